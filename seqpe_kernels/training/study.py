"""``seqpe-kernels study``: does SeqPE extrapolate better than the baseline position encodings?

For one task it trains every position encoding asked for (:data:`seqpe_kernels.training.baselines.PE_CHOICES`: SeqPE and
the baselines learned / sinusoidal / rope / alibi / none; the ViT takes their 2-D forms and has no ALiBi) with the
same model, data, steps and seed set (``seqpe-kernels train`` with ``--pe``), evaluates each run at the task's
scales -- LM perplexity at 1x, 2x, 4x, 8x, 16x the training length, ViT accuracy at 1x-4x the training grid side
-- and prints mean +- std over seeds per PE and scale, with a plot (metric vs scale, one line per PE, a band from
the lowest to the highest seed). ``--json`` writes one row per (pe, seed, scale): ``task, pe, seed, scale,
length, metric, value`` (``length``: tokens for the LM, patches per grid side for the ViT) plus ``status``
(``ok``, ``diverged``: a non-finite training loss or evaluation, reported with ``value`` null instead of being
dropped, or ``n/a``: a length the encoder has no positions for -- a learned table's rows, SeqPE's digits -- or,
for the LM, longer than the held-out text, which is never replaced by training text). ``--md`` writes a report
with the command,
device, commit, date, timings and the table.

Sizes (:data:`PRESETS`): ``--quick`` (3 seeds, short runs: minutes on 2 CPU cores), the default (more steps,
ViT 5 seeds: well under 45 minutes on 2 CPU cores), ``--large`` (a bigger model and longer runs, meant for a
GPU). Models and data are the ``train`` task defaults (tiny byte-level GPT-2 on the embedded 40 KB text; tiny
ViT on the synthetic side-of-a-boundary task). On a CPU the study runs torch single-threaded (``--threads``): these models
are tiny and a second thread only adds contention.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["PRESETS", "STUDY_SCALES", "add_arguments", "run", "run_study", "summarize", "format_table",
           "plot_study", "write_report"]

STUDY_SCALES = {"lm": (1.0, 2.0, 4.0, 8.0, 16.0), "vit": (1.0, 2.0, 3.0, 4.0)}

# TrainConfig overrides per preset and task ('seeds' is the default seed count). Fields not named take the
# `train` task defaults (seqpe_kernels.training.train.TASK_DEFAULTS); the regularisers are on for SeqPE only.
PRESETS: Dict[str, Dict[str, dict]] = {
    # CI smoke test: seconds in all
    "toy": {
        "lm": dict(seeds=2, steps=3, batch_size=4, block_size=8, model_dim=16, model_layers=1, model_heads=2,
                   pe_dim=16, pe_heads=2, pe_layers=1, max_position=256, contrastive_size=4, contrastive_batch=2,
                   transfer_size=4, transfer_batch=2, eval_tokens=256, eval_scales=(1.0, 2.0)),
        "vit": dict(seeds=2, steps=3, batch_size=8, img_size=8, patch_size=4, model_dim=16, model_layers=1,
                    model_heads=2, pe_dim=16, pe_heads=2, pe_layers=1, max_position=64, contrastive_size=4,
                    contrastive_batch=2, transfer_size=4, transfer_batch=2, eval_samples=32,
                    eval_scales=(1.0, 2.0)),
    },
    # 2-core CPU, one torch thread, measured: LM quick ~3 min, default ~12 min; ViT quick ~4.5 min, default ~11 min
    "quick": {
        "lm": dict(seeds=3, steps=500),
        "vit": dict(seeds=3, steps=1000),
    },
    "default": {
        "lm": dict(seeds=3, steps=2000),
        "vit": dict(seeds=5, steps=1500),
    },
    # for a GPU (not run on the 2-core development machines): a 4-layer d=256 LM on 256-token windows (16x =
    # 4096) and a 4-layer d=128 ViT on an 8x8 grid; give the LM a real corpus with --data (the embedded one is
    # 40 KB and a model this size overfits it)
    "large": {
        "lm": dict(seeds=3, steps=5000, batch_size=32, lr=1e-3, block_size=256, model_dim=256, model_layers=4,
                   model_heads=4, pe_dim=128, pe_heads=4, max_position=8192, eval_tokens=65536),
        "vit": dict(seeds=3, steps=5000, batch_size=128, img_size=32, patch_size=4, model_dim=128, model_layers=4,
                    model_heads=4, pe_dim=64, pe_heads=2, max_position=4096, eval_samples=2048),
    },
}


# ---------------------------------------------------------------------------------------------------- running
def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def run_study(task: str, pes: Sequence[str], seeds: int, preset: str = "quick", steps: Optional[int] = None,
              device: Optional[str] = None, backend: str = "auto", data: Optional[str] = None,
              progress: bool = True, log=print) -> dict:
    """Train and evaluate every (pe, seed); returns ``{"rows", "runs", "settings", "wall_s"}``."""
    from .train import TrainConfig, train

    kw = {k: v for k, v in PRESETS[preset][task].items() if k != "seeds"}
    if steps is not None:
        kw["steps"] = steps
    kw.setdefault("eval_scales", STUDY_SCALES[task])
    rows: List[dict] = []
    runs: List[dict] = []
    n_runs, i = len(pes) * seeds, 0
    t_all = time.perf_counter()
    settings = None
    for pe in pes:
        for seed in range(seeds):
            i += 1
            cfg = TrainConfig(task=task, pe=pe, seed=seed, backend=backend, device=device, data=data,
                              progress=progress, **kw)
            t0 = time.perf_counter()
            r = train(cfg, log=lambda *a, **k: None, progress_desc=f"[{i}/{n_runs}] {task} {pe} seed {seed}")
            wall = time.perf_counter() - t0
            if settings is None:
                settings = {k: v for k, v in r["config"].items()
                            if k not in ("pe", "seed", "pe_method", "pe_qk", "contrastive_weight",
                                         "transfer_weight", "shift_rate", "encoder_backend", "max_digits",
                                         "pe_out_dim", "progress", "resume", "cuda_graphs",
                                         "encoder_cuda_graphs", "do_eval", "world_size", "position_streams",
                                         "device")
                            and v is not None}
            losses, main = r["losses"], r["main"]
            bad_step = next((s for s, v in enumerate(losses) if not _finite(v)), None)
            ev = r["eval"]
            diverged = bad_step is not None or any(row["value"] is not None and not _finite(row["value"])
                                                   for row in ev["rows"])
            for row in ev["rows"]:
                length = row["length"] if task == "lm" else row["grid"]
                status = "diverged" if diverged else ("ok" if row["value"] is not None else "n/a")
                out = dict(task=task, pe=pe, seed=seed, scale=row["scale"], length=length, metric=ev["metric"],
                           value=row["value"] if status == "ok" else None, status=status, steps=cfg.steps
                           if cfg.steps is not None else r["config"]["steps"])
                if row.get("note"):
                    out["note"] = row["note"]
                rows.append(out)
            run = dict(pe=pe, seed=seed, status="diverged" if diverged else "ok", train_s=round(r["time_s"], 2),
                       wall_s=round(wall, 2), first_loss=main[0], final_loss=float(np.mean(main[-10:])),
                       encoder_backend=r["config"]["encoder_backend"])
            if bad_step is not None:
                run["diverged_at_step"] = bad_step
            runs.append(run)
            word = "DIVERGED" + (f" at step {bad_step}" if bad_step is not None else " (non-finite evaluation)") \
                if diverged else f"final main loss {run['final_loss']:.3f}"
            vals = " ".join(f"{x['scale']:g}x:{x['value']:.3f}" if x["value"] is not None else f"{x['scale']:g}x:-"
                            for x in rows[-len(ev['rows']):])
            log(f"  [{i}/{n_runs}] {pe:<10} seed {seed}: {word}, {ev['metric']} {vals} ({wall:.0f}s)")
            del r
    return {"rows": rows, "runs": runs, "settings": settings or {}, "wall_s": time.perf_counter() - t_all,
            "task": task, "pes": list(pes), "seeds": seeds, "preset": preset}


# ---------------------------------------------------------------------------------------------------- summary
def summarize(rows: Sequence[dict]) -> List[dict]:
    """Per (pe, scale): mean, std (ddof 1), min, max over the seeds with a value; counts of diverged / n/a runs."""
    out = []
    keys = []
    for r in rows:
        k = (r["pe"], r["scale"])
        if k not in keys:
            keys.append(k)
    for pe, scale in keys:
        sel = [r for r in rows if r["pe"] == pe and r["scale"] == scale]
        v = np.array([r["value"] for r in sel if r["status"] == "ok"], dtype=float)
        out.append(dict(pe=pe, scale=scale, length=sel[0]["length"], metric=sel[0]["metric"], n=len(sel),
                        n_ok=len(v), diverged=sum(r["status"] == "diverged" for r in sel),
                        na=sum(r["status"] == "n/a" for r in sel),
                        mean=float(v.mean()) if len(v) else None,
                        std=float(v.std(ddof=1)) if len(v) > 1 else (0.0 if len(v) else None),
                        min=float(v.min()) if len(v) else None, max=float(v.max()) if len(v) else None))
    return out


def _ratio_last_to_first(rows: Sequence[dict], pe: str) -> Optional[tuple]:
    """Per seed, value at the largest scale / value at the smallest; (mean, std) over seeds."""
    sel = [r for r in rows if r["pe"] == pe]
    scales = sorted({r["scale"] for r in sel})
    if len(scales) < 2:
        return None
    rs = []
    for seed in sorted({r["seed"] for r in sel}):
        a = next((r["value"] for r in sel if r["seed"] == seed and r["scale"] == scales[0]), None)
        b = next((r["value"] for r in sel if r["seed"] == seed and r["scale"] == scales[-1]), None)
        if _finite(a) and _finite(b) and a > 0:
            rs.append(b / a)
    if not rs:
        return None
    return float(np.mean(rs)), float(np.std(rs, ddof=1)) if len(rs) > 1 else 0.0


def format_table(study: dict, markdown: bool = False) -> str:
    """The table: one row per PE, one column per scale, ``mean ± std`` over seeds (``k/n diverged`` noted)."""
    rows = study["rows"]
    summ = summarize(rows)
    if not summ:
        return "(no results)"
    metric = summ[0]["metric"]
    scales = sorted({s["scale"] for s in summ})
    pes = list(dict.fromkeys(s["pe"] for s in summ))
    lengths = {s["scale"]: s["length"] for s in summ}
    fmt = (lambda m, s: f"{m:.2f} ± {s:.2f}") if metric == "perplexity" else (lambda m, s: f"{m:.3f} ± {s:.3f}")
    unit = "tokens" if study["task"] == "lm" else "grid"
    head = ["PE"] + [f"{sc:g}× ({lengths[sc]}{'' if unit == 'tokens' else 'x' + str(lengths[sc])})" for sc in scales]
    ratio_name = f"{scales[-1]:g}× / {scales[0]:g}×"
    head.append(ratio_name)
    body = []
    for pe in pes:
        line = [pe]
        for sc in scales:
            s = next(x for x in summ if x["pe"] == pe and x["scale"] == sc)
            cell = fmt(s["mean"], s["std"]) if s["mean"] is not None else ("n/a" if s["na"] == s["n"] else "–")
            notes = []
            if s["diverged"]:
                notes.append(f"{s['diverged']}/{s['n']} diverged")
            if s["na"] and s["mean"] is not None:
                notes.append(f"{s['na']}/{s['n']} n/a")
            if notes:
                cell += f" ({', '.join(notes)})"
            line.append(cell)
        rr = _ratio_last_to_first(rows, pe)
        if rr is None:
            line.append("–")
        elif metric == "perplexity":
            line.append(f"{(rr[0] - 1) * 100:+.1f} % ± {rr[1] * 100:.1f}")
        else:
            line.append(f"{rr[0]:.2f} ± {rr[1]:.2f}")
        body.append(line)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(out)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(out)


def _title(study: dict) -> str:
    rows = study["rows"]
    first = min(r["scale"] for r in rows)
    n = next(r["length"] for r in rows if r["scale"] == first)  # the training length / grid side
    if study["task"] == "lm":
        what = f"LM perplexity on held-out text, trained on {n}-token windows (lower is better)"
    else:
        what = f"ViT accuracy on the synthetic task, trained on a {n}x{n} patch grid (higher is better)"
    steps = study["settings"].get("steps") or next((r["steps"] for r in rows if r.get("steps")), None)
    return (f"{what}; mean ± std over {study['seeds']} seed(s)" + (f", {steps} steps each" if steps else "") +
            f" (preset {study['preset']})")


def study_from_rows(rows: Sequence[dict], preset: str = "?") -> dict:
    """A study dict (for :func:`format_table` / :func:`plot_study`) from the rows of a ``--json`` file."""
    if not rows:
        raise ValueError("no rows")
    return {"rows": list(rows), "runs": [], "settings": {}, "wall_s": 0.0, "task": rows[0]["task"],
            "pes": list(dict.fromkeys(r["pe"] for r in rows)), "seeds": len({r["seed"] for r in rows}),
            "preset": preset}


# ---------------------------------------------------------------------------------------------------- outputs
def plot_study(study: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(study["rows"])
    metric = summ[0]["metric"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for pe in dict.fromkeys(s["pe"] for s in summ):
        ss = [s for s in summ if s["pe"] == pe and s["mean"] is not None]
        if not ss:
            continue
        x = [s["scale"] for s in ss]
        n_div = max((s["diverged"] for s in summ if s["pe"] == pe), default=0)
        label = pe + (f" ({n_div}/{ss[0]['n']} diverged)" if n_div else "")
        line, = ax.plot(x, [s["mean"] for s in ss], "o-", lw=2.2 if pe == "seqpe" else 1.4, label=label)
        ax.fill_between(x, [s["min"] for s in ss], [s["max"] for s in ss], color=line.get_color(), alpha=0.15)
    scales = sorted({s["scale"] for s in summ})
    if metric == "perplexity":
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("evaluation length / training length")
    else:
        ax.set_xlabel("evaluation grid side / training grid side")
        ax.axhline(1.0 / 8, color="gray", ls=":", lw=1, label="chance")
        ax.axhline(0.25, color="gray", ls="--", lw=1, label="position-blind ceiling")
        ax.set_ylim(0, 1.02)
    ax.set_xticks(scales)
    ax.set_xticklabels([f"{s:g}x" for s in scales])
    from matplotlib.ticker import NullLocator

    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylabel(metric)
    ax.set_title(_title(study).split(";")[0] + f"\n{study['seeds']} seeds: lines = mean, bands = min..max",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_description(device: Optional[str]) -> str:
    import torch

    if device is not None and device.startswith("cuda") or (device is None and torch.cuda.is_available()):
        return torch.cuda.get_device_name(torch.device(device or "cuda"))
    from ..bench.timing import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"


def write_report(study: dict, path: str, command: str) -> None:
    """Markdown: provenance (command, device, torch, commit, date, wall time), the table, per-run timings."""
    import torch

    from .config import _SEQPE_ONLY

    st = study["settings"]
    lines = [f"# `seqpe-kernels study --task {study['task']}` ({study['preset']})", "",
             f"- command: `{command}`",
             f"- device: {study.get('device', '?')}",
             f"- torch {torch.__version__}, python {platform.python_version()}",
             f"- commit: {study.get('commit', '?')} (at the start" +
             ("; -dirty: the working tree had uncommitted changes)" if "dirty" in study.get("commit", "") else ")"),
             f"- date: {study.get('date', '?')} (start)",
             f"- wall time: {study['wall_s'] / 60:.1f} min for {len(study['runs'])} runs", "",
             _title(study) + ":", "", format_table(study, markdown=True), "",
             "Settings shared by every run: " + ", ".join(f"{k}={v}" for k, v in st.items()
                                                         if k != "task" and k not in _SEQPE_ONLY) + ".",
             "SeqPE runs also: " + ", ".join(f"{k}={v}" for k, v in st.items() if k in _SEQPE_ONLY) + ".",
             "SeqPE trains with its contrastive and transfer regularisers and the random window shift; the "
             "baselines without them (positions 0..N-1 only).", "",
             "| pe | seed | status | first main loss | final main loss (mean of the last 10 steps) | train s | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in study["runs"]:
        lines.append(f"| {r['pe']} | {r['seed']} | {r['status']} | {r['first_loss']:.3f} | {r['final_loss']:.3f} | "
                     f"{r['train_s']:.1f} | {r['wall_s']:.1f} |")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    from .baselines import PE_CHOICES
    from ..cli import output_path, positive_int, usable_device

    p.add_argument("--task", choices=["lm", "vit"], default="lm", help="language model or ViT (default lm)")
    p.add_argument("--pe", nargs="+", choices=list(PE_CHOICES), default=None, metavar="PE",
                   help=f"position encodings to compare ({', '.join(PE_CHOICES)}; default all of the task's: the "
                        "ViT has no alibi)")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="seeds 0..N-1 per PE (default: quick 3, default 3 (lm) / 5 (vit), large 3)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="3 seeds of short runs (LM 500 steps, ViT 1000): ~3 (LM) / ~4.5 (ViT) min on 2 CPU "
                           "cores for all PEs")
    size.add_argument("--large", action="store_true",
                      help="a bigger model and longer runs, for a GPU (see PRESETS in seqpe_kernels/training/study.py)")
    p.add_argument("--toy", action="store_true", help=argparse.SUPPRESS)  # CI smoke size (seconds); wins over the rest
    p.add_argument("--steps", type=positive_int, default=None, help="training steps per run (default: the preset's)")
    p.add_argument("--json", default=None, metavar="PATH", type=output_path(),
                   help="write the rows (task, pe, seed, scale, length, metric, value, status) as a JSON list")
    p.add_argument("--plot", default=None, metavar="PATH", type=output_path(""),
                   help="PNG: metric vs scale, one line per PE, bands over seeds (default "
                        "study-<task>-<preset>.png; '' for none)")
    p.add_argument("--md", default=None, metavar="PATH", type=output_path(),
                   help="write a markdown report (command, device, commit, date, timings, the table)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="lm: a UTF-8 text file; vit: an image folder (default: the embedded data)")
    p.add_argument("--device", default=None, type=usable_device, help="cpu or cuda[:i] (default: cuda if present)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda", "cpu"],
                   help="SeqPE encoder backend (default auto)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default 1 on a CPU: faster for these tiny models on a shared machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--from-json", default=None, metavar="PATH", type=_existing_file,
                   help="train nothing: print the table of a --json file and redraw its --plot")


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


_STATUSES = ("ok", "diverged", "n/a")


def _check_rows(rows) -> None:
    """ValueError unless ``rows`` are one study's rows as ``--json`` writes them: one task and metric, a finite
    value exactly where the status is ok, each (pe, seed, scale) once, every PE at every scale."""
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and {"task", "pe", "seed", "scale", "length", "metric", "value"} <= set(r)
            for r in rows):
        raise ValueError("not a list of study rows")
    for r in rows:
        r.setdefault("status", "ok" if r["value"] is not None else "diverged")
        for k, kind in (("value", (int, float, type(None))), ("scale", (int, float)), ("length", int),
                        ("seed", int)):
            if isinstance(r[k], bool) or not isinstance(r[k], kind):
                raise ValueError(f"row {r!r}: {k} must be a number, got {r[k]!r}")
        if not isinstance(r["pe"], str) or r["task"] not in ("lm", "vit") or r["status"] not in _STATUSES:
            raise ValueError(f"row {r!r}: pe must be a name, task lm or vit, status one of {', '.join(_STATUSES)}")
        if not (math.isfinite(r["scale"]) and r["scale"] > 0):
            raise ValueError(f"row {r!r}: scale must be a positive finite number")
        if (r["status"] == "ok") != _finite(r["value"]):
            raise ValueError(f"row {r!r}: a finite value goes with status ok, and only with it")
    for k in ("task", "metric"):
        vals = sorted({str(r[k]) for r in rows})
        if len(vals) > 1:
            raise ValueError(f"rows of more than one {k} ({', '.join(vals)}): one study per table")
    seen = set()
    for r in rows:
        key = (r["pe"], r["seed"], r["scale"])
        if key in seen:
            raise ValueError(f"pe {key[0]} seed {key[1]} scale {key[2]:g} appears twice")
        seen.add(key)
    scales = sorted({r["scale"] for r in rows})
    for pe in dict.fromkeys(r["pe"] for r in rows):
        have = {r["scale"] for r in rows if r["pe"] == pe}
        if have != set(scales):
            raise ValueError(f"pe {pe} lacks scale(s) {', '.join(f'{s:g}' for s in scales if s not in have)}")


def _replot(args) -> int:
    from ..cli import UsageError

    # what --from-json does not use: the training flags and the other outputs (it only prints and redraws --plot)
    unused = [f"--{k.replace('_', '-')}" for k, default in (("task", "lm"), ("pe", None), ("seeds", None),
                                                              ("quick", False), ("large", False), ("toy", False),
                                                              ("steps", None), ("json", None), ("md", None),
                                                              ("data", None), ("device", None), ("backend", "auto"),
                                                              ("threads", None))
              if getattr(args, k, default) != default]
    if unused:
        raise UsageError(f"--from-json trains nothing and writes only --plot: {' '.join(unused)} would be ignored")
    try:
        with open(args.from_json) as f:
            rows = json.load(f)
        _check_rows(rows)
    except (OSError, ValueError) as e:
        raise UsageError(f"--from-json {args.from_json}: {e}") from None
    base = os.path.basename(args.from_json)
    preset = next((p for p in PRESETS if f"-{p}" in base), "?")
    study = study_from_rows(rows, preset)
    print(_title(study) + ":")
    print(format_table(study))
    if args.plot:
        plot_study(study, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this study (the flags that change results)."""
    parts = ["seqpe-kernels study", f"--task {args.task}"]
    if args.pe:
        parts.append("--pe " + " ".join(dict.fromkeys(args.pe)))
    for flag in ("quick", "large", "toy"):
        if getattr(args, flag):
            parts.append(f"--{flag}")
    for name in ("seeds", "steps", "data", "device", "threads"):
        v = getattr(args, name)
        if v is not None:
            parts.append(f"--{name} {v}")
    if args.backend != "auto":
        parts.append(f"--backend {args.backend}")
    for name in ("json", "plot", "md"):
        v = getattr(args, name)
        if v:
            parts.append(f"--{name} {v}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``seqpe-kernels study``; returns the exit code."""
    import torch

    from .baselines import PE_CHOICES, VIT_PE_CHOICES
    from ..cli import UsageError

    if args.from_json:
        return _replot(args)
    choices = PE_CHOICES if args.task == "lm" else VIT_PE_CHOICES
    pes = list(dict.fromkeys(args.pe)) if args.pe else list(choices)
    bad = [p for p in pes if p not in choices]
    if bad:
        raise UsageError(f"--pe {' '.join(bad)}: not available for --task {args.task} "
                         f"(choose from {', '.join(choices)})")
    if args.data is not None and not os.path.exists(args.data):
        raise UsageError(f"--data {args.data}: no such file or directory")
    preset = "toy" if args.toy else "quick" if args.quick else "large" if args.large else "default"
    seeds = args.seeds or PRESETS[preset][args.task]["seeds"]
    on_cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    if args.threads is not None or on_cpu:
        torch.set_num_threads(args.threads or 1)
    plot_path = f"study-{args.task}-{preset}.png" if args.plot is None else args.plot
    command = _command(args)
    from ..bench.timing import git_commit

    commit, started = git_commit(), datetime.datetime.now(datetime.timezone.utc)  # what ran, and when
    print(f"seqpe-kernels study: task={args.task} preset={preset} PEs={' '.join(pes)} seeds={seeds} "
          f"({len(pes) * seeds} runs)")
    from ..backend import BackendUnavailable
    from .train import MissingDependency

    try:
        study = run_study(args.task, pes, seeds, preset, steps=args.steps, device=args.device,
                          backend=args.backend, data=args.data, progress=not args.no_progress)
    except (ValueError, BackendUnavailable, MissingDependency) as e:
        raise UsageError(str(e)) from None
    study.update(device=device_description(args.device), commit=commit,
                 date=started.strftime("%Y-%m-%d %H:%M UTC"))
    print()
    print(_title(study) + ":")
    print(format_table(study))
    n_div = sum(r["status"] == "diverged" for r in study["runs"])
    print(f"{len(study['runs'])} runs in {study['wall_s'] / 60:.1f} min" +
          (f"; {n_div} diverged (reported above, not dropped)" if n_div else ""))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(study["rows"], f, indent=1)
        print(f"wrote {args.json}")
    if plot_path:
        try:
            plot_study(study, plot_path)
            print(f"wrote {plot_path}")
        except ImportError as e:
            print(f"seqpe-kernels study: no plot ({e})", file=sys.stderr)
    if args.md:
        write_report(study, args.md, command)
        print(f"wrote {args.md}")
    return 0
