"""The one place that decides which implementation runs a FusedSeqPE forward.

Backends:
  torch   eager reference (always available)
  triton  fused Triton kernels (CUDA tensors; CPU only under TRITON_INTERPRET=1, for tests)
  cuda    C++/CUDA extension (CUDA tensors), built from csrc/ (JIT on first use, or ahead of time)
  cpu     C++ CPU extension (CPU tensors), same build
  auto    triton on CUDA tensors, else the best usable CPU path, else torch

`SEQPE_KERNELS_BACKEND` overrides ``backend="auto"``. An explicit request that cannot be met raises
with the reason; ``auto`` falls back with one warning per (reason) naming why.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Dict, Optional, Tuple

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")
MAX_TRITON_T = 32  # tokens per sequence (incl. CLS) the attention kernel handles


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs; the message says why."""


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_ERR: list = []  # memo (a plain list, not lru_cache: torch.compile traces this function)


def _triton_import_error() -> Optional[str]:
    if not _TRITON_ERR:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_ERR.append(None)
        except Exception as e:  # pragma: no cover - depends on the machine
            _TRITON_ERR.append(f"triton is not importable ({type(e).__name__}: {e})")
    return _TRITON_ERR[0]


_CUDA_PROBLEM: Dict[Optional[int], Optional[str]] = {}  # memo of cuda_device_problem per device index


def cuda_device_problem(device: torch.device) -> Optional[str]:
    """Why tensors cannot live on the CUDA ``device`` in this process (None if they can, or if it is not CUDA).

    Every status below asks this first, so that no backend is reported usable on a CUDA device that does not
    exist (a CPU-only torch build, no visible GPU, or an index past the last device)."""
    if device.type != "cuda":
        return None
    if device.index in _CUDA_PROBLEM:
        return _CUDA_PROBLEM[device.index]
    if not torch.cuda.is_available():
        why = (f"CUDA is not available (torch {torch.__version__}, "
               + (f"built for CUDA {torch.version.cuda}, but no CUDA device is visible)" if torch.version.cuda
                  else "a CPU-only build)"))
    elif device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        why = f"there is no CUDA device {device} ({n} visible: cuda:0..cuda:{n - 1})"
    else:
        why = None
    _CUDA_PROBLEM[device.index] = why
    return why


def triton_status(device: torch.device) -> Tuple[bool, str]:
    bad = cuda_device_problem(device)
    if bad:
        return False, bad
    err = _triton_import_error()
    if err:
        return False, err
    if device.type == "cuda":
        return True, "fused Triton kernels"
    if device.type == "cpu" and interpret_mode():
        return True, "Triton interpreter (TRITON_INTERPRET=1): correct but slow, for tests"
    return False, (f"Triton kernels need a CUDA tensor (got {device.type}); on CPU they run only under "
                   "TRITON_INTERPRET=1")


def extension_status(name: str, device: torch.device) -> Tuple[bool, str]:
    bad = cuda_device_problem(device)
    if bad:
        return False, bad
    if name == "cuda" and device.type != "cuda":
        return False, f"the CUDA extension needs a CUDA tensor (got {device.type})"
    if name == "cpu" and device.type != "cpu":
        return False, f"the C++ CPU extension needs a CPU tensor (got {device.type})"
    from . import _ext

    return _ext.status(device.type)


def status(name: str, device: torch.device) -> Tuple[bool, str]:
    if name == "torch":
        bad = cuda_device_problem(device)
        return (False, bad) if bad else (True, "eager PyTorch reference")
    if name == "triton":
        return triton_status(device)
    if name in ("cuda", "cpu"):
        return extension_status(name, device)
    raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")


def available_backends(device=None) -> Dict[str, Tuple[bool, str]]:
    """{backend: (usable, reason)} for a device (default: cuda if present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {b: status(b, device) for b in BACKENDS}


def config_problem(module, name: str) -> Optional[str]:
    """Why a fused backend cannot run this module's configuration (None if it can)."""
    if name == "triton":
        T = module.seq_len
        if T > MAX_TRITON_T:
            return f"sequence length T={T} (data_dim*max_digits+1) exceeds the Triton kernel limit {MAX_TRITON_T}"
    return None


_warned = set()


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def _warn_once(msg: str):
    if msg not in _warned:
        f, level = sys._getframe(0), 1  # point at the first frame outside this package and torch (the user's)
        while f is not None and f.f_code.co_filename.startswith(_INTERNAL):
            f, level = f.f_back, level + 1
        warnings.warn(msg, RuntimeWarning, stacklevel=level)
        _warned.add(msg)  # (after the warning: under -W error it raised, and the next call must raise again)


ENV = "SEQPE_KERNELS_BACKEND"


def requested_backend(requested: str) -> str:
    """The backend asked for: ``requested``, or for "auto" the SEQPE_KERNELS_BACKEND override if set (spaces and
    case ignored; an unknown value raises naming the variable)."""
    if requested == "auto":
        env = os.environ.get(ENV, "").strip().lower() or "auto"
        if env not in ("auto",) + BACKENDS:
            raise ValueError(f"{ENV}={os.environ.get(ENV)!r}: choose auto, {', '.join(BACKENDS)} (or unset it)")
        return env
    return requested


@torch.compiler.assume_constant_result
def _status_constant(name: str, device_type: str, index: int) -> Tuple[bool, str]:
    """status() run by torch.compile at trace time, outside the trace: a first call may build or load the C++
    extension under a lock, which Dynamo cannot trace (a fullgraph compile in a fresh process failed)."""
    return status(name, torch.device(device_type) if index < 0 else torch.device(device_type, index))


def _status(name: str, device: torch.device) -> Tuple[bool, str]:
    if torch.compiler.is_compiling():
        return _status_constant(name, device.type, -1 if device.index is None else device.index)
    return status(name, device)


def auto_order(device: torch.device) -> Tuple[str, ...]:
    """The backends ``auto`` tries on ``device``, first usable wins."""
    return ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")


def auto_choice(device) -> str:
    """What ``backend="auto"`` runs on ``device`` for an encoder every backend supports (``seqpe-kernels env``),
    with the reason: the SEQPE_KERNELS_BACKEND override, or the first usable backend of :func:`auto_order`."""
    device = torch.device(device)
    try:
        req = requested_backend("auto")
    except ValueError as e:
        return f"nothing: {e}"
    if req != "auto":
        ok, why = status(req, device)
        return f"{req} ({ENV}={req})" if ok else f"nothing: {ENV}={req} cannot run here ({why})"
    skipped = []
    for name in auto_order(device):
        ok, why = status(name, device)
        if ok:
            return name + (f" (unusable first: {', '.join(skipped)})" if skipped else "")
        skipped.append(name)
    return "nothing usable"


def resolve(module, requested: str, device: torch.device) -> str:
    """Backend that will run `module` on tensors of `device` (raises/warns as described above)."""
    asked = requested
    requested = requested_backend(requested)
    if requested != "auto":
        said = f"{ENV}={requested}" if asked == "auto" else f"backend={requested!r}"  # ('auto' overridden)
        ok, why = _status(requested, device)
        if not ok:
            raise BackendUnavailable(f"{said} cannot run here: {why}")
        prob = config_problem(module, requested)
        if prob:
            raise BackendUnavailable(f"{said} does not support this configuration: {prob}")
        return requested
    order = auto_order(device)
    reasons = []
    for name in order:
        ok, why = _status(name, device)
        prob = None if not ok else config_problem(module, name)
        if ok and prob is None:
            if reasons:
                _warn_once(f"seqpe_kernels: backend 'auto' on {device.type} uses {name!r} because "
                           + "; ".join(reasons))
            return name
        reasons.append(f"{name}: {prob or why}")
    # only when no tensor can exist on ``device`` (e.g. resolved_backend("cuda") on a machine without CUDA)
    raise BackendUnavailable(f"no backend can run on {device}: " + "; ".join(reasons))
