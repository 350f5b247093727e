"""Layer 0's table gradient: the backward of gathering (digit, slot) table rows per token.

Layer 0 computes q/k/v once per row of a small table (``base * L + 1`` rows: digit b in slot j is row b*L + j,
the last is CLS) and gathers them per token (``encoder.table_rows``). Its backward sums each token's gradient
into its row. ``embedding_dense_backward`` does that generically: for bf16 it first needs an fp32 copy of the
whole [M, T, C] gradient (to sum in fp32), then sorts the indices. Here the rows' structure does the work:
token (m, t) goes to row ``rows[m, t]`` whose slot is t, so a program owns one slot, one column block and a chunk
of sequences, loads [BLOCK_M sequences, BLOCK_C columns] tiles of slot t's gradient rows at once, and sums each tile
per digit (``rows // L``) with one product ``onehot [BASE_P, BLOCK_M] x tile [BLOCK_M, BLOCK_C]`` into a
[BASE_P, BLOCK_C] accumulator (``tl.dot`` with IEEE fp32 operands: the products are exact, the sums fp32 adds;
the earlier kernel loaded one 256-byte row per loop iteration and added it into all BASE_P rows under a mask,
latency-bound at 156 us on an H200 for the text step). Each output row is written by one program per chunk (no
atomics, deterministic), and the chunks' partials are summed in order. The gradient is read once in its own
dtype; sums are fp32 (fp64 for fp64). The bf16 operands could feed the tensor cores directly, but the Triton
interpreter's bf16 ``tl.dot`` is broken, so every dtype takes the fp32 (fp64) product the CPU tests run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, cdiv, next_pow2, num_sms, tile_chunks
from .launch import direct


@direct
@triton.jit
def _table_grad(G, ROWS, PART, M, T, L, C, base, seqs_per_prog, BASE_P: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # program (slot t, column block, chunk of sequences): [BLOCK_M sequences, BLOCK_C columns] tiles of slot t's
    # gradient rows, each summed per digit by one product onehot [BASE_P, BLOCK_M] x tile [BLOCK_M, BLOCK_C]
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    ch = tl.program_id(2).to(tl.int64)
    b_ids = tl.arange(0, BASE_P)
    acc = tl.zeros([BASE_P, BLOCK_C], dtype=ACC)
    m0 = ch * seqs_per_prog
    m_end = tl.minimum(m0 + seqs_per_prog, M)
    for i in range(0, seqs_per_prog, BLOCK_M):
        ms = m0 + i + tl.arange(0, BLOCK_M)
        mm = ms < m_end
        tok = ms * T + t
        dig = (tl.load(ROWS + tok, mask=mm, other=0) // L).to(tl.int32)  # the CLS slot's row base * L: digit base
        g = tl.load(G + tok[:, None] * C + cols[None, :], mask=mm[:, None] & cm[None, :], other=0.0).to(ACC)
        onehot = ((b_ids[:, None] == dig[None, :]) & mm[None, :]).to(ACC)
        # exact products (x 0 or 1), summed in ACC: the sums of a loop of ACC adds, on any GPU and the interpreter
        acc = tl.dot(onehot, g, acc, input_precision="ieee", out_dtype=ACC)
    # slot t < L: digit b's row is b * L + t; the CLS slot (t == L) has one row, base * L, its tokens' digit == base
    out_rows = tl.where(t < L, b_ids * L + t, base * L)
    ok = tl.where(t < L, b_ids < base, b_ids == base)
    tl.store(PART + (ch * (base * L + 1) + out_rows[:, None]) * C + cols[None, :], acc,
             mask=ok[:, None] & cm[None, :])


_BLOCK_C = 128
_BLOCK_M = 32


def table_grad(g: torch.Tensor, rows: torch.Tensor, n_rows: int, L: int, acc_out: bool = False) -> torch.Tensor:
    """[n_rows, C] in ``g``'s dtype (``acc_out``: in the accumulation dtype, the sums unrounded): row r = the sum of
    ``g[m, t]`` over the tokens with ``rows[m, t] == r``, for g [M, T, C] (T = L + 1) and rows [M, T] from
    ``encoder.table_rows`` (in range: rows[:, t] = digit*L + t for t < L, base*L for the CLS slot). Summed in fp32
    (fp64 for fp64)."""
    M, T, C = g.shape
    if rows.shape != (M, T) or T != L + 1 or (n_rows - 1) % L:
        raise ValueError(f"table_grad: g {tuple(g.shape)}, rows {tuple(rows.shape)}, n_rows {n_rows}, L {L} do "
                         "not describe a (digit, slot) table")
    base = (n_rows - 1) // L
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    if M == 0 or C == 0:
        return g.new_zeros((n_rows, C), dtype=acc if acc_out else g.dtype)
    g = g.contiguous()
    rows = rows.contiguous()
    BLOCK_C = max(16, min(_BLOCK_C, next_pow2(C)))  # tl.dot tiles are >= 16 wide
    BLOCK_M = max(16, min(_BLOCK_M, next_pow2(M)))
    n_col = cdiv(C, BLOCK_C)
    # ~4 programs per SM: T slots x column blocks x chunks of sequences, each chunk whole tiles of BLOCK_M
    n_chunks, per = tile_chunks(M, BLOCK_M, cdiv(4 * num_sms(g.device), T * n_col))
    part = g.new_empty((n_chunks, n_rows, C), dtype=acc)  # every (chunk, row) is written by one program
    _table_grad[(T, n_col, n_chunks)](g, rows, part, M, T, L, C, base, per, BASE_P=max(16, next_pow2(base + 1)),
                                      BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, ACC=acc_dtype(g), num_warps=4)
    out = part.sum(0) if n_chunks > 1 else part[0]
    return out if acc_out or out.dtype == g.dtype else out.to(g.dtype)
