"""``seqpe-kernels study`` (seqpe_kernels/training/study.py): the smoke test of the whole command at toy size (seconds),
the JSON rows, table and plot, diverged runs reported rather than dropped, and usage errors (exit 2, one line)."""
import json
import math

import numpy as np
import pytest

from seqpe_kernels import cli
from seqpe_kernels.training import study as S

KEYS = {"task", "pe", "seed", "scale", "length", "metric", "value"}


def test_study_quick_toy_lm_smoke(tmp_path, capsys):
    js, png, md = tmp_path / "s.json", tmp_path / "s.png", tmp_path / "s.md"
    rc = cli.main(["study", "--task", "lm", "--quick", "--toy", "--no-progress", "--json", str(js), "--plot",
                   str(png), "--md", str(md)])
    assert rc == 0
    rows = json.loads(js.read_text())
    assert isinstance(rows, list) and all(KEYS <= set(r) for r in rows)
    pes = ["seqpe", "learned", "sinusoidal", "rope", "alibi", "none"]
    assert list(dict.fromkeys(r["pe"] for r in rows)) == pes  # every PE, in order
    assert len(rows) == len(pes) * 2 * 2  # 2 seeds x 2 scales at toy size
    assert {r["seed"] for r in rows} == {0, 1} and {r["scale"] for r in rows} == {1.0, 2.0}
    assert {r["length"] for r in rows} == {8, 16} and {r["metric"] for r in rows} == {"perplexity"}
    assert all(r["status"] == "ok" and 1.0 < r["value"] < 1000 for r in rows)
    assert png.stat().st_size > 5000
    out = capsys.readouterr().out
    for pe in pes:
        assert pe in out
    assert "±" in out and "2× / 1×" in out
    text = md.read_text()
    assert "seqpe-kernels study --task lm --quick --toy" in text and "commit" in text and "| seqpe |" in text
    shared = next(l for l in text.splitlines() if l.startswith("Settings shared by every run: "))
    seqpe_only = next(l for l in text.splitlines() if l.startswith("SeqPE runs also: "))
    assert "pe_dim=" not in shared and "contrastive_size=" not in shared and "model_dim=" in shared
    assert "pe_dim=16" in seqpe_only and "contrastive_size=" in seqpe_only and "model_dim=" not in seqpe_only
    assert all(r["steps"] == 3 for r in rows)
    # --from-json: the same table and a redrawn plot, without training
    png2 = tmp_path / "again.png"
    assert cli.main(["study", "--from-json", str(js), "--plot", str(png2)]) == 0
    again = capsys.readouterr().out
    assert png2.stat().st_size > 5000
    table = [l for l in out.splitlines() if l.startswith(("PE ", "seqpe ", "alibi "))]
    assert table and all(l in again for l in table)


def test_study_toy_vit_subset(tmp_path, capsys):
    js = tmp_path / "v.json"
    rc = cli.main(["study", "--task", "vit", "--toy", "--pe", "seqpe", "rope", "none", "--seeds", "1",
                   "--no-progress", "--json", str(js), "--plot", ""])
    assert rc == 0
    rows = json.loads(js.read_text())
    assert [r["pe"] for r in rows] == ["seqpe"] * 2 + ["rope"] * 2 + ["none"] * 2
    assert all(r["metric"] == "accuracy" and 0 <= r["value"] <= 1 for r in rows)
    assert [r["length"] for r in rows[:2]] == [2, 4]  # patches per grid side
    assert "accuracy" in capsys.readouterr().out


def test_diverged_runs_are_reported_not_dropped(tmp_path, monkeypatch, capsys):
    from seqpe_kernels.training import train as T

    real = T.train

    def fake(cfg, log=print, progress_desc=None):
        r = real(cfg, log=log, progress_desc=progress_desc)
        if cfg.pe == "none" and cfg.seed == 1:
            r["losses"][1] = float("nan")
        return r

    monkeypatch.setattr(T, "train", fake)
    js = tmp_path / "d.json"
    rc = cli.main(["study", "--toy", "--pe", "rope", "none", "--no-progress", "--json", str(js), "--plot", ""])
    assert rc == 0
    rows = json.loads(js.read_text())
    bad = [r for r in rows if r["pe"] == "none" and r["seed"] == 1]
    assert len(bad) == 2 and all(r["status"] == "diverged" and r["value"] is None for r in bad)
    assert all(r["status"] == "ok" for r in rows if r not in bad)
    out = capsys.readouterr().out
    assert "DIVERGED at step 1" in out and "1/2 diverged" in out and "1 diverged (reported" in out


def test_summary_and_table():
    rows = [dict(task="lm", pe=pe, seed=s, scale=sc, length=int(8 * sc), metric="perplexity", value=v, status="ok")
            for pe, vals in (("a", {1.0: (10.0, 12.0), 4.0: (11.0, 13.2)}), ("b", {1.0: (5.0, 5.0), 4.0: (50.0, 5.0)}))
            for sc, vs in vals.items() for s, v in enumerate(vs)]
    rows[-1] = dict(rows[-1], value=None, status="diverged")
    summ = {(s["pe"], s["scale"]): s for s in S.summarize(rows)}
    assert summ[("a", 1.0)]["mean"] == 11.0 and summ[("a", 1.0)]["std"] == pytest.approx(math.sqrt(2))
    assert summ[("b", 4.0)]["n_ok"] == 1 and summ[("b", 4.0)]["diverged"] == 1 and summ[("b", 4.0)]["std"] == 0.0
    table = S.format_table({"rows": rows, "task": "lm"})
    assert "+10.0 % ± 0.0" in table  # a: 11/10 and 13.2/12 -> +10 % for both seeds
    assert "50.00 ± 0.00 (1/2 diverged)" in table
    md = S.format_table({"rows": rows, "task": "lm"}, markdown=True)
    assert md.splitlines()[0].startswith("| PE | 1× (8) | 4× (32) |")


@pytest.mark.parametrize("argv,msg", [
    (["--task", "vit", "--pe", "alibi"], "not available for --task vit"),
    (["--seeds", "0"], "must be >= 1"),
    (["--quick", "--large"], "not allowed with"),
    (["--pe", "wavelet"], "invalid choice"),
    (["--steps", "-3"], "must be >= 1"),
    (["--data", "/no/such/file"], "no such file"),
    (["--from-json", "/no/such.json"], "no such file"),
])
def test_study_usage_errors(capsys, argv, msg):
    rc = cli.main(["study", "--toy", "--no-progress", "--plot", "", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err
    assert len([l for l in err.strip().splitlines() if not l.startswith("usage") and not l.startswith(" ")]) == 1


def test_presets_cover_both_tasks():
    for name, p in S.PRESETS.items():
        assert set(p) == {"lm", "vit"} and all(p[t]["seeds"] >= 1 for t in p), name
    assert S.PRESETS["quick"]["lm"]["seeds"] >= 2 and S.PRESETS["quick"]["vit"]["seeds"] >= 2
    assert S.STUDY_SCALES["lm"] == (1.0, 2.0, 4.0, 8.0, 16.0) and S.STUDY_SCALES["vit"] == (1.0, 2.0, 3.0, 4.0)


def _rows():
    return [dict(task="lm", pe=pe, seed=seed, scale=sc, length=int(8 * sc), metric="perplexity",
                 value=100.0 + seed + sc, status="ok", steps=3)
            for pe in ("seqpe", "rope") for seed in (0, 1) for sc in (1.0, 2.0)]


def _set(i, **kw):
    def f(rows):
        rows[i].update(kw)
        return rows
    return f


@pytest.mark.parametrize("bad,msg", [
    (_set(0, value=float("nan")), "finite value goes with status ok"),
    (_set(0, value=float("inf")), "finite value goes with status ok"),
    (_set(0, value=None, status="ok"), "finite value goes with status ok"),
    (_set(0, status="diverged"), "finite value goes with status ok"),  # diverged with a value
    (_set(0, status="banana"), "status one of"),
    (_set(0, pe=7), "pe must be a name"),
    (_set(0, scale=float("nan")), "positive finite"),
    (_set(0, scale=0.0), "positive finite"),
    (lambda rows: rows + [dict(rows[0])], "appears twice"),
    (lambda rows: [r for r in rows if not (r["pe"] == "rope" and r["scale"] == 2.0)], "lacks scale"),
    (lambda rows: [dict(r, task="vit", metric="accuracy") if r["pe"] == "rope" else r for r in rows],
     "more than one task"),
], ids=["nan", "inf", "null", "diverged-with-value", "status", "pe", "scale-nan", "scale-0", "dup", "missing",
        "mixed"])
def test_from_json_refuses_rows_it_would_misreport(bad, msg, tmp_path, capsys):
    """Such rows printed 'nan ± nan', averaged unknown statuses into ratios, counted duplicates twice, titled
    perplexities as accuracies, or ended in a bare StopIteration."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps(_rows()))
    assert cli.main(["study", "--from-json", str(path)]) == 0
    capsys.readouterr()
    path.write_text(json.dumps(bad(_rows())))
    assert cli.main(["study", "--from-json", str(path)]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err, err


@pytest.mark.parametrize("flag", [["--md", "x.md"], ["--json", "x.json"], ["--task", "vit"], ["--seeds", "2"]])
def test_from_json_refuses_flags_it_would_ignore(flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(_rows()))
    assert cli.main(["study", "--from-json", str(path)] + flag) == 2
    assert f"{flag[0]} would be ignored" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists() and not (tmp_path / "x.json").exists()


def test_table_cells_are_mean_std_and_the_mean_ratio_over_seeds():
    """A cell is mean ± std (ddof 1) over seeds; the last column the mean ± std of the per-seed ratio
    largest-scale / smallest-scale (mutants: the cell's spread as max - mean, the ratio of the last seed only --
    the suite's rows had equal per-seed ratios and one-value cells)."""
    vals = {1.0: (10.0, 12.0), 4.0: (12.0, 16.8)}  # per-seed ratios 1.2 and 1.4
    rows = [dict(task="lm", pe="a", seed=s, scale=sc, length=int(8 * sc), metric="perplexity", value=v, status="ok")
            for sc, vs in vals.items() for s, v in enumerate(vs)]
    table = S.format_table({"rows": rows, "task": "lm"}, markdown=True)
    line = next(ln for ln in table.splitlines() if ln.startswith("| a |"))
    assert line == "| a | 11.00 ± 1.41 | 14.40 ± 3.39 | +30.0 % ± 14.1 |", line
