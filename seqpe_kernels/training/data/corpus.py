"""Embedded training data that needs no download (used by ``seqpe-kernels train``).

* LM: ``chronicle.txt`` (~40 KB), a synthetic English "chronicle" produced deterministically by
  :func:`generate_chronicle` below (a small story grammar, lines wrapped at 72 columns, numbered chapters
  and dated entries). Written for this package and dedicated to the public domain (CC0). Regenerate with
  ``python -m seqpe_kernels.training.data.corpus > seqpe_kernels/training/data/chronicle.txt``; a test checks that the
  shipped file equals the generator's output.
* ViT: no file; :func:`seqpe_kernels.training.train.synthetic_images` draws images on the fly.

The generator uses its own 64-bit PRNG (splitmix64), so its output does not depend on the Python version.
"""
from __future__ import annotations

import os
import textwrap
from typing import List, Sequence

__all__ = ["generate_chronicle", "load_chronicle", "CHRONICLE_PATH"]

CHRONICLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chronicle.txt")


class _Rng:
    """splitmix64: tiny, fast enough, identical everywhere."""

    def __init__(self, seed: int):
        self.s = seed & 0xFFFFFFFFFFFFFFFF

    def next(self) -> int:
        self.s = (self.s + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def pick(self, seq: Sequence):
        return seq[self.below(len(seq))]

    def chance(self, num: int, den: int) -> bool:
        return self.below(den) < num


_NAMES = ["Margaret", "Thomas", "Eleanor", "Jonas", "Agnes", "William", "Clara", "Edmund", "Harriet", "Samuel",
          "Lydia", "Robert", "Martha", "Henry", "Beatrice", "Josiah"]
_ROLES = ["the miller", "the schoolmaster", "the old doctor", "the ferryman", "the vicar", "the blacksmith",
          "the widow Hale", "the young clerk", "the shepherd", "the innkeeper", "the captain", "the weaver"]
_PLACES = ["the mill by the river", "the market square", "the chapel on the hill", "the long meadow",
           "the harbour wall", "the inn at the crossroads", "the orchard", "the counting house",
           "the bridge over the weir", "the churchyard", "the north road", "the forge", "the lighthouse"]
_TIMES = ["At dawn", "Before noon", "In the afternoon", "Towards evening", "Late that night", "At first light",
          "When the bells had rung", "After supper", "Long before the frost", "On the following morning"]
_WEATHER = ["the rain came down in grey sheets", "a cold wind blew from the sea", "the sky was clear and pale",
            "a thin fog lay over the fields", "the snow had begun to fall", "the sun stood low and red",
            "thunder rolled beyond the hills", "the air was still and warm"]
_OBJECTS = ["a sealed letter", "an old lantern", "a basket of apples", "a silver watch", "a torn map",
            "a bundle of keys", "a loaf of bread", "a small wooden box", "a ledger bound in leather",
            "a pair of boots", "a length of rope", "a bottle of ink"]
_VERBS_TO = ["walked to", "hurried to", "returned to", "went down to", "climbed up to", "rode out to",
             "wandered towards", "came back to"]
_VERBS_OBJ = ["carried", "found", "lost", "mended", "hid", "sold", "bought", "opened", "examined", "gave away"]
_VERBS_IMP = ["carry", "find", "mend", "hide", "sell", "buy", "open", "examine", "fetch", "return"]
_FEELINGS = ["glad", "uneasy", "weary", "curious", "afraid", "hopeful", "silent", "angry", "content", "troubled"]
_SAYINGS = ["We shall see what the morning brings", "There is no use in waiting", "I have told you all I know",
            "The river is higher than it was", "Nobody has passed this way since Tuesday",
            "You must keep it safe until I return", "It was not I who left the gate open",
            "The price of corn has risen again", "Come in, and close the door behind you",
            "I counted them twice, and there were {n}"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_ORDINALS = ["First", "Second", "Third", "Fourth", "Fifth", "Sixth"]
_ROMAN = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII", "XIII", "XIV", "XV", "XVI",
          "XVII", "XVIII", "XIX", "XX", "XXI", "XXII", "XXIII", "XXIV", "XXV", "XXVI", "XXVII", "XXVIII", "XXIX",
          "XXX"]


def _day(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _person(r: _Rng) -> str:
    return r.pick(_NAMES) if r.chance(1, 2) else r.pick(_ROLES)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _sentence(r: _Rng) -> str:
    k = r.below(7)
    if k == 0:
        return f"{r.pick(_TIMES)} {_person(r)} {r.pick(_VERBS_TO)} {r.pick(_PLACES)}."
    if k == 1:
        return f"{_cap(_person(r))} {r.pick(_VERBS_OBJ)} {r.pick(_OBJECTS)} near {r.pick(_PLACES)}."
    if k == 2:
        return f"{_cap(r.pick(_WEATHER))}, and {_person(r)} was {r.pick(_FEELINGS)}."
    if k == 3:
        said = r.pick(_SAYINGS).format(n=2 + r.below(40))
        return f"\"{said},\" said {_person(r)}."
    if k == 4:
        return (f"{_cap(_person(r))} and {_person(r)} spoke for a long while of {r.pick(_OBJECTS)}, "
                f"but neither would say who had brought it to {r.pick(_PLACES)}.")
    if k == 5:
        return f"It was the {_day(1 + r.below(28))} of {r.pick(_MONTHS)}, and {r.pick(_WEATHER)}."
    return (f"{_cap(_person(r))} {r.pick(_VERBS_TO)} {r.pick(_PLACES)}, where {_person(r)} "
            f"{r.pick(_VERBS_OBJ)} {r.pick(_OBJECTS)}.")


def _paragraph(r: _Rng) -> List[str]:
    if r.chance(1, 6):  # a short numbered list
        n = 2 + r.below(4)
        head = f"{_cap(_person(r))} wrote down what had to be done."
        items = [f"{_ORDINALS[i]}, {r.pick(_VERBS_IMP)} "
                 f"{r.pick(_OBJECTS)} at {r.pick(_PLACES)}." for i in range(n)]
        return [head] + items
    return [" ".join(_sentence(r) for _ in range(3 + r.below(5)))]


def generate_chronicle(seed: int = 1847, target_bytes: int = 40_000, width: int = 72) -> str:
    """The embedded LM corpus: chapters of wrapped paragraphs, deterministic in ``seed``."""
    r = _Rng(seed)
    out: List[str] = ["THE CHRONICLE OF THE MILL TOWN", "", "A synthetic account, generated for seqpe-kernels.", ""]
    size = sum(len(s) + 1 for s in out)
    chapter = 0
    year = 1840
    while size < target_bytes and chapter < len(_ROMAN):
        title = f"CHAPTER {_ROMAN[chapter]}. {_cap(r.pick(_PLACES)[4:]).upper()}"
        chapter += 1
        year += r.below(2)
        block = [title, "", f"Entered in the ledger, {_day(1 + r.below(28))} {r.pick(_MONTHS)}, {year}.", ""]
        for _ in range(4 + r.below(4)):
            for line in _paragraph(r):
                block.extend(textwrap.wrap(line, width=width))
            block.append("")
        out.extend(block)
        size += sum(len(s) + 1 for s in block)
    return "\n".join(out).rstrip("\n") + "\n"


def load_chronicle() -> str:
    with open(CHRONICLE_PATH, "r", encoding="utf-8") as f:
        return f.read()


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.stdout.write(generate_chronicle())
