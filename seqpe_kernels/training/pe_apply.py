"""How the main model consumes the SeqPE output (SEQPE_SPEC §4.2-§4.4), re-implemented from the spec.

Methods: ``input_add``, ``attn_mul``, ``attn_add``, ``attn_scalar``, ``rotary`` (plus ``nope``: no PE, and
``alibi``: the causal linear bias of the ALiBi baseline, :func:`alibi_attn_mask`; see :mod:`seqpe_kernels.training.baselines`).

**Windows, not copies.** The encoder gives one PE table per distinct position window, ``pe`` [P, N, O]
(P = 1 on default steps, P = pe_main_batch_size on shifted steps). The reference tiles it to the batch with
``repeat`` (sample b uses window ``b mod P``) and then runs the Q/K projection and every PE-derived product on
B copies (SEQPE_SPEC §6.1). Here every PE-derived tensor (Q/K projection, per-head split, rotary tables,
the attn_scalar bias of the explicit form) is computed once per window and broadcast against the batch by
viewing the batch axis as ``[B // P, P]`` -- the same ``b mod P`` rule, no B-fold materialisation.
:func:`tile_windows` is the materialised reference rule, for tests.

**attn_scalar** is computed as ordinary scaled-dot-product attention over augmented heads,
``[q ; s*P^q] . [k ; P^k]`` with the model's scale 1/sqrt(d_h) (§4.4 identity), via
``F.scaled_dot_product_attention`` -- no [B, H, N, N] bias. :func:`attn_scalar_explicit` is the reference's
explicit-bias form (GPT-2 eager / ViT): ``(q k^T + s P^q P^k^T) / sqrt(d_h)`` + additive causal mask.

Shapes used throughout: q, k, v [B, H, N, d_h] (heads split, before any kv-cache concat); P^q, P^k
[P, h', N, d'] with h' = H (``use_pe_multi_head``) or 1 (one set broadcast over heads).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.seqpe import trunc_normal_

__all__ = ["METHODS", "pe_out_dim", "tile_windows", "window_broadcast", "input_add", "split_pe_qk", "PeQK",
           "attn_mul", "attn_add", "rotary_tables", "rotary", "rotate_pairs", "attn_scalar",
           "attn_scalar_bias", "attn_scalar_explicit", "pe_attention", "alibi_attn_mask"]

METHODS = ("nope", "input_add", "attn_mul", "attn_add", "attn_scalar", "rotary", "alibi")


def pe_out_dim(method: str, model_dim: int, num_heads: int, multi_head: bool = True) -> int:
    """Encoder output width O required by a method (SEQPE_SPEC §4.1); -1 for 'nope'. 'alibi' is no SeqPE method
    (it raises; the ALiBi baseline's width is its head count, :class:`seqpe_kernels.training.baselines.ALiBi`)."""
    if model_dim % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide model_dim={model_dim}")
    d_h = model_dim // num_heads
    if method == "nope":
        return -1
    if method == "input_add":
        return model_dim
    if method == "rotary":
        if multi_head:
            raise ValueError("rotary with SeqPE uses one O = d_h table shared by all heads (multi_head=False)")
        return d_h
    if method in ("attn_mul", "attn_add", "attn_scalar"):
        return model_dim if multi_head else d_h
    raise ValueError(f"unknown PE method {method!r}; expected one of {METHODS}")


# ============================================================================================ windows
def tile_windows(pe: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The reference's materialised tiling: ``pe.repeat(B // P, ...)``, so sample b gets window ``b mod P``."""
    P = pe.shape[0]
    if batch_size % P:
        raise ValueError(f"batch size {batch_size} is not a multiple of the number of PE windows {P}")
    return pe.repeat(batch_size // P, *([1] * (pe.dim() - 1)))


def window_broadcast(x: torch.Tensor, per_window: torch.Tensor, op) -> torch.Tensor:
    """``op(x[b], per_window[b mod P])`` for every b, without tiling: x [B, ...], per_window [P, ...]."""
    B, P = x.shape[0], per_window.shape[0]
    if B % P:
        raise ValueError(f"batch size {B} is not a multiple of the number of PE windows {P}")
    out = op(x.reshape(B // P, P, *x.shape[1:]), per_window.unsqueeze(0))
    return out.reshape(B, *out.shape[2:])


def input_add(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """``x0 = x + pe[b mod P]``: x [B, N, C], pe [P, N, C] (or [N, C]). Dropout is the caller's."""
    if pe.dim() == x.dim() - 1:
        pe = pe.unsqueeze(0)
    if pe.shape[1:] != x.shape[1:]:
        raise ValueError(f"input_add: pe windows {tuple(pe.shape[1:])} do not match the input {tuple(x.shape[1:])}")
    return window_broadcast(x, pe, torch.add)


# ============================================================================================ Q/K projection
def split_pe_qk(pe2: torch.Tensor, n_head: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """[P, N, 2E] -> (P^q, P^k), each [P, n_head, N, E / n_head] (views).

    The 2E-vector is read as [2, n_head, E / n_head]: first half P^q, second half P^k, heads contiguous
    chunks inside each half (SEQPE_SPEC §4.3).
    """
    P, N, D2 = pe2.shape
    if D2 % (2 * n_head):
        raise ValueError(f"PE width {D2} cannot be split into q/k halves of {n_head} head(s)")
    t = pe2.reshape(P, N, 2, n_head, D2 // (2 * n_head)).permute(2, 0, 3, 1, 4)
    return t[0], t[1]


class PeQK(nn.Module):
    """Q/K projection of the PE for the attn_* methods (``use_pe_qk_per_layer``, SEQPE_SPEC §4.3).

    Args:
      pe_dim: O, the encoder output width.
      model_dim: C_m (only used by the GPT-2 'none' rule).
      num_heads: H of the main model; ``multi_head`` selects n_head = H (``use_pe_multi_head``) or 1.
      num_layers: attention layers ('multi' has one projection each).
      mode: 'multi' -- per-layer Linear(O, 2O); 'single' -- one Linear(O, 2O) applied once per step and
        shared by all layers; 'none' -- no projection.
      none_style: for 'none': 'gpt2' duplicates the PE ([pe ; pe], P^q = P^k) when O == C_m and otherwise splits
        the raw vector in halves; 'vit' always splits in halves (§8.3 item 14).
      bias: Linear bias (True in both models).
      init: 'normal' (GPT-2: N(0, 0.02^2)) or 'trunc_normal' (ViT: truncated normal, std 0.02); bias zero.

    Usage per step: ``shared = peqk.prepare(pe)`` once ([P, N, O] -> [P, N, 2O] or [P, N, O]); then per layer i
    ``pq, pk = peqk(shared, i)`` -> [P, n_head, N, d'] each. Everything is per window, never per sample.
    """

    def __init__(self, pe_dim: int, model_dim: int, num_heads: int, num_layers: int = 1, mode: str = "single",
                 multi_head: bool = True, none_style: str = "gpt2", bias: bool = True, init: str = "normal"):
        super().__init__()
        if mode not in ("none", "single", "multi"):
            raise ValueError(f"mode must be 'none', 'single' or 'multi', got {mode!r}")
        if none_style not in ("gpt2", "vit"):
            raise ValueError(f"none_style must be 'gpt2' or 'vit', got {none_style!r}")
        if init not in ("normal", "trunc_normal"):
            raise ValueError(f"init must be 'normal' or 'trunc_normal', got {init!r}")
        self.pe_dim, self.model_dim, self.num_heads = pe_dim, model_dim, num_heads
        self.num_layers, self.mode, self.multi_head = num_layers, mode, multi_head
        self.none_style, self.init = none_style, init
        self.n_head = num_heads if multi_head else 1
        if mode == "single":
            self.proj = nn.Linear(pe_dim, 2 * pe_dim, bias=bias)
        elif mode == "multi":
            self.projs = nn.ModuleList(nn.Linear(pe_dim, 2 * pe_dim, bias=bias) for _ in range(num_layers))
        width = 2 * pe_dim if (mode != "none" or (none_style == "gpt2" and pe_dim == model_dim)) else pe_dim
        if width % (2 * self.n_head):
            raise ValueError(f"PE width {width} cannot be split into q/k halves of {self.n_head} head(s)")
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if self.init == "normal":
                    nn.init.normal_(m.weight, std=0.02)
                else:
                    trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    m.bias.zero_()

    def prepare(self, pe: torch.Tensor) -> torch.Tensor:
        """Model-level step, once per forward: 'single' projection, or the GPT-2 'none' duplication."""
        if pe.shape[-1] != self.pe_dim:
            raise ValueError(f"PE width {pe.shape[-1]} != pe_dim {self.pe_dim}")
        if self.mode == "single":
            return self.proj(pe)
        if self.mode == "none" and self.none_style == "gpt2" and self.pe_dim == self.model_dim:
            return torch.cat([pe, pe], dim=-1)
        return pe

    def forward(self, shared: torch.Tensor, layer: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-layer (P^q, P^k) [P, n_head, N, d'] from ``prepare``'s output."""
        if self.mode == "multi":
            shared = self.projs[layer](shared)
        return split_pe_qk(shared, self.n_head)

    def extra_repr(self):
        return (f"pe_dim={self.pe_dim}, mode={self.mode!r}, n_head={self.n_head}, "
                f"num_layers={self.num_layers}, none_style={self.none_style!r}")


# ============================================================================================ q/k methods
def _check_qk_pe(name: str, x: torch.Tensor, p: torch.Tensor, same_width: bool = True):
    if p.dim() != 4:
        raise ValueError(f"{name}: per-window PE must be [P, h, N, d], got {tuple(p.shape)}")
    if p.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"{name}: PE has {p.shape[1]} head(s), the model {x.shape[1]}")
    if p.shape[2] != x.shape[2]:
        raise ValueError(f"{name}: PE has {p.shape[2]} rows, the sequence {x.shape[2]}")
    if same_width and p.shape[3] != x.shape[3]:
        raise ValueError(f"{name}: PE head width {p.shape[3]} != model head dim {x.shape[3]} (e.g. the ViT "
                         "'none' split only fits attn_scalar, SEQPE_SPEC §4.3)")


def attn_mul(q: torch.Tensor, k: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor):
    """q ← q ⊙ P^q, k ← k ⊙ P^k (per window, broadcast b mod P; values untouched)."""
    _check_qk_pe("attn_mul", q, pq)
    _check_qk_pe("attn_mul", k, pk)
    return window_broadcast(q, pq, torch.mul), window_broadcast(k, pk, torch.mul)


def attn_add(q: torch.Tensor, k: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor):
    """q ← q + P^q, k ← k + P^k."""
    _check_qk_pe("attn_add", q, pq)
    _check_qk_pe("attn_add", k, pk)
    return window_broadcast(q, pq, torch.add), window_broadcast(k, pk, torch.add)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).reshape(x.shape)


def rotary_tables(pe: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-window rotary factors from the learned PE: [P, N, d] -> (cos', sin') each [P, 1, N, d].

    The O = d vector is read as [a | b] (a: first d/2, "sin"; b: last d/2, "cos"), each duplicated pairwise:
    a' = (a0, a0, a1, a1, ...). A [P, h, N, d] input gives per-head tables.
    """
    if pe.dim() == 3:
        pe = pe.unsqueeze(1)
    d = pe.shape[-1]
    if d % 2:
        raise ValueError(f"rotary needs an even PE width, got {d}")
    a, b = pe[..., : d // 2], pe[..., d // 2:]
    return b.repeat_interleave(2, dim=-1), a.repeat_interleave(2, dim=-1)


def rotary(q: torch.Tensor, k: torch.Tensor, pe: Optional[torch.Tensor] = None,
           tables: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """q ← q ⊙ b' + rot(q) ⊙ a', same for k (SEQPE_SPEC §4.4). Give ``pe`` [P, N, d_h] or precomputed
    ``tables = rotary_tables(pe)`` (compute them once per step and reuse them in every layer)."""
    cos, sin = tables if tables is not None else rotary_tables(pe)
    _check_qk_pe("rotary", q, cos)

    def apply(x):
        return window_broadcast(x, cos, torch.mul) + window_broadcast(rotate_pairs(x), sin, torch.mul)

    return apply(q), apply(k)


# ============================================================================================ attn_scalar
def _head_scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _check_qkv(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v [B, H, N(k), d]: one batch and head count, and one key length for k and v (SDPA does not check
    the latter on every path: a longer v was read as garbage)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{fn}: q, k, v must be [B, H, N, d_h], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise ValueError(f"{fn}: q, k, v differ in batch or head count: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[2] != v.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{fn}: k and v must have the same length and q and k the same head dim, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _causal_allowed(Nq: int, Nk: int, device) -> torch.Tensor:
    """[Nq, Nk] bool, True where query i may attend key j: j <= Nk - Nq + i (bottom-right aligned: with cached
    keys, query i sits at key Nk - Nq + i, as GPT-2's mask slice has it)."""
    return torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril(Nk - Nq)


def _sdpa_mask(attn_mask: Optional[torch.Tensor], causal: bool, Nq: int, Nk: int, device: torch.device):
    """(mask, is_causal) for SDPA: with both a mask and ``causal`` the causal part is folded into the mask (SDPA
    takes one or the other; dropping ``causal`` silently let queries see the future). The causal diagonal is
    bottom-right aligned (query i sits at key Nk - Nq + i: decoding with cached keys, as GPT-2's mask slice and
    attn_scalar_explicit have it); SDPA's ``is_causal`` is top-left aligned when Nq != Nk, so it is used only for
    Nq == Nk (a mismatch there let a cached decode step attend to the wrong keys)."""
    if not causal:
        return attn_mask, False
    if attn_mask is None and Nq == Nk:
        return None, True
    allowed = _causal_allowed(Nq, Nk, device)
    if attn_mask is None:
        return allowed, False
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed, False
    return attn_mask.masked_fill(~allowed, float("-inf")), False


def attn_scalar(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor,
                scalar_scale: float = 1.0, causal: bool = False, attn_mask: Optional[torch.Tensor] = None,
                dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """attn_scalar attention via SDPA over augmented heads (SEQPE_SPEC §4.4 identity).

    ``softmax((q k^T + s P^q P^k^T) * scale [+ mask]) v`` computed as SDPA on ``[q ; s P^q]``, ``[k ; P^k]``
    (head dim d_h + d') and v (d_h), with ``scale`` = 1/sqrt(d_h) of the *model* head dim by default.
    Returns [B, H, N, d_h]. ``attn_mask`` is an SDPA mask (bool: True = attend, or additive float); with
    ``causal=True`` as well, the causal mask is folded into it.
    """
    _check_qkv("attn_scalar", q, k, v)
    _check_qk_pe("attn_scalar", q, pq, same_width=False)
    _check_qk_pe("attn_scalar", k, pk, same_width=False)
    if pq.shape[-1] != pk.shape[-1]:
        raise ValueError(f"attn_scalar: P^q width {pq.shape[-1]} != P^k width {pk.shape[-1]}")
    sc = _head_scale(q, scale)
    B, H = q.shape[:2]
    P = pq.shape[0]

    def augment(x, p):
        xv = x.reshape(B // P, P, *x.shape[1:])
        pe = p.unsqueeze(0).expand(B // P, P, H, p.shape[2], p.shape[3]).to(x.dtype)
        return torch.cat([xv, pe], dim=-1).reshape(B, H, x.shape[2], x.shape[3] + p.shape[3])

    if B % P:
        raise ValueError(f"batch size {B} is not a multiple of the number of PE windows {P}")
    q_aug = augment(q, pq * scalar_scale if scalar_scale != 1.0 else pq)
    k_aug = augment(k, pk)
    # v padded with zero columns to the q/k width: the flash / memory-efficient SDPA kernels need one head dim
    # for q, k and v, and without them SDPA falls back to the math path that materialises [B, H, N, N]
    d_v = v.shape[-1]
    v_aug = F.pad(v, (0, q_aug.shape[-1] - d_v)) if q_aug.shape[-1] != d_v else v
    mask, is_causal = _sdpa_mask(attn_mask, causal, q.shape[2], k.shape[2], q.device)
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=sc)
    return out[..., :d_v] if v_aug is not v else out


def attn_scalar_bias(pq: torch.Tensor, pk: torch.Tensor, scalar_scale: float = 1.0) -> torch.Tensor:
    """Per-window bias ``s P^q P^k^T`` [P, h', N, N] (the reference computes it per tiled sample)."""
    return torch.matmul(pq, pk.transpose(-1, -2)) * scalar_scale


def attn_scalar_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor,
                         scalar_scale: float = 1.0, causal: bool = False, dropout_p: float = 0.0,
                         scale: Optional[float] = None, training: bool = True) -> torch.Tensor:
    """The reference's explicit-bias form (GPT-2 eager / ViT): ``(q k^T + bias) * scale``, then the causal
    mask added as ``(1 - mask) * finfo.min``, softmax, dropout, ``@ v``. Materialises [B, H, N, N]."""
    _check_qk_pe("attn_scalar", q, pq, same_width=False)
    sc = _head_scale(q, scale)
    bias = attn_scalar_bias(pq, pk, scalar_scale)
    w = window_broadcast(torch.matmul(q, k.transpose(-1, -2)), bias, torch.add) * sc
    if causal:
        allowed = _causal_allowed(q.shape[-2], k.shape[-2], q.device)
        w = w + (~allowed).to(w.dtype) * torch.finfo(w.dtype).min
    w = F.softmax(w, dim=-1).to(v.dtype)
    w = F.dropout(w, dropout_p, training)
    return torch.matmul(w, v)


# ============================================================================================ ALiBi
def alibi_attn_mask(pe: torch.Tensor, batch_size: Optional[int] = None, causal: bool = True) -> torch.Tensor:
    """The ALiBi bias as an additive SDPA mask from per-window coordinates ``pe`` [P, N, H] = ``m_h * p``
    (:class:`seqpe_kernels.training.baselines.ALiBi`): ``-m_h (p_i - p_j)`` for keys j <= i and ``-inf`` above the
    diagonal (``causal``; otherwise ``-m_h |p_i - p_j|``). Returns [P, H, N, N], or with ``batch_size`` B the
    mask for the batch (sample b uses window b mod P; [1, H, N, N] when P == 1, broadcast by SDPA)."""
    if pe.dim() != 3:
        raise ValueError(f"alibi: per-window coordinates must be [P, N, H], got {tuple(pe.shape)}")
    c = pe.to(torch.float64).transpose(1, 2)  # [P, H, N] (differences of large products: in float64)
    d = c[..., :, None] - c[..., None, :]  # m_h (p_i - p_j)
    if causal:
        N = c.shape[-1]
        allowed = _causal_allowed(N, N, pe.device)
        mask = torch.where(allowed, -d, torch.full_like(d, float("-inf")))
    else:
        mask = -d.abs()
    mask = mask.to(torch.float32)
    if batch_size is not None and mask.shape[0] > 1:
        if batch_size % mask.shape[0]:
            raise ValueError(f"batch size {batch_size} is not a multiple of the number of PE windows "
                             f"{mask.shape[0]}")
        mask = mask.repeat(batch_size // mask.shape[0], 1, 1, 1)
    return mask


# ============================================================================================ dispatcher
def pe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str,
                 pq: Optional[torch.Tensor] = None, pk: Optional[torch.Tensor] = None,
                 rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, scalar_scale: float = 1.0,
                 causal: bool = False, dropout_p: float = 0.0, scale: Optional[float] = None,
                 attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention with the PE applied after the head split: q, k, v [B, H, N, d_h] -> [B, H, N, d_h].

    ``method`` 'attn_mul' / 'attn_add' / 'attn_scalar' need (pq, pk) from :class:`PeQK`; 'rotary' needs
    ``rope = rotary_tables(pe)``; 'alibi' needs ``attn_mask = alibi_attn_mask(pe, B)`` (causal part included);
    'input_add' / 'nope' apply nothing here.
    """
    _check_qkv("pe_attention", q, k, v)
    sc = _head_scale(q, scale)
    if method in ("attn_mul", "attn_add", "attn_scalar") and (pq is None or pk is None):
        raise ValueError(f"{method} needs the per-window (pq, pk) from PeQK")
    if method == "rotary" and rope is None:
        raise ValueError("rotary needs rope=rotary_tables(pe)")
    if method == "alibi":
        if attn_mask is None:
            raise ValueError("alibi needs attn_mask=alibi_attn_mask(pe, batch_size)")
        if attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)
    if method == "attn_scalar":
        return attn_scalar(q, k, v, pq, pk, scalar_scale, causal, attn_mask, dropout_p, sc)
    if method == "attn_mul":
        q, k = attn_mul(q, k, pq, pk)
    elif method == "attn_add":
        q, k = attn_add(q, k, pq, pk)
    elif method == "rotary":
        q, k = rotary(q, k, tables=rope)
    elif method not in ("input_add", "nope", "alibi"):
        raise ValueError(f"unknown PE method {method!r}; expected one of {METHODS}")
    mask, is_causal = _sdpa_mask(attn_mask, causal, q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=sc)
