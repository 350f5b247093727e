"""Position-embedding cache and prefix sharing, measured on CPU (ratios in one process; SEQPE_SPEC §4.5, §2.8).

(a) SeqPECache hit for 16 384 positions vs recomputing them with the encoder (target >= 50x), sparse and
    dense mode.
(b) eval forward of positions 0..32767 with the text config (D=768, 12 heads, K=5, 2 layers, causal):
    prefix_shared_forward vs module.forward (target >= 2.5x), with the max abs difference of the outputs.

Everything runs under torch.inference_mode(), after a warm-up; times are medians of --repeats runs.
Usage:  python benchmarks/bench_cache.py [--repeats 3] [--quick] [--csv out.csv]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from seqpe_kernels import SeqPE  # noqa: E402
from seqpe_kernels.cache import SeqPECache  # noqa: E402
from seqpe_kernels.dedup import prefix_shared_forward, prefix_trie_stats  # noqa: E402


def timeit(fn, repeats):
    ts = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def text_encoder():
    torch.manual_seed(0)
    m = SeqPE(768, 12, 5, num_layers=2, attn_direction="causal", out_dim=768)
    with torch.no_grad():  # trained-looking weights rather than the init (LN weights 1, zero biases)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each expensive forward (median)")
    ap.add_argument("--hit-repeats", type=int, default=50, help="timed runs of each cache hit (median)")
    ap.add_argument("--quick", action="store_true", help="8x fewer positions (smoke run)")
    ap.add_argument("--csv", default=None, help="append the figures to this CSV")
    args = ap.parse_args()
    n_hit = 16384 // (8 if args.quick else 1)
    n_eval = 32768 // (8 if args.quick else 1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, commit {git_commit()}")
    m = text_encoder()
    rows = []

    with torch.inference_mode():
        # warm-up (allocator, thread pool, first-call overheads)
        warm = torch.arange(1024)
        m(warm)
        prefix_shared_forward(m, warm)

        # ---------------------------------------------------------------- (a) cache hit vs recompute
        g = torch.Generator().manual_seed(0)
        pos = torch.randperm(n_hit, generator=g)  # 0..n_hit-1 in random order
        t_rec, ref = timeit(lambda: m(pos), args.repeats)
        print(f"\n(a) {n_hit} positions, text config: recompute (module.forward) median {t_rec * 1e3:.1f} ms")
        for mode in ("sparse", "dense"):
            c = SeqPECache(m, mode=mode, max_bytes=1 << 30)
            if mode == "dense":
                c.precompute(range(n_hit))
            else:
                c(pos)  # fill
            for _ in range(3):
                c(pos)  # warm the hit path
            t_hit, out = timeit(lambda: c(pos), args.hit_repeats)
            diff = (out - ref).abs().max().item()
            ratio = t_rec / t_hit
            print(f"    cache hit ({mode:6s}) median {t_hit * 1e3:8.3f} ms  -> {ratio:9.1f}x faster "
                  f"(target >= 50x: {'PASS' if ratio >= 50 else 'FAIL'}), max |diff| {diff:.2e}, "
                  f"stats {c.stats()}")
            rows.append(dict(case=f"cache_hit_{mode}", n=n_hit, t_base_s=t_rec, t_new_s=t_hit, ratio=ratio,
                             max_abs_diff=diff))

        # ---------------------------------------------------------------- (b) prefix sharing at eval
        pos = torch.arange(n_eval)
        st = prefix_trie_stats(m, pos)
        t_ref, ref = timeit(lambda: m(pos), args.repeats)
        t_pre, out = timeit(lambda: prefix_shared_forward(m, pos), args.repeats)
        diff = (out - ref).abs().max().item()
        rel = diff / ref.abs().max().item()
        ratio = t_ref / t_pre
        print(f"\n(b) positions 0..{n_eval - 1}, text config (D=768, H=12, K=5, 2 layers, causal), eval:")
        print(f"    token-states: {st['token_states']} with prefix sharing vs {st['reference_token_states']} "
              f"(levels {st['levels']}, CLS {st['cls']})")
        print(f"    module.forward median {t_ref:.2f} s; prefix_shared_forward median {t_pre:.2f} s "
              f"-> {ratio:.2f}x (target >= 2.5x: {'PASS' if ratio >= 2.5 else 'FAIL'})")
        print(f"    max |out - ref| = {diff:.3e} (relative to max |ref| {rel:.2e})")
        rows.append(dict(case="prefix_sharing_eval", n=n_eval, t_base_s=t_ref, t_new_s=t_pre, ratio=ratio,
                         max_abs_diff=diff))

    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["date", "commit", "device", "torch", "threads", "repeats", "case",
                                              "n", "t_base_s", "t_new_s", "ratio", "max_abs_diff"])
            if new:
                w.writeheader()
            for r in rows:
                w.writerow(dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=git_commit(),
                                device=f"cpu ({platform.machine()})", torch=torch.__version__,
                                threads=torch.get_num_threads(), repeats=args.repeats, **r))


if __name__ == "__main__":
    main()
