"""Small main models that consume a position encoder: a GPT-2-style LM and a ViT (SEQPE_SPEC §4).

Both take any position encoder (an ``nn.Module`` with ``forward(positions) -> [M, O]``, e.g.
:class:`seqpe_kernels.SeqPE`) and one PE method of :mod:`seqpe_kernels.training.pe_apply`. Defaults are tiny (train on
a CPU in seconds); ``GPTConfig.paper()`` / ``ViTConfig.small()`` / ``ViTConfig.base()`` give the paper sizes.

The PE is passed per distinct window, ``pe`` [P, N, O] (sample b uses window b mod P), typically the ``main``
part of :func:`seqpe_kernels.training.samplers.split_outputs` after one merged encoder call; without ``pe`` the model
encodes its default positions itself. PE-derived tensors (Q/K projection, rotary tables) are computed once per
window and broadcast, never tiled to the batch.

These follow the authors' GPT-2 / timm ViT structure (pre-LN blocks, GPT-2 N(0, 0.02) / ViT truncated-normal
init, the ViT's own learned CLS PE prepended to the encoder PE, §4.2) but their parameter names are this
package's own; they are not meant to load the authors' main-model checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.seqpe import trunc_normal_
from .pe_apply import PeQK, alibi_attn_mask, input_add, pe_attention, pe_out_dim, rotary_tables
from .samplers import grid_positions

__all__ = ["GPTConfig", "SeqPEGPT", "ViTConfig", "SeqPEViT"]

_ATTN_METHODS = ("attn_mul", "attn_add", "attn_scalar")


def _check_method(method: str, pe_qk: str):
    if method not in ("nope", "input_add", "rotary", "alibi") + _ATTN_METHODS:
        raise ValueError(f"unknown pe_method {method!r}")
    if pe_qk not in ("none", "single", "multi"):
        raise ValueError(f"pe_qk must be 'none', 'single' or 'multi', got {pe_qk!r}")


class _PeContext:
    """Per-forward PE state shared by the layers (computed once per window)."""

    def __init__(self, method, shared=None, rope=None, peqk=None, mask=None):
        self.method, self.shared, self.rope, self.peqk = method, shared, rope, peqk
        self.mask = mask  # additive attention mask (the ALiBi baseline's bias, causal part included)

    def qk(self, layer: int):
        if self.method in _ATTN_METHODS:
            return self.peqk(self.shared, layer)
        return None, None


class _Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias, attn_pdrop, resid_pdrop, causal, scalar_scale):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_pdrop, self.causal, self.scalar_scale = attn_pdrop, causal, scalar_scale
        self.resid_drop = nn.Dropout(resid_pdrop)

    def forward(self, x, ctx: _PeContext, layer: int):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        pq, pk = ctx.qk(layer)
        o = pe_attention(q, k, v, ctx.method, pq=pq, pk=pk, rope=ctx.rope, scalar_scale=self.scalar_scale,
                         causal=self.causal and ctx.mask is None,  # (ALiBi's mask has the causal part)
                         dropout_p=self.attn_pdrop if self.training else 0.0,
                         attn_mask=ctx.mask)
        return self.resid_drop(self.proj(o.transpose(1, 2).reshape(B, N, C)))


class _Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, attn_pdrop, resid_pdrop, eps, causal, scalar_scale,
                 act):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, num_heads, qkv_bias, attn_pdrop, resid_pdrop, causal, scalar_scale)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), act, nn.Linear(hidden, dim), nn.Dropout(resid_pdrop))

    def forward(self, x, ctx, layer):
        x = x + self.attn(self.ln_1(x), ctx, layer)
        return x + self.mlp(self.ln_2(x))


def _make_peqk(method, pe_qk, pe_dim, dim, heads, layers, multi_head, style, bias, init):
    if method not in _ATTN_METHODS:
        return None
    return PeQK(pe_dim, dim, heads, num_layers=layers, mode=pe_qk, multi_head=multi_head, none_style=style,
                bias=bias, init=init)


# ============================================================================================ GPT-2-style LM
@dataclass
class GPTConfig:
    vocab_size: int = 64
    block_size: int = 32  # training window N
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 4
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    pe_method: str = "attn_scalar"
    pe_qk: str = "single"  # 'none' | 'single' | 'multi'
    pe_multi_head: bool = True
    scalar_scale: float = 1.0  # seqpe_scalar_scale
    tie_word_embeddings: bool = True

    @classmethod
    def paper(cls, **kw) -> "GPTConfig":
        """GPT-2 small as in the WT103 script (attn_scalar, 'single', multi-head, block 512)."""
        base = dict(vocab_size=50257, block_size=512, n_embd=768, n_layer=12, n_head=12, embd_pdrop=0.1,
                    resid_pdrop=0.1, attn_pdrop=0.1)
        base.update(kw)
        return cls(**base)

    @property
    def pe_dim(self) -> int:
        if self.pe_method == "alibi":  # the ALiBi baseline's per-head coordinates m_h * p
            return self.n_head
        return pe_out_dim(self.pe_method, self.n_embd, self.n_head, self.pe_multi_head)


class SeqPEGPT(nn.Module):
    """A GPT-2-style causal LM whose positions come from a position encoder.

    ``forward(input_ids [B, N], pe=None, labels=None)``: ``pe`` [P, N_pe >= N, O] -- row t of each window is the
    PE of the t-th token (GPT-2 gathers ``pe[:, position_ids]``, §4.2); without it the encoder is run on
    ``start_pos .. start_pos + N - 1``. Returns ``(logits [B, N, V], loss or None)``; ``labels`` are the
    next-token targets aligned with the inputs (shifted inside, GPT-2 style).
    """

    def __init__(self, config: GPTConfig, pe_encoder: Optional[nn.Module] = None):
        super().__init__()
        c = config
        _check_method(c.pe_method, c.pe_qk)
        if c.n_embd % c.n_head:
            raise ValueError("n_head must divide n_embd")
        if c.pe_method != "nope" and pe_encoder is None:
            raise ValueError(f"pe_method {c.pe_method!r} needs a position encoder")
        self.config = c
        self.pe_encoder = pe_encoder
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.drop = nn.Dropout(c.embd_pdrop)
        self.blocks = nn.ModuleList(
            _Block(c.n_embd, c.n_head, 4.0, True, c.attn_pdrop, c.resid_pdrop, c.layer_norm_epsilon, True,
                   c.scalar_scale, nn.GELU(approximate="tanh")) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.pe_qk = _make_peqk(c.pe_method, c.pe_qk, c.pe_dim if c.pe_method != "nope" else 0, c.n_embd,
                                c.n_head, c.n_layer, c.pe_multi_head, "gpt2", True, "normal")
        self._init_weights()
        if c.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def _init_weights(self):
        for name, m in self.named_modules():
            if name.startswith("pe_encoder"):
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for blk in self.blocks:  # GPT-2's scaled init of the residual projections
            for p in (blk.attn.proj.weight, blk.mlp[2].weight):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def default_positions(self, n: Optional[int] = None, start_pos: int = 0, device=None) -> torch.Tensor:
        n = self.config.block_size if n is None else n
        return torch.arange(start_pos, start_pos + n, device=device)

    def encode_positions(self, n: int, start_pos: int = 0) -> torch.Tensor:
        dev = self.wte.weight.device
        return self.pe_encoder(self.default_positions(n, start_pos, dev)).view(1, n, -1)

    def _context(self, pe, N, B=None):
        c = self.config
        if c.pe_method == "nope":
            return _PeContext("nope"), None
        pe = pe[:, :N]
        if c.pe_method == "input_add":
            return _PeContext("input_add"), pe
        if c.pe_method == "alibi":  # pe: per-head coordinates m_h * p of the ALiBi baseline
            return _PeContext("alibi", mask=alibi_attn_mask(pe, B, causal=True)), None
        if c.pe_method == "rotary":
            return _PeContext("rotary", rope=rotary_tables(pe)), None
        return _PeContext(c.pe_method, shared=self.pe_qk.prepare(pe), peqk=self.pe_qk), None

    def forward(self, input_ids: torch.Tensor, pe: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                start_pos: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, N = input_ids.shape
        c = self.config
        if c.pe_method != "nope":
            if pe is None:
                pe = self.encode_positions(N, start_pos)
            if pe.dim() != 3 or pe.shape[1] < N or pe.shape[2] != c.pe_dim:
                raise ValueError(f"pe must be [P, >= {N}, {c.pe_dim}], got {tuple(pe.shape)}")
            if B % pe.shape[0]:
                raise ValueError(f"batch size {B} is not a multiple of the number of PE windows {pe.shape[0]}")
        ctx, add = self._context(pe, N, B)
        x = self.wte(input_ids)
        if add is not None:
            x = input_add(x, add.to(x.dtype))
        x = self.drop(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x, ctx, i)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1))
        return logits, loss


# ============================================================================================ ViT
@dataclass
class ViTConfig:
    img_size: int = 16
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    embed_dim: int = 32
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    pe_method: str = "attn_mul"
    pe_qk: str = "multi"
    pe_multi_head: bool = True
    # the CLS token's PE row: 'learned' (§4.2) or 'identity' (fixed: no rotation for 'rotary', zeros otherwise;
    # the RoPE baseline's CLS is not rotated, as in RoPE-ViT)
    cls_pe: str = "learned"

    @classmethod
    def small(cls, **kw) -> "ViTConfig":
        """ViT-S/16 at 224 px (attn_mul, 'multi', multi-head, O = 384)."""
        base = dict(img_size=224, patch_size=16, num_classes=1000, embed_dim=384, depth=12, num_heads=6)
        base.update(kw)
        return cls(**base)

    @classmethod
    def base(cls, **kw) -> "ViTConfig":
        """ViT-B/16 at 224 px (O = 768)."""
        base = dict(img_size=224, patch_size=16, num_classes=1000, embed_dim=768, depth=12, num_heads=12)
        base.update(kw)
        return cls(**base)

    @property
    def pe_dim(self) -> int:
        return pe_out_dim(self.pe_method, self.embed_dim, self.num_heads, self.pe_multi_head)

    @property
    def grid(self) -> Tuple[int, int]:
        g = self.img_size // self.patch_size
        return g, g


class SeqPEViT(nn.Module):
    """A ViT classifier whose patch positions come from a (2-D) position encoder.

    ``forward(images [B, C, H, W], pe=None)``: ``pe`` [P, N_patches, O] (row-major patch grid per window);
    without it the encoder is run on the grid of the input resolution starting at ``start_pos`` (the
    'extend' evaluation of §4.5). The model prepends its own learned CLS PE (trunc-normal, std 0.02), so the
    CLS token never gets an encoder PE (§4.2). Returns logits [B, num_classes].
    """

    def __init__(self, config: ViTConfig, pe_encoder: Optional[nn.Module] = None):
        super().__init__()
        c = config
        _check_method(c.pe_method, c.pe_qk)
        if c.pe_method == "alibi":
            raise ValueError("pe_method 'alibi' is 1-D and causal (the LM's); the ViT has no ALiBi")
        if c.cls_pe not in ("learned", "identity"):
            raise ValueError(f"cls_pe must be 'learned' or 'identity', got {c.cls_pe!r}")
        if c.embed_dim % c.num_heads:
            raise ValueError("num_heads must divide embed_dim")
        if c.pe_method != "nope" and pe_encoder is None:
            raise ValueError(f"pe_method {c.pe_method!r} needs a position encoder")
        self.config = c
        self.pe_encoder = pe_encoder
        self.patch_embed = nn.Conv2d(c.in_chans, c.embed_dim, c.patch_size, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_drop = nn.Dropout(c.drop_rate)
        if c.pe_method != "nope" and c.cls_pe == "identity":
            row = torch.zeros(1, 1, c.pe_dim)
            if c.pe_method == "rotary":  # [sin | cos] = [0 | 1]: no rotation
                row[..., c.pe_dim // 2:] = 1.0
            self.register_buffer("cls_token_pos_embed", row, persistent=False)
        elif c.pe_method != "nope":
            self.cls_token_pos_embed = nn.Parameter(torch.zeros(1, 1, c.pe_dim))
        self.blocks = nn.ModuleList(
            _Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias, c.attn_drop_rate, c.drop_rate, 1e-6, False,
                   1.0, nn.GELU()) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.head = nn.Linear(c.embed_dim, c.num_classes)
        self.pe_qk = _make_peqk(c.pe_method, c.pe_qk, c.pe_dim if c.pe_method != "nope" else 0, c.embed_dim,
                                c.num_heads, c.depth, c.pe_multi_head, "vit", c.qkv_bias, "trunc_normal")
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        trunc_normal_(self.cls_token, std=0.02)
        if isinstance(getattr(self, "cls_token_pos_embed", None), nn.Parameter):
            trunc_normal_(self.cls_token_pos_embed, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("pe_encoder"):
                continue
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()

    def default_positions(self, grid: Optional[Tuple[int, int]] = None, start_pos=(0, 0), device=None):
        gh, gw = grid if grid is not None else self.config.grid
        return torch.from_numpy(grid_positions(start_pos[0], start_pos[1], gh, gw)).to(device)

    def encode_positions(self, grid: Tuple[int, int], start_pos=(0, 0)) -> torch.Tensor:
        pos = self.default_positions(grid, start_pos, self.patch_embed.weight.device)
        return self.pe_encoder(pos).view(1, grid[0] * grid[1], -1)

    def forward(self, images: torch.Tensor, pe: Optional[torch.Tensor] = None, start_pos=(0, 0)) -> torch.Tensor:
        c = self.config
        x = self.patch_embed(images)  # [B, C, gh, gw]
        B, _, gh, gw = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        if c.pe_method == "nope":
            ctx = _PeContext("nope")
            x = self.pos_drop(x)
        else:
            if pe is None:
                pe = self.encode_positions((gh, gw), start_pos)
            if pe.dim() != 3 or pe.shape[1] != gh * gw or pe.shape[2] != c.pe_dim:
                raise ValueError(f"pe must be [P, {gh * gw}, {c.pe_dim}], got {tuple(pe.shape)}")
            if B % pe.shape[0]:
                raise ValueError(f"batch size {B} is not a multiple of the number of PE windows {pe.shape[0]}")
            pe = torch.cat([self.cls_token_pos_embed.expand(pe.shape[0], -1, -1).to(pe.dtype), pe], dim=1)
            if c.pe_method == "input_add":
                ctx = _PeContext("input_add")
                x = self.pos_drop(input_add(x, pe.to(x.dtype)))
            else:
                x = self.pos_drop(x)
                if c.pe_method == "rotary":
                    ctx = _PeContext("rotary", rope=rotary_tables(pe))
                else:
                    ctx = _PeContext(c.pe_method, shared=self.pe_qk.prepare(pe), peqk=self.pe_qk)
        for i, blk in enumerate(self.blocks):
            x = blk(x, ctx, i)
        return self.head(self.norm(x)[:, 0])
