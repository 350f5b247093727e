"""The C++ CPU extension (FusedSeqPE backend="cpu") against the eager reference on this machine's CPU.

    python benchmarks/bench_cpu_ext.py [--reps 5] [--configs text vits] [--threads N] [--no-profile] [--dedup off]

Sizes are the default training steps of SEQPE_SPEC §6 (seqpe_kernels.bench CONFIGS): text (M=1552, D=768,
12 heads, K=5, 2 layers, out 768) and ViT-S (M=4324, D=384, 6 heads, 2-D positions K=2, out 384), fp32.
Modes: eval-mode forward under inference_mode, and a training step (forward + backward, resid_pdrop 0.1,
attn_pdrop 0 as in the paper scripts). Eager and extension runs are interleaved and the medians of
``--reps`` repeats compared, because other work shares this machine. The profile splits each provider's
time into GEMMs (addmm / mm / linear / matmul / bmm) and everything else.

Numbers from a shared 2-core CPU are only meaningful as ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import seqpe_kernels as sk  # noqa: E402
from seqpe_kernels.bench import CONFIGS as BENCH_CONFIGS  # noqa: E402

SIZES = {"text": "text-default", "vits": "vits-default"}
GEMM_OPS = ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm", "aten::baddbmm",
            "seqpe_ext::gemm")  # the C++ encoder calls BLAS directly on CPU, under this profiler range


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make(cfg_name: str, dedup: str = "off"):
    bc = BENCH_CONFIGS[cfg_name]
    kw = bc.module_kwargs()
    torch.manual_seed(0)
    ref = sk.SeqPE(**kw)
    with torch.no_grad():  # perturb so that LN weights/biases and zero-initialised biases matter
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ext = sk.FusedSeqPE.from_reference(ref, backend="cpu")
    if hasattr(ext, "dedup"):
        ext.dedup = dedup
    g = torch.Generator().manual_seed(1)
    hi = bc.pos_bound
    shape = (bc.M, bc.data_dim) if bc.data_dim > 1 else (bc.M,)
    pos = torch.randint(0, hi, shape, generator=g)
    return bc, ref, ext, pos


def eval_step(mod, pos):
    with torch.inference_mode():
        return mod(pos)


def train_step(mod, pos, g):
    mod.zero_grad(set_to_none=True)
    y = mod(pos)
    y.backward(g)
    return y


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def profile_split(fn):
    """(total ms, GEMM ms, top non-GEMM ops) of one call, from torch.profiler (CPU self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    gemm = other = 0.0
    rest = {}
    for e in prof.key_averages():
        t = e.self_cpu_time_total / 1e3
        if e.key in GEMM_OPS:
            gemm += t
        else:
            other += t
            rest[e.key] = rest.get(e.key, 0.0) + t
    top = sorted(rest.items(), key=lambda kv: -kv[1])[:6]
    return gemm + other, gemm, top


def run(cfg_key: str, reps: int, do_profile: bool, dedup: str = "off"):
    bc, ref, ext, pos = make(SIZES[cfg_key], dedup)
    print(f"\n== {cfg_key}: M={bc.M} T={bc.T} D={bc.embed_dim} heads={bc.num_heads} K={bc.max_digits} "
          f"d={bc.data_dim} out={bc.O} layers={bc.num_layers} (fp32, {torch.get_num_threads()} threads)")
    # ---- eval forward
    ref.eval(), ext.eval()
    yr, ye = eval_step(ref, pos), eval_step(ext, pos)  # warm-up (and first-use build of the extension)
    err = rel(ye, yr)
    te, tx = [], []
    for _ in range(reps):
        te.append(timed(lambda: eval_step(ref, pos)))
        tx.append(timed(lambda: eval_step(ext, pos)))
    me, mx = statistics.median(te), statistics.median(tx)
    print(f"eval forward : eager {me * 1e3:8.1f} ms  ext {mx * 1e3:8.1f} ms  speed-up {me / mx:5.2f}x  "
          f"(rel err {err:.2e})")
    res = {"eval": me / mx, "eval_err": err}
    if do_profile:
        for name, mod in (("eager", ref), ("ext", ext)):
            tot, gemm, top = profile_split(lambda: eval_step(mod, pos))
            print(f"   profile {name:5s}: total {tot:8.1f} ms, GEMMs {gemm:8.1f} ms ({gemm / tot:4.0%}), "
                  f"rest {tot - gemm:7.1f} ms: " + ", ".join(f"{k} {v:.1f}" for k, v in top[:4]))
    # ---- training forward + backward
    ref.train(), ext.train()
    g = torch.randn(bc.M, bc.O)
    train_step(ref, pos, g), train_step(ext, pos, g)
    te, tx = [], []
    for _ in range(reps):
        te.append(timed(lambda: train_step(ref, pos, g)))
        tx.append(timed(lambda: train_step(ext, pos, g)))
    me, mx = statistics.median(te), statistics.median(tx)
    print(f"train fwd+bwd: eager {me * 1e3:8.1f} ms  ext {mx * 1e3:8.1f} ms  speed-up {me / mx:5.2f}x  "
          f"(resid_pdrop {bc.resid_pdrop})")
    res["train"] = me / mx
    if do_profile:
        for name, mod in (("eager", ref), ("ext", ext)):
            tot, gemm, top = profile_split(lambda: train_step(mod, pos, g))
            print(f"   profile {name:5s}: total {tot:8.1f} ms, GEMMs {gemm:8.1f} ms ({gemm / tot:4.0%}), "
                  f"rest {tot - gemm:7.1f} ms: " + ", ".join(f"{k} {v:.1f}" for k, v in top[:4]))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--configs", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--dedup", default="off", choices=["off", "auto", "unique", "prefix"],
                    help="FusedSeqPE.dedup (default off: time the kernels, not the deduplication of repeated "
                         "positions; eager has none)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from seqpe_kernels import _ext

    ok, why = _ext.status("cpu")
    if not ok:
        raise SystemExit(f"the C++ CPU extension is not usable: {why}")
    print(f"torch {torch.__version__}, {why}")
    bar = {"eval": 2.0, "train": 1.5}
    print(f"FusedSeqPE(backend='cpu', dedup={args.dedup!r})")
    results = {k: run(k, args.reps, not args.no_profile, args.dedup) for k in args.configs}
    print("\nsummary (bar: eval >= 2.0x, train >= 1.5x, eval rel err <= 1e-5)")
    for k, r in results.items():
        flags = [f"{m} {r[m]:.2f}x {'ok' if r[m] >= bar[m] else 'MISSED'}" for m in ("eval", "train")]
        print(f"  {k:5s}: " + "; ".join(flags) + f"; eval rel err {r['eval_err']:.1e}"
              f" {'ok' if r['eval_err'] <= 1e-5 else 'FAILED'}")


if __name__ == "__main__":
    main()
