"""Benchmarks of the SeqPE encoder: every provider side by side in one process (KERNEL_GUIDE §6).

Providers
  eager     the reference ``SeqPE`` (the baseline; always measured)
  compile   ``torch.compile`` of the reference (compile time excluded by warm-up; a failure is recorded
            with its reason and the run goes on)
  compile-cg  ``torch.compile(mode="reduce-overhead")``: compiled and replayed as CUDA graphs (CUDA only), the
            fair baseline for the graph providers
  triton, cuda, cpu
            ``FusedSeqPE`` with that backend, only where ``available_backends`` says it is usable
            (Triton is never timed under the interpreter)
  triton-graph, cuda-graph
            the same, wrapped in ``GraphedSeqPE`` (forward and backward replayed as CUDA graphs; CUDA only)
  The three CUDA-graph providers run by default on CUDA and are skipped with the reason on CPU; to leave them
  out, name the providers to run (``--provider eager compile triton cuda ...``; Python:
  ``run_bench(..., cuda_graphs=False)``).
  dedup, prefix, cache
            ``dedup_forward`` / ``prefix_shared_forward`` (seqpe_kernels.dedup) and ``SeqPECache``
            (seqpe_kernels.cache), when those modules exist, in ``nograd`` mode only (the only mode in which
            they are exact) and only after their output matched the reference

Modes
  forward   train mode (dropout on), grad enabled: the forward of a training step
  backward  backward only, through a retained graph (``retain_graph=True``); where that is not supported
            it is derived as full - forward and the row says so. The CUDA-graph providers are always derived:
            a captured backward reads the activations its own forward replay left in the graph's pool and
            overwrites them while it runs, so it cannot be replayed on its own (GraphedSeqPE refuses it;
            repeating it is the likely cause of the illegal memory access in the first H100 run with graph
            providers)
  full      forward + backward
  nograd    eval mode under ``torch.inference_mode``

Workloads are SEQPE_SPEC §6: the positions of one training step, merged in the order
main ; pivots ; candidates ; transfer (§5.7), drawn with a seeded generator that imitates the samplers
of §4.5 / §5.1 / §5.3. Text runs under bf16 autocast on CUDA (as accelerate does) and in fp32 on CPU; the
ViT configs are fp32.

Metrics per row: median / p20 / p80 ms (``triton.testing.do_bench`` on CUDA; ``time.perf_counter`` on CPU),
peak memory of one call, host time per call (CUDA only), achieved TFLOP/s counting the reference's GEMM
FLOPs, and ``floor_ratio`` = (minimal exact GEMM FLOPs / GEMM rate measured in this run) / measured time,
i.e. the fraction of the speed of light that the provider reaches (1.0 = at the floor; the minimal work
uses the CLS-only last layer of SEQPE_SPEC §2.8; deduplicating providers can exceed 1).
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .backend import BackendUnavailable, available_backends, interpret_mode
from .reference import SeqPE

MODES = ("forward", "backward", "full", "nograd")
QUICK_MODES = ("forward", "full", "nograd")
FUSED_PROVIDERS = ("triton", "cuda", "cpu")
GRAPH_PROVIDERS = ("triton-graph", "cuda-graph")   # the fused backends replayed as CUDA graphs (GraphedSeqPE)
ALGO_PROVIDERS = ("dedup", "prefix", "cache")
PROVIDERS = ("eager", "compile", "compile-cg") + FUSED_PROVIDERS + GRAPH_PROVIDERS + ALGO_PROVIDERS
CUDA_GRAPH_PROVIDERS = ("compile-cg",) + GRAPH_PROVIDERS
# every provider by default; the CUDA-graph ones are skipped with the reason off CUDA (run_bench(cuda_graphs=False)
# or an explicit provider list leaves them out)
DEFAULT_PROVIDERS = PROVIDERS
# why the CUDA-graph providers' backward row is derived (full - forward) instead of timed on its own
GRAPH_BACKWARD_NOTE = ("backward-only timing not applicable to CUDA-graph replay (a captured backward consumes the "
                       "activations of its own forward replay; repeating it without one reads overwritten memory): "
                       "derived as full - forward")
TRAIN_MODES = ("forward", "backward", "full")

CSV_COLUMNS = (
    "config", "provider", "mode", "status", "M", "T", "tokens", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
    "host_ms", "tflops", "floor_ratio", "speedup_vs_eager", "gemm_tflops", "ref_gflop", "floor_gflop",
    "warmup_s", "device", "torch_version", "triton_version", "cuda_version", "dtype", "git_commit", "date",
    "quick", "note")

QUICK_FWD_FLOPS = 3e9          # quick mode: M scaled so that one reference forward is about this many FLOPs
QUICK_CONFIGS = ("text-default", "vits-default")
SWEEP_M_CUDA = (128, 512, 2048, 8192, 32768)
SWEEP_M_CPU = (16, 64, 256)
SWEEP_M_CPU_QUICK = (8, 32)


# ------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class BenchConfig:
    """One benchmark size. ``workload`` picks the position generator; ``M`` the number of sequences.

    ``M_full`` is the size of one realistic step of the workload (SEQPE_SPEC §6); a different ``M`` keeps the
    mix of components (main windows / pivots / candidates / transfer) in proportion.
    """
    name: str
    workload: str            # text-default | text-shifted | vit-default | vit-shifted | uniform
    M: int
    embed_dim: int
    num_heads: int
    max_digits: int
    data_dim: int = 1
    out_dim: Optional[int] = None
    num_layers: int = 2
    attn_direction: str = "causal"
    resid_pdrop: float = 0.1
    cuda_autocast: Optional[str] = None   # "bf16" / "fp16": autocast dtype on CUDA (CPU always runs fp32)
    max_position: Optional[int] = None    # per-axis exclusive bound of the positions (default base**K)
    init: str = "text"

    @property
    def T(self) -> int:
        return self.data_dim * self.max_digits + 1

    @property
    def O(self) -> int:
        return self.out_dim if self.out_dim else self.embed_dim

    @property
    def tokens(self) -> int:
        return self.M * self.T

    @property
    def pos_bound(self) -> int:
        return min(self.max_position or 10 ** self.max_digits, 10 ** self.max_digits)

    def with_M(self, M: int) -> "BenchConfig":
        return replace(self, M=int(M))

    def module_kwargs(self) -> dict:
        return dict(embed_dim=self.embed_dim, num_heads=self.num_heads, max_digits=self.max_digits,
                    num_layers=self.num_layers, data_dim=self.data_dim, out_dim=self.out_dim,
                    attn_direction=self.attn_direction, resid_pdrop=self.resid_pdrop, attn_pdrop=0.0,
                    init=self.init)

    def dtype_label(self, device: torch.device) -> str:
        if device.type == "cuda" and self.cuda_autocast:
            return f"{self.cuda_autocast}-autocast"
        return "fp32"

    def autocast_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        if device.type == "cuda" and self.cuda_autocast:
            return {"bf16": torch.bfloat16, "fp16": torch.float16}[self.cuda_autocast]
        return None


_TEXT = dict(embed_dim=768, num_heads=12, max_digits=5, data_dim=1, out_dim=768, cuda_autocast="bf16",
             max_position=20000, init="text", resid_pdrop=0.1)
# ViT-S and ViT-B share the encoder (D=384, 6 heads); ViT-B projects to 768 and its script uses
# resid_pdrop 0.3 (SEQPE_SPEC §2.1) -- the rate does not change the cost.
_VIT = dict(embed_dim=384, num_heads=6, max_digits=2, data_dim=2, out_dim=384, cuda_autocast=None,
            max_position=100, init="image", resid_pdrop=0.1)

CONFIGS: Dict[str, BenchConfig] = {
    "text-default": BenchConfig("text-default", "text-default", 1552, **_TEXT),
    "text-shifted": BenchConfig("text-shifted", "text-shifted", 8720, **_TEXT),
    "vits-default": BenchConfig("vits-default", "vit-default", 4324, **_VIT),
    "vits-shifted": BenchConfig("vits-shifted", "vit-shifted", 8352, **_VIT),
    "vitb-default": BenchConfig("vitb-default", "vit-default", 4324, **{**_VIT, "out_dim": 768, "resid_pdrop": 0.3}),
    "vitb-shifted": BenchConfig("vitb-shifted", "vit-shifted", 8352, **{**_VIT, "out_dim": 768, "resid_pdrop": 0.3}),
}


def get_config(name_or_cfg: Union[str, BenchConfig, dict]) -> BenchConfig:
    if isinstance(name_or_cfg, BenchConfig):
        return name_or_cfg
    if isinstance(name_or_cfg, dict):
        d = dict(name_or_cfg)
        d.setdefault("workload", "uniform")
        return BenchConfig(**d)
    if name_or_cfg not in CONFIGS:
        raise ValueError(f"unknown bench config {name_or_cfg!r}; choose from {', '.join(CONFIGS)} or 'all'")
    return CONFIGS[name_or_cfg]


# ------------------------------------------------------------------------------------------- workloads
def _edit_digits(s: str, rng: np.random.Generator, max_chars: int, n_max: int) -> Optional[str]:
    """One hard-negative string surgery step (SEQPE_SPEC §5.1, simplified): insert/swap/replace/delete."""
    op = rng.integers(4)
    if op == 0:  # insert
        if len(s) >= max_chars:
            return None
        i = int(rng.integers(len(s) + 1))
        d = str(int(rng.integers(1, 10)) if i == 0 else int(rng.integers(10)))
        t = s[:i] + d + s[i:]
    elif op == 1:  # swap
        if len(s) < 2:
            return None
        i, j = rng.choice(len(s), 2, replace=False)
        lst = list(s)
        lst[i], lst[j] = lst[j], lst[i]
        t = "".join(lst)
        if t[0] == "0" or t == s:
            return None
    elif op == 2:  # replace
        i = int(rng.integers(len(s)))
        choices = [c for c in "0123456789" if c != s[i] and not (i == 0 and c == "0" and len(s) > 1)]
        t = s[:i] + choices[int(rng.integers(len(choices)))] + s[i + 1:]
    else:  # delete
        if len(s) < 2:
            return None
        i = int(rng.integers(len(s)))
        t = s[:i] + s[i + 1:]
        if len(t) > 1 and t[0] == "0":
            return None
    return t if int(t) < n_max else None


def _hard_negative(s: str, rng, max_chars: int, n_max: int) -> Optional[str]:
    n_edits = int(rng.integers(1, 4))
    cur, done = s, 0
    for _ in range(20):
        t = _edit_digits(cur, rng, max_chars, n_max)
        if t is not None and t != s:
            cur, done = t, done + 1
            if done == n_edits:
                return cur
    return cur if cur != s else None


def _merge_candidates(special: List, simple: List, pivot, C: int) -> List:
    out, seen = [], {pivot}
    for q in list(special) + list(simple):
        if q not in seen:
            seen.add(q)
            out.append(q)
        if len(out) == C:
            break
    return out


def _text_step(rng, shifted: bool, bound: int, N=512, P=16, B_c=16, C=32, B_t=16, T_n=32, R=256):
    parts = []
    if shifted:  # P consecutive windows of the fixed shift pool (§4.5)
        starts = rng.integers(0, max(bound - N, 0) + 1, size=P)
        parts.append(("main", np.concatenate([np.arange(s, s + N) for s in starts])))
    else:
        parts.append(("main", np.arange(N)))
    pivots = rng.integers(0, bound, size=B_c)
    parts.append(("pivots", pivots))
    cands = []
    for p in pivots.tolist():
        simple = rng.choice(bound, size=min(C + 1, bound), replace=False).tolist()
        if rng.random() < 0.4:   # hard negatives
            hard = [_hard_negative(str(p), rng, len(str(bound - 1)), bound) for _ in range(int(C * 0.25))]
            special = [int(h) for h in hard if h is not None]
        else:                    # distributional window, not centred on the pivot
            length = max(R, 5 * C)
            start = int((bound - length) * rng.random()) if bound > length else 0
            window = np.arange(start, min(start + length, bound))
            special = rng.choice(window, size=min(C, len(window)), replace=False).tolist()
        cands.extend(_merge_candidates(special, simple, p, C))
    parts.append(("candidates", np.asarray(cands)))
    if not shifted:  # transfer (only on unshifted steps)
        lo, hi = N // 4, max(bound - N - 1, N // 4)
        starts = rng.integers(lo, hi + 1, size=B_t)
        tr = [s + rng.choice(N, size=T_n, replace=False) for s in starts]
        parts.append(("transfer", np.concatenate(tr)))
    return [(k, np.mod(v, bound).reshape(-1, 1)) for k, v in parts]


def _vit_step(rng, shifted: bool, G: int, g=14, P=32, B_c=32, C=64, B_t=32, T_n=64):
    rr, cc = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    grid = np.stack([rr.ravel(), cc.ravel()], 1)  # row-major (h outer, w inner)
    parts = []
    if shifted:
        corners = rng.integers(0, max(G - g, 0) + 1, size=(P, 2))
        parts.append(("main", np.concatenate([grid + c for c in corners])))
    else:
        parts.append(("main", grid))
    pivots = rng.integers(0, G, size=(B_c, 2))
    parts.append(("pivots", pivots))
    K = len(str(G - 1))
    cands = []
    for r, c in pivots.tolist():
        flat = rng.choice(G * G, size=min(C + 1, G * G), replace=False)
        simple = [(int(f) // G, int(f) % G) for f in flat]
        u = rng.random()
        special = []
        if 0.5 <= u < 0.8:      # hard negatives on str(r)+str(c), split back at a random cut
            for _ in range(int(C * 0.2)):
                h = _hard_negative(str(r) + str(c), rng, K, G * G)
                if h is None:
                    continue
                if len(h) == 1:
                    h = h + "0" if rng.random() < 0.5 else "0" + h
                cuts = [k for k in range(1, len(h)) if len(h[:k]) <= K and len(h[k:]) <= K]
                if not cuts:
                    continue
                k = cuts[int(rng.integers(len(cuts)))]
                q = (int(h[:k]), int(h[k:]))
                if q[0] < G and q[1] < G:
                    special.append(q)
        elif u >= 0.8:          # distributional 17x17 block
            side = max(g, int(math.sqrt(5 * C)))
            corner = (rng.random(2) * max(G - side, 0)).astype(int)
            block = [(corner[0] + i // side, corner[1] + i % side) for i in range(side * side)]
            idx = rng.choice(len(block), size=min(C, len(block)), replace=False)
            special = [block[i] for i in idx]
        cands.extend(_merge_candidates(special, simple, (r, c), C))
    parts.append(("candidates", np.asarray(cands).reshape(-1, 2)))
    if not shifted:
        ok = [(i, j) for i in range(max(G - g - 1, 1)) for j in range(max(G - g - 1, 1)) if i >= g or j >= g]
        ok = ok or [(0, 0)]
        sel = rng.integers(0, len(ok), size=B_t)
        tr = [np.asarray(ok[s]) + grid[rng.choice(g * g, size=T_n, replace=False)] for s in sel]
        parts.append(("transfer", np.concatenate(tr)))
    return [(k, np.mod(v, G)) for k, v in parts]


def _workload_step(cfg: BenchConfig, rng) -> List[Tuple[str, np.ndarray]]:
    w = cfg.workload
    if w in ("text-default", "text-shifted"):
        return _text_step(rng, w == "text-shifted", cfg.pos_bound)
    if w in ("vit-default", "vit-shifted"):
        return _vit_step(rng, w == "vit-shifted", cfg.pos_bound)
    if w == "uniform":
        return [("uniform", rng.integers(0, cfg.pos_bound, size=(max(cfg.M, 1), cfg.data_dim)))]
    raise ValueError(f"unknown workload {w!r}")


def make_positions(cfg: BenchConfig, seed: int = 0, device="cpu") -> torch.Tensor:
    """The positions of one step of ``cfg.workload``, resized to ``cfg.M`` rows (int64 ``[M]`` or ``[M, d]``).

    Realistic steps are concatenated (fresh draws) until there are at least M rows; then every component
    keeps the same share of the M rows (windows keep their consecutive prefixes), so the mix of the step and
    its duplicate / shared-prefix structure survive the resizing.
    """
    rng = np.random.default_rng(seed)
    M = cfg.M
    comps: Dict[str, List[np.ndarray]] = {}
    total = 0
    while total < M or not comps:
        for k, v in _workload_step(cfg, rng):
            comps.setdefault(k, []).append(v)
            total += len(v)
    arrays = [(k, np.concatenate(v)) for k, v in comps.items()]
    sizes = [len(v) for _, v in arrays]
    keep = [int(math.floor(M * s / total)) for s in sizes]
    rest = M - sum(keep)
    for i in sorted(range(len(sizes)), key=lambda i: -(M * sizes[i] / total - keep[i]))[:rest]:
        keep[i] += 1
    pos = np.concatenate([v[:n] for (_, v), n in zip(arrays, keep)]) if M > 0 else np.zeros((0, cfg.data_dim))
    t = torch.as_tensor(pos.astype(np.int64)).reshape(M, cfg.data_dim)
    if cfg.data_dim == 1:
        t = t.reshape(M)
    return t.to(device)


# ------------------------------------------------------------------------------------------- FLOPs
def ref_fwd_flops(cfg: BenchConfig, M: Optional[int] = None) -> float:
    """GEMM FLOPs of the reference forward: 24·D²·tokens per layer + out_proj 2·D·O·M."""
    M = cfg.M if M is None else M
    D = cfg.embed_dim
    return cfg.num_layers * 24.0 * D * D * M * cfg.T + 2.0 * D * cfg.O * M


def floor_fwd_flops(cfg: BenchConfig, M: Optional[int] = None) -> float:
    """Minimal exact GEMM FLOPs: the last block computes only K/V (4·D²) for non-CLS rows (SEQPE_SPEC §2.8)."""
    M = cfg.M if M is None else M
    D, T = cfg.embed_dim, cfg.T
    full = (cfg.num_layers - 1) * 24.0 * D * D * M * T
    last = 4.0 * D * D * M * (T - 1) + 24.0 * D * D * M   # non-CLS rows: K and V; CLS row: everything
    return full + last + 2.0 * D * cfg.O * M


MODE_FLOP_FACTOR = {"forward": 1.0, "nograd": 1.0, "backward": 2.0, "full": 3.0}


# ------------------------------------------------------------------------------------------- provenance
def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
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
                cuda_version=torch.version.cuda or "", git_commit=_git_commit(),
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
    from .fused import FusedSeqPE
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
        from .graphs import GraphedSeqPE
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
        fn, why = _optional("dedup", "dedup_forward" if name == "dedup" else "prefix_shared_forward")
        if fn is None:
            return Provider(name, None, None, skip_reason=why)
        return Provider(name, ref, lambda pos, _f=fn: _f(ref, pos), modes=("nograd",),
                        note=f"{fn.__name__} over the eager reference")
    if name == "cache":
        cls, why = _optional("cache", "SeqPECache")
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
    scale = max(want.abs().max().item(), 1e-30)
    err = (got - want).abs().max().item() / scale
    tol = 1e-5 if ac_dtype is None else 2e-2
    if not err <= tol:
        return f"output differs from the reference (max rel err {err:.2e} > {tol:g}); not timed"
    return None


def measure(prov: Provider, mode: str, positions, cfg: BenchConfig, device: torch.device,
            policy: TimingPolicy) -> dict:
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
        mem, mem_note = _peak_mem_mb(fn, pre, device)
    finally:
        cleanup()
    return dict(median_ms=med, p20_ms=p20, p80_ms=p80, host_ms=host, peak_mem_mb=mem, warmup_s=warmup_s,
                note=mem_note)


# ------------------------------------------------------------------------------------------- driver
def _nan():
    return float("nan")


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    return d


def quick_M(cfg: BenchConfig) -> int:
    """M for quick mode: the forward is scaled to about QUICK_FWD_FLOPS (at most the real M)."""
    per_seq = ref_fwd_flops(cfg, 1)
    return int(max(8, min(cfg.M, round(QUICK_FWD_FLOPS / per_seq))))


def default_csv_path(device: torch.device, kind: str = "csv") -> str:
    return os.path.join("out", f"bench-{device_slug(device)}.{kind}")


def run_bench(configs: Optional[Iterable[Union[str, BenchConfig, dict]]] = None,
              providers: Optional[Iterable[str]] = None, modes: Optional[Iterable[str]] = None,
              quick: bool = False, sweep: bool = False, csv_path: Optional[str] = "default",
              png_path: Optional[str] = "default", progress: bool = True, device=None,
              M: Optional[int] = None, sweep_ms: Optional[Sequence[int]] = None, seed: int = 0,
              policy: Optional[TimingPolicy] = None, print_table: bool = True, file=None,
              threads: Optional[int] = None, cuda_graphs: bool = True) -> List[dict]:
    """Run the benchmark grid and return its rows (dicts with the CSV columns).

    configs   names from CONFIGS, "all", BenchConfig objects or dicts of BenchConfig fields
              (default: all; quick: text-default and vits-default, whose shifted / ViT-B twins differ only
              in M / out_dim, which quick mode scales away anyway)
    providers subset of PROVIDERS (default DEFAULT_PROVIDERS: all; the CUDA-graph ones are skipped with the
              reason off CUDA; "eager" is always measured: it is the baseline)
    cuda_graphs False: leave the CUDA-graph providers (compile-cg, triton-graph, cuda-graph) out of the default
              provider list (an explicit ``providers`` list is taken as given)
    modes     subset of MODES (default all; quick: forward, full, nograd)
    quick     small M (one forward ~ QUICK_FWD_FLOPS), short timing budget: for a 2-core CPU in minutes
    sweep     every config at each M of ``sweep_ms`` (default depends on device / quick)
    M         override the number of sequences of every config (tests; custom sizes)
    threads   CPU threads for torch (default: torch's own; quick mode on CPU: 1, because on a shared
              machine OpenMP's spinning threads make multi-threaded timings collapse by up to 10x)
    csv_path / png_path  "default" -> out/bench-<device>.{csv,png}; None -> not written
    """
    device = _resolve_device(device)
    file = file or sys.stdout
    if threads is None and quick and device.type == "cpu":
        threads = 1
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        if providers is None and not cuda_graphs:
            providers = [p for p in DEFAULT_PROVIDERS if p not in CUDA_GRAPH_PROVIDERS]
        return _run_bench(configs, providers, modes, quick, sweep, csv_path, png_path, progress, device, M,
                          sweep_ms, seed, policy, print_table, file)
    finally:
        torch.set_num_threads(old_threads)


def _run_bench(configs, providers, modes, quick, sweep, csv_path, png_path, progress, device, M, sweep_ms, seed,
               policy, print_table, file) -> List[dict]:
    if isinstance(configs, (str, BenchConfig, dict)):
        configs = [configs]
    configs = list(configs) if configs is not None else []
    if not configs or configs == ["all"]:
        cfgs = [CONFIGS[n] for n in (QUICK_CONFIGS if quick else CONFIGS)]
    else:
        cfgs = [get_config(c) for c in configs]
    providers = list(providers) if providers else list(DEFAULT_PROVIDERS)
    for p in providers:
        if p not in PROVIDERS:
            raise ValueError(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
    if "eager" not in providers:
        providers.insert(0, "eager")
    providers.sort(key=PROVIDERS.index)
    modes = list(modes) if modes else list(QUICK_MODES if quick else MODES)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if policy is None:
        policy = TimingPolicy(warmup=1, min_reps=3, max_reps=10, budget_s=1.0, cuda_warmup_ms=10,
                              cuda_rep_ms=40) if quick else TimingPolicy()

    # the list of (config, M) points
    points: List[BenchConfig] = []
    for cfg in cfgs:
        if sweep:
            ms = sweep_ms or (SWEEP_M_CUDA if device.type == "cuda" else
                              (SWEEP_M_CPU_QUICK if quick else SWEEP_M_CPU))
            points += [cfg.with_M(m) for m in ms]
        elif M is not None:
            points.append(cfg.with_M(M))
        elif quick:
            points.append(cfg.with_M(quick_M(cfg)))
        else:
            points.append(cfg)

    prov_info = provenance(device)
    rows: List[dict] = []
    tasks = [(c, p, m) for c in points for p in providers for m in modes]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(tasks), desc="seqpe bench", unit="run", file=sys.stderr, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    try:
        import torch._dynamo as dynamo
    except Exception:  # pragma: no cover
        dynamo = None
    ref, ref_key = None, None
    for cfg in points:
        key = replace(cfg, M=0)
        if key != ref_key:  # a new configuration (sweep points of one config share module and graphs)
            ref = None
            if dynamo is not None:
                dynamo.reset()  # no stale graphs / recompile-limit carry-over between configs
            if device.type == "cuda":
                torch.cuda.empty_cache()
            torch.manual_seed(seed)
            ref = SeqPE(**cfg.module_kwargs()).to(device)
            ref.check_range = False  # positions are generated in range; the check is one host sync per call
            ref_key = key
        positions = make_positions(cfg, seed=seed, device=device)
        rate = measure_gemm_rate(cfg, device, policy)
        ac = cfg.autocast_dtype(device)
        base = dict(config=cfg.name, M=cfg.M, T=cfg.T, tokens=cfg.tokens, dtype=cfg.dtype_label(device),
                    gemm_tflops=rate / 1e12, quick=bool(quick), **prov_info)
        for pname in providers:
            prov = build_provider(pname, cfg, ref, device)
            if not prov.skip_reason and pname in ALGO_PROVIDERS:
                try:
                    bad = check_exact(prov, ref, positions, ac, device)
                except Exception as e:
                    bad = f"{type(e).__name__}: {e}"
                if bad:
                    prov = Provider(pname, None, None, skip_reason=bad)
            for mode in modes:
                if bar is not None:
                    bar.set_postfix_str(f"{cfg.name} M={cfg.M} {pname}/{mode}", refresh=False)
                elif device.type == "cuda":
                    # without the bar, still name each run: a CUDA fault kills the process without a row
                    print(f"[bench] {cfg.name} M={cfg.M} {pname}/{mode}", file=sys.stderr, flush=True)
                row = dict(base, provider=pname, mode=mode)
                ff = MODE_FLOP_FACTOR[mode]
                row["ref_gflop"] = ref_fwd_flops(cfg) * ff / 1e9
                row["floor_gflop"] = floor_fwd_flops(cfg) * ff / 1e9
                if mode not in prov.modes and not (mode == "backward" and prov.backward_derived
                                                   and not prov.skip_reason):
                    if bar is not None:
                        bar.update(1)
                    continue  # not applicable (dedup/prefix/cache are exact only without grad)
                if mode not in prov.modes:  # CUDA-graph providers: backward = full - forward, with the reason
                    row.update(status="derived", note=prov.backward_derived)
                elif prov.skip_reason:
                    row.update(status="skipped", note=prov.skip_reason)
                else:
                    try:
                        with _dynamo_strict():
                            res = measure(prov, mode, positions, cfg, device, policy)
                        row.update(res, status="ok")
                        row["note"] = "; ".join(x for x in (prov.note, row.get("note", "")) if x)
                    except BackendUnavailable as e:
                        row.update(status="skipped", note=str(e))
                    except Exception as e:
                        if mode == "backward":
                            row.update(status="derived", note=f"retain_graph backward failed "
                                                              f"({type(e).__name__}: {_short(e)}); full - forward")
                        else:
                            row.update(status="failed", note=f"{type(e).__name__}: {_short(e)}")
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                rows.append(row)
                if bar is not None:
                    bar.update(1)
            # drop the provider's module/compiled code before the next provider
            del prov
        _derive_backward(rows, cfg)
        _fill_metrics(rows, cfg, rate)
    if bar is not None:
        bar.close()
    for r in rows:
        for c in CSV_COLUMNS:
            r.setdefault(c, _nan() if c.endswith(("_ms", "_mb", "tflops", "ratio", "eager", "_s")) else "")
    if print_table:
        print(format_table(rows, quick=quick, device=device), file=file)
    if csv_path == "default":
        csv_path = default_csv_path(device, "csv")
    if png_path == "default":
        png_path = default_csv_path(device, "png")
    if csv_path:
        write_csv(rows, csv_path)
        print(f"wrote {csv_path}", file=file)
    if png_path:
        try:
            plot(rows, png_path)
            print(f"wrote {png_path}", file=file)
        except Exception as e:  # plotting must never lose the measurements
            print(f"could not draw {png_path}: {type(e).__name__}: {e}", file=file)
    return rows


@contextlib.contextmanager
def _dynamo_strict():
    """Make torch.compile fail loudly instead of silently falling back to eager at the recompile limit."""
    try:
        import torch._dynamo
        patch = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=64)
    except Exception:
        patch = contextlib.nullcontext()
    with patch:
        yield


def _short(e: BaseException, n: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[:n] + "..."


def _derive_backward(rows: List[dict], cfg: BenchConfig):
    """Rows marked 'derived': backward = full - forward of the same provider (medians; p20/p80 likewise)."""
    mine = [r for r in rows if r["config"] == cfg.name and r["M"] == cfg.M]
    by = {(r["provider"], r["mode"]): r for r in mine}
    for r in mine:
        if r.get("status") != "derived":
            continue
        f, fu = by.get((r["provider"], "forward")), by.get((r["provider"], "full"))
        if f and fu and f.get("status") == "ok" and fu.get("status") == "ok":
            for k in ("median_ms", "p20_ms", "p80_ms"):
                r[k] = max(fu[k] - f[k], 0.0)
        else:
            r["status"] = "failed"
            r["note"] += " (forward and full rows needed to derive it are missing)"


def _fill_metrics(rows: List[dict], cfg: BenchConfig, rate: float):
    mine = [r for r in rows if r["config"] == cfg.name and r["M"] == cfg.M]
    eager = {r["mode"]: r.get("median_ms") for r in mine if r["provider"] == "eager" and r.get("status") in ("ok", "derived")}
    for r in mine:
        med = r.get("median_ms", _nan())
        if r.get("status") not in ("ok", "derived") or not med or med != med:
            r["tflops"] = r["floor_ratio"] = r["speedup_vs_eager"] = _nan()
            continue
        secs = med * 1e-3
        r["tflops"] = r["ref_gflop"] * 1e9 / secs / 1e12
        r["floor_ratio"] = (r["floor_gflop"] * 1e9 / rate) / secs
        e = eager.get(r["mode"])
        r["speedup_vs_eager"] = (e / med) if e and e == e else _nan()


# ------------------------------------------------------------------------------------------- output
def write_csv(rows: List[dict], path: str):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt_csv(r.get(k, "")) for k in CSV_COLUMNS})


def _fmt_csv(v):
    if isinstance(v, float):
        return "" if v != v else f"{v:.6g}"
    return v


def _f(v, fmt):
    if v is None or (isinstance(v, float) and v != v) or v == "":
        return "-"
    return format(v, fmt)


def format_table(rows: List[dict], quick: bool = False, device=None) -> str:
    lines = []
    if rows:
        r0 = rows[0]
        lines.append(f"SeqPE encoder benchmark  device: {r0['device']}  torch {r0['torch_version']}  "
                     f"triton {r0['triton_version'] or '-'}  CUDA {r0['cuda_version'] or '-'}  commit {r0['git_commit']}")
    if quick:
        lines.append(f"QUICK mode: M scaled down so one reference forward is ~{QUICK_FWD_FLOPS / 1e9:.0f} GFLOP "
                     "(NOT the SEQPE_SPEC §6 step sizes); short timing budget.")
    if device is not None and torch.device(device).type == "cpu":
        lines.append("CPU timings are only meaningful as ratios measured in the same run.")
    hdr = (f"{'provider':<9} {'mode':<8} {'median ms':>10} {'p20':>9} {'p80':>9} {'mem MB':>8} {'host ms':>8} "
           f"{'TFLOP/s':>8} {'floor':>6} {'vs eager':>8}")
    points = []
    for r in rows:
        k = (r["config"], r["M"])
        if k not in points:
            points.append(k)
    skipped = {}
    for name, M in points:
        mine = [r for r in rows if r["config"] == name and r["M"] == M]
        r0 = mine[0]
        lines.append("")
        lines.append(f"== {name}  M={M} T={r0['T']} tokens={r0['tokens']} dtype={r0['dtype']}  "
                     f"fwd {r0['ref_gflop'] / MODE_FLOP_FACTOR[r0['mode']]:.2f} GFLOP (floor "
                     f"{r0['floor_gflop'] / MODE_FLOP_FACTOR[r0['mode']]:.2f})  "
                     f"GEMM rate {r0['gemm_tflops']:.3g} TFLOP/s")
        lines.append(hdr)
        for r in mine:
            if r["status"] == "skipped":
                skipped.setdefault((r["provider"], r["note"]), set()).add(name)
                continue
            if r["status"] == "failed":
                lines.append(f"{r['provider']:<9} {r['mode']:<8} FAILED: {r['note']}")
                continue
            mark = "*" if r["status"] == "derived" else ""
            lines.append(f"{r['provider']:<9} {r['mode']:<8} {_f(r['median_ms'], '10.3f')}{mark:1}"
                         f"{_f(r['p20_ms'], '9.3f')} {_f(r['p80_ms'], '9.3f')} {_f(r['peak_mem_mb'], '8.1f')} "
                         f"{_f(r['host_ms'], '8.3f')} {_f(r['tflops'], '8.4f')} {_f(r['floor_ratio'], '6.3f')} "
                         f"{_f(r['speedup_vs_eager'], '7.2f')}x")
    if any(r["status"] == "derived" for r in rows):
        lines.append("* backward derived as full - forward (retained-graph backward not supported by that provider)")
    if skipped:
        lines.append("")
        lines.append("skipped providers:")
        for (p, why), names in sorted(skipped.items()):
            lines.append(f"  {p:<8} {why}")
    lines.append("floor = (minimal exact GEMM FLOPs / measured GEMM rate) / time; 1.0 = at the floor.")
    return "\n".join(lines)


def plot(rows: List[dict], path: str):
    """Speed-up vs eager: bars per config/mode, or lines over M when a config was swept."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") in ("ok", "derived") and r["provider"] != "eager"
          and r.get("speedup_vs_eager") == r.get("speedup_vs_eager")]
    names = []
    for r in rows:
        if r["config"] not in names:
            names.append(r["config"])
    n = max(len(names), 1)
    ncol = min(n, 3)
    nrow = int(math.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 3.8 * nrow), squeeze=False)
    title = rows[0]["device"] if rows else ""
    for i, name in enumerate(names):
        ax = axes[i // ncol][i % ncol]
        mine = [r for r in ok if r["config"] == name]
        Ms = sorted({r["M"] for r in rows if r["config"] == name})
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        if len(Ms) > 1:
            for key in sorted({(r["provider"], r["mode"]) for r in mine}):
                pts = sorted((r["M"], r["speedup_vs_eager"]) for r in mine if (r["provider"], r["mode"]) == key)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]}/{key[1]}")
            ax.set_xscale("log")
            ax.set_xlabel("M (sequences)")
        else:
            modes = [m for m in MODES if any(r["mode"] == m for r in rows if r["config"] == name)]
            provs = [p for p in PROVIDERS if any(r["provider"] == p for r in mine)]
            width = 0.8 / max(len(provs), 1)
            for j, p in enumerate(provs):
                xs, ys = [], []
                for k, m in enumerate(modes):
                    v = [r["speedup_vs_eager"] for r in mine if r["provider"] == p and r["mode"] == m]
                    if v:
                        xs.append(k + (j - (len(provs) - 1) / 2) * width)
                        ys.append(v[0])
                bars = ax.bar(xs, ys, width=width, label=p)
                for b_, v in zip(bars, ys):
                    ax.annotate(f"{v:.3g}x", (b_.get_x() + b_.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=6, xytext=(0, 1), textcoords="offset points")
            ax.set_xticks(range(len(modes)))
            ax.set_xticklabels(modes)
        dt = next((r["dtype"] for r in rows if r["config"] == name), "")
        ax.set_title(f"{name} ({dt}, M={','.join(map(str, Ms))})", fontsize=9)
        ax.set_ylabel("speed-up vs eager (log)")
        ax.set_yscale("log")
        if mine:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no provider besides eager ran", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8)
    for j in range(len(names), nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    fig.suptitle(f"SeqPE encoder: speed-up vs eager reference -- {title}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
