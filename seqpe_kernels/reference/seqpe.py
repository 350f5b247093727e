"""Reference SeqPE encoder: a faithful re-implementation of the authors' ``SequentialPE`` (SEQPE_SPEC §2).

Plain eager PyTorch, op for op the same computation (and the same dtype flow under autocast) as the
authors' module, with the same state-dict keys and layouts so their checkpoints load with strict=True.
Every fused path in this package is tested against this module.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .tokenize import _INT_DTYPES, tokenize


def trunc_normal_(t: torch.Tensor, std: float = 0.02, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """``nn.init.trunc_normal_(t, std=std, a=a, b=b)`` (mean 0), without the atom at the bounds of torch < 2.13:
    there it draws by inverse CDF, and a uniform draw of exactly -1 gives erfinv = -inf, clamped to ``a`` (at std
    0.02: a weight of -2.0, 100 sigma; one element in ~2^24, so ~1 ViT-S init in 8 holds one). Such elements are
    redrawn from N(0, std^2) until inside (a, b): rejection sampling, as torch >= 2.13 does (no atom there, so
    nothing is redrawn and the random stream is unchanged)."""
    nn.init.trunc_normal_(t, std=std, a=a, b=b)
    if t.is_meta:  # no values (checkpoint.py builds the module on the meta device first)
        return t
    with torch.no_grad():
        for _ in range(100):  # (each round keeps all but P(outside) of the rest: bounds within a sigma end fast too)
            bad = (t <= a) | (t >= b)
            if not bool(bad.any()):
                break
            t[bad] = torch.empty(int(bad.sum()), dtype=t.dtype, device=t.device).normal_(0.0, std)
        else:
            t.clamp_(a, b)
    return t


LIVE_PER_BLOCK = 7  # values per block in SeqPE._live(): 3 dropout p's, 2 LayerNorm eps, scale, num_heads


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximate GELU, written as the authors' ``NewGELUActivation`` (explicit cube via pow)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Conv1D(nn.Module):
    """GPT-2 ``Conv1D``: a linear layer whose weight is stored ``[in, out]``; y = x @ W + b via addmm."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class _Dropout(nn.Module):
    """nn.Dropout that a test can drive with explicit keep-masks (``SeqPE.dropout_masks[site]``).

    With a mask given it computes ``x * mask / (1 - p)``, the same as F.dropout with that mask, so a fused
    kernel's seeded masks can be replayed here for exact parity with dropout on.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.site = ""
        # the owner's dropout_masks, handed down by its setter (a reference back to the owner instead made every
        # SeqPE a reference cycle, its parameters freed only by the cycle collector)
        self.masks: Optional[Dict[str, torch.Tensor]] = None

    def forward(self, x):
        masks = self.__dict__.get("masks")  # (a module pickled by an earlier version has none)
        if masks is not None and self.site in masks and self.training and self.p > 0:
            m = masks[self.site]
            return x * m.to(x.dtype) * (1.0 / (1.0 - self.p))
        return F.dropout(x, self.p, self.training)


class SeqPEAttention(nn.Module):
    def __init__(self, embed_dim, num_heads, attn_pdrop, resid_pdrop, scale_attn_weights=True):
        super().__init__()
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        self.head_dim = embed_dim // num_heads
        self.scale_attn_weights = scale_attn_weights
        self.c_attn = Conv1D(3 * embed_dim, embed_dim)
        self.c_proj = Conv1D(embed_dim, embed_dim)
        self.attn_dropout = _Dropout(attn_pdrop)
        self.resid_dropout = _Dropout(resid_pdrop)

    def _split_heads(self, t):
        return t.view(t.size()[:-1] + (self.num_heads, self.head_dim)).permute(0, 2, 1, 3)

    def forward(self, h, attention_mask):
        q, k, v = self.c_attn(h).split(self.embed_dim, dim=2)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        w = torch.matmul(q, k.transpose(-1, -2))
        if self.scale_attn_weights:
            w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        # additive mask after scaling, finfo(dtype of the logits).min, built from a float32 0/1 mask: under
        # autocast bf16 logits + fp32 mask promote to fp32 (SEQPE_SPEC §2.3, §7.2)
        # (1 - mask) is promoted to at least the logits' precision: identical to the authors for fp32 and for
        # bf16/fp16 autocast (stays fp32), and avoids their fp32 overflow of finfo(fp64).min -> -inf, whose
        # product with the allowed entries' 0 is NaN: in fp64 every output of theirs is NaN (a deviation that
        # only exists in fp64).
        mask = attention_mask.unsqueeze(1)
        w = w + torch.finfo(w.dtype).min * (1 - mask).to(torch.promote_types(mask.dtype, w.dtype))
        w = F.softmax(w, dim=-1).type(v.dtype)
        w = self.attn_dropout(w)
        o = torch.matmul(w, v)
        o = o.permute(0, 2, 1, 3).contiguous()
        o = o.view(o.size()[:-2] + (self.embed_dim,))
        return self.resid_dropout(self.c_proj(o))


class SeqPEMLP(nn.Module):
    def __init__(self, embed_dim, resid_pdrop):
        super().__init__()
        self.c_fc = Conv1D(4 * embed_dim, embed_dim)
        self.c_proj = Conv1D(embed_dim, 4 * embed_dim)
        self.dropout = _Dropout(resid_pdrop)

    def forward(self, h):
        return self.dropout(self.c_proj(gelu_new(self.c_fc(h))))


class SeqPEBlock(nn.Module):
    def __init__(self, embed_dim, num_heads, resid_pdrop, attn_pdrop, eps, scale_attn_weights=True):
        super().__init__()
        self.attn = SeqPEAttention(embed_dim, num_heads, attn_pdrop, resid_pdrop, scale_attn_weights)
        self.layernorm_1 = nn.LayerNorm(embed_dim, eps=eps)
        self.layernorm_2 = nn.LayerNorm(embed_dim, eps=eps)
        self.mlp = SeqPEMLP(embed_dim, resid_pdrop)

    def forward(self, h, attention_mask):
        h = self.attn(self.layernorm_1(h), attention_mask) + h
        return h + self.mlp(self.layernorm_2(h))


def attention_mask(pad_mask: torch.Tensor, direction: str, mask_padding: bool) -> torch.Tensor:
    """[M, T, T] float 0/1 allowed-attention matrix with the CLS key appended (never masked), §2.3 step 2."""
    M, L = pad_mask.shape
    T = L + 1
    base = torch.ones(T, T, device=pad_mask.device)
    if direction == "causal":
        base = torch.tril(base)
    mask = base.unsqueeze(0).repeat(M, 1, 1)
    if mask_padding:
        keys = torch.cat([pad_mask, torch.ones(M, 1, dtype=pad_mask.dtype, device=pad_mask.device)], dim=-1)
        mask = mask * keys.unsqueeze(1)
    return mask.float()


class SeqPE(nn.Module):
    """The SeqPE position encoder (reference implementation).

    Args follow the authors' ``SequentialPE`` (SEQPE_SPEC §2.1) with this package's defaults set to the
    paper configurations: ``use_last_layernorm=True``, ``mask_padding=False``, ``attn_pdrop=0``.
    ``init`` is "text" (normal, std 0.02) or "image" (timm-style truncated normal at ±2, std 0.02).
    ``base`` other than 10 is an extension: the digit table then has ``base`` rows (not loadable from the
    authors' checkpoints, which are decimal).
    """

    def __init__(self, embed_dim: int, num_heads: int, max_digits: int, num_layers: int = 2, data_dim: int = 1,
                 out_dim: Optional[int] = None, attn_direction: str = "causal", mask_padding: bool = False,
                 use_last_layernorm: bool = True, resid_pdrop: float = 0.1, attn_pdrop: float = 0.0,
                 temperature: float = 1.0, layer_norm_eps: float = 1e-5, init: str = "text",
                 init_norm_weight: float = 1.0, base: int = 10, scale_attn_weights: bool = True):
        super().__init__()
        _validate_config(embed_dim, num_heads, max_digits, num_layers, data_dim, out_dim, attn_direction,
                         resid_pdrop, attn_pdrop, temperature, init, base, layer_norm_eps)
        embed_dim, num_heads, max_digits, num_layers, data_dim, base = (
            operator.index(v) for v in (embed_dim, num_heads, max_digits, num_layers, data_dim, base))
        out_dim = None if out_dim is None else operator.index(out_dim)
        self.embed_dim = embed_dim
        self.max_digits = max_digits
        self.num_layers = num_layers
        self.data_dim = data_dim
        self.out_dim = out_dim if out_dim and out_dim > 0 else embed_dim
        self.attn_direction = attn_direction
        self.mask_padding = mask_padding
        self.use_last_layernorm = use_last_layernorm
        self.temperature = temperature  # (resid_pdrop / attn_pdrop: properties over the dropout layers below)
        self.base = base
        self.init_scheme = init
        # check_range: validate positions / digit ids before encoding (one host sync per call; an on-device
        # assert under torch.compile or CUDA-graph capture). Switching it off gives up the error message, not
        # memory safety: the fused kernels never index outside their tables and return NaN rows for
        # out-of-range input (the C++ CPU backend still raises); this eager reference raises from
        # F.embedding for a digit id >= base and wraps positions >= base**max_digits to their low digits.
        self.check_range = True
        # test hook: {site: keep-mask} replayed by the dropout layers (see _Dropout and the property below)
        self.dropout_masks = None

        L = data_dim * max_digits
        self.pos_of_seqpe_embed = nn.Embedding(L, embed_dim)
        self.token_of_seqpe_embed = nn.Embedding(base, embed_dim)
        if data_dim > 1:
            self.dim_token_embed = nn.Parameter(torch.zeros(data_dim, 1, embed_dim))
        self.cls_token_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.transformers = nn.ModuleList([
            SeqPEBlock(embed_dim, num_heads, resid_pdrop, attn_pdrop, layer_norm_eps, scale_attn_weights)
            for _ in range(num_layers)])
        if use_last_layernorm:
            self.layernorm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.out_proj = nn.Linear(embed_dim, self.out_dim)
        for i, blk in enumerate(self.transformers):
            for site, mod in ((f"attn{i}", blk.attn.attn_dropout), (f"resid_attn{i}", blk.attn.resid_dropout),
                              (f"resid_mlp{i}", blk.mlp.dropout)):
                mod.site = site
        self.reset_parameters(init_norm_weight)

    @property
    def dropout_masks(self) -> Optional[Dict[str, torch.Tensor]]:
        """Test hook: ``{site: keep-mask}`` that the dropout layers replay (sites ``attn{i}``, ``resid_attn{i}``,
        ``resid_mlp{i}``), or None."""
        return self.__dict__.get("_dropout_masks")

    @dropout_masks.setter
    def dropout_masks(self, masks: Optional[Dict[str, torch.Tensor]]) -> None:
        self.__dict__["_dropout_masks"] = masks
        for mod in self.modules():
            if isinstance(mod, _Dropout):
                mod.masks = masks

    # ------------------------------------------------------------------ init (SEQPE_SPEC §2.6, §2.7)
    @torch.no_grad()
    def reset_parameters(self, init_norm_weight: float = 1.0):
        if self.init_scheme == "image":
            def draw(t):
                trunc_normal_(t, std=0.02, a=-2.0, b=2.0)
        else:
            def draw(t):
                nn.init.normal_(t, std=0.02)
        if self.data_dim > 1:
            draw(self.dim_token_embed)
        draw(self.cls_token_embed)
        for m in self.modules():
            if isinstance(m, (Conv1D, nn.Linear)):
                draw(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                draw(m.weight)
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(init_norm_weight)
                m.bias.zero_()

    def no_weight_decay_keywords(self):
        names = {"pos_of_seqpe_embed", "token_of_seqpe_embed", "layernorm", "cls_token_embed"}
        if self.data_dim > 1:
            names.add("dim_token_embed")
        return names

    # The dropout probabilities are the dropout layers' own ``p`` (what forward applies): a loop that sets
    # ``m.p`` on every nn.Dropout-like layer changes what every backend computes, and setting ``resid_pdrop`` /
    # ``attn_pdrop`` sets the layers'. Reading raises if the layers of one kind differ (no single value).
    def _live(self):
        """What the plan reads that a user can change between calls, read from the modules at each call (~0.8 us
        for two layers): per block the dropout layers' active p (their p in train mode, 0 in eval mode: each layer's
        own mode, as nn.Dropout applies it), the two LayerNorms' eps, the attention's scale_attn_weights and
        num_heads, then the final LayerNorm's eps."""
        out = []
        for b in self._modules["transformers"]._modules.values():
            bm = b._modules
            att = bm["attn"]
            at = att._modules
            d1, d2, d3 = at["attn_dropout"], at["resid_dropout"], bm["mlp"]._modules["dropout"]
            out += (d1.p if d1.training else 0.0, d2.p if d2.training else 0.0, d3.p if d3.training else 0.0,
                    bm["layernorm_1"].eps, bm["layernorm_2"].eps, getattr(att, "scale_attn_weights", True),
                    att.num_heads)
        ln = self._modules.get("layernorm")
        out.append(None if ln is None else ln.eps)
        return tuple(out)  # flat: LIVE_PER_BLOCK values per block, then the final LayerNorm's eps

    def _active_dropout(self):
        """(residual p, attention p) that forward applies now: each dropout layer's p where that layer is in
        train mode (a layer switched to eval inside a training module drops nothing; Monte-Carlo dropout keeps
        layers in train mode inside an eval module). ValueError if the layers of one kind disagree: the fused
        encoder applies one probability per kind."""
        live, n = self._live()[:-1], LIVE_PER_BLOCK
        res = set(live[1::n]) | set(live[2::n])
        att = set(live[0::n])
        if len(res) > 1 or len(att) > 1:
            kind = "resid" if len(res) > 1 else "attn"
            raise ValueError(f"the {kind} dropout layers would apply different probabilities "
                             f"({sorted(res if kind == 'resid' else att)}; a layer in eval mode applies 0): the fused "
                             "encoder applies one per kind. Give them the same p and train / eval mode.")
        return float(res.pop()), float(att.pop())

    def _dropout_layers(self, kind: str):
        out = []
        for blk in self._modules["transformers"]._modules.values():
            at = blk._modules["attn"]._modules
            if kind == "attn":
                out.append(at["attn_dropout"])
            else:
                out += [at["resid_dropout"], blk._modules["mlp"]._modules["dropout"]]
        return out

    def _dropout_p(self, kind: str) -> float:
        layers = self._dropout_layers(kind)
        p = layers[0].p
        for m in layers:
            if m.p != p:
                names = [f"transformers.{i}.{site}" for i in range(len(self._modules["transformers"]))
                         for site in (("attn.attn_dropout",) if kind == "attn" else ("attn.resid_dropout",
                                                                                   "mlp.dropout"))]
                raise ValueError(f"the {kind} dropout layers' probabilities differ ("
                                 + ", ".join(f"{n}.p={m_.p}" for n, m_ in zip(names, layers))
                                 + f"): {kind}_pdrop has no single value; the fused encoder applies one per kind")
        return float(p)

    def _set_dropout_p(self, kind: str, p: float):
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{kind}_pdrop must be in [0, 1), got {p}")
        for m in self._dropout_layers(kind):
            m.p = p

    def _layernorms(self):
        out = []
        for blk in self._modules["transformers"]._modules.values():
            out += [blk._modules["layernorm_1"], blk._modules["layernorm_2"]]
        ln = self._modules.get("layernorm")
        return out + ([ln] if ln is not None else [])

    def _get_eps(self) -> float:
        eps = {m.eps for m in self._layernorms()}
        if len(eps) > 1:
            raise ValueError(f"the LayerNorms' eps differ ({sorted(eps)}): layer_norm_eps has no single value")
        return float(eps.pop())

    def _set_eps(self, eps: float):
        _check_eps(eps)
        for m in self._layernorms():
            m.eps = float(eps)

    def _attn_attr(self, name: str):
        vals = {getattr(b._modules["attn"], name) for b in self._modules["transformers"]._modules.values()}
        if len(vals) > 1:
            raise ValueError(f"the attention layers' {name} differ ({sorted(vals)}): no single value")
        return vals.pop()

    def _set_scale(self, v):
        for b in self._modules["transformers"]._modules.values():
            b._modules["attn"].scale_attn_weights = bool(v)

    # read from the attention layers, which compute with them (the fused path reads these properties)
    num_heads = property(lambda self: self._attn_attr("num_heads"), doc="heads of every attention layer")
    scale_attn_weights = property(lambda self: self._attn_attr("scale_attn_weights"), _set_scale,
                                  doc="whether attention logits are divided by sqrt(head_dim), every layer")

    # like the dropout probabilities: the LayerNorms' own eps (what forward uses, what config() records)
    layer_norm_eps = property(_get_eps, _set_eps, doc="every LayerNorm's eps (the modules' own)")
    resid_pdrop = property(lambda self: self._dropout_p("resid"), lambda self, p: self._set_dropout_p("resid", p),
                           doc="residual dropout probability (the layers' own p)")
    attn_pdrop = property(lambda self: self._dropout_p("attn"), lambda self, p: self._set_dropout_p("attn", p),
                          doc="attention-probability dropout (the layers' own p)")

    @property
    def seq_len(self) -> int:
        """Tokens per sequence including CLS (T = d*K + 1)."""
        return self.data_dim * self.max_digits + 1

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, max_digits={self.max_digits}, "
                f"num_layers={self.num_layers}, data_dim={self.data_dim}, out_dim={self.out_dim}, "
                f"attn_direction={self.attn_direction!r}, mask_padding={self.mask_padding}, "
                f"use_last_layernorm={self.use_last_layernorm}, base={self.base}")

    def config(self) -> dict:
        """Constructor arguments that rebuild an identical module (used by FusedSeqPE.from_reference)."""
        return dict(embed_dim=self.embed_dim, num_heads=self.num_heads, max_digits=self.max_digits,
                    num_layers=self.num_layers, data_dim=self.data_dim, out_dim=self.out_dim,
                    attn_direction=self.attn_direction, mask_padding=self.mask_padding,
                    use_last_layernorm=self.use_last_layernorm, resid_pdrop=self.resid_pdrop,
                    attn_pdrop=self.attn_pdrop, temperature=self.temperature,
                    layer_norm_eps=self.layer_norm_eps, init=self.init_scheme, base=self.base,
                    scale_attn_weights=self.scale_attn_weights)

    # ------------------------------------------------------------------ forward
    def tokenize(self, positions: torch.Tensor):
        return tokenize(positions, self.max_digits, self.base, self.data_dim, self.check_range)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Integer positions ``[M]`` (1-D) or ``[M, data_dim]`` -> embeddings ``[M, out_dim]``."""
        digits, pad_mask = self.tokenize(positions)
        return self.forward_digits(digits, pad_mask)

    def _check_digits(self, digits, pad_mask):
        L = self.data_dim * self.max_digits
        if digits.dim() != 2 or digits.shape[1] != L:
            raise ValueError(f"digits must have shape [M, {L}] (data_dim*max_digits), got {tuple(digits.shape)}")
        if digits.dtype not in _INT_DTYPES:
            raise TypeError(f"digits must be integer ids, got {digits.dtype}")
        digits = digits.long()  # (once: the check and the caller read int64)
        given_mask = pad_mask is not None
        if pad_mask is None:
            pad_mask = torch.ones(digits.shape, dtype=torch.float32, device=digits.device)
        if pad_mask.shape != digits.shape:
            raise ValueError(f"pad_mask shape {tuple(pad_mask.shape)} != digits shape {tuple(digits.shape)}")
        # a pad mask the encoder reads must be 0 / 1 (1 = real digit): other values would mean a partial mask in
        # the reference's additive form and something else in the fused kernels
        binary = self.mask_padding and given_mask and pad_mask.dtype != torch.bool
        if self.check_range and torch.compiler.is_compiling():
            torch._assert_async(((digits >= 0) & (digits < self.base)).all(), f"digit ids must lie in [0, {self.base})")
            if binary:
                torch._assert_async(((pad_mask == 0) | (pad_mask == 1)).all(), "pad_mask values must be 0 or 1")
        elif self.check_range and digits.numel() > 0:
            lo, hi = torch.aminmax(digits)
            vals = [lo, hi] + ([((pad_mask != 0) & (pad_mask != 1)).any().long()] if binary else [])
            vals = torch.stack(vals).tolist()  # one host sync
            if vals[0] < 0 or vals[1] >= self.base:
                raise ValueError(f"digit ids must lie in [0, {self.base}), got range [{vals[0]}, {vals[1]}]")
            if binary and vals[2]:
                raise ValueError("pad_mask values must be 0 or 1 (1 = a real digit, 0 = padding); got others "
                                 "(NaN included)")
        return digits, pad_mask

    def forward_digits(self, digits: torch.Tensor, pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The authors' interface: digit ids ``[M, L]`` and pad mask ``[M, L]`` -> ``[M, out_dim]``."""
        digits, pad_mask = self._check_digits(digits, pad_mask)
        M, L = digits.shape
        mask = attention_mask(pad_mask, self.attn_direction, self.mask_padding)
        pos_ids = torch.arange(L, device=digits.device).unsqueeze(0).repeat(M, 1)
        x = self.token_of_seqpe_embed(digits) + self.pos_of_seqpe_embed(pos_ids)
        if self.data_dim > 1:
            dim = self.dim_token_embed.expand(-1, self.max_digits, -1).flatten(0, 1)
            x = x + dim.unsqueeze(0).expand(M, -1, -1)
        x = torch.cat([x, self.cls_token_embed.expand(M, -1, -1)], dim=1)
        for blk in self.transformers:
            x = blk(x, mask)
        if self.use_last_layernorm:
            x = self.layernorm(x)
        return self.out_proj(x[:, -1]) * (1 / self.temperature)


def _check_eps(eps, what: str = "layer_norm_eps") -> None:
    if not 0 <= eps < float("inf"):  # (also NaN)
        raise ValueError(f"{what} must be a finite number >= 0, got {eps}")


def _validate_config(embed_dim, num_heads, max_digits, num_layers, data_dim, out_dim, attn_direction,
                     resid_pdrop, attn_pdrop, temperature, init, base, layer_norm_eps=1e-5):
    for name, v in (("embed_dim", embed_dim), ("num_heads", num_heads), ("max_digits", max_digits),
                    ("num_layers", num_layers), ("data_dim", data_dim), ("base", base), ("out_dim", out_dim)):
        if v is None and name == "out_dim":
            continue
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise TypeError(f"{name} must be an integer, got {v!r} ({type(v).__name__})")
    for name, v in (("resid_pdrop", resid_pdrop), ("attn_pdrop", attn_pdrop), ("temperature", temperature),
                    ("layer_norm_eps", layer_norm_eps)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {v!r} ({type(v).__name__})")
    _check_eps(layer_norm_eps)
    if embed_dim < 1 or num_heads < 1:
        raise ValueError(f"embed_dim and num_heads must be positive, got {embed_dim}, {num_heads}")
    if embed_dim % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide embed_dim={embed_dim}")
    if max_digits < 1 or num_layers < 1 or data_dim < 1:
        raise ValueError(f"max_digits, num_layers and data_dim must be >= 1, got {max_digits}, {num_layers}, {data_dim}")
    if attn_direction not in ("causal", "bi"):
        raise ValueError(f"attn_direction must be 'causal' or 'bi', got {attn_direction!r}")
    for name, p in (("resid_pdrop", resid_pdrop), ("attn_pdrop", attn_pdrop)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {p}")
    if not temperature > 0 or temperature == float("inf"):  # (also NaN)
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if init not in ("text", "image"):
        raise ValueError(f"init must be 'text' or 'image', got {init!r}")
    if base < 2:
        raise ValueError(f"base must be >= 2, got {base}")
    if out_dim is not None and out_dim <= 0 and out_dim != -1:
        raise ValueError(f"out_dim must be positive (or None / -1 for embed_dim), got {out_dim}")
