"""Host cost of one Triton launch: ``JITFunction.run`` vs the direct path of ``seqpe_kernels.ops.launch``.

Without a GPU: a stand-in Triton driver (current device 0, stream 0, an sm_90 target) lets the real
``JITFunction.run`` bind, specialise and look up the kernel exactly as on a GPU, and a stand-in compiled kernel
records the final launch call instead of calling the CUDA driver. So the figure is everything Triton and this
package do in Python per launch, on this machine's CPU, minus the driver's own ``cuLaunchKernel`` (the same for
both paths). tests/test_launch.py uses the same harness to check the direct path passes the compiled kernel
exactly the arguments ``JITFunction.run`` passes (tensors as their addresses). With ``--gpu`` (on a GPU): the
real kernel, launched each way on a small input (host-bound), timed to a final synchronize; "direct, tensors"
is the direct path passing tensors as JITFunction.run does, whose C launcher then calls each tensor's
data_ptr() and queries the driver (cuPointerGetAttribute) per tensor per launch: the rows say which is cheaper.

    python benchmarks/launch_overhead.py [--iters N] [--gpu]
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import time
import types

if __name__ == "__main__" and "--gpu" not in sys.argv:
    # as a script without a GPU: the package's kernels import as interpreted; real JITs are built here. Never on
    # import (tests import this harness): a process-wide TRITON_INTERPRET=1 set on a GPU machine made every
    # Triton module imported afterwards an interpreted one (the 2026-11-30 H200 run)
    os.environ.setdefault("TRITON_INTERPRET", "1")


class CompiledStandIn:
    """What JITFunction.run's last line calls: records the call."""

    def __init__(self):
        self.function, self.packed_metadata, self.calls = object(), object(), []

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *a):
        self.calls.append(a)


@contextlib.contextmanager
def gpu_standin():
    """A Triton driver and torch CUDA hooks that behave like device 0 of an sm_90 GPU on its default stream, and
    direct launches switched on; yields ``jit(py_fn)`` -> a real JITFunction whose compile returns a stand-in."""
    import torch
    from triton.runtime.driver import driver as tdriver  # the DriverConfig
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    from seqpe_kernels.ops import launch

    fake = types.SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", 90, 32),
                                 get_current_device=lambda: 0, get_current_stream=lambda dev: 0)
    saved = (tdriver._active, torch.cuda.current_device, getattr(torch._C, "_cuda_getCurrentRawStream", None),
             dict(launch._STATE))
    tdriver.set_active(fake)
    torch.cuda.current_device = lambda: 0
    torch._C._cuda_getCurrentRawStream = lambda dev: 0
    from triton import knobs

    launch._STATE.clear()
    launch.switch_on(knobs.runtime, knobs.compilation, inspect.getsource(JITFunction.run), why="stand-in GPU")

    def jit(py_fn):
        jf = JITFunction(py_fn)
        jf.device_caches[0]  # build the binder now, then compile into a recorder instead of a cubin
        jf.compile = lambda src, target=None, options=None, **kw: CompiledStandIn()
        return jf

    try:
        yield jit
    finally:
        tdriver._active = saved[0]
        torch.cuda.current_device = saved[1]
        if saved[2] is None:
            del torch._C._cuda_getCurrentRawStream
        else:
            torch._C._cuda_getCurrentRawStream = saved[2]
        launch._STATE.clear()
        launch._STATE.update(saved[3])


def ln_backward_call(device="cpu", R=9312, n_prog=528):
    """The encoder's residual + LayerNorm backward launch (default: the text step's sizes): (python fn, grid,
    args, kwargs), arguments built as seqpe_kernels.ops.layernorm builds them (on CPU only their addresses and
    dtypes matter)."""
    import torch
    import triton.language as tl

    from seqpe_kernels.ops import layernorm

    D = 768
    x = torch.zeros(R, D, device=device)
    dy = torch.empty(R, D, dtype=torch.bfloat16, device=device)
    part = torch.empty(3, n_prog, D, device=device)
    st = torch.ones(R, device=device)
    seeds = torch.zeros(6, dtype=torch.int64, device=device)
    args = (x, x, x, torch.ones(D, device=device), st, st, seeds, 4, x, dy, part, R, D, -(-R // n_prog), n_prog, 1,
            0.1, 1 / 0.9, 0.0)
    kwargs = dict(HAS_DA=True, HAS_DH=True, DH_SPARSE=False, HAS_Y=True, HAS_LN=True, DROPOUT=True, DYB=True,
                  BLOCK_D=1024, ACC=tl.float32, num_warps=4)
    return layernorm._res_ln_bwd.fn.fn, (n_prog,), args, kwargs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gpu", action="store_true", help="the real kernel on this machine's GPU")
    a = ap.parse_args(argv)
    if a.gpu:
        os.environ["TRITON_INTERPRET"] = "0"
    import torch
    import triton

    from seqpe_kernels.bench.timing import cpu_model
    from seqpe_kernels.ops import launch
    from seqpe_kernels.ops.launch import DirectKernel

    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if a.gpu else (lambda: None)
    with (contextlib.nullcontext() if a.gpu else gpu_standin()) as jit:
        if a.gpu:  # small R: each launch's GPU work is shorter than its host work
            fn, grid, args, kwargs = ln_backward_call("cuda", R=64, n_prog=64)
            on, why = launch.status()
            assert on, f"direct launches are off here: {why}"
            jf, dk = triton.runtime.jit.JITFunction(fn), DirectKernel(triton.runtime.jit.JITFunction(fn))
        else:
            fn, grid, args, kwargs = ln_backward_call()
            jf, dk = jit(fn), DirectKernel(jit(fn))
        for _ in range(3):
            jf[grid](*args, **kwargs)
            dk[grid](*args, **kwargs)
        assert dk.compiled, "the direct path did not engage"
        times = {"JITFunction.run": [], "direct": [], "direct, tensors": []}
        try:
            for _ in range(a.reps):  # interleaved
                for name, k in (("JITFunction.run", jf), ("direct", dk), ("direct, tensors", dk)):
                    # "direct" passes tensors as addresses; "direct, tensors" as JITFunction.run does (the C
                    # launcher then reads each data_ptr() and asks the driver about the pointer)
                    launch.PASS_ADDRESSES = name != "direct, tensors"
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(a.iters):
                        k[grid](*args, **kwargs)
                    sync()
                    times[name].append((time.perf_counter() - t0) / a.iters * 1e6)
        finally:
            launch.PASS_ADDRESSES = True
    where = torch.cuda.get_device_name() if a.gpu else "a stand-in GPU"
    print(f"Triton {triton.__version__}, torch {torch.__version__}, {cpu_model()}, 1 thread, {where}")
    print(f"host time per launch of the LayerNorm backward ({len(args)} runtime + {len(kwargs) - 1} constexpr "
          f"arguments), {a.reps} interleaved rounds x {a.iters}"
          + (", to a final synchronize:" if a.gpu else ", without the driver's cuLaunchKernel:"))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k:16s} median {med[k]:6.2f} us  (min {min(v):.2f}, max {max(v):.2f})")
    print(f"  direct / JITFunction.run = {med['direct'] / med['JITFunction.run']:.2f}; addresses / tensors = "
          f"{med['direct'] / med['direct, tensors']:.2f}"
          + ("" if a.gpu else " (the stand-in skips what tensors cost the C launcher: data_ptr() and the driver's "
                              "pointer query, per tensor)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
