"""The benchmark's outputs: the CSV (tidy, with provenance columns), the printed table, the speed-up plot."""
from __future__ import annotations

import csv
import math
import os
from typing import List

import torch

from .configs import CONFIGS, CSV_COLUMNS, CUDA_GRAPH_PROVIDERS, MODE_FLOP_FACTOR, MODES, PROVIDERS, QUICK_FWD_FLOPS

def write_csv(rows: List[dict], path: str):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt_csv(r.get(k, "")) for k in CSV_COLUMNS})


_NUMERIC = ("M", "T", "tokens", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "host_ms", "tflops", "floor_ratio",
            "speedup_vs_eager", "rel_err", "gemm_tflops", "ref_gflop", "floor_gflop", "warmup_s")


def read_csv(path: str) -> List[dict]:
    """Rows of a bench CSV, numbers as numbers (empty cells: NaN), as ``run_bench`` returned them."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in _NUMERIC:
            if k in r:
                v = r[k]
                r[k] = float("nan") if v in ("", None) else (int(v) if k in ("M", "T", "tokens") else float(v))
        if "quick" in r:
            r["quick"] = r["quick"] in ("True", "true", "1")
    return rows


def _fmt_csv(v):
    if isinstance(v, float):
        return "" if v != v else f"{v:.6g}"
    return v


def _f(v, fmt):
    if v is None or (isinstance(v, float) and v != v) or v == "":
        width = fmt.split(".")[0]  # (padded like a number, so the columns after it stay under their headers)
        return "-".rjust(int(width) if width.isdigit() else 0)
    return format(v, fmt)


def format_table(rows: List[dict], quick: bool = False, device=None) -> str:
    lines = []
    if rows:
        r0 = rows[0]
        lines.append(f"SeqPE encoder benchmark  device: {r0['device']}  torch {r0['torch_version']}  "
                     f"triton {r0['triton_version'] or '-'}  CUDA {r0['cuda_version'] or '-'}  commit {r0['git_commit']}")
    off_spec = sorted({(r["config"], r["M"]) for r in rows
                       if r["config"] in CONFIGS and r["M"] != CONFIGS[r["config"]].M})
    if quick:
        lines.append("QUICK mode: short timing budget" + (
            f"; M scaled down so one reference forward is ~{QUICK_FWD_FLOPS / 1e9:.0f} GFLOP unless --M gave it"
            if off_spec else "") + ".")
    if off_spec:
        lines.append("NOT the SEQPE_SPEC §6 step size: " + ", ".join(
            f"{c} at M={m} (spec M={CONFIGS[c].M})" for c, m in off_spec) + ".")
    if device is not None and torch.device(device).type == "cpu":
        lines.append("CPU timings are only meaningful as ratios measured in the same run.")
    hdr = (f"{'provider':<9} {'mode':<8} {'median ms':>10} {'p20':>9} {'p80':>9} {'mem MB':>8} {'host ms':>8} "
           f"{'TFLOP/s':>8} {'floor':>6} {'vs eager':>8} {'rel err':>8}")
    points = []
    for r in rows:
        k = (r["config"], r["M"])
        if k not in points:
            points.append(k)
    skipped = {}
    for name, M in points:
        mine = [r for r in rows if r["config"] == name and r["M"] == M]
        r0 = mine[0]
        lines.append("")
        lines.append(f"== {name}  M={M} T={r0['T']} tokens={r0['tokens']} dtype={r0['dtype']}  "
                     f"fwd {r0['ref_gflop'] / MODE_FLOP_FACTOR[r0['mode']]:.2f} GFLOP (floor "
                     f"{r0['floor_gflop'] / MODE_FLOP_FACTOR[r0['mode']]:.2f})  "
                     f"GEMM rate {r0['gemm_tflops']:.3g} TFLOP/s")
        lines.append(hdr)
        for r in mine:
            if r["status"] == "skipped":
                skipped.setdefault((r["provider"], r["note"]), set()).add(name)
                continue
            if r["status"] == "failed":
                lines.append(f"{r['provider']:<9} {r['mode']:<8} FAILED: {r['note']}")
                continue
            if r["status"] == "wrong":
                lines.append(f"{r['provider']:<9} {r['mode']:<8} WRONG ({_f(r['median_ms'], '.3f')} ms, not a result): "
                             f"{r['note']}")
                continue
            mark = "*" if r["status"] == "derived" else ""
            lines.append(f"{r['provider']:<9} {r['mode']:<8} {_f(r['median_ms'], '10.3f')}{mark:1}"
                         f"{_f(r['p20_ms'], '9.3f')} {_f(r['p80_ms'], '9.3f')} {_f(r['peak_mem_mb'], '8.1f')} "
                         f"{_f(r['host_ms'], '8.3f')} {_f(r['tflops'], '8.4f')} {_f(r['floor_ratio'], '6.3f')} "
                         f"{_f(r['speedup_vs_eager'], '7.2f')}x {_f(r.get('rel_err'), '8.1e')}")
    if any(r["status"] == "derived" for r in rows):
        lines.append("* backward derived as full - forward (retained-graph backward not supported by that provider)")
    if skipped:
        lines.append("")
        lines.append("skipped providers:")
        for (p, why), names in sorted(skipped.items()):
            lines.append(f"  {p:<8} {why}")
    lines.append("floor = (minimal exact GEMM FLOPs / measured GEMM rate) / time; 1.0 = at the floor.")
    if any(isinstance(r.get("rel_err"), float) and r["rel_err"] == r["rel_err"] for r in rows):
        lines.append("rel err (no-grad rows) = max |out - ref| / max |ref| against the eager reference's eval output "
                     "in IEEE fp32 (no autocast, no TF32).")
    return "\n".join(lines)


def _md(v, fmt, suffix=""):
    return "–" if v is None or (isinstance(v, float) and v != v) or v == "" else format(v, fmt) + suffix


def markdown_tables(rows: List[dict]) -> str:
    """One markdown table per (config, M): a row per provider with the full step, forward and no-grad times,
    speed-up vs eager, floor ratio, peak memory and the no-grad output's error (the README's results format)."""
    out = []
    points = []
    for r in rows:
        if (r["config"], r["M"]) not in points:
            points.append((r["config"], r["M"]))
    cols = [("full", "full step"), ("forward", "forward"), ("nograd", "no-grad")]
    for name, M in points:
        mine = [r for r in rows if r["config"] == name and r["M"] == M]
        r0 = mine[0]
        have = [(m, t) for m, t in cols if any(r["mode"] == m for r in mine)]
        out.append(f"**{name}** (M={M}, T={r0['T']}, {r0['dtype']}; GEMM rate {_md(r0['gemm_tflops'], '.3g')} "
                   f"TFLOP/s{'; QUICK timing' if r0.get('quick') else ''})")
        out.append("")
        head = ["provider"]
        for _, t in have:
            head += [f"{t} ms (× eager)", "floor", "peak MB"]
        head.append("rel err")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        notes = []
        for p in [p for p in PROVIDERS if any(r["provider"] == p for r in mine)]:
            by = {r["mode"]: r for r in mine if r["provider"] == p}
            if all(r.get("status") not in ("ok", "derived") for r in by.values()):
                # nothing measured: one line under the table instead of a row of dashes
                why = dict.fromkeys(f"{r.get('status')}: {r.get('note', '')}" for r in by.values())
                notes.append(f"{p}: " + "; ".join(why))
                continue
            cells, err = [p], float("nan")
            for m, _ in have:
                r = by.get(m)
                if r is None or r.get("status") not in ("ok", "derived"):
                    cells += ["–" if r is None else r.get("status", "–"), "–", "–"]
                    if r is not None:
                        notes.append(f"{p} {m}: {r.get('status')}: {r.get('note', '')}")
                    continue
                derived = " †" if r.get("status") == "derived" else ""
                # a graph replay's activations sit in its pool (allocated at capture): CSVs from before the bench
                # left that cell blank hold a per-replay figure that is not comparable with the other rows
                mem = "‡" if p in CUDA_GRAPH_PROVIDERS else _md(r["peak_mem_mb"], ".0f")
                cells += [f"{_md(r['median_ms'], '.3f')} ({_md(r['speedup_vs_eager'], '.2f', '×')}){derived}",
                          _md(r["floor_ratio"], ".2f"), mem]
                if m == "nograd":
                    err = r.get("rel_err", float("nan"))
            cells.append(_md(err, ".1e"))
            out.append("| " + " | ".join(cells) + " |")
        if notes:
            out.append("")
            out += [f"- {n}" for n in dict.fromkeys(notes)]
        out.append("")
    out.append("floor = (minimal exact GEMM FLOPs / GEMM rate measured in the same run) / time (1.0 = at the floor); "
               "† = backward timed as full - forward (CUDA-graph replay); rel err = max |out - ref| / max |ref| of "
               "the no-grad output against the eager reference in IEEE fp32"
               + ("; ‡ = peak memory not measured for CUDA-graph replay (its activations live in the graph's pool, "
                  "allocated at capture)." if any(r["provider"] in CUDA_GRAPH_PROVIDERS for r in rows) else "."))
    return "\n".join(out)


def plot(rows: List[dict], path: str):
    """Speed-up vs eager: bars per config/mode, or lines over M when a config was swept."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") in ("ok", "derived") and r["provider"] != "eager"
          and r.get("speedup_vs_eager") == r.get("speedup_vs_eager")]
    names = []
    for r in rows:
        if r["config"] not in names:
            names.append(r["config"])
    n = max(len(names), 1)
    ncol = min(n, 3)
    nrow = int(math.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 3.8 * nrow), squeeze=False)
    title = rows[0]["device"] if rows else ""
    for i, name in enumerate(names):
        ax = axes[i // ncol][i % ncol]
        mine = [r for r in ok if r["config"] == name]
        Ms = sorted({r["M"] for r in rows if r["config"] == name})
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        if len(Ms) > 1:
            for key in sorted({(r["provider"], r["mode"]) for r in mine}):
                pts = sorted((r["M"], r["speedup_vs_eager"]) for r in mine if (r["provider"], r["mode"]) == key)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]}/{key[1]}")
            ax.set_xscale("log")
            ax.set_xlabel("M (sequences)")
        else:
            modes = [m for m in MODES if any(r["mode"] == m for r in rows if r["config"] == name)]
            provs = [p for p in PROVIDERS if any(r["provider"] == p for r in mine)]
            width = 0.8 / max(len(provs), 1)
            for j, p in enumerate(provs):
                xs, ys = [], []
                for k, m in enumerate(modes):
                    v = [r["speedup_vs_eager"] for r in mine if r["provider"] == p and r["mode"] == m]
                    if v:
                        xs.append(k + (j - (len(provs) - 1) / 2) * width)
                        ys.append(v[0])
                bars = ax.bar(xs, ys, width=width, label=p)
                for b_, v in zip(bars, ys):
                    ax.annotate(f"{v:.3g}x", (b_.get_x() + b_.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=6, xytext=(0, 1), textcoords="offset points")
            ax.set_xticks(range(len(modes)))
            ax.set_xticklabels(modes)
        dt = next((r["dtype"] for r in rows if r["config"] == name), "")
        ax.set_title(f"{name} ({dt}, M={','.join(map(str, Ms))})", fontsize=9)
        ax.set_ylabel("speed-up vs eager (log)")
        ax.set_yscale("log")
        if mine:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no provider besides eager ran", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8)
    for j in range(len(names), nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    fig.suptitle(f"SeqPE encoder: speed-up vs eager reference -- {title}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
