"""Timing, memory and provenance of one benchmark call (``triton.testing.do_bench`` on CUDA, perf_counter on CPU)."""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from .configs import BenchConfig

# ------------------------------------------------------------------------------------------- provenance
def git_commit() -> str:
    """The checkout's commit (12 hex digits), with "-dirty" when tracked files have uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what the platform module knows."""
    model = platform.processor() or platform.machine() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_model()
    n = torch.get_num_threads()
    return f"{model} ({n} thread{'s' if n != 1 else ''})"


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def provenance(device: torch.device) -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = ""
    return dict(device=device_name(device), torch_version=torch.__version__, triton_version=tv,
                cuda_version=torch.version.cuda or "", git_commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


# ------------------------------------------------------------------------------------------- timing
def _quantiles(ts_ms: Sequence[float]) -> Tuple[float, float, float]:
    a = np.asarray(ts_ms, dtype=float)
    return float(np.median(a)), float(np.quantile(a, 0.2)), float(np.quantile(a, 0.8))


@dataclass
class TimingPolicy:
    warmup: int = 2            # CPU warm-up calls (after the first, compiling one)
    min_reps: int = 3
    max_reps: int = 50
    budget_s: float = 3.0      # CPU: stop after this much timed work once min_reps are done
    cuda_warmup_ms: int = 25
    cuda_rep_ms: int = 100
    host_reps: int = 10


def _time_call(fn: Callable, pre: Callable, device: torch.device, policy: TimingPolicy, params) -> Tuple[float, float, float]:
    if device.type == "cuda":
        try:
            import triton.testing
            q = triton.testing.do_bench(fn, warmup=policy.cuda_warmup_ms, rep=policy.cuda_rep_ms,
                                        grad_to_none=list(params) or None, quantiles=[0.5, 0.2, 0.8])
            return float(q[0]), float(q[1]), float(q[2])
        except ImportError:
            pass
        ts = []  # CUDA events
        for _ in range(max(policy.min_reps, 20)):
            pre()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        return _quantiles(ts)
    for _ in range(policy.warmup):
        pre()
        fn()
    ts, spent = [], 0.0
    while len(ts) < policy.max_reps and (len(ts) < policy.min_reps or spent < policy.budget_s):
        pre()
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        del out
        ts.append(dt * 1e3)
        spent += dt
    return _quantiles(ts)


def _host_time(fn, pre, device, policy) -> float:
    """Median wall time of the Python call itself with CUDA not synchronised (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    ts = []
    for _ in range(policy.host_reps):
        pre()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        ts.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        del out
    return float(statistics.median(ts))


def _rss_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim():
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _peak_mem_mb(fn, pre, device) -> Tuple[float, str]:
    """Peak memory of one call above what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak RSS (VmHWM, reset through
    /proc/self/clear_refs) minus the RSS before the call, after malloc_trim -- approximate (page
    granularity; memory the allocator still holds is not counted).
    """
    pre()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak / 2 ** 20, ""
    try:
        _malloc_trim()  # give freed heap pages back first, or reused memory would hide the peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kb("VmRSS")
        out = fn()
        hwm = _rss_kb("VmHWM")
        del out
        if base is None or hwm is None:
            raise OSError("no VmRSS/VmHWM")
        return max(hwm - base, 0) / 1024.0, "cpu mem = peak RSS delta (approx.)"
    except OSError:
        fn()
        return float("nan"), "cpu peak memory not measurable here"


def measure_gemm_rate(cfg: BenchConfig, device: torch.device, policy: TimingPolicy) -> float:
    """FLOP/s of torch.matmul [M·T, D] x [D, 4D] in the config's compute dtype, measured now."""
    dtype = cfg.autocast_dtype(device) or torch.float32
    n = max(cfg.tokens, 1)
    D = cfg.embed_dim
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, D, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(D, 4 * D, generator=g).to(device=device, dtype=dtype)
    pol = replace(policy, warmup=max(policy.warmup, 3), max_reps=max(policy.max_reps, 100))  # cheap: many reps
    med, _, _ = _time_call(lambda: torch.matmul(a, b), lambda: None, device, pol, [])
    return 2.0 * n * D * 4 * D / (med * 1e-3)
