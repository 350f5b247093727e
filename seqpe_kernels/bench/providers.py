"""The providers a benchmark compares (eager, compile, the fused backends, graphs, dedup / cache) and one
measurement of a provider in a mode."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ..backend import BackendUnavailable, available_backends, interpret_mode
from ..precision import fp32_matmul
from ..reference import SeqPE
from .configs import (CUDA_GRAPH_PROVIDERS, FUSED_PROVIDERS, GRAPH_BACKWARD_NOTE, GRAPH_PROVIDERS, MODES, PROVIDERS,
                      BenchConfig)
from .timing import TimingPolicy, _host_time, _peak_mem_mb, _time_call

# ------------------------------------------------------------------------------------------- providers
@dataclass
class Provider:
    name: str
    module: Optional[torch.nn.Module]     # the nn.Module whose train/eval state and params matter
    call: Optional[Callable]              # positions -> [M, O]
    modes: Tuple[str, ...] = MODES
    skip_reason: str = ""
    note: str = ""                        # what the row measures, when it is not obvious
    backward_derived: str = ""            # when set (and "backward" not in modes): the backward row is derived
                                          # as full - forward, with this reason as its note


def _optional(modname: str, attr: str):
    try:
        mod = __import__(f"seqpe_kernels.{modname}", fromlist=[attr])
        return getattr(mod, attr), ""
    except ImportError as e:
        return None, f"seqpe_kernels.{modname} not available ({e})"
    except AttributeError:
        return None, f"seqpe_kernels.{modname} has no {attr}"


def fused_from_reference(ref: SeqPE, backend: str):
    """FusedSeqPE with the reference's weights (``from_reference`` when the class has it)."""
    from ..fused import FusedSeqPE
    if hasattr(FusedSeqPE, "from_reference"):
        return FusedSeqPE.from_reference(ref, backend=backend)
    fused = FusedSeqPE(**ref.config(), backend=backend)
    fused.load_state_dict(ref.state_dict())
    return fused.to(next(ref.parameters()).device)


def _cache_call(cache):
    for attr in ("cache", "lookup", "__call__"):
        f = getattr(cache, attr, None)
        if callable(f):
            return f
    raise TypeError("SeqPECache has no cache/lookup/__call__")


def build_provider(name: str, cfg: BenchConfig, ref: SeqPE, device: torch.device) -> Provider:
    if name == "eager":
        return Provider(name, ref, ref)
    if name == "compile":
        try:
            compiled = torch.compile(ref)
        except Exception as e:  # pragma: no cover - depends on the machine
            return Provider(name, None, None, skip_reason=f"torch.compile failed: {type(e).__name__}: {e}")
        return Provider(name, ref, compiled)
    if name in GRAPH_PROVIDERS + ("compile-cg",) and device.type != "cuda":
        return Provider(name, None, None, skip_reason="CUDA graphs need a CUDA device")
    graph_modes = tuple(m for m in MODES if m != "backward")
    if name == "compile-cg":
        compiled = torch.compile(ref, mode="reduce-overhead")

        def call(pos):
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: earlier outputs may be reused
            return compiled(pos)
        return Provider(name, ref, call, modes=graph_modes, backward_derived=GRAPH_BACKWARD_NOTE)
    if name in GRAPH_PROVIDERS:
        inner = build_provider(name[:-len("-graph")], cfg, ref, device)
        if inner.skip_reason:
            return Provider(name, None, None, skip_reason=inner.skip_reason)
        from ..savings.graphs import GraphedSeqPE
        return Provider(name, inner.module, GraphedSeqPE(inner.module), modes=graph_modes,
                        backward_derived=GRAPH_BACKWARD_NOTE)
    if name in FUSED_PROVIDERS:
        ok, why = available_backends(device).get(name, (False, "unknown backend"))
        if not ok:
            return Provider(name, None, None, skip_reason=why)
        if name == "triton" and device.type == "cpu" and interpret_mode():
            return Provider(name, None, None, skip_reason="Triton interpreter (TRITON_INTERPRET=1) is never timed")
        try:
            fused = fused_from_reference(ref, name)
        except BackendUnavailable as e:
            return Provider(name, None, None, skip_reason=str(e))
        if hasattr(fused, "check_range"):
            fused.check_range = False
        return Provider(name, fused, fused)
    if name in ("dedup", "prefix"):
        fn, why = _optional("savings.dedup", "dedup_forward" if name == "dedup" else "prefix_shared_forward")
        if fn is None:
            return Provider(name, None, None, skip_reason=why)
        return Provider(name, ref, lambda pos, _f=fn: _f(ref, pos), modes=("nograd",),
                        note=f"{fn.__name__} over the eager reference")
    if name == "cache":
        cls, why = _optional("savings.cache", "SeqPECache")
        if cls is None:
            return Provider(name, None, None, skip_reason=why)
        try:
            cache = cls(ref)
            call = _cache_call(cache)
        except Exception as e:
            return Provider(name, None, None, skip_reason=f"SeqPECache(module) not usable: {type(e).__name__}: {e}")
        return Provider(name, ref, call, modes=("nograd",),
                        note="warm SeqPECache: every position already stored (gather only)")
    raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")


# ------------------------------------------------------------------------------------------- one measurement
def _set_grads_none(params):
    for p in params:
        p.grad = None


def mode_callables(prov: Provider, mode: str, positions, ac_dtype, device):
    """(fn, pre, params, cleanup) for one provider/mode. ``fn`` runs one timed call."""
    mod = prov.module
    params = [p for p in mod.parameters() if p.requires_grad] if mod is not None else []

    def autocast():
        if ac_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=ac_dtype)

    def pre():
        _set_grads_none(params)

    if mode == "nograd":
        mod.eval()

        def fn():
            with torch.inference_mode(), autocast():
                return prov.call(positions)
        return fn, (lambda: None), [], lambda: None
    mod.train()
    if mode == "forward":
        def fn():
            with autocast():
                return prov.call(positions)
        return fn, (lambda: None), [], lambda: None
    grad_cache: Dict[str, torch.Tensor] = {}

    def grad_like(y):
        g = grad_cache.get("g")
        if g is None or g.shape != y.shape or g.dtype != y.dtype:
            gen = torch.Generator(device="cpu").manual_seed(1)
            g = torch.randn(y.shape, generator=gen).to(device=y.device, dtype=y.dtype)
            grad_cache["g"] = g
        return g

    if mode == "full":
        def fn():
            # a fresh step every call, also in do_bench's untimed warm-up / estimate calls (its grad_to_none
            # covers only the timed ones): under CUDA graphs (compile-cg's cudagraph trees) a .grad kept from
            # the previous step lives in memory that step's replay reuses
            _set_grads_none(params)
            with autocast():
                y = prov.call(positions)
            y.backward(grad_like(y))
        return fn, pre, params, lambda: _set_grads_none(params)
    if mode == "backward":
        with autocast():
            y = prov.call(positions)
        g = grad_like(y)
        state = {"y": y}

        def fn():
            state["y"].backward(g, retain_graph=True)

        def cleanup():
            state.clear()
            _set_grads_none(params)
        return fn, pre, params, cleanup
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def check_exact(prov: Provider, ref: SeqPE, positions, ac_dtype, device) -> Optional[str]:
    """For dedup/prefix/cache: their eval output must match the reference's (else they are not timed)."""
    ref.eval()
    ctx = torch.autocast(device.type, dtype=ac_dtype) if ac_dtype else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        want = ref(positions).float()
        got = prov.call(positions).float()
    if got.shape != want.shape:
        return f"output shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    err = rel_err(got, want)
    tol = 1e-5 if ac_dtype is None else 2e-2
    if not err <= tol:
        return f"output differs from the reference (max rel err {err:.2e} > {tol:g}); not timed"
    return None


def reference_output(ref: SeqPE, positions) -> torch.Tensor:
    """The eager reference's eval output in IEEE fp32 (no autocast, no TF32): what each provider's ``rel_err``
    is measured against."""
    was = ref.training
    ref.eval()
    try:
        with fp32_matmul(tf32=False), torch.autocast(positions.device.type, enabled=False), torch.inference_mode():
            return ref(positions).float()
    finally:
        ref.train(was)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (NaN if the shapes differ, inf if got is not finite)."""
    if tuple(got.shape) != tuple(want.shape):
        return float("nan")
    if not bool(torch.isfinite(got).all()):  # (a NaN would read as "not measured")
        return float("inf")
    scale = max(want.abs().max().item(), 1e-30)
    return (got.float() - want).abs().max().item() / scale


PEAK_MEM_GRAPH_NOTE = ("peak memory not measured: a CUDA-graph replay's activations live in the graph's private "
                       "pool, allocated at capture, not per call")


def measure(prov: Provider, mode: str, positions, cfg: BenchConfig, device: torch.device,
            policy: TimingPolicy, want: Optional[torch.Tensor] = None) -> dict:
    """One provider/mode: warm-up, timing, host time, peak memory; for ``nograd`` with ``want`` also the output's
    ``rel_err`` against the IEEE-fp32 reference (the eval output: deterministic, dropout off)."""
    ac = cfg.autocast_dtype(device)
    fn, pre, params, cleanup = mode_callables(prov, mode, positions, ac, device)
    try:
        t0 = time.perf_counter()
        pre()
        out = fn()               # first call: compilation / autotuning / lazy init happens here
        del out
        if device.type == "cuda":
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t0
        med, p20, p80 = _time_call(fn, pre, device, policy, params)
        host = _host_time(fn, pre, device, policy)
        if device.type == "cuda" and prov.name in CUDA_GRAPH_PROVIDERS:
            # a replay allocates (almost) nothing: its activations live in the graph's private pool, allocated at
            # capture, so "peak above what was allocated before the call" read 0-59 MB on the H200, next to
            # eager's 1579 MB. Not comparable with the other rows: left blank rather than misleading
            mem, mem_note = float("nan"), PEAK_MEM_GRAPH_NOTE
        else:
            mem, mem_note = _peak_mem_mb(fn, pre, device)
        err = rel_err(fn(), want) if (mode == "nograd" and want is not None) else float("nan")
    finally:
        cleanup()
    return dict(median_ms=med, p20_ms=p20, p80_ms=p80, host_ms=host, peak_mem_mb=mem, warmup_s=warmup_s,
                rel_err=err, note=mem_note)
