"""Digit embedding: integer positions in, embedded token sequences out, CLS appended.

With ``from_positions`` the kernel computes digit j of axis a as ``(p_a // base**(K-1-slot)) % base`` itself,
so the [M, L] int64 digit tensor of the reference never exists; it then sums the token, digit-position and
(n-D) dimension embeddings in the reference's order ((tok + pos) + dim, fp32) and writes the CLS vector at
row L. ``from_positions=False`` takes the authors' digit ids instead.

Backward reduces into the tables deterministically: a program owns one slot, one column block and a chunk of
sequences, and sums [BLOCK_M, BD] tiles of that slot's gradient rows per digit with one one-hot product (the
digit rows plus an all-ones row for the slot / CLS sum; ``tl.dot`` with fp32 (fp64) operands, exact products);
the output launch sums the chunks' partials in a fixed order, several rows per step.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import cdiv, dense, next_pow2, num_sms, tile_chunks
from .launch import direct


@triton.jit
def _digits(X, POW, m, sxm, sxc, j, L, K: tl.constexpr, BASE: tl.constexpr, FROM_POS: tl.constexpr):
    """Digit ids [TP] of sequence m (0 beyond L) and a per-slot validity flag. Any strides (sxm, sxc) of x.
    An input outside the encodable range (a position < 0 or >= BASE**K, a digit id outside [0, BASE)) is
    flagged invalid and its digit is 0, so no load ever leaves the tables (check_range=False must not crash)."""
    jm = j < L
    if FROM_POS:
        axis = j // K
        slot = j % K
        p = tl.load(X + m * sxm + axis * sxc, mask=jm, other=0).to(tl.int64)
        pw = tl.load(POW + slot, mask=jm, other=1)
        top = tl.load(POW)  # BASE**(K-1)
        ok = (p >= 0) & (p // top < BASE)
        d = (p // pw) % BASE
    else:
        d = tl.load(X + m * sxm + j * sxc, mask=jm, other=0).to(tl.int64)
        ok = (d >= 0) & (d < BASE)
    return tl.where(ok, d, 0), ok | (j >= L)


@direct
@triton.jit
def _embed_fwd(X, POW, TOK, POS, DIM, CLS, OUT, ROWS, TAB, sxm, sxc, M, L, T, D, K: tl.constexpr,
               BASE: tl.constexpr, TP: tl.constexpr, BD: tl.constexpr, FROM_POS: tl.constexpr, HAS_DIM: tl.constexpr,
               WRITE_ROWS: tl.constexpr, WRITE_TAB: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cm = cols < D
    if WRITE_TAB:  # program m also writes row m of layer 0's (digit, slot) table (encoder.embedding_table's values)
        if m < BASE * L + 1:
            on = cm & ((cols * 0 + m) < BASE * L)  # a digit row (the last row is CLS)
            s = m % L
            t = tl.load(TOK + tl.minimum(m // L, BASE - 1) * D + cols, mask=on, other=0.0)
            t = t + tl.load(POS + s * D + cols, mask=on, other=0.0)  # (tok + pos) + dim: the reference's order
            if HAS_DIM:
                t = t + tl.load(DIM + (s // K) * D + cols, mask=on, other=0.0)
            t = tl.where(m == BASE * L, tl.load(CLS + cols, mask=cm, other=0.0), t)
            tl.store(TAB + m * D + cols, t, mask=cm)
    if m < M:
        _embed_seq(X, POW, TOK, POS, DIM, CLS, OUT, ROWS, m, cols, cm, sxm, sxc, L, T, D, K, BASE, TP, FROM_POS,
                   HAS_DIM, WRITE_ROWS)


@triton.jit
def _embed_seq(X, POW, TOK, POS, DIM, CLS, OUT, ROWS, m, cols, cm, sxm, sxc, L, T, D, K: tl.constexpr,
               BASE: tl.constexpr, TP: tl.constexpr, FROM_POS: tl.constexpr, HAS_DIM: tl.constexpr,
               WRITE_ROWS: tl.constexpr):
    j = tl.arange(0, TP)
    jm = j < L
    dig, ok = _digits(X, POW, m, sxm, sxc, j, L, K, BASE, FROM_POS)
    msk = jm[:, None] & cm[None, :]
    e = tl.load(TOK + dig[:, None] * D + cols[None, :], mask=msk, other=0.0)
    e = e + tl.load(POS + j[:, None] * D + cols[None, :], mask=msk, other=0.0)
    if HAS_DIM:
        e = e + tl.load(DIM + (j // K)[:, None] * D + cols[None, :], mask=msk, other=0.0)
    # a sequence with an out-of-range input (possible only with check_range=False) comes out NaN, not wrapped
    bad = tl.sum((ok == 0).to(tl.int32), axis=0) > 0
    e = tl.where(bad, float("nan"), e)
    base = OUT + m * T * D
    tl.store(base + j[:, None] * D + cols[None, :], e, mask=msk)
    cls = tl.load(CLS + cols, mask=cm, other=0.0)
    cls = tl.where(bad, float("nan"), cls)
    tl.store(base + L * D + cols, cls, mask=cm)
    if WRITE_ROWS:  # the (digit, slot) table rows of the sequence, for layer 0 (encoder.table_rows' values)
        if tl.program_id(1) == 0:
            tl.store(ROWS + m * T + j, tl.where(jm, dig * L + j, BASE * L), mask=j < T)


@direct
@triton.jit
def _embed_bwd(G, X, POW, PART, sxm, sxc, M, L, T, D, seqs_per_prog, K: tl.constexpr, BASE: tl.constexpr,
               BASEP: tl.constexpr, BLOCK_M: tl.constexpr, BD: tl.constexpr, FROM_POS: tl.constexpr,
               ACC: tl.constexpr):
    """Program (slot t, column block, chunk of sequences): PART[chunk, t, b] = the sum of g[m, t] over the chunk's
    sequences whose digit at slot t is b (b < BASE; none for the CLS slot t == L), PART[chunk, t, BASE] = the sum
    over all of them. [BLOCK_M, BD] tiles of slot t's rows, each reduced by one product
    onehot [BASEP, BLOCK_M] x tile [BLOCK_M, BD] (exact products, ACC sums: deterministic, no atomics)."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cm = cols < D
    ch = tl.program_id(2).to(tl.int64)
    b = tl.arange(0, BASEP)
    acc = tl.zeros([BASEP, BD], dtype=ACC)
    m0 = ch * seqs_per_prog
    m_end = tl.minimum(m0 + seqs_per_prog, M)
    for i in range(0, seqs_per_prog, BLOCK_M):
        ms = m0 + i + tl.arange(0, BLOCK_M)
        mm = ms < m_end
        g = tl.load(G + (ms * T + t)[:, None] * D + cols[None, :], mask=mm[:, None] & cm[None, :],
                    other=0.0).to(ACC)
        # digit of slot t (as _digits, one slot for BLOCK_M sequences); an invalid one reaches no token row
        xm = mm & (tl.zeros([BLOCK_M], dtype=tl.int32) + t < L)  # (not mm & is_digit: the interpreter makes that
        # an int32 mask where L == 1 is specialised)
        if FROM_POS:
            p = tl.load(X + ms * sxm + (t // K) * sxc, mask=xm, other=0).to(tl.int64)
            pw = tl.load(POW + t % K)  # in bounds for every slot (the CLS slot's xm is all false)
            top = tl.load(POW)  # BASE**(K-1)
            ok = (p >= 0) & (p // top < BASE)
            d = (p // pw) % BASE
        else:
            d = tl.load(X + ms * sxm + t * sxc, mask=xm, other=0).to(tl.int64)
            ok = (d >= 0) & (d < BASE)
        dig = tl.where(ok & xm, d, -1).to(tl.int32)
        onehot = (((b[:, None] == dig[None, :]) | (b[:, None] == BASE)) & mm[None, :]).to(ACC)
        acc = tl.dot(onehot, g, acc, input_precision="ieee", out_dtype=ACC)
    tl.store(PART + ((ch * T + t) * BASEP + b[:, None]) * D + cols[None, :], acc,
             mask=(b <= BASE)[:, None] & cm[None, :])


@direct
@triton.jit
def _embed_bwd_out(PART, TAB, D_TOK, D_POS, D_CLS, D_DIM, n_prog, L, T, D, K: tl.constexpr, BASE: tl.constexpr,
                   BASEP: tl.constexpr, QB: tl.constexpr, BD: tl.constexpr, HAS_TAB: tl.constexpr,
                   ACC: tl.constexpr):
    """Output row r of [d_tok: BASE rows; d_pos: L; d_cls: 1; d_dim: one per dimension]: the chunks' partials
    (PART [n_prog, T, BASEP, D], _embed_bwd's) summed, plus (HAS_TAB) layer 0's (digit, slot) table gradient
    folded in (row v * L + s: digit v at slot s; row BASE * L: CLS), each written in the output dtype. Replaces
    the partial sums, casts and the encoder's table sums and adds (csrc/seqpe_ext.h embed_grad_out is the C++/CUDA
    twin). Each output row sums the partial rows (chunk p, slot j in [lo, hi), row ri) and the table rows (digit v
    in [vlo, vhi), slot in [lo, hi); CLS: the last), QB at a time into a [QB, BD] tile reduced once (a fixed
    order: deterministic; a few loads in flight per step, not one chain of dependent loads per partial)."""
    r = tl.program_id(0)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cm = cols < D
    q_ids = tl.arange(0, QB)
    if r < BASE:  # token digit r: its row at every slot
        lo, hi, ri, vlo, vhi, cls = 0, L, r, r, r + 1, 0
    elif r < BASE + L:  # slot r - BASE: every digit's row at that slot
        lo, hi, ri, vlo, vhi, cls = r - BASE, r - BASE + 1, BASE, 0, BASE, 0
    elif r == BASE + L:  # CLS
        lo, hi, ri, vlo, vhi, cls = L, L + 1, BASE, 0, 0, 1
    else:  # dimension dd: its K slots
        dd = r - BASE - L - 1
        lo, hi, ri, vlo, vhi, cls = dd * K, dd * K + K, BASE, 0, BASE, 0
    acc = tl.zeros([QB, BD], dtype=ACC)
    n_q = n_prog * T
    for q0 in range(0, n_q, QB):
        q = q0 + q_ids
        j = q % T
        qm = (q < n_q) & (j >= lo) & (j < hi)
        acc += tl.load(PART + (q.to(tl.int64)[:, None] * BASEP + ri) * D + cols[None, :],
                       mask=qm[:, None] & cm[None, :], other=0.0)
    if HAS_TAB:
        n_u = BASE * L + 1
        for u0 in range(0, n_u, QB):
            u = u0 + q_ids
            v = u // L
            sl = u % L
            um = tl.where(u == BASE * L, cls == 1, (u < BASE * L) & (v >= vlo) & (v < vhi) & (sl >= lo) & (sl < hi))
            acc += tl.load(TAB + u.to(tl.int64)[:, None] * D + cols[None, :], mask=um[:, None] & cm[None, :],
                           other=0.0).to(ACC)
    s = tl.sum(acc, 0)
    if r < BASE:
        tl.store(D_TOK + r * D + cols, s, mask=cm)
    elif r < BASE + L:
        tl.store(D_POS + (r - BASE) * D + cols, s, mask=cm)
    elif r == BASE + L:
        tl.store(D_CLS + cols, s, mask=cm)
    else:
        tl.store(D_DIM + (r - BASE - L - 1) * D + cols, s, mask=cm)


_BWD_BD = 128  # _embed_bwd's tile: [_BWD_BM sequences, _BWD_BD columns] of one slot
_BWD_BM = 32
_OUT_QB = 32  # _embed_bwd_out: partial / table rows per step
_POW: dict = {}


def _pow_table(K: int, base: int, device) -> torch.Tensor:
    """[K] int64: base**(K-1) .. base**0 on ``device``, made once per (K, base, device) (two launches per call
    otherwise). Computed on the device (no host-to-device copy, so a call can be captured in a CUDA graph),
    and never kept when first made inside a capture (its memory would belong to the graph's pool)."""
    key = (K, base, device)
    t = _POW.get(key)
    if t is None:
        t = torch.pow(base, torch.arange(K - 1, -1, -1, dtype=torch.int64, device=device))
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            _POW[key] = t
    return t


def digit_embed_forward(x: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor, dim: Optional[torch.Tensor],
                        cls: torch.Tensor, from_positions: bool, max_digits: int, with_rows: bool = False,
                        with_table: bool = False):
    """x: positions [M, d] (from_positions) or digit ids [M, L]. Returns h0 [M, L+1, D] in the table dtype;
    ``with_rows``: (h0, rows) with rows [M, L+1] int64 = digit * L + slot, base * L for CLS (the encoder's
    layer-0 table rows, written by the same launch instead of ~10 small ops). A sequence with an invalid input
    (check_range=False) gets digit 0 there, in bounds; its h0 is NaN. ``with_table`` (with ``with_rows``):
    (h0, rows, table), the table [base * L + 1, D] (encoder.embedding_table, bit for bit) from the same launch."""
    if with_table and not with_rows:
        raise ValueError("digit_embed_forward: with_table needs with_rows")
    M = x.shape[0]
    tok, pos, dim, cls = dense(tok), dense(pos), dense(dim), dense(cls)  # (parameters: any strides)
    base, D = tok.shape
    L = pos.shape[0]
    T = L + 1
    out = tok.new_empty((M, T, D))
    rows = torch.empty((M, T), dtype=torch.int64, device=x.device) if with_rows else None
    tab = tok.new_empty((base * L + 1, D)) if with_table else None
    res = (out, rows, tab) if with_table else (out, rows) if with_rows else out
    if (M == 0 and not with_table) or D == 0:
        return res
    K = max_digits
    TP = next_pow2(T)
    BD = min(256, next_pow2(D))
    powt = _pow_table(K, base, x.device)
    dimt = dim.reshape(-1, D) if dim is not None else tok
    # one program per sequence, and with the table at least one per table row
    _embed_fwd[(max(M, base * L + 1) if with_table else M, cdiv(D, BD))](
        x, powt, tok, pos, dimt, cls.reshape(D), out, rows if with_rows else out, tab if with_table else out,
        x.stride(0), x.stride(1) if x.dim() == 2 else 1, M, L, T, D, K=K, BASE=base, TP=TP, BD=BD,
        FROM_POS=from_positions, HAS_DIM=dim is not None, WRITE_ROWS=with_rows, WRITE_TAB=with_table, num_warps=4)
    return res


def digit_embed_backward(g: torch.Tensor, x: torch.Tensor, from_positions: bool, max_digits: int, base: int,
                         data_dim: int, table_grad: Optional[torch.Tensor] = None):
    """Returns (d_tok [base, D], d_pos [L, D], d_dim [d, 1, D] (empty if d == 1), d_cls [1, 1, D]) in g's dtype.
    ``table_grad`` [base * L + 1, D] (the encoder's layer-0 table gradient, row digit * L + slot, CLS last) is
    folded into them by the same launch. Two launches: the programs' partials, then every output row."""
    M, T, D = g.shape
    L = T - 1
    K = max_digits
    g = g.contiguous()
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    if table_grad is not None:
        if table_grad.shape != (base * L + 1, D) or table_grad.device != g.device or \
                not table_grad.dtype.is_floating_point:
            raise ValueError(f"digit_embed_backward: table_grad must be a float [base * L + 1, D] = "
                             f"[{base * L + 1}, {D}] tensor on {g.device}, got {tuple(table_grad.shape)} "
                             f"{table_grad.dtype} on {table_grad.device}")
        table_grad = table_grad.contiguous()
    BASEP = max(16, next_pow2(base + 1))  # the digits' rows and the all-ones row (tl.dot tiles are >= 16)
    BD = max(16, min(_BWD_BD, next_pow2(D)))
    BLOCK_M = max(16, min(_BWD_BM, next_pow2(M)))
    n_col = cdiv(D, BD)
    # ~4 programs per SM: T slots x column blocks x chunks of sequences, each chunk whole tiles of BLOCK_M
    n_prog, per = tile_chunks(M, BLOCK_M, cdiv(4 * num_sms(g.device), T * n_col))
    # every program stores its (slot, rows <= base, columns) slice of the partials; with M = 0 there is none:
    # one zeroed partial
    part = (g.new_empty if M > 0 else g.new_zeros)((n_prog, T, BASEP, D), dtype=acc)
    ACC = tl.float64 if acc == torch.float64 else tl.float32
    if M > 0:
        _embed_bwd[(T, n_col, n_prog)](g, x, _pow_table(K, base, g.device), part, x.stride(0),
                                       x.stride(1) if x.dim() == 2 else 1, M, L, T, D, per, K=K, BASE=base,
                                       BASEP=BASEP, BLOCK_M=BLOCK_M, BD=BD, FROM_POS=from_positions, ACC=ACC,
                                       num_warps=4)
    tok_g, pos_g, cls_g = g.new_empty((base, D)), g.new_empty((L, D)), g.new_empty((1, 1, D))
    dim_g = g.new_empty((data_dim, 1, D)) if data_dim > 1 else g.new_empty((0,))
    n_out = base + T + (data_dim if data_dim > 1 else 0)
    BO = min(128, next_pow2(D))
    _embed_bwd_out[(n_out, cdiv(D, BO))](part, table_grad if table_grad is not None else part,
                                         tok_g, pos_g, cls_g, dim_g if data_dim > 1 else tok_g, n_prog, L, T, D,
                                         K=K, BASE=base, BASEP=BASEP, QB=_OUT_QB, BD=BO, HAS_TAB=table_grad is not None,
                                         ACC=ACC, num_warps=4)
    return tok_g, pos_g, dim_g, cls_g


# ----------------------------------------------------------------------------- PyTorch operators
from typing import Tuple  # noqa: E402

from torch import Tensor  # noqa: E402

from ._common import IMPL_EXT, backward_op, eager_entry, ext_ops  # noqa: E402


@torch.library.custom_op("seqpe::digit_embed", mutates_args=())
def digit_embed(x: Tensor, tok: Tensor, pos: Tensor, dim: Optional[Tensor], cls: Tensor, from_positions: bool,
                max_digits: int, impl: int) -> Tensor:
    if impl == IMPL_EXT:
        return ext_ops().digit_embed_fwd(x, tok, pos, dim, cls, from_positions, max_digits)
    return digit_embed_forward(x, tok, pos, dim, cls, from_positions, max_digits)


@digit_embed.register_fake
def _(x, tok, pos, dim, cls, from_positions, max_digits, impl):
    return tok.new_empty((x.shape[0], pos.shape[0] + 1, tok.shape[1]))


@torch.library.custom_op("seqpe::digit_embed_backward", mutates_args=())
def digit_embed_bwd(g: Tensor, x: Tensor, from_positions: bool, max_digits: int, base: int,
                    data_dim: int, impl: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if impl == IMPL_EXT:
        return ext_ops().digit_embed_bwd(g, x, from_positions, max_digits, base, data_dim)
    return digit_embed_backward(g, x, from_positions, max_digits, base, data_dim)


@digit_embed_bwd.register_fake
def _(g, x, from_positions, max_digits, base, data_dim, impl):
    M, T, D = g.shape
    dim = g.new_empty((data_dim, 1, D)) if data_dim > 1 else g.new_empty((0,))
    return g.new_empty((base, D)), g.new_empty((T - 1, D)), dim, g.new_empty((1, 1, D))


def _embed_setup(ctx, inputs, output):
    x, tok, pos, dim, cls, from_positions, max_digits, impl = inputs
    ctx.args = (from_positions, max_digits, tok.shape[0], dim.shape[0] if dim is not None else 1, impl)
    ctx.save_for_backward(x)


def _embed_backward(ctx, g):
    (x,) = ctx.saved_tensors
    from_positions, max_digits, base, data_dim, impl = ctx.args
    dtok, dpos, ddim, dcls = backward_op(ctx, digit_embed_bwd, g, x, from_positions, max_digits, base, data_dim,
                                         impl)
    return None, dtok, dpos, (ddim if data_dim > 1 else None), dcls, None, None, None


digit_embed.register_autograd(_embed_backward, setup_context=_embed_setup)
digit_embed_call = eager_entry(digit_embed, _embed_setup, _embed_backward)
