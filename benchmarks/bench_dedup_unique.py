"""The unique step of ``dedup="auto"`` (every eval / no-dropout call of a FusedSeqPE, SeqPECache misses,
``dedup_forward``): the row-wise ``torch.unique(pos, dim=0)`` it used against ``unique_positions`` (one int64 key
per row, a 1-D unique), at the paper's step sizes.

    python benchmarks/bench_dedup_unique.py [--device cuda] [--reps 30]

Median per call, both in one run; the ratio is what to quote on a CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch

    from seqpe_kernels.savings.dedup import unique_positions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def med_us(f):
        f()
        ts = []
        for _ in range(args.reps):
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e6

    g = torch.Generator().manual_seed(0)
    cases = [("text-default 1-D, M=1552", torch.randperm(10 ** 5, generator=g)[:1552, None], 10 ** 5),
             ("text-default 1-D, M=8720", torch.randperm(10 ** 5, generator=g)[:8720, None], 10 ** 5),
             ("vits-default 2-D, M=4324", torch.cartesian_prod(torch.arange(66), torch.arange(66))[:4324], 100)]
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU, 1 thread'}), "
          f"torch {torch.__version__}")
    for name, pos, radix in cases:
        pos = pos.to(dev)
        a = med_us(lambda: torch.unique(pos, dim=0, sorted=True, return_inverse=True))
        b = med_us(lambda: unique_positions(pos, radix))
        print(f"  {name}: torch.unique(dim=0) {a:9.0f} us   unique_positions {b:7.0f} us   {a / b:6.1f}x")


if __name__ == "__main__":
    main()
