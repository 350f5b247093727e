"""fp32 GEMM precision (IEEE fp32 or TF32) for a block of code, under either of PyTorch's two switches.

Why: PyTorch >= 2.9 has two APIs for the same state, the legacy one (``torch.backends.cuda.matmul.allow_tf32``,
``torch.set_float32_matmul_precision``) and the per-backend one (``torch.backends.cuda.matmul.fp32_precision``).
A legacy setter updates both; a new-API setter only the new one, after which every legacy *getter* raises
("you have used mix of the legacy and new APIs"). So a library that reads or restores the state with the legacy
API crashes in a script that uses the new one, and one that restores with the new API breaks the legacy reads of
a script that used the old one. ``fp32_matmul`` sets and restores through whichever API the caller's state is
readable with.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["fp32_matmul", "tf32_enabled"]


def _new_api() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _legacy_state():
    """(allow_tf32, float32_matmul_precision) or None when the legacy getters refuse (the new API was used)."""
    try:
        return torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    except RuntimeError:
        if not _new_api():  # pragma: no cover - a legacy-only PyTorch never refuses
            raise
        return None


def tf32_enabled() -> bool:
    """Whether cuBLAS may run fp32 GEMMs in TF32 now (read through whichever API is consistent)."""
    legacy = _legacy_state()
    if legacy is not None:
        return bool(legacy[0])
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


@contextlib.contextmanager
def fp32_matmul(tf32: bool = False) -> Iterator[None]:
    """Inside: fp32 GEMMs in IEEE fp32 (``tf32=False``, also on CPU/oneDNN) or TF32 on CUDA (``tf32=True``).
    Outside: exactly the caller's state, through the API it was set with."""
    legacy = _legacy_state()
    m = torch.backends.cuda.matmul
    cpu = torch.backends.mkldnn.matmul if _new_api() else None
    saved = (m.fp32_precision, cpu.fp32_precision) if cpu is not None else None
    try:
        if legacy is not None:
            # the legacy setters keep both APIs' states consistent: "highest" = IEEE everywhere (oneDNN
            # included), then TF32 for cuBLAS alone
            torch.set_float32_matmul_precision("highest")
            m.allow_tf32 = bool(tf32)
        else:
            m.fp32_precision = "tf32" if tf32 else "ieee"
            cpu.fp32_precision = "ieee"  # oneDNN may otherwise run fp32 GEMMs in bf16 / TF32
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy[1])  # allow_tf32 follows it (it is precision != "highest")
        if saved is not None:  # the per-backend values as they were ("none" = inherit stays "none")
            m.fp32_precision, cpu.fp32_precision = saved
