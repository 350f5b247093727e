"""Row gather for the position-embedding cache: ``out[i] = table[rows[i]]``.

A cache hit is pure data movement (read M rows, write M rows), so the figure that matters is the fraction of
the device's copy bandwidth it reaches. Each program moves a BLOCK_M x BLOCK_D tile with contiguous,
vectorisable loads along D; row offsets are int64 (a 32768 x 768 fp32 table is 100 MB, and larger tables
with many rows would overflow int32 offsets). No autograd: the cache refuses grad mode.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_pow2
from .launch import direct


@direct
@triton.jit
def _gather_kernel(TAB, ROWS, OUT, M, D, s_tab, s_out, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pm = tl.program_id(0)
    pd = tl.program_id(1)
    i = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    im = i < M
    r = tl.load(ROWS + i, mask=im, other=0).to(tl.int64)
    m = im[:, None] & (c[None, :] < D)
    x = tl.load(TAB + r[:, None] * s_tab + c[None, :], mask=m)
    tl.store(OUT + i.to(tl.int64)[:, None] * s_out + c[None, :], x, mask=m)


@torch.library.custom_op("seqpe::gather_rows", mutates_args=())
def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table.index_select(0, rows)`` for a 2-D table with unit column stride; rows must be in range
    (the cache only produces in-range rows; this kernel does not check them)."""
    M, D = rows.shape[0], table.shape[1]
    out = torch.empty(M, D, dtype=table.dtype, device=table.device)
    if M == 0 or D == 0:
        return out
    tab = table if table.stride(1) == 1 else table.contiguous()
    # 16 KB-ish tiles: wide enough along D for 16-byte accesses, several rows in flight per program
    BLOCK_D = min(next_pow2(D), 1024 if tab.element_size() <= 2 else 512)
    BLOCK_M = max(1, min(16, 4096 // BLOCK_D))
    grid = (cdiv(M, BLOCK_M), cdiv(D, BLOCK_D))
    _gather_kernel[grid](tab, rows.contiguous(), out, M, D, tab.stride(0), out.stride(0),
                         BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=4)
    return out


@gather_rows.register_fake
def _(table, rows):
    return table.new_empty(rows.shape[0], table.shape[1])
