"""Position-embedding cache and prefix sharing, measured in one process (SEQPE_SPEC §4.5, §2.8).

(a) SeqPECache hit for 16 384 positions vs recomputing them with the encoder (target >= 50x), sparse and
    dense mode.
(b) eval forward of positions 0..32767 with the text config (D=768, 12 heads, K=5, 2 layers, causal):
    prefix_shared_forward vs module.forward (target >= 2.5x), with the max abs difference of the outputs.

(c) CUDA only: the cache's row gather (Triton) and torch's index_select against the device's copy
    bandwidth, measured in the same run (a large device-to-device copy, bytes read + written; target: the
    gather at >= 70%), and the whole cache hit call (lookup + gather) as effective bandwidth.

Everything runs under torch.inference_mode(), after a warm-up; times are medians of --repeats runs (CPU) or
of triton.testing.do_bench (CUDA events). On CUDA, (b) also times the fused Triton encoder without prefix
sharing, the honest baseline there.
Usage:  python benchmarks/bench_cache.py [--device cuda] [--repeats 3] [--quick] [--csv out.csv]
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

from seqpe_kernels import FusedSeqPE, SeqPE  # noqa: E402
from seqpe_kernels.savings.cache import SeqPECache  # noqa: E402
from seqpe_kernels.savings.dedup import prefix_shared_forward, prefix_trie_stats  # noqa: E402


def timeit(fn, repeats, device="cpu"):
    if torch.device(device).type == "cuda":
        import triton.testing

        out = fn()
        ms = triton.testing.do_bench(fn, warmup=25, rep=max(100, 20 * repeats), return_mode="median")
        return ms / 1e3, out
    ts = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def text_encoder(device="cpu"):
    torch.manual_seed(0)
    m = SeqPE(768, 12, 5, num_layers=2, attn_direction="causal", out_dim=768).to(device)
    with torch.no_grad():  # trained-looking weights rather than the init (LN weights 1, zero biases)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def gather_bandwidth(dev, m, args):
    """(c): copy bandwidth, row gathers and the cache hit call, all as bytes read + written per second."""
    import triton.testing

    from seqpe_kernels.ops.gather import gather_rows

    def bw(fn, nbytes):
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        return nbytes / (ms / 1e3) / 1e9, ms

    rows = []
    src = torch.randn(256 << 20, device=dev)  # 1 GiB fp32: far past L2
    dst = torch.empty_like(src)
    copy_gbs, copy_ms = bw(lambda: dst.copy_(src), 2 * src.numel() * 4)
    del src, dst
    print(f"\n(c) {torch.cuda.get_device_name(dev)}: device-to-device copy of 1 GiB: {copy_gbs:.0f} GB/s "
          f"(read + write, {copy_ms:.3f} ms)")
    g = torch.Generator(device=dev).manual_seed(0)
    for n_tab, D, M, dt in ((32768, 768, 32768, torch.float32), (32768, 768, 262144, torch.float32),
                            (32768, 768, 262144, torch.bfloat16), (10000, 384, 262144, torch.float32)):
        tab = torch.randn(n_tab, D, device=dev).to(dt)
        idx = torch.randint(0, n_tab, (M,), device=dev, generator=g)
        nbytes = 2 * M * D * tab.element_size() + idx.numel() * 8
        ref = tab.index_select(0, idx)
        assert torch.equal(gather_rows(tab, idx), ref), "Triton gather differs from index_select"
        t_gbs, t_ms = bw(lambda: gather_rows(tab, idx), nbytes)
        i_gbs, i_ms = bw(lambda: tab.index_select(0, idx), nbytes)
        print(f"    gather {M:6d} rows of a {n_tab}x{D} {str(dt)[6:]} table: Triton {t_gbs:5.0f} GB/s "
              f"({t_gbs / copy_gbs:4.0%} of copy, target >= 70%: {'PASS' if t_gbs >= 0.7 * copy_gbs else 'FAIL'}); "
              f"index_select {i_gbs:5.0f} GB/s ({i_gbs / copy_gbs:4.0%})")
        rows.append(dict(case=f"gather_triton_{n_tab}x{D}_{str(dt)[6:]}_M{M}", n=M, t_base_s=copy_ms / 1e3,
                         t_new_s=t_ms / 1e3, ratio=t_gbs / copy_gbs, max_abs_diff=0.0))
        rows.append(dict(case=f"gather_index_select_{n_tab}x{D}_{str(dt)[6:]}_M{M}", n=M, t_base_s=copy_ms / 1e3,
                         t_new_s=i_ms / 1e3, ratio=i_gbs / copy_gbs, max_abs_diff=0.0))
        del tab, idx, ref
    # the whole cache hit (validation, lookup, gather) for a 32768-position eval window, dense and sparse
    pos = torch.randint(0, 32768, (262144,), device=dev, generator=g)
    for mode in ("dense", "sparse"):
        c = SeqPECache(m, mode=mode, max_bytes=1 << 30)
        c.precompute(range(32768))
        ref = m(pos[:4096])
        assert (c(pos[:4096]) - ref).abs().max().item() < 1e-4
        nbytes = 2 * pos.numel() * 768 * 4
        gbs, ms = bw(lambda: c(pos), nbytes)
        print(f"    SeqPECache hit ({mode:6s}) for {pos.numel()} positions: {ms:.3f} ms, {gbs:.0f} GB/s effective "
              f"({gbs / copy_gbs:.0%} of copy)")
        rows.append(dict(case=f"cache_hit_{mode}_effective_bw_M{pos.numel()}", n=pos.numel(),
                         t_base_s=copy_ms / 1e3, t_new_s=ms / 1e3, ratio=gbs / copy_gbs, max_abs_diff=0.0))
    return rows


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
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity with the CPU figures
    n_hit = 16384 // (8 if args.quick else 1)
    n_eval = 32768 // (8 if args.quick else 1)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})"
    print(f"torch {torch.__version__}, {dev_name}, {torch.get_num_threads()} threads, commit {git_commit()}")
    m = text_encoder(dev)
    rows = []

    with torch.inference_mode():
        # warm-up (allocator, thread pool, first-call overheads)
        warm = torch.arange(1024, device=dev)
        m(warm)
        prefix_shared_forward(m, warm)

        # ---------------------------------------------------------------- (a) cache hit vs recompute
        g = torch.Generator().manual_seed(0)
        pos = torch.randperm(n_hit, generator=g).to(dev)  # 0..n_hit-1 in random order
        t_rec, ref = timeit(lambda: m(pos), args.repeats, dev)
        print(f"\n(a) {n_hit} positions, text config: recompute (module.forward) median {t_rec * 1e3:.1f} ms")
        for mode in ("sparse", "dense"):
            c = SeqPECache(m, mode=mode, max_bytes=1 << 30)
            if mode == "dense":
                c.precompute(range(n_hit))
            else:
                c(pos)  # fill
            for _ in range(3):
                c(pos)  # warm the hit path
            t_hit, out = timeit(lambda: c(pos), args.hit_repeats, dev)
            diff = (out - ref).abs().max().item()
            ratio = t_rec / t_hit
            print(f"    cache hit ({mode:6s}) median {t_hit * 1e3:8.3f} ms  -> {ratio:9.1f}x faster "
                  f"(target >= 50x: {'PASS' if ratio >= 50 else 'FAIL'}), max |diff| {diff:.2e}, "
                  f"stats {c.stats()}")
            rows.append(dict(case=f"cache_hit_{mode}", n=n_hit, t_base_s=t_rec, t_new_s=t_hit, ratio=ratio,
                             max_abs_diff=diff))

        # ---------------------------------------------------------------- (b) prefix sharing at eval
        pos = torch.arange(n_eval, device=dev)
        st = prefix_trie_stats(m, pos)
        t_ref, ref = timeit(lambda: m(pos), args.repeats, dev)
        t_pre, out = timeit(lambda: prefix_shared_forward(m, pos), args.repeats, dev)
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
        if dev.type == "cuda":
            fm = FusedSeqPE.from_reference(m, backend="triton").eval()
            fp = FusedSeqPE.from_reference(m, backend="triton", dedup="prefix").eval()
            t_fus, out_f = timeit(lambda: fm(pos), args.repeats, dev)
            t_fpre, out_p = timeit(lambda: fp(pos), args.repeats, dev)
            d_f, d_p = (out_f - ref).abs().max().item(), (out_p - ref).abs().max().item()
            print(f"    fused Triton forward median {t_fus * 1e3:.2f} ms (max |diff| {d_f:.2e}); "
                  f"fused + prefix sharing {t_fpre * 1e3:.2f} ms (max |diff| {d_p:.2e}) -> "
                  f"{t_fus / t_fpre:.2f}x over the fused forward, {t_ref / t_fpre:.2f}x over module.forward")
            rows.append(dict(case="prefix_sharing_eval_vs_fused_triton", n=n_eval, t_base_s=t_fus, t_new_s=t_fpre,
                             ratio=t_fus / t_fpre, max_abs_diff=d_p))
            rows += gather_bandwidth(dev, m, args)

    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["date", "commit", "device", "torch", "threads", "repeats", "case",
                                              "n", "t_base_s", "t_new_s", "ratio", "max_abs_diff"])
            if new:
                w.writeheader()
            for r in rows:
                w.writerow(dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=git_commit(),
                                device=dev_name, torch=torch.__version__,
                                threads=torch.get_num_threads(), repeats=args.repeats, **r))


if __name__ == "__main__":
    main()
