"""Host cost of one SeqPE encoder training step, and kernel launches per step (issue 11, item 1).

    python benchmarks/host_time.py [--reps 7] [--iters 200] [--backends torch cpu triton]

1. **Host time of a tiny training step** (D=16, 2 heads, 2 layers, K=5, M=8, resid/attn dropout 0.1, forward +
   ``backward`` of a fixed output gradient, 1 thread): at this size the kernels do almost nothing, so the time
   is what Python, the dispatcher and autograd cost per step. Providers are interleaved, ``--reps`` rounds of
   ``--iters`` steps each, and the median per-step time of each provider is reported with its ratio to eager
   (target: the C++ backend at <= 0.25x eager). Triton (on CPU only under TRITON_INTERPRET=1) is not timed: the
   interpreter's cost says nothing about a GPU launcher.
2. **Launches per text-default training step** (M=1552, D=768, 12 heads, K=5, dropout 0.1; counted on a small M
   since the count does not depend on M): ATen operators that reach a CPU kernel (torch profiler, CPU) and
   Triton kernel launches (counted by wrapping the launcher), per backend. On a GPU each is one kernel launch.

Run on the 2-core dev CPU; absolute times are only meaningful as ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TINY = dict(embed_dim=16, num_heads=2, max_digits=5, num_layers=2, resid_pdrop=0.1, attn_pdrop=0.1)
TEXT = dict(embed_dim=768, num_heads=12, max_digits=5, num_layers=2, resid_pdrop=0.1, attn_pdrop=0.0)


def make(backend: str, cfg: dict, M: int, seed: int = 0):
    import torch

    import seqpe_kernels as sk

    torch.manual_seed(seed)
    ref = sk.SeqPE(**cfg)
    mod = ref if backend == "torch" else sk.FusedSeqPE.from_reference(ref, backend=backend)
    mod.train()
    mod.check_range = False  # a host sync per call; a training loop with generated positions switches it off
    if hasattr(mod, "dedup"):
        mod.dedup = "off"
    pos = torch.randint(0, 10 ** cfg["max_digits"], (M,))
    gout = torch.randn(M, mod.out_dim)
    return mod, pos, gout


def step(mod, pos, gout):
    for p in mod.parameters():
        p.grad = None
    mod(pos).backward(gout)


def host_times(backends, reps: int, iters: int):
    mods = {b: make(b, TINY, 8) for b in backends}
    for b in backends:  # warm-up: the extension load, first-call caches
        for _ in range(20):
            step(*mods[b])
    per = {b: [] for b in backends}
    for _ in range(reps):
        for b in backends:
            t0 = time.perf_counter()
            for _ in range(iters):
                step(*mods[b])
            per[b].append((time.perf_counter() - t0) / iters * 1e3)
    return per


def count_launches(backend: str, M: int = 16):
    """(operators that launch a kernel, Triton launches) for one text-config training step."""
    from seqpe_kernels.launches import count_launches as count

    mod, pos, gout = make(backend, TEXT, M)
    step(mod, pos, gout)  # warm-up (compilation, extension load)
    return count(lambda: step(mod, pos, gout))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--backends", nargs="+", default=["torch", "cpu"])
    ap.add_argument("--no-count", action="store_true", help="skip the launch count")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from seqpe_kernels import __version__

    print(f"seqpe-kernels {__version__}, torch {torch.__version__}, 1 thread")
    per = host_times(args.backends, args.reps, args.iters)
    base = statistics.median(per["torch"]) if "torch" in per else None
    print(f"\ntiny training step (D=16, 2 heads, 2 layers, M=8, dropout on, fwd+bwd), {args.reps} interleaved "
          f"rounds x {args.iters} steps:")
    print(f"  {'backend':<8} {'median ms':>10} {'min':>7} {'max':>7} {'x eager':>8}")
    for b, ts in per.items():
        med = statistics.median(ts)
        ratio = f"{med / base:.2f}" if base else "-"
        print(f"  {b:<8} {med:>10.3f} {min(ts):>7.3f} {max(ts):>7.3f} {ratio:>8}")
    if not args.no_count:
        print("\nkernel launches per text-default training step (M=16 here; the count does not depend on M):")
        backends = ["torch", "cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
        for b in backends:
            aten, tri = count_launches(b)
            print(f"  {b:<8} ATen/extension ops {aten:>4}  Triton launches {tri:>4}  total {aten + tri:>4}")
        if "triton" not in backends:
            print("  (triton: run with TRITON_INTERPRET=1 to count its launches on CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
