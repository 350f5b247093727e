"""Up to eight tensors cast to one dtype in one launch (encoder-internal: the weights of a layer under autocast).

Why: under bf16 autocast each encoder call casts every weight and bias of the GEMMs to bf16 (18 tensors at the
paper's two layers): 18 tiny copy kernels and their launches, most of them a few microseconds of a GPU at the
paper's sizes. Here one launch per group of up to eight: program (i, k) copies block i of tensor k (tensors
flattened; programs past a tensor's end return). Values are converted as ``Tensor.to`` converts them (round to
nearest even on a GPU). The outputs are new contiguous tensors with the inputs' shapes.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import triton
import triton.language as tl

from ._common import cdiv
from .launch import direct

_BLOCK = 2048
GROUP = 8


@triton.jit
def _copy_block(S, D, n, i, BLOCK: tl.constexpr):
    offs = i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(D + offs, tl.load(S + offs, mask=m).to(D.dtype.element_ty), mask=m)


@direct
@triton.jit
def _cast_group(S0, S1, S2, S3, S4, S5, S6, S7, D0, D1, D2, D3, D4, D5, D6, D7, n0, n1, n2, n3, n4, n5, n6, n7,
                BLOCK: tl.constexpr):
    i = tl.program_id(0)
    k = tl.program_id(1)
    if k == 0:
        _copy_block(S0, D0, n0, i, BLOCK)
    elif k == 1:
        _copy_block(S1, D1, n1, i, BLOCK)
    elif k == 2:
        _copy_block(S2, D2, n2, i, BLOCK)
    elif k == 3:
        _copy_block(S3, D3, n3, i, BLOCK)
    elif k == 4:
        _copy_block(S4, D4, n4, i, BLOCK)
    elif k == 5:
        _copy_block(S5, D5, n5, i, BLOCK)
    elif k == 6:
        _copy_block(S6, D6, n6, i, BLOCK)
    else:
        _copy_block(S7, D7, n7, i, BLOCK)


def cast_group(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:
    """``[t.to(dtype) for t in tensors]`` (contiguous results) in one launch per group of up to eight; tensors
    already in ``dtype`` are returned as they are (as ``Tensor.to`` does). All on one device."""
    out: List[torch.Tensor] = list(tensors)
    todo = [j for j, t in enumerate(tensors) if t.dtype != dtype]
    for g0 in range(0, len(todo), GROUP):
        idx = todo[g0:g0 + GROUP]
        src = [tensors[j].contiguous() for j in idx]
        dst = [torch.empty(s.shape, dtype=dtype, device=s.device) for s in src]
        for j, d in zip(idx, dst):
            out[j] = d
        ns = [s.numel() for s in src]
        blocks = cdiv(max(ns), _BLOCK) if ns and max(ns) else 0
        if blocks == 0:
            continue
        pad = GROUP - len(src)  # unused slots: zero-length copies of the first pair (never read or written)
        src += [src[0]] * pad
        dst += [dst[0]] * pad
        ns += [0] * pad
        _cast_group[(blocks, len(idx))](*src, *dst, *ns, BLOCK=_BLOCK, num_warps=4)
    return out
