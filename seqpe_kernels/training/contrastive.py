"""The contrastive sampler of the SeqPE training pipeline (``SeqPeContrstiveDataSampler``, SEQPE_SPEC §5.1): pivots,
candidates with hard negatives (string surgery on the digits) or a distributional window, and the labels (the
nearest candidate). Shares the RNG and epoch conventions of :mod:`seqpe_kernels.training.samplers`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..reference.tokenize import max_digits_for
from .samplers import _PIPELINES, SeedLike, _as_rng, _ordered_sample, _to_tensor, epoch_order, grid_positions

__all__ = ["ContrastiveSampler", "ContrastiveBatch"]


@dataclass
class ContrastiveBatch:
    """One contrastive batch (SEQPE_SPEC §5.1).

    ``pivots`` [B] / [B, 2]; ``candidates`` [B*C] / [B*C, 2], pivot-major (row b*C + c); ``labels`` [B] =
    index of the nearest candidate (squared Euclidean distance, ties to the first). Diagnostics: ``modes`` [B]
    (0 simple only, 1 hard negatives, 2 distributional), ``num_special`` [B] (how many of the leading
    candidates of each pivot came from the special method), ``simple_min_sq_dist`` [B] (for mode-1 rows, the
    minimum squared distance to the first C+1-n_hard simple negatives, which hard negatives must exceed; inf
    elsewhere).
    """
    pivots: torch.Tensor
    candidates: torch.Tensor
    labels: torch.Tensor
    contrastive_size: int
    modes: np.ndarray = field(repr=False)
    num_special: np.ndarray = field(repr=False)
    simple_min_sq_dist: np.ndarray = field(repr=False)

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])




class _Uniforms:
    """Buffered uniforms from a Generator (the hard-negative surgery makes many scalar draws)."""

    def __init__(self, rng: np.random.Generator, size: int = 4096):
        self.rng, self.size = rng, size
        self.buf, self.i = rng.random(size), 0

    def random(self) -> float:
        if self.i >= self.size:
            self.buf, self.i = self.rng.random(self.size), 0
        u = self.buf[self.i]
        self.i += 1
        return float(u)

    def randint(self, a: int, b: int) -> int:
        """Uniform integer in [a, b] (inclusive, like Python's random.randint)."""
        return a + min(int(self.random() * (b - a + 1)), b - a)


class ContrastiveSampler:
    """Contrastive pivot / candidate sampler (``SeqPeContrstiveDataSampler``, SEQPE_SPEC §5.1).

    Args:
      max_position: ``pe_max_position``. Pivot set: 0..max-1 (1-D) or {0..G-1}^2 with G = floor(sqrt(max))
        (2-D).
      contrastive_size: C, candidates per pivot (text 32, image 64).
      batch_size: B_c pivots per batch.
      n_batch_per_epoch: batches per epoch (the reference uses len(train loader) x multiplier); None = one
        pass over the pivot set.
      data_dim: 1 or 2.
      pipeline: 'text' or 'image' -- selects the method probabilities (text: 0.4 hard / 0.6 distributional;
        image: 0.5 simple / 0.3 hard / 0.2 distributional), the hard-negative ratio (0.25 / 0.2), the default
        distributional range R (256 / 196, fixed at 196 in the image pipeline) and the 1-D distributional
        window rule (text: start ~ floor((max-R) U); image: start ~ floor(max U), truncated at max).
      max_digits: K per axis; derived from ``max_position`` like the reference if None.
      dist_sample_range, hard_neg_ratio, method_probs: override the pipeline's values.
      range_limited_dist_window: 1-D distributional start rule. Default: the pipeline's own (text: start ~
        floor((max - R) U); image: start ~ floor(max U), windows truncated at max). True for the image pipeline
        is the fix of §8.3 item 13: start ~ floor((max - len) U), len = max(R, 5C).
      max_edit_attempts: safety cap on string-edit attempts per hard negative (the reference loops until it
        succeeds, which can spin for ever on degenerate tiny position ranges); a capped attempt yields no
        hard negative.

    Candidates for one pivot: C+1 simple negatives uniformly without replacement from the pivot set; a
    special list (none / hard negatives / a distributional window sample); merged as special ++ simple with
    duplicates and the pivot removed, first C kept. The pivot is never its own candidate; the candidates
    contain the positive (the nearest one), whose index is the label.
    """

    def __init__(self, max_position: int, contrastive_size: int, batch_size: int,
                 n_batch_per_epoch: Optional[int] = None, data_dim: int = 1, pipeline: str = "text",
                 max_digits: Optional[int] = None, dist_sample_range: Optional[int] = None,
                 hard_neg_ratio: Optional[float] = None, method_probs: Optional[Sequence[float]] = None,
                 range_limited_dist_window: Optional[bool] = None, seed: SeedLike = None,
                 max_edit_attempts: int = 10000):
        if pipeline not in _PIPELINES:
            raise ValueError(f"pipeline must be 'text' or 'image', got {pipeline!r}")
        if data_dim not in (1, 2):
            raise ValueError(f"data_dim must be 1 or 2, got {data_dim}")
        probs, ratio, R = _PIPELINES[pipeline]
        self.pipeline = pipeline
        self.data_dim = data_dim
        self.max_position = int(max_position)
        self.C = int(contrastive_size)
        self.batch_size = int(batch_size)
        if self.C < 1 or self.batch_size < 1:
            raise ValueError("contrastive_size and batch_size must be >= 1")
        self.max_digits = int(max_digits) if max_digits else max_digits_for(self.max_position, data_dim)
        self.method_probs = tuple(float(p) for p in (method_probs if method_probs is not None else probs))
        if len(self.method_probs) != 3 or any(p < 0 for p in self.method_probs) or \
                abs(sum(self.method_probs) - 1) > 1e-9:
            raise ValueError(f"method_probs must be 3 non-negative numbers summing to 1, got {method_probs}")
        self.hard_neg_ratio = float(hard_neg_ratio if hard_neg_ratio is not None else ratio)
        self.n_hard = int(self.C * self.hard_neg_ratio)
        self.dist_sample_range = int(dist_sample_range if dist_sample_range is not None else R)
        self.range_limited_dist_window = (pipeline == "text") if range_limited_dist_window is None \
            else bool(range_limited_dist_window)
        self.max_edit_attempts = int(max_edit_attempts)
        if data_dim == 1:
            self.n_max = self.max_position  # bound of edited values
            self.n_pivots = self.max_position
        else:
            self.G = math.isqrt(self.max_position)
            self.n_max = self.G * self.G
            self.n_pivots = self.G * self.G
        if self.n_pivots < self.C + 1:
            raise ValueError(f"the pivot set ({self.n_pivots}) must hold at least C+1 = {self.C + 1} positions")
        if 10 ** self.max_digits < (self.max_position if data_dim == 1 else self.G):
            raise ValueError(f"max_digits={self.max_digits} cannot encode the pivot range")
        self.n_batch_per_epoch = int(n_batch_per_epoch) if n_batch_per_epoch else \
            -(-self.n_pivots // self.batch_size)
        self.rng = _as_rng(seed)
        self._u = _Uniforms(self.rng)
        self.epoch = -1
        self._new_epoch()

    # ---------------------------------------------------------------- pivot-set indexing
    def _coords(self, idx: np.ndarray) -> np.ndarray:
        """Pivot-set indices -> positions ([n] 1-D, [n, 2] 2-D row-major)."""
        if self.data_dim == 1:
            return idx.astype(np.int64)
        return np.stack([idx // self.G, idx % self.G], axis=-1).astype(np.int64)

    def _new_epoch(self):
        self.epoch += 1
        self._order = epoch_order(self.rng, self.n_pivots, self.n_batch_per_epoch, self.batch_size)
        self.batch_ptr = 0

    def __iter__(self):
        return self

    def __next__(self) -> ContrastiveBatch:
        return self.next()

    def next(self) -> ContrastiveBatch:
        if self.batch_ptr >= self.n_batch_per_epoch:
            self._new_epoch()
        s = self.batch_ptr * self.batch_size
        self.batch_ptr += 1
        return self.prepare_batch(self._coords(self._order[s:s + self.batch_size]))

    # ---------------------------------------------------------------- hard negatives
    def _edit_insert(self, s: str) -> Optional[str]:
        n = len(s)
        if n == self.max_digits:  # per-axis K even in 2-D (reference behaviour)
            return None
        pos = self._u.randint(0, n)
        d = self._u.randint(1, 9) if pos == 0 else self._u.randint(0, 9)
        r = s[:pos] + str(d) + s[pos:]
        return None if int(r) >= self.n_max else r

    def _edit_delete(self, s: str) -> Optional[str]:
        n = len(s)
        if n == 1:
            return None
        pos = self._u.randint(0, n - 1)
        while pos == 0 and s[1] == "0":  # never create a leading zero
            pos = self._u.randint(1, n - 1)
        return s[:pos] + s[pos + 1:]

    def _two_positions(self, n: int) -> Tuple[int, int]:
        i = self._u.randint(0, n - 1)
        j = self._u.randint(0, n - 2)
        j = j + 1 if j >= i else j
        return (i, j) if i < j else (j, i)

    def _edit_swap(self, s: str) -> Optional[str]:
        n = len(s)
        if n == 1 or (n == 2 and (s[1] == "0" or s[0] == s[1])):
            return None

        def swapped(i, j):
            c = list(s)
            c[i], c[j] = c[j], c[i]
            return "".join(c)

        i, j = self._two_positions(n)
        r = swapped(i, j)
        tries = 0
        while (i == 0 and s[j] == "0") or r == s:
            if tries == 10:
                return None
            i, j = self._two_positions(n)
            r = swapped(i, j)
            tries += 1
        return None if int(r) >= self.n_max else r

    def _edit_replace(self, s: str) -> Optional[str]:
        n = len(s)
        pos, d = self._u.randint(0, n - 1), self._u.randint(0, 9)
        while (pos == 0 and d == 0) or str(d) == s[pos]:
            pos, d = self._u.randint(0, n - 1), self._u.randint(0, 9)
        r = s[:pos] + str(d) + s[pos + 1:]
        return None if int(r) >= self.n_max else r

    def _hard_negative_value(self, pivot_str: str) -> Optional[int]:
        """E ~ U{1,2,3} successful compounding edits (insert / swap / replace / delete) of the pivot string."""
        ops = (self._edit_insert, self._edit_swap, self._edit_replace, self._edit_delete)
        n_edits = self._u.randint(1, 3)
        done, cur = 0, pivot_str
        for _ in range(self.max_edit_attempts):
            if done == n_edits:
                return int(cur)
            r = ops[self._u.randint(0, 3)](cur)
            if r is not None and r != pivot_str:  # an edit that reproduces the pivot does not count
                done += 1
                cur = r
        return int(cur) if done == n_edits else None

    def _split_2d(self, value: int) -> Tuple[int, int]:
        """Split the edited concatenated string back into (row, col) at a random valid cut (§5.1)."""
        x = str(value)
        K = self.max_digits
        if len(x) < 2:
            x = (x + "0") if self._u.random() < 0.5 else ("0" + x)
        while True:
            k = self._u.randint(1, K)
            if 0 < len(x) - k <= K:
                return int(x[:k]), int(x[k:])

    def generate_hard_negatives(self, pivot, n_hard: int, min_sq_dist: float = 0.0) -> list:
        """Up to ``n_hard`` hard negatives of ``pivot`` (int, or (row, col)), each kept only if its squared
        distance to the pivot is strictly greater than ``min_sq_dist``.

        2-D: (r, c) -> the integer of str(r)+str(c), edited, then split at a random cut into two parts of at
        most K digits each. Coordinates of a 2-D hard negative can exceed G-1 (up to 10^K - 1) when G is not a
        power of ten, as in the reference; they are always encodable.

        Edits work on strings, as in the reference, so an edit such as "0" -> "00" counts as a change while its
        value equals the pivot; such results have distance 0 and never pass the strict distance test.
        """
        out = []
        if self.data_dim == 1:
            p = int(pivot)
            p_str = str(p)
            for _ in range(n_hard):
                v = self._hard_negative_value(p_str)
                if v is not None and (v - p) ** 2 > min_sq_dist:
                    out.append(v)
        else:
            r, c = (int(v) for v in pivot)
            p_str = str(int(str(r) + str(c)))
            for _ in range(n_hard):
                v = self._hard_negative_value(p_str)
                if v is None:
                    continue
                hr, hc = self._split_2d(v)
                if (hr - r) ** 2 + (hc - c) ** 2 > min_sq_dist:
                    out.append((hr, hc))
        return out

    # ---------------------------------------------------------------- distributional
    def distributional_sample(self) -> np.ndarray:
        """C positions (fewer if the window is small) from a contiguous window not centred on any pivot."""
        C, u = self.C, self._u
        if self.data_dim == 1:
            R, n_max = self.dist_sample_range, self.max_position
            length = max(R, 5 * C)
            if self.range_limited_dist_window:
                start = int((n_max - (R if self.pipeline == "text" else length)) * u.random())
            else:
                start = int(n_max * u.random())
            start = max(start, 0)
            end = min(start + length, n_max)
            pool = np.arange(start, end, dtype=np.int64)
        else:
            G = self.G
            side = max(math.isqrt(self.dist_sample_range), math.isqrt(5 * C))
            r0, c0 = int((G - side) * u.random()), int((G - side) * u.random())
            r0, c0 = max(r0, 0), max(c0, 0)
            pool = grid_positions(r0, c0, min(side + r0, G) - r0, min(side + c0, G) - c0)
        n = len(pool)
        take_all = n <= C if self.pipeline == "text" else n < C
        if take_all:
            return pool
        return pool[_ordered_sample(self.rng, n, C, 1)[0]]

    # ---------------------------------------------------------------- one batch
    def _key(self, pos: np.ndarray) -> np.ndarray:
        """Scalar key of positions (2-D coordinates are < 10^K)."""
        if self.data_dim == 1:
            return pos.astype(np.int64)
        return pos[..., 0].astype(np.int64) * (10 ** self.max_digits) + pos[..., 1]

    def _sq_dist(self, pivots: np.ndarray, cands: np.ndarray) -> np.ndarray:
        """pivots [B(,2)], cands [B, n(,2)] -> squared distances [B, n] (exact integers)."""
        if self.data_dim == 1:
            return (cands - pivots[:, None]) ** 2
        return ((cands - pivots[:, None, :]) ** 2).sum(-1)

    def prepare_batch(self, pivots: np.ndarray, modes: Optional[np.ndarray] = None) -> ContrastiveBatch:
        """Candidates and labels for given pivots ([B] or [B, 2]). ``modes`` forces the special method."""
        pivots = np.asarray(pivots, dtype=np.int64)
        B, C = len(pivots), self.C
        simple = self._coords(_ordered_sample(self.rng, self.n_pivots, C + 1, B))  # [B, C+1(, 2)]
        simple_d = self._sq_dist(pivots, simple)
        if modes is None:
            u = self.rng.random(B)
            p0, p1, _ = self.method_probs
            modes = (u >= p0).astype(np.int64) + (u >= p0 + p1)
        modes = np.asarray(modes, dtype=np.int64)
        cand_shape = (B, C) if self.data_dim == 1 else (B, C, 2)
        cands = np.empty(cand_shape, dtype=np.int64)
        num_special = np.zeros(B, dtype=np.int64)
        simple_min = np.full(B, np.inf)
        piv_keys = self._key(pivots)
        for b in range(B):
            if modes[b] == 1 and self.n_hard > 0:
                m = simple_d[b, :C + 1 - self.n_hard].min()
                simple_min[b] = m
                special = np.asarray(self.generate_hard_negatives(pivots[b], self.n_hard, m), dtype=np.int64)
            elif modes[b] == 2:
                special = self.distributional_sample()
            else:
                special = np.zeros((0,) if self.data_dim == 1 else (0, 2), dtype=np.int64)
            special = special.reshape((-1,) if self.data_dim == 1 else (-1, 2))
            merged = np.concatenate([special, simple[b]], axis=0)
            keys = self._key(merged)
            _, first = np.unique(keys, return_index=True)
            first.sort()
            first = first[keys[first] != piv_keys[b]][:C]
            if len(first) < C:  # impossible: C+1 distinct simple negatives, at most one is the pivot
                raise RuntimeError("fewer than C candidates after merging")
            cands[b] = merged[first]
            num_special[b] = int((first < len(special)).sum())
        labels = np.argmin(self._sq_dist(pivots, cands), axis=1)  # first minimum on ties
        flat = cands.reshape(B * C) if self.data_dim == 1 else cands.reshape(B * C, 2)
        return ContrastiveBatch(_to_tensor(pivots), _to_tensor(flat), _to_tensor(labels), C, modes,
                                num_special, simple_min)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_ptr": self.batch_ptr, "order": self._order.copy(),
                "rng": self.rng.bit_generator.state, "u_buf": self._u.buf.copy(), "u_i": self._u.i}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_ptr = int(state["epoch"]), int(state["batch_ptr"])
        self._order = np.asarray(state["order"], dtype=np.int64)
        self.rng.bit_generator.state = state["rng"]
        self._u.buf, self._u.i = np.asarray(state["u_buf"]), int(state["u_i"])


# ============================================================================================ transfer
