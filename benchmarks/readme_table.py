"""The README's results tables from bench CSVs, and where the step stands against issue 11's targets.

    python benchmarks/readme_table.py benchmarks/results/<DEVICE>_bench_*.csv [--out tables.md]

One markdown table per config (a row per provider: full step / forward / no-grad time with the speed-up vs
eager, floor ratio, peak memory, and the no-grad output's error against the IEEE-fp32 reference), preceded by
the provenance of the run (device, versions, commit, date) and followed by the targets: the text step's full
step against eager (>= 4x), torch.compile (>= 2x) and compile's reduce-overhead mode (>= 1.3x), and the ViT-S
step's floor ratio (>= 0.90). Paste the output into README.md's Results section.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from seqpe_kernels.bench import CONFIGS, FUSED_PROVIDERS, GRAPH_PROVIDERS, markdown_tables, read_csv  # noqa: E402
from seqpe_kernels.cli import output_path_problem  # noqa: E402

FUSED = tuple(p for p in FUSED_PROVIDERS if p != "cpu") + GRAPH_PROVIDERS
TEXT_TARGETS = (("eager", 4.0), ("compile", 2.0), ("compile-cg", 1.3))
FLOOR_TARGET = 0.90


REQUIRED = ("config", "provider", "mode", "status", "M", "median_ms", "floor_ratio", "speedup_vs_eager", "device")


def _full(rows, config, provider):
    for r in rows:
        if r["config"] == config and r["provider"] == provider and r["mode"] == "full" and \
                r.get("status") in ("ok", "derived") and r["median_ms"] == r["median_ms"]:
            return r
    return None


def _spec_M(rows, config) -> str:
    """'' when the config's rows are at its SEQPE_SPEC §6 step size (the targets are stated there), else why not."""
    ms = sorted({r["M"] for r in rows if r["config"] == config})
    want = CONFIGS[config].M if config in CONFIGS else None
    return "" if ms == [want] else f"measured at M={', '.join(map(str, ms))}, not the spec's M={want}: no verdict"


def targets(rows) -> list:
    out = ["**Targets (issue 11, full training step)**", ""]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    if not any(_full(rows, c, p) for c in configs for p in FUSED):
        return out + ["No fused CUDA provider (" + ", ".join(FUSED) + ") has a full-step row here: no verdicts.", ""]
    off = {c: _spec_M(rows, c) for c in configs}
    for c, why in off.items():
        if why and (c == "text-default" or c.startswith("vits-default")):
            out += [f"- {c}: {why}", ""]
    if "text-default" in configs and not off["text-default"]:
        out += ["| text-default | " + " | ".join(f"vs {b} (≥ {t:g}×)" for b, t in TEXT_TARGETS) + " |",
                "|---|" + "---|" * len(TEXT_TARGETS)]
        base = {b: _full(rows, "text-default", b) for b, _ in TEXT_TARGETS}
        for p in FUSED:
            r = _full(rows, "text-default", p)
            if r is None:
                continue
            cells = []
            for b, t in TEXT_TARGETS:
                if base[b] is None:
                    cells.append("not measured")
                    continue
                x = base[b]["median_ms"] / r["median_ms"]
                cells.append(f"{x:.2f}× {'met' if x >= t else 'NOT met'}")
            out.append(f"| {p} | " + " | ".join(cells) + " |")
        out.append("")
    for c in [c for c in configs if c.startswith("vits-default") and not off[c]]:
        # the floor target is the fp32 step's (the authors' numerics); the TF32 opt-in is reported beside it, its
        # floor taken at the TF32 GEMM rate, without a verdict
        target = c == "vits-default"
        out += [f"| {c} | ms | × eager | floor{f' (≥ {FLOOR_TARGET:g})' if target else ' (no target)'} | "
                "rel err (no-grad) |", "|---|---|---|---|---|"]
        for p in ("eager",) + FUSED:
            r = _full(rows, c, p)
            if r is None:
                continue
            ng = [x for x in rows if x["config"] == c and x["provider"] == p and x["mode"] == "nograd"]
            err = ng[0].get("rel_err", float("nan")) if ng else float("nan")
            verdict = "" if p == "eager" or not target else (" met" if r["floor_ratio"] >= FLOOR_TARGET else " NOT met")
            out.append(f"| {p} | {r['median_ms']:.3f} | {r['speedup_vs_eager']:.2f}× | {r['floor_ratio']:.2f}"
                       f"{verdict} | {'–' if err != err else f'{err:.1e}'} |")
        out.append("")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", nargs="+", help="bench CSVs (seqpe-kernels bench --csv ...)")
    ap.add_argument("--out", help="write the markdown here as well as to stdout")
    a = ap.parse_args(argv)
    why = output_path_problem(a.out) if a.out else None
    if why:
        print(f"readme_table: --out {a.out}: {why}", file=sys.stderr)
        return 2
    rows = []
    for path in a.csv:
        if not os.path.exists(path):
            print(f"readme_table: {path}: no such file", file=sys.stderr)
            return 2
        try:
            mine = read_csv(path)
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
            print(f"readme_table: {path}: not a bench CSV ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        for i, r in enumerate(mine):
            missing = [k for k in REQUIRED if r.get(k) is None or r.get(k) == ""]
            if missing:
                print(f"readme_table: {path}: row {i + 2} lacks {', '.join(missing)} (a truncated or foreign CSV?)",
                      file=sys.stderr)
                return 2
        rows += mine
    if not rows:
        print("readme_table: the CSVs hold no rows", file=sys.stderr)
        return 2
    devices = list(dict.fromkeys(r["device"] for r in rows))
    if len(devices) > 1:  # one table per run: rows of two GPUs would be merged into one table under one heading
        print(f"readme_table: the CSVs come from {len(devices)} devices ({', '.join(devices)}): one device per "
              "table", file=sys.stderr)
        return 2
    seen = {}
    for r in rows:
        k = (r["config"], r["M"], r["provider"], r["mode"])
        if k in seen:
            print(f"readme_table: {k[0]} M={k[1]} {k[2]} {k[3]} appears twice ({seen[k]}, {r.get('date')}): pass one "
                  "run's CSVs", file=sys.stderr)
            return 2
        seen[k] = r.get("date")
    prov = []
    for key in ("device", "torch_version", "triton_version", "cuda_version", "git_commit", "date"):
        vals = list(dict.fromkeys(str(r.get(key, "")) for r in rows))
        prov.append(f"{key.replace('_version', '')} {', '.join(v for v in vals if v) or '-'}")
    text = "\n".join([f"_{'; '.join(prov)}; from {', '.join(os.path.basename(p) for p in a.csv)}_", "",
                      markdown_tables(rows), ""] + targets(rows))
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
