"""Tiny-sequence attention: the whole T×T softmax attention of one (sequence, head) in registers.

SeqPE sequences have T = 5..6 tokens (up to 32 here), so eager PyTorch's batched matmul / mask / softmax /
matmul chain (plus the head split/merge copies and an [M, T, T] float mask) is pure memory traffic. One
program reads q, k, v of one (sequence, head) straight out of the c_attn GEMM output (strided, no split
copies), applies the causal and key-padding masks with the reference's semantics, and writes the head's
output into the merged-head layout c_proj reads. Backward recomputes the probabilities (no T×T tensor is
saved) and replays attention dropout from the saved Philox seed.

Mask semantics (SEQPE_SPEC §2.3): masked logits are set to a large finite negative (the reference adds
finfo.min), so a fully masked query row becomes uniform over all T keys, as in the reference; padded
columns (j >= T) are -inf and never count.

Query rows ``0..TQ-1`` are absolute token rows ``q_start..q_start+TQ-1``: TQ = T for a full block, and TQ = 1,
q_start = T-1 for the CLS-only last layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, cdiv, drop_scales, next_pow2
from .launch import direct

_FMIN = -3.0e38  # stands in for finfo.min: only equality among masked logits matters


@triton.jit
def _scores(q, k, USE_DOT: tl.constexpr):
    if USE_DOT:
        return tl.dot(q, tl.trans(k), input_precision="ieee")
    return tl.sum(q[:, None, :] * k[None, :, :], axis=2)


@triton.jit
def _probs(q, k, PAD, pad_row, iq, jk, T, L, q_start, sdiv, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
           USE_DOT: tl.constexpr):
    return _masked_softmax(_scores(q, k, USE_DOT) / sdiv, PAD, pad_row, iq, jk, T, L, q_start, CAUSAL, HAS_MASK)


@triton.jit
def _masked_softmax(s, PAD, pad_row, iq, jk, T, L, q_start, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """(probabilities, allowed) from scaled scores s [TQP, TP]: the causal and key-padding masks, then softmax."""
    allowed = jk[None, :] < T
    if CAUSAL:
        allowed = allowed & (jk[None, :] <= (q_start + iq)[:, None])
    if HAS_MASK:
        keym = tl.load(PAD + pad_row + jk, mask=jk < L, other=1.0)
        allowed = allowed & (keym[None, :] != 0)
    s = tl.where(allowed, s, -3.0e38)
    s = tl.where(jk[None, :] < T, s, float("-inf"))
    mx = tl.max(s, 1)
    e = tl.exp(s - mx[:, None])
    return e / tl.sum(e, 1)[:, None], allowed


@triton.jit
def _load_qkv(Q, K, V, ROWS, m, T, TQ, q_start, sqm, sqt, skm, skt, svm, svt, iq, jk, col, qm, kvm,
              Q_ROWS: tl.constexpr, KV_ROWS: tl.constexpr, ACC: tl.constexpr):
    # token t of sequence m is row t of its [T, W] block, or (indexed: layer 0) row ROWS[m, t] of a table
    if Q_ROWS:
        qr = tl.load(ROWS + m * T + q_start + iq, mask=iq < TQ, other=0)
    else:
        qr = iq
    if KV_ROWS:
        kr = tl.load(ROWS + m * T + jk, mask=jk < T, other=0)
    else:
        kr = jk
    q = tl.load(Q + m * sqm + qr[:, None] * sqt + col[None, :], mask=qm, other=0.0).to(ACC)
    k = tl.load(K + m * skm + kr[:, None] * skt + col[None, :], mask=kvm, other=0.0).to(ACC)
    v = tl.load(V + m * svm + kr[:, None] * svt + col[None, :], mask=kvm, other=0.0).to(ACC)
    return q, k, v


@triton.jit
def _keep(SEEDS, seed_idx, m, H, h, TQ, T, iq, jk, p):
    """Attention-dropout keep mask of one (sequence, head): Philox offset ((m*H + h)*TQ + i)*T + j."""
    off = ((m * H + h) * TQ + iq[:, None]) * T + jk[None, :]
    return tl.rand(tl.load(SEEDS + seed_idx), off.to(tl.int32)) > p


@triton.jit
def _softmax_bwd(pr, dpd, allowed, SEEDS, seed_idx, m, H, h, TQ, T, iq, jk, p, sdiv, drop_scale, drop_scale_lo,
                 DROPOUT: tl.constexpr, ACC: tl.constexpr):
    """(pd, ds) from the probabilities pr and dpd = dO V^T: pd the dropped-out probabilities (dV = pd^T dO), ds the
    scaled score gradient (dQ = ds K, dK = ds^T Q)."""
    if DROPOUT:
        keepf = tl.where(_keep(SEEDS, seed_idx, m, H, h, TQ, T, iq, jk, p),
                         tl.cast(drop_scale, ACC) + tl.cast(drop_scale_lo, ACC), 0.0)
        pd = pr * keepf
        dp = dpd * keepf
    else:
        pd = pr
        dp = dpd
    # masked logits are constants in the forward, so they pass no gradient to q/k. (The reference's autograd
    # differentiates through its additive finfo.min; the two differ only on fully masked rows, whose outputs
    # never reach the encoder output, so their incoming gradient is zero either way.)
    return pd, tl.where(allowed, pr * (dp - tl.sum(pr * dp, 1)[:, None]), 0.0) / sdiv


@direct
@triton.jit
def _attn_fwd(Q, K, V, ROWS, PAD, O, SEEDS, seed_idx, sqm, sqt, skm, skt, svm, svt, spm, T, TQ, L, q_start, H,
              D, sdiv, p, drop_scale, drop_scale_lo, DH: tl.constexpr, DHP: tl.constexpr, TP: tl.constexpr, TQP: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, USE_DOT: tl.constexpr,
              Q_ROWS: tl.constexpr, KV_ROWS: tl.constexpr, ACC: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    iq = tl.arange(0, TQP)
    jk = tl.arange(0, TP)
    d = tl.arange(0, DHP)
    dm = d < DH
    col = h * DH + d
    qm = (iq < TQ)[:, None] & dm[None, :]
    kvm = (jk < T)[:, None] & dm[None, :]
    q, k, v = _load_qkv(Q, K, V, ROWS, m, T, TQ, q_start, sqm, sqt, skm, skt, svm, svt, iq, jk, col, qm, kvm,
                        Q_ROWS, KV_ROWS, ACC)
    pr, allowed = _probs(q, k, PAD, m * spm, iq, jk, T, L, q_start, sdiv, CAUSAL, HAS_MASK, USE_DOT)
    if DROPOUT:
        # (a multiply by 0 / scale, not a select, as F.dropout: NaN stays NaN)
        pr = pr * tl.where(_keep(SEEDS, seed_idx, m, H, h, TQ, T, iq, jk, p),
                           tl.cast(drop_scale, ACC) + tl.cast(drop_scale_lo, ACC), 0.0)
    if USE_DOT:
        o = tl.dot(pr, v, input_precision="ieee")
    else:
        o = tl.sum(pr[:, :, None] * v[None, :, :], axis=1)
    tl.store(O + m * TQ * D + iq[:, None] * D + col[None, :], o.to(O.dtype.element_ty), mask=qm)


@direct
@triton.jit
def _attn_bwd(Q, K, V, ROWS, PAD, DO, DQ, DK, DV, SEEDS, seed_idx, sqm, sqt, skm, skt, svm, svt, spm,
              dqm, dqt, dkm, dkt, dvm, dvt, T, TQ, L, q_start, H, D, sdiv, p, drop_scale, drop_scale_lo,
              DH: tl.constexpr, DHP: tl.constexpr, TP: tl.constexpr, TQP: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, USE_DOT: tl.constexpr, Q_ROWS: tl.constexpr,
              KV_ROWS: tl.constexpr, ACC: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    iq = tl.arange(0, TQP)
    jk = tl.arange(0, TP)
    d = tl.arange(0, DHP)
    dm = d < DH
    col = h * DH + d
    qm = (iq < TQ)[:, None] & dm[None, :]
    kvm = (jk < T)[:, None] & dm[None, :]
    q, k, v = _load_qkv(Q, K, V, ROWS, m, T, TQ, q_start, sqm, sqt, skm, skt, svm, svt, iq, jk, col, qm, kvm,
                        Q_ROWS, KV_ROWS, ACC)
    do = tl.load(DO + m * TQ * D + iq[:, None] * D + col[None, :], mask=qm, other=0.0).to(ACC)
    pr, allowed = _probs(q, k, PAD, m * spm, iq, jk, T, L, q_start, sdiv, CAUSAL, HAS_MASK, USE_DOT)
    if USE_DOT:
        dpd = tl.dot(do, tl.trans(v), input_precision="ieee")
    else:
        dpd = tl.sum(do[:, None, :] * v[None, :, :], axis=2)
    pd, ds = _softmax_bwd(pr, dpd, allowed, SEEDS, seed_idx, m, H, h, TQ, T, iq, jk, p, sdiv, drop_scale,
                          drop_scale_lo, DROPOUT, ACC)
    if USE_DOT:
        dv = tl.dot(tl.trans(pd), do, input_precision="ieee")
        dq = tl.dot(ds, k, input_precision="ieee")
        dk = tl.dot(tl.trans(ds), q, input_precision="ieee")
    else:
        dv = tl.sum(pd[:, :, None] * do[:, None, :], axis=0)
        dq = tl.sum(ds[:, :, None] * k[None, :, :], axis=1)
        dk = tl.sum(ds[:, :, None] * q[:, None, :], axis=0)
    tl.store(DQ + m * dqm + iq[:, None] * dqt + col[None, :], dq.to(DQ.dtype.element_ty), mask=qm)
    tl.store(DK + m * dkm + jk[:, None] * dkt + col[None, :], dk.to(DK.dtype.element_ty), mask=kvm)
    tl.store(DV + m * dvm + jk[:, None] * dvt + col[None, :], dv.to(DV.dtype.element_ty), mask=kvm)


def _views(qkv: torch.Tensor, kv: Optional[torch.Tensor], D: int):
    """(q, k, v) strided views: from one [M, T, 3D] c_attn output, or q [M, TQ, D] + kv [M, T, 2D]."""
    if kv is None:
        return qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    return qkv, kv[..., :D], kv[..., D:]


def _check(q, k, v, pad_mask, num_heads):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3 or t.stride(-1) != 1:
            raise ValueError(f"tiny_attention: {name} must be [M, T, D] with a contiguous last dim")
    if q.shape[2] % num_heads:
        raise ValueError(f"tiny_attention: num_heads={num_heads} does not divide width {q.shape[2]}")
    if pad_mask is not None and (pad_mask.shape[0] != q.shape[0] or pad_mask.shape[1] != k.shape[1] - 1):
        raise ValueError("tiny_attention: pad_mask must be [M, T-1] (no entry for the CLS key)")


NUM_WARPS_OVERRIDE = None  # benchmarks/tune_attention.py sweeps this; None = the rule below


def _num_warps(TP, TQP, DHP) -> int:
    """Warps per (sequence, head) program. A program's tile is tiny (T <= 8 rows of one head at the paper
    shapes), so one warp wins: on an H100 (benchmarks/tune_attention.py, 2026-11-22) 1 warp vs the former 4
    took the full block from 199/338 us (fwd/bwd) to 60/126 us at text-default and 271/475 -> 99/201 us at
    vits-default, and the CLS-only block from 130 -> 111 us (text) and 180 -> 117 us (ViT) fwd+bwd."""
    if NUM_WARPS_OVERRIDE:
        return int(NUM_WARPS_OVERRIDE)
    n = TP * TQP * DHP
    if n <= 4096 and TP < 16:  # measured shapes only (T <= 8, no tl.dot); larger tiles keep the old rule
        return 1
    return 4 if n <= 8192 else 8


def _operands(qkv, kv, rows, pad_mask, num_heads, check: bool = True):
    """(q, k, v, M, TQ, T, strides (sqm, sqt, skm, skt, svm, svt), q_rows, kv_rows). Without ``rows``: strided
    [M, T, *] views of qkv [M, T, 3D] or q [M, TQ, D] + kv [M, T, 2D]. With ``rows`` [M, T] (layer 0, whose
    tokens are rows of a (digit, slot) table): qkv is the table [n, 3D] (q, k and v read by index), or q
    [M, TQ, D] as given with kv the table [n, 2D] (k and v by index) -- no [M, T, 3D] gather."""
    D = kv.shape[-1] // 2 if kv is not None else qkv.shape[-1] // 3
    q, k, v = _views(qkv, kv, D)
    if rows is None:
        if check:
            _check(q, k, v, pad_mask, num_heads)
        M, TQ = q.shape[0], q.shape[1]
        st = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
        return q, k, v, M, TQ, k.shape[1], st, False, False
    M, T = rows.shape
    tab_q = kv is None
    TQ = T if tab_q else q.shape[1]
    sq = (0, q.stride(0)) if tab_q else (q.stride(0), q.stride(1))
    st = (*sq, 0, k.stride(0), 0, v.stride(0))
    if not check:  # the backward of a checked forward
        return q, k, v, M, TQ, T, st, tab_q, True
    for name, t in ((("q", q),) if tab_q else ()) + (("k", k), ("v", v)):
        if t.dim() != 2 or t.stride(-1) != 1:
            raise ValueError(f"tiny_attention: indexed {name} must be a [rows, D] table with a contiguous last dim")
    if not tab_q and (q.dim() != 3 or q.stride(-1) != 1):
        raise ValueError("tiny_attention: q must be [M, TQ, D] with a contiguous last dim")
    if rows.dtype != torch.int64 or not rows.is_contiguous() or (not tab_q and q.shape[0] != M):
        raise ValueError("tiny_attention: rows must be a contiguous int64 [M, T] tensor of table rows")
    if q.shape[-1] % num_heads:
        raise ValueError(f"tiny_attention: num_heads={num_heads} does not divide width {q.shape[-1]}")
    if pad_mask is not None and (pad_mask.shape[0] != M or pad_mask.shape[1] != T - 1):
        raise ValueError("tiny_attention: pad_mask must be [M, T-1] (no entry for the CLS key)")
    return q, k, v, M, TQ, T, st, tab_q, True


def _geometry(q, M, TQ, T, D, num_heads):
    DH = D // num_heads
    TP, TQP, DHP = next_pow2(T), next_pow2(TQ), next_pow2(DH)
    use_dot = (TP >= 16 and TQP >= 16 and DHP >= 16 and q.dtype != torch.float64
               and q.device.type == "cuda")
    return DH, TP, TQP, DHP, use_dot


def tiny_attention_forward(qkv, kv, pad_mask, num_heads: int, causal: bool, q_start: int, scale_div: float,
                           p: float, seeds, seed_idx: int, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[M, TQ, D] attention output. ``rows``: layer 0's table rows (see _operands)."""
    q, k, v, M, TQ, T, st, q_rows, kv_rows = _operands(qkv, kv, rows, pad_mask, num_heads)
    D = q.shape[-1]
    DH, TP, TQP, DHP, use_dot = _geometry(q, M, TQ, T, D, num_heads)
    L = pad_mask.shape[1] if pad_mask is not None else 0
    out = q.new_empty((M, TQ, D))
    dropout = p > 0.0
    if M > 0:
        pad = pad_mask if pad_mask is not None else q
        _attn_fwd[(M, num_heads)](
            q, k, v, rows if rows is not None else q, pad, out, seeds if dropout else q, seed_idx, *st,
            pad.stride(0) if pad_mask is not None else 0, T, TQ, L, q_start, num_heads, D, scale_div, p,
            *drop_scales(p, q.dtype), DH=DH, DHP=DHP, TP=TP, TQP=TQP, CAUSAL=causal, HAS_MASK=pad_mask is not None,
            DROPOUT=dropout, USE_DOT=use_dot, Q_ROWS=q_rows, KV_ROWS=kv_rows, ACC=acc_dtype(q),
            num_warps=_num_warps(TP, TQP, DHP))
    return out


def tiny_attention_backward(dout, qkv, kv, pad_mask, num_heads: int, causal: bool, q_start: int,
                            scale_div: float, p: float, seeds, seed_idx: int, rows: Optional[torch.Tensor] = None):
    """Returns (d_qkv, d_kv): d_qkv has qkv's shape ([M,T,3D] or [M,TQ,D]); d_kv is empty without kv. With
    ``rows`` the gradients are per token, as for the gathered operands: d_qkv [M, T, 3D] for a table qkv, d_kv
    [M, T, 2D] for a table kv (the table's own gradient is their sum per row: ops/table_grad.py)."""
    q, k, v, M, TQ, T, st, q_rows, kv_rows = _operands(qkv, kv, rows, pad_mask, num_heads, check=False)
    D = q.shape[-1]
    DH, TP, TQP, DHP, use_dot = _geometry(q, M, TQ, T, D, num_heads)
    L = pad_mask.shape[1] if pad_mask is not None else 0
    dout = dout.contiguous()
    first_shape = (M, T, 3 * D) if q_rows else qkv.shape
    d_first = torch.empty(first_shape, dtype=qkv.dtype, device=qkv.device)
    d_kv = (torch.empty((M, T, 2 * D) if kv_rows else kv.shape, dtype=kv.dtype, device=kv.device)
            if kv is not None else qkv.new_empty((0,)))
    dq, dk, dv = _views(d_first, d_kv if kv is not None else None, D)
    dropout = p > 0.0
    if M > 0:
        pad = pad_mask if pad_mask is not None else q
        _attn_bwd[(M, num_heads)](
            q, k, v, rows if rows is not None else q, pad, dout, dq, dk, dv, seeds if dropout else q, seed_idx,
            *st, pad.stride(0) if pad_mask is not None else 0,
            dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), T, TQ, L,
            q_start, num_heads, D, scale_div, p, *drop_scales(p, q.dtype), DH=DH, DHP=DHP, TP=TP, TQP=TQP,
            CAUSAL=causal, HAS_MASK=pad_mask is not None, DROPOUT=dropout, USE_DOT=use_dot, Q_ROWS=q_rows,
            KV_ROWS=kv_rows, ACC=acc_dtype(q), num_warps=_num_warps(TP, TQP, DHP))
    return d_first, d_kv


@triton.jit
def _attn_mask_kernel(SEEDS, seed_idx, OUT, N, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(tl.load(SEEDS + seed_idx), offs.to(tl.int32)) > p
    tl.store(OUT + offs, keep.to(tl.float32), mask=offs < N)


def attention_keep_mask(seeds, seed_idx: int, M: int, H: int, TQ: int, T: int, p: float) -> torch.Tensor:
    """Test hook: the [M, H, TQ, T] keep-mask the kernels draw (offset ((m*H+h)*TQ+i)*T+j)."""
    n = M * H * TQ * T
    out = torch.empty(n, dtype=torch.float32, device=seeds.device)
    if n:
        _attn_mask_kernel[(cdiv(n, 1024),)](seeds, seed_idx, out, n, p, BLOCK=1024)
    return out.view(M, H, TQ, T)


# ----------------------------------------------------------------------------- PyTorch operators
from typing import Tuple  # noqa: E402

from torch import Tensor  # noqa: E402

from ._common import IMPL_EXT, backward_op, eager_entry, ext_ops  # noqa: E402


@torch.library.custom_op("seqpe::tiny_attention", mutates_args=())
def tiny_attention(qkv: Tensor, kv: Optional[Tensor], pad_mask: Optional[Tensor], num_heads: int, causal: bool,
                   q_start: int, scale_div: float, p: float, seeds: Optional[Tensor], seed_idx: int,
                   impl: int) -> Tensor:
    if impl == IMPL_EXT:
        return ext_ops().tiny_attention_fwd(qkv, kv, pad_mask, num_heads, causal, q_start, scale_div, p, seeds,
                                            seed_idx)
    return tiny_attention_forward(qkv, kv, pad_mask, num_heads, causal, q_start, scale_div, p, seeds, seed_idx)


@tiny_attention.register_fake
def _(qkv, kv, pad_mask, num_heads, causal, q_start, scale_div, p, seeds, seed_idx, impl):
    D = kv.shape[2] // 2 if kv is not None else qkv.shape[2] // 3
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], D))


@torch.library.custom_op("seqpe::tiny_attention_backward", mutates_args=())
def tiny_attention_bwd(dout: Tensor, qkv: Tensor, kv: Optional[Tensor], pad_mask: Optional[Tensor],
                       num_heads: int, causal: bool, q_start: int, scale_div: float, p: float,
                       seeds: Optional[Tensor], seed_idx: int, impl: int) -> Tuple[Tensor, Tensor]:
    if impl == IMPL_EXT:
        return ext_ops().tiny_attention_bwd(dout, qkv, kv, pad_mask, num_heads, causal, q_start, scale_div, p,
                                            seeds, seed_idx)
    return tiny_attention_backward(dout, qkv, kv, pad_mask, num_heads, causal, q_start, scale_div, p, seeds,
                                   seed_idx)


@tiny_attention_bwd.register_fake
def _(dout, qkv, kv, pad_mask, num_heads, causal, q_start, scale_div, p, seeds, seed_idx, impl):
    return qkv.new_empty(qkv.shape), (kv.new_empty(kv.shape) if kv is not None else qkv.new_empty((0,)))


def _attn_setup(ctx, inputs, output):
    qkv, kv, pad_mask, num_heads, causal, q_start, scale_div, p, seeds, seed_idx, impl = inputs
    ctx.args = (num_heads, causal, q_start, scale_div, p, seed_idx, impl)
    ctx.has_kv = kv is not None
    ctx.save_for_backward(qkv, kv, pad_mask, seeds)


def _attn_backward(ctx, dout):
    qkv, kv, pad_mask, seeds = ctx.saved_tensors
    num_heads, causal, q_start, scale_div, p, seed_idx, impl = ctx.args
    d_first, d_kv = backward_op(ctx, tiny_attention_bwd, dout, qkv, kv, pad_mask, num_heads, causal, q_start,
                                scale_div, p, seeds, seed_idx, impl)
    return d_first, (d_kv if ctx.has_kv else None), None, None, None, None, None, None, None, None, None


tiny_attention.register_autograd(_attn_backward, setup_context=_attn_setup)
tiny_attention_call = eager_entry(tiny_attention, _attn_setup, _attn_backward)
