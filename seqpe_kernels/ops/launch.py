"""Triton launches without ``JITFunction.run``'s per-call work (issue 11 item 1).

Why: ``JITFunction.run`` re-derives on every call what a call site keeps fixed (knobs, device and stream
lookups, the argument binder, the cache key, a check of global values): ~12.5 us per launch against ~3.5 us for
calling the compiled kernel (KERNEL_GUIDE §8), and a text training step launches ~40 Triton kernels. The compiled
kernel then gets tensors as their addresses (ints): its C launcher would otherwise call each tensor's data_ptr()
and query the driver about the pointer (cuPointerGetAttribute) on every launch. ``direct``
wraps a ``@triton.jit`` kernel (same ``kernel[grid](*args, **kwargs)`` call). The first launches of each
argument *specialisation* go through ``JITFunction.run``, which compiles and returns the ``CompiledKernel``;
once two of them returned the same compiled kernel for one key, later launches with that key call it the way
``JITFunction.run`` does in its last line.

Safety: the key (``spec_key``) is at least as fine as Triton's specialisation, so a reused kernel always fits
its arguments: per tensor its dtype and whether its address is 16-byte aligned; per int whether it equals 1,
is divisible by 16, and its range (int32 / int64 / uint64); bools by value, floats by type; constexpr
parameters by value;
the launch options (num_warps, ...) and the current device. (Triton specialises on exactly these properties;
reusing a kernel compiled for another specialisation is how misaligned accesses and context-poisoning
asynchronous errors arise, pytorch/helion PR #3010.) If one key ever comes back with two different compiled
kernels, that kernel launches through ``JITFunction.run`` from then on and a warning says so.

Off, every launch through ``JITFunction.run``: for a kernel that reads module-level globals (``run`` checks
them on every launch; none of this package's kernels do); under the Triton interpreter; when the installed Triton's
``JITFunction.run`` does not end in the launch call mirrored here (checked once against its source: the
launcher signature is private and has changed between versions); with ``SEQPE_KERNELS_TRITON_LAUNCH=jit``.
"""
from __future__ import annotations

import inspect
import os
import re
import threading
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

MODE_ENV = "SEQPE_KERNELS_TRITON_LAUNCH"
# direct launches pass tensors as their addresses (see DirectKernel._run); False passes the tensors, as
# JITFunction.run does (benchmarks/launch_overhead.py times both on a GPU)
PASS_ADDRESSES = True
# the last statement of JITFunction.run (Triton >= 3.3), whitespace-normalised; mirrored by DirectKernel._run
_LAUNCH_CALL = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, "
                "launch_metadata, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, "
                "*bound_args.values())")
# the options JITFunction.run (3.3 .. 3.9) adds to a launch's keywords from Triton's knobs; each is part of its
# compiled-kernel key, so each is part of ``DirectKernel.launch``'s key (read per launch: proton's instrumentation
# mode is set when profiling starts, often after the kernels' first launches)
_KNOB_OPTIONS = {"debug", "instrumentation_mode", "fpsan_homomorphic_casts"}
_STATE: Dict[str, Any] = {}


# Triton's interpreter keeps one process-wide builder (the grid, the program ids) and patches triton.language for
# the duration of a launch: launches from two threads at once read each other's grids (wrong rows, NaN, crashes)
_INTERP_LOCK = threading.RLock()


def _interpreting() -> bool:
    v = _STATE.get("interp")
    if v is None:
        v = _STATE["interp"] = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return v


def status() -> Tuple[bool, str]:
    """(direct launches on?, why), decided once per process (``reset`` forgets it)."""
    if "on" not in _STATE:
        _STATE["on"], _STATE["why"] = _decide()
    return _STATE["on"], _STATE["why"]


def reset() -> None:
    _STATE.clear()


def _decide() -> Tuple[bool, str]:
    mode = os.environ.get(MODE_ENV, "direct").strip().lower() or "direct"
    if mode not in ("direct", "jit"):
        raise ValueError(f"{MODE_ENV}={mode!r}: choose 'direct' (the default) or 'jit'")
    if mode == "jit":
        return False, f"{MODE_ENV}=jit"
    try:
        import triton
        from triton import knobs  # noqa: F401  (the launch call reads triton.knobs)
        from triton.runtime.jit import JITFunction
    except Exception as e:  # pragma: no cover - a Triton without knobs (< 3.3)
        return False, f"this Triton ({e}) predates the launch convention mirrored here"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False, "the Triton interpreter runs every launch in Python"
    try:
        src = " ".join(inspect.getsource(JITFunction.run).split())
    except (OSError, TypeError) as e:  # pragma: no cover - source not shipped
        return False, f"cannot read JITFunction.run's source ({e})"
    if _LAUNCH_CALL not in src:
        return False, (f"Triton {triton.__version__}'s JITFunction.run does not end in the launch call mirrored "
                       "here (its private launcher convention changed)")
    unknown = set(re.findall(r'kwargs\["(\w+)"\] =', src)) - _KNOB_OPTIONS
    if unknown:
        return False, (f"Triton {triton.__version__}'s JITFunction.run adds launch options this key does not "
                       f"cover ({sorted(unknown)})")
    switch_on(knobs.runtime, knobs.compilation, src)
    return True, f"Triton {triton.__version__}: cached compiled kernels, called directly"


def switch_on(runtime, compilation, run_src: str = "", why: str = "") -> None:
    """What the direct path reads per launch: Triton's runtime and compilation knobs, and which of the per-launch
    knobs this Triton's JITFunction.run (source ``run_src``) reads. ``why``: also switch direct launches on
    (stand-in GPUs in tests and benchmarks)."""
    _STATE.update(knobs=runtime, compilation=compilation,
                  # Triton 3.9 (not 3.6) also keys on knobs.compilation.fpsan_homomorphic_casts (an env lookup)
                  fpsan="fpsan_homomorphic_casts" in run_src,
                  stages_hook="add_stages_inspection_hook" in run_src)
    if why:
        _STATE.update(on=True, why=why)


def arg_keys(full, constexpr) -> list:
    """Per argument, what Triton specialises it on, or more (never less): constexprs by value; tensors by dtype
    and 16-byte alignment; ints by == 1, % 16 and range; floats by type; anything else (bools, None) by value
    and type (Triton keys a constexpr on str(value): 1, True and 1.0 are three kernels)."""
    return keys_and_args(full, constexpr)[0]


def keys_and_args(full, constexpr):
    """(``arg_keys``, the arguments with every tensor as its address): each tensor's data_ptr() is read once, for
    its alignment and for the launch. One loop, bound appends: this runs on every launch (~0.1 us per argument,
    0.3 us more than the keys alone for a 28-argument kernel on the dev CPU)."""
    Tensor = torch.Tensor
    keys, args = [], []
    key, arg = keys.append, args.append
    for a, c in zip(full, constexpr):
        if c:
            key((type(a), a))
            arg(a)
        elif isinstance(a, Tensor):
            p = a.data_ptr()
            # is_cuda: passed as an address, a CPU tensor would reach the GPU (Triton's launcher raises for it)
            key((a.dtype, p % 16 == 0, a.is_cuda))
            arg(p)
        elif type(a) is int:
            key((int, a == 1, a % 16 == 0, -2147483648 <= a < 2147483648, a >= 9223372036854775808))
            arg(a)
        else:
            key(float if type(a) is float else (type(a), a))
            arg(a)
    return keys, args


def spec_key(a: Any):
    """``arg_keys`` of one runtime (non-constexpr) argument."""
    return arg_keys([a], [False])[0]


class DirectKernel:
    """``kernel[grid](*args, **kwargs)`` for a ``@triton.jit`` kernel, launching cached compiled kernels directly
    (module doc). ``fn``: the JITFunction (or the interpreter's function, which always launches through it)."""

    def __init__(self, fn):
        self.fn = fn
        params = getattr(fn, "params", None) or []
        self.names: List[str] = [p.name for p in params]
        self._names = frozenset(self.names)
        self.constexpr = [bool(getattr(p, "is_constexpr", False)) for p in params]
        self.defaults = [p.default if p.has_default else inspect.Parameter.empty for p in params]
        self.compiled: Dict[tuple, Any] = {}  # key -> CompiledKernel, confirmed by two JITFunction.run launches
        self.seen: Dict[tuple, Any] = {}      # key -> the CompiledKernel of the first launch
        self.off: Optional[str] = None        # why this kernel went back to JITFunction.run for good

    def __getitem__(self, grid):
        if callable(grid):  # JITFunction.run calls it with the bound arguments: not mirrored here
            return self.fn[grid]
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def __repr__(self):
        return f"DirectKernel({self.fn!r})"

    def launch(self, grid, args, kwargs):
        # the hot path: one pass over the arguments, no per-argument function calls (~0.1 us per argument)
        on = _STATE.get("on")
        if on is None:
            on = status()[0]
        if not on or self.off is not None:
            if _interpreting():  # one launch at a time: the interpreter's grid state is process-global
                with _INTERP_LOCK:
                    return self.fn[grid](*args, **kwargs)
            return self.fn[grid](*args, **kwargs)
        try:  # the constexprs come as keywords, in any order
            full = [*args, *map(kwargs.__getitem__, self.names[len(args):])]
        except KeyError:
            full = self._with_defaults(args, kwargs)
            if full is None:  # let Triton raise its own error for the missing argument
                return self.fn[grid](*args, **kwargs)
        names = self._names
        opts = tuple([kv for kv in kwargs.items() if kv[0] not in names])  # launch options (num_warps, ...)
        dev = torch.cuda.current_device()
        keys, ptrs = keys_and_args(full, self.constexpr)
        rt, comp = _STATE["knobs"], _STATE["compilation"]  # the options JITFunction.run adds from knobs
        key = (dev, opts, rt.debug, comp.instrumentation_mode,
               comp.fpsan_homomorphic_casts if _STATE["fpsan"] else None, *keys)
        if _STATE["stages_hook"] and rt.add_stages_inspection_hook is not None:  # (Triton 3.9) keyed per call
            return self.fn[grid](*args, **kwargs)
        try:
            k = self.compiled.get(key)
        except TypeError:  # an unhashable argument: no key, the plain launch
            return self.fn[grid](*args, **kwargs)
        if k is not None:
            return self._run(k, grid, full, ptrs, dev)
        k = self.fn[grid](*args, **kwargs)  # compiles when needed, launches, returns the CompiledKernel
        if k is None:  # a compile hook declined: nothing to reuse
            return k
        first = self.seen.get(key)
        if first is None:
            self.seen[key] = k
        elif first is k:  # a second launch with this key found the same compiled kernel: reuse it from now on
            if getattr(self.fn, "used_global_vals", None):  # JITFunction.run re-checks module globals per launch
                self.off = f"{self.fn!r} reads module globals, which JITFunction.run checks on every launch"
                return k
            if getattr(self.fn, "pre_run_hooks", None):  # JITFunction.run calls them on every launch
                self.off = f"{self.fn!r} has pre-run hooks, which JITFunction.run calls on every launch"
                return k
            self.compiled[key] = k
        else:
            self.off = (f"{self.fn!r}: one argument key gave two compiled kernels; its launches go through "
                        "JITFunction.run from now on")
            warnings.warn(f"seqpe_kernels: {self.off}", RuntimeWarning, stacklevel=3)
        return k

    def _with_defaults(self, args, kwargs):
        full = list(args)
        for i in range(len(args), len(self.names)):
            n = self.names[i]
            if n in kwargs:
                full.append(kwargs[n])
            elif self.defaults[i] is not inspect.Parameter.empty:
                full.append(self.defaults[i])
            else:
                return None
        return full

    def _run(self, k, grid, full, ptrs, dev):
        knobs = _STATE["knobs"]
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = torch._C._cuda_getCurrentRawStream(dev)
        # tensors go in as their device addresses (``ptrs``, read for the key): Triton's launcher would call each
        # tensor's data_ptr() from C and ask the driver about it (cuPointerGetAttribute) on every launch; an int
        # goes straight in. The key holds is_cuda, so only CUDA tensors get here. Launch hooks see the arguments
        # as given.
        enter, exit_ = knobs.launch_enter_hook, knobs.launch_exit_hook
        if getattr(enter, "calls", None) == [] and getattr(exit_, "calls", None) == []:
            # Triton 3.6 / 3.9's hooks are HookChains, never None: with none registered the launcher would still
            # build the launch metadata and call both empty chains (~1.3 us); None skips them, to the same effect
            k.run(g0, g1, g2, stream, k.function, k.packed_metadata, None, None, None,
                  *(ptrs if PASS_ADDRESSES else full))
        else:
            k.run(g0, g1, g2, stream, k.function, k.packed_metadata, k.launch_metadata(grid, stream, *full),
                  enter, exit_, *(ptrs if PASS_ADDRESSES else full))
        return k


def direct(fn) -> DirectKernel:
    return DirectKernel(fn)
