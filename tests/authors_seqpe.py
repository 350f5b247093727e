"""Test helper: a stand-in for the authors' ``SequentialPE`` (ghrua/seqpe), written from SEQPE_SPEC §1-§3.

It is what ``seqpe_kernels.patch`` has to work on in a user's script, so it has the authors' *interface*, not this
package's: their class and attribute names (``pe_embed_dim``, ``head_num``, ``layer_num``, ``seqpe_temperature``,
``use_cls_token``, per-block ``attn.num_heads`` / ``attn.scale_attn_weights`` / ``attn.attn_dropout`` /
``attn.resid_dropout`` / ``mlp.dropout`` / ``mlp.act`` / ``layernorm_1.eps``), their constructor arguments and
defaults (§2.1: ``mask_padding=True``, ``use_last_layernorm=False``, ``attn_pdrop=0.1``), GPT-2 ``Conv1D`` layers
stored [in, out] (§2.2), plain ``nn.Dropout`` layers (no replay hook), blocks that return tuples, and
``forward(x, pad_mask)`` building the [M, T, T] float allowed-attention matrix itself (§2.3 step 2) and adding
``finfo.min * (1 - mask)`` after scaling. Text and image copies differ only in initialisation (§2.7):
``SequentialPE`` (normal, std 0.02) and ``ImageSequentialPE`` (truncated normal at +-2, std 0.02).

``PeUtils`` holds the authors' data helpers as they behave (§1.3-§1.7): ``prepare_seqpe_data`` with its per-position
string loop (the slow original that ``seqpe_kernels.prepare_seqpe_data`` replaces) and ``get_seqpe_mask``.

Not copied from the authors' repository (SEQPE_SPEC §8 item 20: re-implement, do not copy).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INIT_NORM_WEIGHT = [1.0]  # the authors keep this as a module-level global that leaks to later instances (§2.6)


class NewGELUActivation(nn.Module):
    """gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) with an explicit cube (§2.3)."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {"gelu_new": NewGELUActivation, "relu": nn.ReLU, "gelu": nn.GELU}


class Conv1D(nn.Module):
    """GPT-2 Conv1D: weight stored [nx (in), nf (out)], y = x @ W + b through addmm."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        out_shape = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(out_shape)


class SequentialPeAttention(nn.Module):
    def __init__(self, num_attention_heads, embed_dim, attn_pdrop=0.1, resid_pdrop=0.1, scale_attn_weights=True):
        super().__init__()
        self.num_heads = num_attention_heads
        self.embed_dim = embed_dim
        self.head_dim = embed_dim // num_attention_heads
        self.split_size = embed_dim
        if self.head_dim * self.num_heads != embed_dim:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_attention_heads}")
        self.scale_attn_weights = scale_attn_weights
        self.c_attn = Conv1D(3 * embed_dim, embed_dim)
        self.c_proj = Conv1D(embed_dim, embed_dim)
        self.attn_dropout = nn.Dropout(attn_pdrop)
        self.resid_dropout = nn.Dropout(resid_pdrop)

    def _heads(self, t):  # [M, T, D] -> [M, H, T, d]
        return t.view(t.size()[:-1] + (self.num_heads, self.head_dim)).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask=None):
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        scores = torch.matmul(q, k.transpose(-1, -2))
        if self.scale_attn_weights:
            scores = scores / torch.full([], v.size(-1) ** 0.5, dtype=scores.dtype, device=scores.device)
        if attention_mask is not None:  # additive, after scaling, finfo(logits dtype).min on disallowed keys
            scores = scores + torch.finfo(scores.dtype).min * (1 - attention_mask.unsqueeze(1))
        probs = F.softmax(scores, dim=-1).type(v.dtype)
        probs = self.attn_dropout(probs)
        out = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        out = out.view(out.size()[:-2] + (self.embed_dim,))
        return self.resid_dropout(self.c_proj(out)), None


class SequentialPeMLP(nn.Module):
    def __init__(self, intermediate_size, hidden_size, activation_function="gelu_new", resid_pdrop=0.1):
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, hidden_size)
        self.c_proj = Conv1D(hidden_size, intermediate_size)
        self.act = ACTIVATIONS[activation_function]()
        self.dropout = nn.Dropout(resid_pdrop)

    def forward(self, h):
        return self.dropout(self.c_proj(self.act(self.c_fc(h))))


class SequentialPeBlock(nn.Module):
    def __init__(self, hidden_size, num_attention_heads, activation_function="gelu_new", resid_pdrop=0.1,
                 attn_pdrop=0.1, layer_norm_epsilon=1e-5, scale_attn_weights=True):
        super().__init__()
        self.attn = SequentialPeAttention(num_attention_heads, hidden_size, attn_pdrop, resid_pdrop,
                                          scale_attn_weights)
        self.layernorm_1 = nn.LayerNorm(hidden_size, eps=layer_norm_epsilon)
        self.layernorm_2 = nn.LayerNorm(hidden_size, eps=layer_norm_epsilon)
        self.mlp = SequentialPeMLP(4 * hidden_size, hidden_size, activation_function, resid_pdrop)

    def forward(self, hidden_states, attention_mask=None):
        h = self.attn(self.layernorm_1(hidden_states), attention_mask=attention_mask)[0] + hidden_states
        h = h + self.mlp(self.layernorm_2(h))
        return (h,)


class SequentialPE(nn.Module):
    """The authors' encoder interface (text copy: normal init)."""

    def __init__(self, pe_embed_dim, num_attention_heads, layer_num, max_digits, attn_direction="causal",
                 use_last_layernorm=False, mask_padding=True, activation_function="gelu_new", resid_pdrop=0.1,
                 attn_pdrop=0.1, layer_norm_epsilon=1e-5, scale_attn_weights=True, use_cls_token=True,
                 out_proj_dim=-1, seqpe_temperature=1.0, seqpe_init_norm_weight=1.0, data_dim=1):
        super().__init__()
        self.max_digits = max_digits
        self.pe_embed_dim = pe_embed_dim
        self.head_num = num_attention_heads
        self.layer_num = layer_num
        self.mask_padding = mask_padding
        self.data_dim = data_dim
        self.attn_direction = attn_direction
        self.use_cls_token = use_cls_token
        self.seqpe_temperature = seqpe_temperature
        self.use_last_layernorm = use_last_layernorm
        INIT_NORM_WEIGHT[0] = seqpe_init_norm_weight
        if attn_direction == "bi":
            assert use_cls_token
        self.pos_of_seqpe_embed = nn.Embedding(max_digits * data_dim, pe_embed_dim)
        self.token_of_seqpe_embed = nn.Embedding(10, pe_embed_dim)
        if data_dim > 1:
            self.dim_token_embed = nn.Parameter(torch.zeros(data_dim, 1, pe_embed_dim))
        if use_cls_token:
            self.cls_token_embed = nn.Parameter(torch.zeros(1, 1, pe_embed_dim))
        self.transformers = nn.ModuleList([
            SequentialPeBlock(pe_embed_dim, num_attention_heads, activation_function, resid_pdrop, attn_pdrop,
                              layer_norm_epsilon, scale_attn_weights) for _ in range(layer_num)])
        if use_last_layernorm:
            self.layernorm = nn.LayerNorm(pe_embed_dim, eps=layer_norm_epsilon)
        self.out_proj = nn.Linear(pe_embed_dim, out_proj_dim if out_proj_dim > 0 else pe_embed_dim)
        self.init_weights()

    def _draw(self, t):
        nn.init.normal_(t, std=0.02)

    @torch.no_grad()
    def init_weights(self):
        if self.data_dim > 1:
            self._draw(self.dim_token_embed)
        if self.use_cls_token:
            self._draw(self.cls_token_embed)
        for m in self.modules():
            if isinstance(m, (Conv1D, nn.Linear)):
                self._draw(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                self._draw(m.weight)
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(INIT_NORM_WEIGHT[0])
                m.bias.zero_()

    def no_weight_decay_keywords(self):
        names = {"pos_of_seqpe_embed", "token_of_seqpe_embed", "layernorm"}
        if self.data_dim > 1:
            names.add("dim_token_embed")
        if self.use_cls_token:
            names.add("cls_token_embed")
        return names

    def forward(self, x, pad_mask):
        M, L = x.shape
        mask = PeUtils.get_seqpe_mask(x, pad_mask, self.attn_direction, self.mask_padding, self.use_cls_token)
        slots = torch.arange(L, device=x.device).unsqueeze(0).repeat(M, 1)
        h = self.token_of_seqpe_embed(x) + self.pos_of_seqpe_embed(slots)
        if self.data_dim > 1:
            per_axis = L // self.data_dim
            dim = self.dim_token_embed.expand(-1, per_axis, -1).flatten(0, 1)
            h = h + dim.unsqueeze(0).expand(M, -1, -1)
        if self.use_cls_token:  # appended after the last digit, no digit-position or dimension embedding
            h = torch.cat([h, self.cls_token_embed.expand(M, -1, -1)], dim=1)
        for block in self.transformers:
            h = block(h, attention_mask=mask)[0]
        if self.use_last_layernorm:
            h = self.layernorm(h)
        return self.out_proj(h[:, -1]) * (1 / self.seqpe_temperature)


class ImageSequentialPE(SequentialPE):
    """The image copy: the same module with timm-style truncated-normal init (§2.7)."""

    def _draw(self, t):
        nn.init.trunc_normal_(t, std=0.02, a=-2.0, b=2.0)


class PeUtils:
    """The authors' data helpers, as they behave (string loops included)."""

    @staticmethod
    def pos2seq(number, max_digits, pad_value=0, is_left_padding=True):
        chars = [int(c) for c in str(number)]
        pad = max_digits - len(chars)
        if is_left_padding:
            return [pad_value] * pad + chars, [0] * pad + [1] * len(chars)
        return chars + [pad_value] * pad, [1] * len(chars) + [0] * pad

    @staticmethod
    def prepare_seqpe_data(raw_pos_list, max_digits, device=torch.device("cpu"), pad_value=0, is_left_padding=True):
        digits, masks = [], []
        for pos in raw_pos_list:
            if isinstance(pos, int):
                dg, pm = PeUtils.pos2seq(pos, max_digits, pad_value, is_left_padding)
            else:  # an n-D position: the axes' sequences concatenated, row first
                dg, pm = [], []
                for sub in pos:
                    a, b = PeUtils.pos2seq(sub, max_digits, pad_value, is_left_padding)
                    dg += a
                    pm += b
            digits.append(dg)
            masks.append(pm)
        return (torch.tensor(digits, dtype=torch.long, device=device),
                torch.tensor(masks, dtype=torch.float, device=device))

    @staticmethod
    def get_seqpe_mask(x, pad_mask, attn_mode="causal", mask_padding=True, add_cls_mask=False):
        M, L = x.shape
        T = L + int(add_cls_mask)
        allowed = torch.ones(T, T, device=x.device)
        if attn_mode != "bi":
            allowed = torch.tril(allowed)
        mask = allowed.unsqueeze(0).repeat(M, 1, 1)
        if mask_padding:  # keys only; the CLS key is never masked
            keys = torch.cat([pad_mask, torch.ones(M, int(add_cls_mask), dtype=pad_mask.dtype, device=x.device)], -1)
            mask = mask * keys.unsqueeze(1)
        return mask.float()


def build_pe_model(cfg):
    """The shape of the authors' builder: a SequentialPE from a config, or None when the PE type is not seq_pe."""
    if cfg.get("pe_type", "seq_pe") != "seq_pe":
        return None
    cls = ImageSequentialPE if cfg.get("image", False) else SequentialPE
    return cls(cfg["pe_embed_dim"], cfg["num_attention_heads"], cfg.get("layer_num", 2), cfg["max_digits"],
               attn_direction=cfg.get("attn_direction", "causal"), use_last_layernorm=cfg.get("use_last_layernorm", True),
               mask_padding=cfg.get("mask_padding", False), resid_pdrop=cfg.get("resid_pdrop", 0.1),
               attn_pdrop=cfg.get("attn_pdrop", 0.0), out_proj_dim=cfg.get("out_proj_dim", -1),
               data_dim=cfg.get("data_dim", 1))
