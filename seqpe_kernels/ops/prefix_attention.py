"""Prefix-trie attention: each trie node's single query attends over its own ancestors' keys/values.

Used by ``seqpe_kernels.savings.dedup.prefix_shared_forward``: there a level-j node (a unique decimal prefix) attends
to its ancestors at levels 0..j, and a CLS node to its whole path plus itself. The eager version gathers k/v
rows by ``anc`` into [n, H, a, de] copies, runs two tiny batched matmuls, an additive mask and a softmax.
Here one program handles a block of nodes for one head: it reads the ancestor rows of k/v straight out of
the (strided) c_attn GEMM output through ``anc``, keeps the a×de tiles in registers, and writes the head's
output into the merged-head layout c_proj reads. Backward recomputes the probabilities (nothing of size
[n, H, a] is saved); dq is stored per node, and dk/dv are scattered onto the ancestor rows with atomic adds
into fp32 (fp64 for fp64 inputs) buffers, because many nodes share an ancestor.

Mask semantics match the eager ``attend``: a masked logit (key_mask == 0) becomes a large finite negative
(the eager code adds finfo.min), so a fully masked row is uniform over its a keys. The backward passes the
softmax gradient to every logit, masked or not, exactly as autograd does through the eager additive mask
(masked keys of a partially masked row have probability 0, hence zero gradient; a fully masked row's
uniform probabilities do pass gradient). No attention dropout: prefix sharing is exact only with dropout
off, and the caller keeps the eager path when it is active.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import acc_dtype, cdiv, next_pow2
from .launch import direct

_FMIN = -3.0e38  # stands in for finfo.min: only equality among masked logits matters


@triton.jit
def _sdiv(DH: tl.constexpr, ACC: tl.constexpr):
    """sqrt(DH) correctly rounded in ACC (the eager code divides by torch.full([], de ** 0.5, dtype))."""
    x = tl.full([], DH, ACC)
    if ACC == tl.float64:
        return tl.sqrt(x)  # fp64 sqrt is IEEE-exact
    else:
        return tl.sqrt_rn(x)  # plain fp32 sqrt may be approximate on GPU


@triton.jit
def _load_tiles(Q, K, V, ANC, KM, pid, h, n, A, sq, sk, sv, sanc, skm, DH: tl.constexpr, BN: tl.constexpr,
                AP: tl.constexpr, DHP: tl.constexpr, SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
                ACC: tl.constexpr):
    """q [BN, DHP], k/v [BN, AP, DHP] of one head for a block of nodes, and the probabilities [BN, AP]."""
    r = pid * BN + tl.arange(0, BN).to(tl.int64)
    a = tl.arange(0, AP)
    d = tl.arange(0, DHP)
    col = h * DH + d
    rm = r < n
    am = a < A
    dm = d < DH
    ra = rm[:, None] & am[None, :]
    idx = tl.load(ANC + r[:, None] * sanc + a[None, :], mask=ra, other=0)  # int64 global rows
    q = tl.load(Q + r[:, None] * sq + col[None, :], mask=rm[:, None] & dm[None, :], other=0.0).to(ACC)
    kvm = ra[:, :, None] & dm[None, None, :]
    k = tl.load(K + idx[:, :, None] * sk + col[None, None, :], mask=kvm, other=0.0).to(ACC)
    v = tl.load(V + idx[:, :, None] * sv + col[None, None, :], mask=kvm, other=0.0).to(ACC)
    s = tl.sum(q[:, None, :] * k, axis=2)  # [BN, AP]  (tiny: elementwise + sum, no tl.dot)
    if SCALE:
        s = s / _sdiv(DH, ACC)
    if HAS_MASK:
        km = tl.load(KM + r[:, None] * skm + a[None, :], mask=ra, other=1.0)
        s = tl.where(km != 0, s, -3.0e38)
    s = tl.where(am[None, :], s, float("-inf"))  # padded ancestor slots never count
    mx = tl.max(s, 1)
    e = tl.exp(s - mx[:, None])
    p = e / tl.sum(e, 1)[:, None]
    return r, col, rm, dm, kvm, idx, q, k, v, p


@direct
@triton.jit
def _pfx_fwd(Q, K, V, ANC, KM, O, n, A, D, sq, sk, sv, sanc, skm, DH: tl.constexpr, BN: tl.constexpr,
             AP: tl.constexpr, DHP: tl.constexpr, SCALE: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    r, col, rm, dm, kvm, idx, q, k, v, p = _load_tiles(Q, K, V, ANC, KM, pid, h, n, A, sq, sk, sv, sanc, skm,
                                                       DH, BN, AP, DHP, SCALE, HAS_MASK, ACC)
    o = tl.sum(p[:, :, None] * v, axis=1)  # [BN, DHP]
    tl.store(O + r[:, None] * D + col[None, :], o.to(O.dtype.element_ty), mask=rm[:, None] & dm[None, :])


@direct
@triton.jit
def _pfx_bwd(Q, K, V, ANC, KM, DO, DQ, DK, DV, n, A, D, sq, sk, sv, sanc, skm, sdo, DH: tl.constexpr,
             BN: tl.constexpr, AP: tl.constexpr, DHP: tl.constexpr, SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
             ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    r, col, rm, dm, kvm, idx, q, k, v, p = _load_tiles(Q, K, V, ANC, KM, pid, h, n, A, sq, sk, sv, sanc, skm,
                                                       DH, BN, AP, DHP, SCALE, HAS_MASK, ACC)
    qm = rm[:, None] & dm[None, :]
    do = tl.load(DO + r[:, None] * sdo + col[None, :], mask=qm, other=0.0).to(ACC)
    dp = tl.sum(do[:, None, :] * v, axis=2)  # [BN, AP]
    # softmax backward on every logit (see the module doc for why masked ones are not zeroed)
    ds = p * (dp - tl.sum(p * dp, 1)[:, None])
    if SCALE:
        ds = ds / _sdiv(DH, ACC)
    dq = tl.sum(ds[:, :, None] * k, axis=1)
    tl.store(DQ + r[:, None] * D + col[None, :], dq.to(DQ.dtype.element_ty), mask=qm)
    dk = ds[:, :, None] * q[:, None, :]
    dv = p[:, :, None] * do[:, None, :]
    off = idx[:, :, None] * D + col[None, None, :]  # DK/DV are contiguous [N, D] accumulation buffers
    tl.atomic_add(DK + off, dk.to(DK.dtype.element_ty), mask=kvm, sem="relaxed")
    tl.atomic_add(DV + off, dv.to(DV.dtype.element_ty), mask=kvm, sem="relaxed")


def _rows(t: Tensor) -> Tensor:
    """A 2-D view with unit column stride (row stride free: slices of a [*, 3D] GEMM output stay views)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _check(q, k, v, anc, key_mask, num_heads):
    if q.dim() != 2 or k.dim() != 2 or v.dim() != 2:
        raise ValueError("prefix_attention: q, k, v must be 2-D ([n, D], [N, D], [N, D])")
    D = q.shape[1]
    if k.shape[1] != D or v.shape != k.shape:
        raise ValueError(f"prefix_attention: k and v must both be [N, {D}] (got {tuple(k.shape)}, "
                         f"{tuple(v.shape)})")
    if num_heads <= 0 or D % num_heads:
        raise ValueError(f"prefix_attention: num_heads={num_heads} does not divide width {D}")
    if anc.dim() != 2 or anc.shape[0] != q.shape[0] or anc.dtype != torch.int64:
        raise ValueError("prefix_attention: anc must be an int64 [n, a] tensor of row indices into k/v")
    if key_mask is not None and key_mask.shape != anc.shape:
        raise ValueError("prefix_attention: key_mask must have anc's shape [n, a]")


def _launch(q, anc, num_heads):
    n, D = q.shape
    A = anc.shape[1]
    DH = D // num_heads
    AP, DHP = next_pow2(A), next_pow2(DH)
    # nodes per program: a small tile on GPU (many programs keep the SMs busy), a big one under the
    # interpreter (which runs programs one after another, so fewer programs is what makes it fast)
    target = 2048 if q.device.type == "cuda" else 1 << 15
    BN = max(1, min(next_pow2(n), target // (AP * DHP)))
    return n, D, A, DH, AP, DHP, BN, (cdiv(n, BN), num_heads)


def prefix_attention_forward(q, k, v, anc, key_mask, num_heads: int, scale: bool) -> Tensor:
    _check(q, k, v, anc, key_mask, num_heads)
    q, k, v, anc = _rows(q), _rows(k), _rows(v), anc.contiguous()
    km = _rows(key_mask) if key_mask is not None else None
    n, D, A, DH, AP, DHP, BN, grid = _launch(q, anc, num_heads)
    out = torch.empty((n, D), dtype=q.dtype, device=q.device)
    if n > 0 and D > 0:
        _pfx_fwd[grid](q, k, v, anc, km if km is not None else q, out, n, A, D, q.stride(0), k.stride(0),
                       v.stride(0), anc.stride(0), km.stride(0) if km is not None else 0, DH=DH, BN=BN, AP=AP,
                       DHP=DHP, SCALE=scale, HAS_MASK=km is not None, ACC=acc_dtype(q, k, v),
                       num_warps=4 if BN * AP * DHP <= 4096 else 8)
    return out


def prefix_attention_backward(dout, q, k, v, anc, key_mask, num_heads: int, scale: bool):
    """(dq [n, D] in q's dtype, dk [N, D], dv [N, D] in k's / v's dtype), all contiguous."""
    _check(q, k, v, anc, key_mask, num_heads)
    q, k, v, anc, dout = _rows(q), _rows(k), _rows(v), anc.contiguous(), _rows(dout)
    km = _rows(key_mask) if key_mask is not None else None
    n, D, A, DH, AP, DHP, BN, grid = _launch(q, anc, num_heads)
    wide = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    dq = torch.empty((n, D), dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=wide, device=k.device)
    dv = torch.zeros(v.shape, dtype=wide, device=v.device)
    if n > 0 and D > 0:
        _pfx_bwd[grid](q, k, v, anc, km if km is not None else q, dout, dq, dk, dv, n, A, D, q.stride(0),
                       k.stride(0), v.stride(0), anc.stride(0), km.stride(0) if km is not None else 0,
                       dout.stride(0), DH=DH, BN=BN, AP=AP, DHP=DHP, SCALE=scale, HAS_MASK=km is not None,
                       ACC=acc_dtype(q, k, v), num_warps=4 if BN * AP * DHP <= 4096 else 8)
    # .to() is a no-op for fp32/fp64 k/v (the buffers are fresh, so nothing aliases an input)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------- PyTorch operators
@torch.library.custom_op("seqpe::prefix_attention", mutates_args=())
def prefix_attention(q: Tensor, k: Tensor, v: Tensor, anc: Tensor, key_mask: Optional[Tensor], num_heads: int,
                     scale: bool) -> Tensor:
    """o [n, D] (contiguous, q's dtype): node i's query q[i] over the rows k[anc[i]], v[anc[i]] per head."""
    return prefix_attention_forward(q, k, v, anc, key_mask, num_heads, scale)


@prefix_attention.register_fake
def _(q, k, v, anc, key_mask, num_heads, scale):
    return q.new_empty((q.shape[0], q.shape[1]))


@torch.library.custom_op("seqpe::prefix_attention_backward", mutates_args=())
def prefix_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, anc: Tensor, key_mask: Optional[Tensor],
                         num_heads: int, scale: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return prefix_attention_backward(dout, q, k, v, anc, key_mask, num_heads, scale)


@prefix_attention_bwd.register_fake
def _(dout, q, k, v, anc, key_mask, num_heads, scale):
    return (q.new_empty((q.shape[0], q.shape[1])), k.new_empty((k.shape[0], k.shape[1])),
            v.new_empty((v.shape[0], v.shape[1])))


def _setup(ctx, inputs, output):
    q, k, v, anc, key_mask, num_heads, scale = inputs
    ctx.args = (num_heads, scale)
    ctx.save_for_backward(q, k, v, anc, key_mask)


def _backward(ctx, dout):
    q, k, v, anc, key_mask = ctx.saved_tensors
    num_heads, scale = ctx.args
    dq, dk, dv = prefix_attention_bwd(dout, q, k, v, anc, key_mask, num_heads, scale)
    return dq, dk, dv, None, None, None, None


prefix_attention.register_autograd(_backward, setup_context=_setup)
