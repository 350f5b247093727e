"""Where a training step's time goes on CUDA: kernel time by op (torch.profiler), the step's GPU busy time vs
its wall time (the gap is host / launch overhead), for eager and each fused backend.

    python benchmarks/profile_step.py [--config text-default vits-default] [--rows 12]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from seqpe_kernels import FusedSeqPE, SeqPE  # noqa: E402
from seqpe_kernels.backend import available_backends  # noqa: E402
from seqpe_kernels.bench import get_config, make_positions  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="+", default=["text-default", "vits-default"])
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device("cuda")
    from torch.profiler import ProfilerActivity, profile

    usable = [b for b in ("triton", "cuda") if available_backends(dev)[b][0]]
    for name in args.config:
        cfg = get_config(name)
        torch.manual_seed(0)
        ref = SeqPE(**cfg.module_kwargs()).to(dev).train()
        ref.check_range = False
        pos = make_positions(cfg, seed=0, device=dev)
        ac = cfg.autocast_dtype(dev)
        mods = [("eager", ref)] + [(b, FusedSeqPE.from_reference(ref, backend=b)) for b in usable]
        for prov, mod in mods:
            def step():
                with torch.autocast("cuda", dtype=ac or torch.float32, enabled=ac is not None):
                    y = mod(pos)
                y.float().sum().backward()
                for p in mod.parameters():
                    p.grad = None
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / args.steps * 1e3
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
            evs = prof.key_averages()
            # kernel-level events only: op-level rows repeat their kernels' device time
            kernels = [e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA
                       and e.self_device_time_total > 0]
            gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / args.steps
            n_k = sum(e.count for e in kernels) / args.steps
            print(f"\n=== {name} M={cfg.M} {prov}: wall {wall:.3f} ms/step, GPU kernel time {gpu_ms:.3f} ms/step, "
                  f"~{n_k:.0f} kernels/step")
            print(evs.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
