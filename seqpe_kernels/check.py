"""Parity check of every usable fused backend against the reference, on this machine (``seqpe-kernels check``).

For each usable backend (``available_backends(device)``) and a few configurations (1-D causal, 2-D bi,
mask_padding on, and dropout replayed through the fused module's recorded keep-masks where the backend
records them), on random-weight modules (every parameter perturbed) and fresh random positions:

* fp32: the fused output (train-mode forward and eval ``inference_mode`` forward) and **every** parameter
  gradient must match the fp32 reference to ``FP32_RTOL`` relative to max |reference| (KERNEL_GUIDE §5).
* bf16 / fp16 (CUDA only): the two-error rule -- err(fused under autocast vs fp32 reference) <=
  2 * err(reference under autocast vs fp32 reference) + atol, per output and per gradient (max-abs errors), with
  one element's rounding noise told apart from a less accurate path (``judge_two_error``).

The reference itself is always checked against an fp64 run of itself (``reference-fp64`` rows), so the
check is real even where only the ``torch`` backend is usable; the backends that were skipped and why are
printed. Under the Triton interpreter (CPU) the shapes are tiny.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .backend import BACKENDS, BackendUnavailable, available_backends, cuda_device_problem, interpret_mode
from .precision import fp32_matmul
from .reference import SeqPE

FP32_RTOL = 1e-5          # fused fp32 vs fp32 reference, relative to max |reference|
FP64_RTOL = 1e-5          # reference fp32 vs reference fp64
LP_ATOL_ULPS = 0.25       # two-error rule: atol = LP_ATOL_ULPS * eps(dtype) * max |reference|
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
_DNAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


class CheckRequestError(ValueError):
    """The requested check cannot run here (unknown device / dtype / backend, or a backend named explicitly that
    is unusable on the device); raised before any work. ``seqpe-kernels check`` turns it into exit code 2."""


@dataclass(frozen=True)
class CheckCase:
    name: str
    kwargs: dict
    M: int
    dropout: bool = False   # replay the fused module's recorded dropout masks in the reference


def default_cases(device: torch.device) -> List[CheckCase]:
    """Tiny shapes on CPU (the Triton interpreter runs one program at a time), moderate ones on CUDA.

    M is prime and D not a power of two where the kernels allow it (KERNEL_GUIDE §5)."""
    if device.type == "cuda":
        d1 = dict(embed_dim=192, num_heads=3, max_digits=5, data_dim=1, out_dim=160, attn_direction="causal")
        d2 = dict(embed_dim=128, num_heads=2, max_digits=2, data_dim=2, out_dim=256, attn_direction="bi",
                  init="image")
        d3 = dict(embed_dim=128, num_heads=2, max_digits=4, data_dim=1, attn_direction="causal", mask_padding=True)
        Ms = (61, 53, 47, 41, 1031)  # (the last: ~6200 rows, several rows per LayerNorm-backward program)
    else:
        d1 = dict(embed_dim=32, num_heads=2, max_digits=5, data_dim=1, out_dim=24, attn_direction="causal")
        d2 = dict(embed_dim=32, num_heads=2, max_digits=2, data_dim=2, out_dim=48, attn_direction="bi",
                  init="image")
        d3 = dict(embed_dim=32, num_heads=2, max_digits=4, data_dim=1, attn_direction="causal", mask_padding=True)
        Ms = (7, 5, 11, 7, 131)  # (the last: ~800 rows, chunked over threads by the C++ CPU loops)
    nodrop = dict(resid_pdrop=0.0, attn_pdrop=0.0)
    return [
        CheckCase("1d-causal", {**d1, **nodrop}, Ms[0]),
        CheckCase("2d-bi", {**d2, **nodrop}, Ms[1]),
        CheckCase("1d-causal-maskpad", {**d3, **nodrop}, Ms[2]),
        CheckCase("1d-causal-dropout", {**d1, "resid_pdrop": 0.1, "attn_pdrop": 0.1}, Ms[3], dropout=True),
        CheckCase("1d-causal-many-rows", {**d3, **nodrop, "mask_padding": False}, Ms[4]),
    ]


# ------------------------------------------------------------------------------------------- helpers
def _random_module(case: CheckCase, device, gen: torch.Generator) -> SeqPE:
    ref = SeqPE(**case.kwargs)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.05
            p.add_(noise.to(p.dtype))    # every parameter moves away from its init (biases, LN, embeddings)
    return ref.to(device)


def _random_positions(case: CheckCase, gen: torch.Generator, device) -> torch.Tensor:
    K = case.kwargs["max_digits"]
    d = case.kwargs.get("data_dim", 1)
    M = case.M
    hi = torch.randint(0, 10 ** K, (M, d), generator=gen)
    lo = torch.randint(0, 10 ** max(K - 2, 1), (M, d), generator=gen)   # short numbers: left padding
    pick = torch.rand(M, d, generator=gen) < 0.5
    pos = torch.where(pick, lo, hi)
    pos[0] = 0
    return (pos[:, 0] if d == 1 else pos).to(device)


def _run(module: nn.Module, positions, g, autocast_dtype=None, replay: Optional[Dict] = None):
    """Train-mode forward + backward with upstream grad g; returns (out fp32, {name: grad fp32})."""
    module.train()
    for p in module.parameters():
        p.grad = None
    if replay is not None:
        module.dropout_masks = replay
    ctx = (torch.autocast(positions.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    try:
        with ctx:
            y = module(positions)
        y.backward(g.to(y.dtype))
    finally:
        if replay is not None:
            module.dropout_masks = None
    grads = {n: (p.grad.detach().to(torch.float64) if p.grad is not None else None)
             for n, p in module.named_parameters()}
    return y.detach().to(torch.float64), grads


def _run_nograd(module: nn.Module, positions, autocast_dtype=None):
    module.eval()
    ctx = (torch.autocast(positions.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with torch.inference_mode(), ctx:
        y = module(positions)
    module.train()
    return y.detach().to(torch.float64)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _scale(ref: torch.Tensor) -> float:
    return max(float(ref.abs().max()) if ref.numel() else 0.0, 1e-30)


@dataclass
class Quantity:
    name: str
    err: float        # absolute max error
    bound: float      # absolute bound
    scale: float      # max |reference|
    noise: str = ""   # two-error rule: why a max-abs error past its bound is one element's rounding noise
    why: str = ""     # two-error rule: why it is not (a failing quantity)

    @property
    def ok(self) -> bool:
        # a non-finite bound (the eager low-precision run or the reference overflowed) bounds nothing: a fail
        return math.isfinite(self.bound) and (self.err <= self.bound or bool(self.noise))

    @property
    def ratio(self) -> float:
        return self.err / self.bound if self.bound > 0 else (0.0 if self.err == 0 else float("inf"))


@dataclass
class CheckRow:
    backend: str
    case: str
    dtype: str
    status: str                      # pass | FAIL | skipped
    quantities: List[Quantity] = field(default_factory=list)
    note: str = ""

    def worst(self, grads: bool) -> Optional[Quantity]:
        qs = [q for q in self.quantities if q.name.startswith("grad:") == grads]
        return max(qs, key=lambda q: q.ratio) if qs else None


def _compare_fp32(y, grads, y_ref, grads_ref, rtol, extra: Sequence[Tuple[str, torch.Tensor, torch.Tensor]] = ()):
    qs, missing = [], []
    s = _scale(y_ref)
    qs.append(Quantity("out", _err(y, y_ref), rtol * s, s))
    for name, a, b in extra:
        sb = _scale(b)
        qs.append(Quantity(name, _err(a, b), rtol * sb, sb))
    for name, gr in grads_ref.items():
        gf = grads.get(name)
        if gr is None:
            continue
        if gf is None:
            missing.append(name)
            continue
        sg = _scale(gr)
        qs.append(Quantity(f"grad:{name}", _err(gf, gr), rtol * sg, sg))
    return qs, missing


@dataclass
class ErrStats:
    """One quantity's errors against the fp32 reference, fused and torch low precision, pooled over draws."""
    scale: float   # max |ref|
    ref_sq: float  # sum ref^2
    n: int
    f_max: float   # fused: max-abs error, sum of squared errors
    f_sq: float
    t_max: float   # torch's low-precision run: the same
    t_sq: float

    @classmethod
    def of(cls, fused: torch.Tensor, torch_lp: torch.Tensor, ref: torch.Tensor) -> "ErrStats":
        r = ref.detach().to(torch.float64)
        df = (fused.detach().to(torch.float64) - r).abs()
        dt = (torch_lp.detach().to(torch.float64) - r).abs()
        if not r.numel():
            return cls(1e-30, 0.0, 0, 0.0, 0.0, 0.0, 0.0)
        return cls(_scale(r), float(r.square().sum()), r.numel(), float(df.max()), float(df.square().sum()),
                   float(dt.max()), float(dt.square().sum()))

    def merge(self, o: "ErrStats") -> "ErrStats":
        return ErrStats(max(self.scale, o.scale), self.ref_sq + o.ref_sq, self.n + o.n, max(self.f_max, o.f_max),
                        self.f_sq + o.f_sq, max(self.t_max, o.t_max), self.t_sq + o.t_sq)


def judge_two_error(stats: Dict[str, ErrStats], dtype) -> List[Quantity]:
    """KERNEL_GUIDE §5's two-error rule per quantity: max-abs err(fused) <= 2 err(torch low precision) + atol,
    atol = LP_ATOL_ULPS * eps * max|ref|. A quantity past that bound still passes as one element's rounding noise
    (``Quantity.noise`` says so) when both
      * RMS: rms(fused error) <= 2 rms(torch error) + LP_ATOL_ULPS * eps * rms(ref) -- the fused path is not
        less accurate in this quantity as a whole, and
      * outlier: its max-abs error in units of eps * max|ref| <= 2x the largest such error torch's own low
        precision made in any quantity of the run + LP_ATOL_ULPS -- no element further off than torch puts
        elements elsewhere;
    otherwise it fails with ``Quantity.why``.

    Why not the max-abs rule alone: it compares the largest elements of two error vectors, whose ratio has a tail
    past 2 for two paths of the same accuracy. Measured on CPU (fp16 / bf16 autocast, the C++ and emulated CUDA
    backends, 1,500 draws): the fused errors, in eps * max|ref|, at or below torch's at every quantile (p50 0.89 /
    0.98, p99.9 2.76 / 2.88), yet one draw in 80-230 failed the max-abs rule on one element (worst 3.41 where
    torch's was 0.76), and maxima over 3-6 draws kept failing. With this judgement: no failure (worst 0.69 of its
    bound, 0.96 for that draw). What it gives up, per draw, against a defect confined to one quantity: one element
    off by 6 / 8 eps * max|ref| is caught in 98 / 100 % of single draws (the max-abs rule: 100 %), by 4 eps -- a
    size torch's own low precision reaches (its worst: 3.2 fp16, 4.1 bf16) -- in 63 % (97 %); a quantity with
    2.5x the rounding error in ~50 %, as by the max-abs rule (benchmarks/results/NOTES.md, 2026-12-01)."""
    eps = torch.finfo(dtype).eps
    worst_torch = max((s.t_max / (eps * s.scale) for s in stats.values()), default=0.0)
    qs = []
    for name, s in stats.items():
        q = Quantity(name, s.f_max, 2.0 * s.t_max + LP_ATOL_ULPS * eps * s.scale, s.scale)
        qs.append(q)
        if q.err <= q.bound or not math.isfinite(q.bound):
            continue
        n = max(s.n, 1)
        frms, trms, rrms = math.sqrt(s.f_sq / n), math.sqrt(s.t_sq / n), math.sqrt(s.ref_sq / n)
        rms_bound = 2.0 * trms + LP_ATOL_ULPS * eps * rrms
        units, out_bound = s.f_max / (eps * s.scale), 2.0 * worst_torch + LP_ATOL_ULPS
        why = []
        if not frms <= rms_bound:
            why.append(f"rms err {_fe(frms)} > {_fe(rms_bound)} (2 x torch's + atol)")
        if not units <= out_bound:
            why.append(f"{units:.2f} eps x max|ref| > {out_bound:.2f} (2 x torch's worst in any quantity, "
                       f"{worst_torch:.2f}, + {LP_ATOL_ULPS:g})")
        if why:
            q.why = ", ".join(why)
        else:
            q.noise = (f"rounding noise: rms err {frms / rms_bound:.2f}x its bound, the element "
                       f"{units / out_bound:.2f}x torch's worst")
    return qs


def _compare_two_error(y, grads, y_lp, grads_lp, y_ref, grads_ref, dtype, extra=()):
    """judge_two_error on one draw: the output, ``extra`` (name, fused, torch low precision, reference) and every
    parameter gradient."""
    stats, missing = {"out": ErrStats.of(y, y_lp, y_ref)}, []
    for name, a, t, r in extra:
        stats[name] = ErrStats.of(a, t, r)
    for name, gr in grads_ref.items():
        if gr is None:
            continue
        gf, gt = grads.get(name), grads_lp.get(name)
        if gf is None or gt is None:  # (no eager low-precision gradient: no bound to hold it to)
            missing.append(name)
            continue
        stats[f"grad:{name}"] = ErrStats.of(gf, gt, gr)
    return judge_two_error(stats, dtype), missing


def _fused_from(ref: SeqPE, backend: str):
    from .bench import fused_from_reference
    return fused_from_reference(ref, backend)


# ------------------------------------------------------------------------------------------- driver
def run_check(device=None, dtypes: Optional[Iterable] = None, backends: Optional[Iterable[str]] = None,
              cases: Optional[Sequence[CheckCase]] = None, seed: Optional[int] = None, file=None,
              verbose: bool = True, threads: Optional[int] = None) -> bool:
    """Check every usable backend on ``device`` against the reference; print a table; False on any failure.

    device   default: cuda if available, else cpu
    dtypes   default: fp32 (+ bf16 and fp16 on CUDA); names or torch dtypes (bf16 / fp16 on CUDA only)
    backends default: every backend ``available_backends`` marks usable; named backends must each be usable
             here (else CheckRequestError, before any work) and each run at least one comparison (else False)
    seed     default: fresh (printed, so a failure can be reproduced with --seed)
    threads  torch CPU threads while checking (default on CPU: 1 -- the shapes are tiny, and on a shared
             machine spinning OpenMP threads slow the Triton interpreter down several-fold); restored after

    False also when no backend comparison ran at all: a check that compared nothing did not pass.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device)
        except (RuntimeError, ValueError, TypeError) as e:
            raise CheckRequestError(f"unknown device {device!r} ({e})") from None
    if threads is None and device.type == "cpu":
        threads = 1
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        # the fp32 parity (and the reference's against fp64) is defined in IEEE fp32 GEMMs: a script's global
        # TF32 switch would fail it at ~1e-3 through no fault of the kernels (restored afterwards)
        with fp32_matmul(tf32=False):
            return _run_check(device, dtypes, backends, cases, seed, file, verbose)
    finally:
        torch.set_num_threads(old)


def _run_check(device, dtypes, backends, cases, seed, file, verbose) -> bool:
    file = file or sys.stdout
    dtypes, usable, skipped = plan_check(device, dtypes, backends)
    explicit = backends is not None
    if seed is None:
        seed = int(time.time_ns() % (2 ** 31))
    cases = list(cases) if cases is not None else default_cases(device)

    rows: List[CheckRow] = []
    t_start = time.perf_counter()
    for ci, case in enumerate(cases):
        gen = torch.Generator().manual_seed(seed + 1000 * ci)
        ref = _random_module(case, device, gen)
        ref.check_range = True
        pos = _random_positions(case, gen, device)
        out_dim = ref.out_dim
        g = torch.randn(case.M, out_dim, generator=gen).to(device)

        # the reference against an fp64 run of itself: always real, whatever backends exist
        if not case.dropout:
            y32, g32 = _run(ref, pos, g)
            ref64 = copy.deepcopy(ref).double()
            y64, g64 = _run(ref64, pos, g.double())
            n32, n64 = _run_nograd(ref, pos), _run_nograd(ref64, pos)
            qs, missing = _compare_fp32(y32, g32, y64, g64, FP64_RTOL, extra=[("nograd", n32, n64)])
            rows.append(_row("reference-fp64", case, "fp32", qs, missing))
            del ref64
        else:
            y32 = g32 = None

        for b in usable:
            try:
                fused = _fused_from(ref, b)
            except BackendUnavailable as e:
                rows.append(CheckRow(b, case.name, "-", "skipped", note=str(e)))
                continue
            for dt in dtypes:
                dname = _DNAME.get(dt, str(dt))
                if dt != torch.float32 and device.type != "cuda":
                    rows.append(CheckRow(b, case.name, dname, "skipped",
                                         note="low-precision parity runs on CUDA only (the Triton interpreter "
                                              "has known bf16 defects)"))
                    continue
                try:
                    rows.append(_check_one(b, case, ref, fused, pos, g, dt, y32, g32))
                except BackendUnavailable as e:
                    rows.append(CheckRow(b, case.name, dname, "skipped", note=str(e)))
                except Exception as e:  # a crash is a failure, reported with its reason
                    rows.append(CheckRow(b, case.name, dname, "FAIL", note=f"{type(e).__name__}: {e}"))
            del fused
    ran = _comparisons_per_backend(rows, usable)
    not_run = [b for b, n in ran.items() if n == 0]
    why_not = ""
    if not any(ran.values()):
        why_not = "no backend comparison ran"
    elif explicit and not_run:
        why_not = f"requested backend{'s' if len(not_run) > 1 else ''} {', '.join(not_run)} ran no comparison"
    ok = all(r.status != "FAIL" for r in rows) and not why_not
    if verbose:
        print(format_check_table(rows, device, seed, skipped, time.perf_counter() - t_start), file=file)
        print(f"check {'PASSED' if ok else 'FAILED'}" + (f" ({why_not})" if why_not else ""), file=file)
    return ok


def plan_check(device: torch.device, dtypes, backends) -> Tuple[List[torch.dtype], List[str], Dict[str, str]]:
    """(dtypes, backends to run, {backend not checked: why}); CheckRequestError for a request that cannot run."""
    bad = cuda_device_problem(device)
    if bad:
        raise CheckRequestError(f"device {device}: {bad}")
    if device.type not in ("cpu", "cuda"):
        raise CheckRequestError(f"device {device}: the check runs on cpu or cuda devices")
    if dtypes is None:
        dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device.type == "cuda" else [])
    out = []
    for d in dtypes:
        if isinstance(d, str) and d not in _DTYPES:
            raise CheckRequestError(f"unknown dtype {d!r}; choose from {', '.join(_DTYPES)}")
        dt = _DTYPES[d] if isinstance(d, str) else d
        if dt not in (torch.float32, torch.bfloat16, torch.float16):
            raise CheckRequestError(f"dtype {d} is not checked; choose from fp32, bf16, fp16")
        if dt != torch.float32 and device.type != "cuda":
            raise CheckRequestError(f"dtype {_DNAME[dt]}: low-precision parity runs on CUDA only (the Triton "
                                    "interpreter has known bf16 defects); use fp32 on cpu")
        if dt not in out:
            out.append(dt)
    if not out:
        raise CheckRequestError("no dtype to check")
    table = available_backends(device)
    if backends is None:
        usable = [b for b in BACKENDS if table[b][0]]
        return out, usable, {b: table[b][1] for b in BACKENDS if not table[b][0]}
    wanted = list(dict.fromkeys(backends))
    if not wanted:
        raise CheckRequestError("no backend to check")
    unknown = [b for b in wanted if b not in table]
    if unknown:
        raise CheckRequestError(f"unknown backend{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                                f"choose from {', '.join(BACKENDS)}")
    unusable = [f"{b} ({table[b][1]})" for b in wanted if not table[b][0]]
    if unusable:
        raise CheckRequestError(f"backend cannot run on {device}: " + "; ".join(unusable))
    return out, wanted, {}


def _comparisons_per_backend(rows: List["CheckRow"], backends: Sequence[str]) -> Dict[str, int]:
    """{backend: rows that compared something (pass or FAIL)}, for every backend that was to run."""
    ran = {b: 0 for b in backends}
    for r in rows:
        if r.backend in ran and r.status != "skipped":
            ran[r.backend] += 1
    return ran


def _row(backend, case, dname, qs, missing, note=""):
    status = "pass" if all(q.ok for q in qs) and not missing else "FAIL"
    if missing:
        note = (note + "; " if note else "") + "no gradient for " + ", ".join(missing)
    return CheckRow(backend, case.name, dname, status, qs, note)


def _mask_rates(fused, masks) -> str:
    """The recorded keep-masks replay the kernels' own draw, so a draw that drops too little (or nothing) would
    pass the replay comparison: each site's dropped fraction, over the entries it draws (the last layer: its CLS
    query / row only), must be p within 6 binomial standard deviations. '' if so, else what is off."""
    nl, p_res, p_att = fused.num_layers, fused.resid_pdrop, fused.attn_pdrop
    out = []
    for name, t in masks.items():
        i = int(re.search(r"(\d+)$", name).group(1))  # attn{i}, resid_attn{i}, resid_mlp{i}
        last = i == nl - 1
        attn = name.startswith("attn")
        drawn = (t[:, :, -1:] if attn else t[:, -1]) if last else t
        p = p_att if attn else p_res
        n = drawn.numel()
        frac = float((drawn == 0).sum()) / max(n, 1)
        if abs(frac - p) > 6 * math.sqrt(p * (1 - p) / max(n, 1)) + 1e-3:
            out.append(f"{name} drops {frac:.3f} of {n} entries for p={p:g}")
    return "; ".join(out)


def _check_one(b, case, ref, fused, pos, g, dt, y32, g32) -> CheckRow:
    dname = _DNAME.get(dt, str(dt))
    replay = None
    note = ""
    if case.dropout:
        if dt != torch.float32:
            return CheckRow(b, case.name, dname, "skipped", note="dropout replay is checked in fp32")
        if not hasattr(fused, "record_dropout_masks"):
            return CheckRow(b, case.name, dname, "skipped", note="backend cannot record its dropout masks")
        fused.record_dropout_masks = {}
        y, gr = _run(fused, pos, g)
        replay = fused.record_dropout_masks
        fused.record_dropout_masks = None
        if not replay:
            if b == "torch":
                return CheckRow(b, case.name, dname, "skipped",
                                note="this backend does not record dropout masks (its dropout is torch's own)")
            return CheckRow(b, case.name, dname, "FAIL", note=(
                "recorded no dropout masks although the module's dropout p > 0: its kernels apply no dropout"))
        bad = _mask_rates(fused, replay)
        if bad:
            return CheckRow(b, case.name, dname, "FAIL", note="dropout masks drop at the wrong rate: " + bad)
        y_ref, gr_ref = _run(ref, pos, g, replay=replay)
        qs, missing = _compare_fp32(y, gr, y_ref, gr_ref, FP32_RTOL)
        return _row(b, case, dname, qs, missing, "dropout masks replayed in the reference")
    if dt == torch.float32:
        y, gr = _run(fused, pos, g)
        n = _run_nograd(fused, pos)
        n_ref = _run_nograd(ref, pos)
        qs, missing = _compare_fp32(y, gr, y32, g32, FP32_RTOL, extra=[("nograd", n, n_ref)])
        return _row(b, case, dname, qs, missing, note)
    y, gr = _run(fused, pos, g, autocast_dtype=dt)
    y_lp, gr_lp = _run(ref, pos, g, autocast_dtype=dt)
    n = _run_nograd(fused, pos, dt)
    n_lp = _run_nograd(ref, pos, dt)
    n32 = _run_nograd(ref, pos)
    qs, missing = _compare_two_error(y, gr, y_lp, gr_lp, y32, g32, dt, extra=[("nograd", n, n_lp, n32)])
    return _row(b, case, dname, qs, missing, "two-error rule vs torch autocast")


def _fe(x: float) -> str:
    return f"{x:.2e}"


def format_check_table(rows: List[CheckRow], device, seed, skipped: Dict[str, str], secs: float) -> str:
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"seqpe-kernels parity check on {dev}  (torch {torch.__version__}, seed {seed}, "
             f"TRITON_INTERPRET={'1' if interpret_mode() else '0'}, {secs:.1f} s)",
             f"errors are max |fused - reference|; bounds: fp32 {FP32_RTOL:g} x max|ref|, reference-fp64 "
             f"{FP64_RTOL:g} x max|ref|, bf16/fp16 2 x err(torch autocast) + {LP_ATOL_ULPS:g} eps x max|ref| "
             "(or, for one element, rounding noise: judge_two_error)",
             "",
             f"{'backend':<15} {'case':<18} {'dtype':<5} {'out err':>9} {'bound':>9} {'nograd':>9} "
             f"{'worst grad err':>14} {'bound':>9}  {'(parameter)':<34} result"]
    for r in rows:
        if r.status == "skipped":
            lines.append(f"{r.backend:<15} {r.case:<18} {r.dtype:<5} skipped: {r.note}")
            continue
        out = next((q for q in r.quantities if q.name == "out"), None)
        ng = next((q for q in r.quantities if q.name == "nograd"), None)
        wg = r.worst(grads=True)
        if out is None:
            lines.append(f"{r.backend:<15} {r.case:<18} {r.dtype:<5} {r.status}: {r.note}")
            continue
        lines.append(
            f"{r.backend:<15} {r.case:<18} {r.dtype:<5} {_fe(out.err):>9} {_fe(out.bound):>9} "
            f"{(_fe(ng.err) if ng else '-'):>9} {(_fe(wg.err) if wg else '-'):>14} {(_fe(wg.bound) if wg else '-'):>9}"
            f"  {(wg.name[5:] if wg else ''):<34} {r.status}" + (f"  ({r.note})" if r.note else ""))
        for q in r.quantities:
            if not q.ok:
                lines.append(f"{'':<15} failing: {q.name} err {_fe(q.err)} > bound {_fe(q.bound)} "
                             f"(max|ref| {_fe(q.scale)})" + (f"; {q.why}" if q.why else ""))
            elif q.noise:
                lines.append(f"{'':<15} passing: {q.name} err {_fe(q.err)} > bound {_fe(q.bound)}, "
                             f"{q.noise}")
    ran: Dict[str, List[int]] = {}  # backend: [compared, skipped] (in the order they ran)
    for r in rows:
        if r.backend != "reference-fp64":
            ran.setdefault(r.backend, [0, 0])[r.status == "skipped"] += 1
    lines.append("")
    lines.append("backends compared against the reference: " + (", ".join(
        f"{b} ({n} comparison{'s' if n != 1 else ''}" + (f", {k} skipped" if k else "") + ")"
        for b, (n, k) in ran.items()) or "none"))
    if skipped:
        lines.append("backends not checked on this device:")
        for b, why in skipped.items():
            lines.append(f"  {b:<7} {why}")
    n_fused = sum(1 for r in rows if r.backend != "reference-fp64" and r.status != "skipped")
    n_real = sum(1 for r in rows if r.backend not in ("reference-fp64", "torch") and r.status != "skipped")
    if n_real == 0:
        lines.append("note: no fused backend ran here; the rows above check the reference against fp64 and the "
                     "'torch' backend (the reference path of FusedSeqPE) against the reference.")
    lines.append(f"{sum(r.status == 'pass' for r in rows)} passed, {sum(r.status == 'FAIL' for r in rows)} failed, "
                 f"{sum(r.status == 'skipped' for r in rows)} skipped ({n_fused} fused-backend comparisons)")
    if any(q.noise for r in rows for q in r.quantities):
        lines.append("note: 'passing' lines are max-abs errors past the two-error bound on one element that the "
                     "judgement (check.judge_two_error) reads as rounding noise: the quantity's RMS error within 2x "
                     "torch's, the element within 2x torch's worst anywhere in the run.")
    lp_fail = [r for r in rows if r.status == "FAIL" and r.dtype in ("bf16", "fp16") and r.quantities
               and sum(not q.ok for q in r.quantities) == 1]
    if lp_fail:
        # a failure on one quantity that the judgement did not read as rounding noise: not seen in 1,500 CPU draws
        # of the fused paths, but one draw is one draw
        lines.append("note: a two-error-rule failure on a single quantity: re-run with other seeds (--seed) to "
                     "confirm; a kernel defect fails again.")
    return "\n".join(lines)
