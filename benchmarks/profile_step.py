"""Where a training step's time goes on CUDA: kernel time by op (torch.profiler), the step's GPU busy time vs
its wall time (the gap is host / launch overhead), for eager and each fused backend.

    python benchmarks/profile_step.py [--config text-default vits-default] [--rows 12] [--host-rows 25]

``--host-rows N`` adds, per provider, where the host's time goes: the Python call of the forward and of the
backward timed apart (each from a synchronised start, CUDA not synchronised inside, so a call that waits for the
GPU shows as host time), and the N functions with the most own time under cProfile. On the H200 (f1) the Triton
text step's call took 6.8 ms of host time for 2.1 ms of GPU work and the C++/CUDA one 2.6 ms: this says where.
Its backward alone took ~5.3 ms of host time (f1's forward rows: 1.5 ms), more than eager's whole backward, while
the same Python on the dev CPU costs ~0.4 ms. On CUDA, autograd runs that backward on its device thread, so the
breakdown also times it inside that thread and with the device threads off, and profiles that thread.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import threading
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
    ap.add_argument("--host-rows", type=int, default=0, help="per provider: forward / backward host time and the "
                    "top functions by own time under cProfile (0: off)")
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
            if args.host_rows:
                print(host_breakdown(mod, pos, ac, args.steps, args.host_rows))


class _BackwardWatch:
    """Wraps ``EncoderFunction.backward`` (the Triton encoder's Python backward) while installed: records on which
    thread autograd ran it and the time spent inside it, and, when ``profile`` is on, profiles it with a cProfile of
    that thread. Why: on CUDA the autograd engine runs backward nodes on its own device thread, which a cProfile
    enabled on the main thread does not see (Python <= 3.11; 3.12's cProfile is process-wide, and a second one then
    refuses to start: the main one sees it). The C++/CUDA backend's node is C++ and is not wrapped."""

    def __init__(self):
        from seqpe_kernels.encoder import EncoderFunction

        self.cls, self.orig = EncoderFunction, EncoderFunction.__dict__["backward"]
        self.main = threading.get_ident()
        self.profile = False
        self.times, self.threads, self.profs, self.prof_note = [], set(), [], None

    def __enter__(self):
        orig = self.orig.__func__

        def backward(ctx, *grads):
            prof = None
            if self.profile and threading.get_ident() != self.main:
                prof = cProfile.Profile()
                try:
                    prof.enable()
                except ValueError as e:  # a process-wide profiler (3.12+) is on: it sees this thread
                    prof, self.prof_note = None, f"the main thread's profiler covers it ({e})"
            t0 = time.perf_counter()
            try:
                return orig(ctx, *grads)
            finally:
                self.times.append(time.perf_counter() - t0)
                self.threads.add("main" if threading.get_ident() == self.main else "autograd worker")
                if prof is not None:
                    prof.disable()
                    self.profs.append(prof)

        self.cls.backward = staticmethod(backward)
        return self

    def __exit__(self, *exc):
        self.cls.backward = self.orig
        return False


def host_breakdown(mod, pos, ac, steps: int, rows: int) -> str:
    """Host time of one training step's forward call and backward call, each from a synchronised start (median of
    ``steps``); the same backward with autograd's device threads off (``torch.autograd.set_multithreading_enabled
    (False)``: on CUDA the engine otherwise runs the backward nodes on its own thread); on which thread the Triton
    encoder's Python backward ran and the time inside it; and cProfile's top ``rows`` functions by own time over
    ``steps`` steps, the backward's thread included. Runs on CPU too (tests)."""
    import statistics

    dev = pos.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    params = [p for p in mod.parameters() if p.requires_grad]

    def fwd():
        with torch.autocast(dev.type, dtype=ac or torch.float32, enabled=ac is not None):
            return mod(pos)

    def run(timed, syncs=True):
        for p in params:
            p.grad = None
        syncs and sync()
        t0 = time.perf_counter()
        y = fwd()
        t1 = time.perf_counter()
        g = torch.ones_like(y)
        syncs and sync()
        t2 = time.perf_counter()
        y.backward(g)
        t3 = time.perf_counter()
        syncs and sync()
        if timed is not None:
            timed.append((t1 - t0, t3 - t2))

    def med(xs, i=None):
        return statistics.median(x if i is None else x[i] for x in xs) * 1e3

    one_thread = getattr(torch.autograd, "set_multithreading_enabled", None)
    with _BackwardWatch() as w:
        for _ in range(3):
            run(None)
        ts = []
        w.times.clear()
        for _ in range(steps):
            run(ts)
        body = (f"the Python backward ran on the {' and '.join(sorted(w.threads))} thread, {med(w.times):.3f} ms "
                "inside it" if w.times else "no Python encoder backward (C++ autograd nodes only)")
        single = "n/a (this torch has no set_multithreading_enabled)"
        if one_thread is not None:
            ts1 = []
            with one_thread(False):
                for _ in range(3):
                    run(None)
                for _ in range(steps):
                    run(ts1)
            single = f"{med(ts1, 1):.3f} ms"
        w.profile = True
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            run(None, syncs=False)  # (a call that waits for the GPU still shows: its own wait)
        prof.disable()
        sync()
    stats = pstats.Stats(prof)
    for p in w.profs:
        stats.add(p)
    seen = (f"{len(w.profs)} backward calls profiled on their own thread" if w.profs else
            w.prof_note or "the backward ran on the profiled thread")
    st = stats.stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    top = sorted(st.items(), key=lambda kv: -kv[1][2])[:rows]
    lines = [f"--- host: forward call {med(ts, 0):.3f} ms, backward call {med(ts, 1):.3f} ms (median of {steps}); "
             f"{body}; backward call with autograd's device threads off: {single}",
             f"    cProfile over {steps} steps, not synchronised between them ({seen}), per step:",
             f"{'own us':>9} {'cum us':>9} {'calls':>6}  function"]
    for (fname, line, func), (_, nc, tt, ct, _) in top:
        short = fname.split("site-packages/")[-1] if "site-packages/" in fname else os.path.relpath(fname)
        where = func if fname == "~" else f"{short}:{line}({func})"
        lines.append(f"{tt / steps * 1e6:9.1f} {ct / steps * 1e6:9.1f} {nc / steps:6.0f}  {where}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
