"""Baseline position encodings for the training stack: what SeqPE is compared against (``seqpe-kernels study``).

Each baseline is a small ``nn.Module`` with the same call as the SeqPE encoder, ``forward(positions) -> [M, O]``
(positions [M] for 1-D, [M, 2] (row, col) for 2-D), so :class:`~seqpe_kernels.training.models.SeqPEGPT` and
:class:`~seqpe_kernels.training.models.SeqPEViT` use it unchanged through one of their PE methods
(:mod:`seqpe_kernels.training.pe_apply`). The attribute ``pe_method`` names that method:

======================  ===============  =========================================================================
``--pe``                ``pe_method``    what ``forward`` returns
======================  ===============  =========================================================================
``learned``             ``input_add``    rows of a learned table (GPT-2 ``wpe`` / ViT ``pos_embed``); 2-D: a
                                         G x G table, G = isqrt(max_position), indexed by (row, col)
``sinusoidal``          ``input_add``    Vaswani et al.'s fixed sin/cos; 2-D: half the channels from the row,
                                         half from the column (MAE's 2-D sin-cos). In the LM it is scaled to the
                                         token embeddings' size (see :func:`build_position_module`)
``rope``                ``rotary``       the [sin | cos] table of rotary embeddings (one d_h table shared by all
                                         heads); 2-D: axial RoPE, half the rotation pairs turn with the row, half
                                         with the column (Heo et al. 2024, base 100)
``alibi``               ``alibi``        per head ``m_h * p`` (1-D only); the model turns it into the causal
                                         bias ``-m_h (p_i - p_j)`` (Press et al. 2022)
``none``                ``nope``         nothing ([M, 0]); the model has no position information (NoPE)
======================  ===============  =========================================================================

The learned table past the training length. A standard GPT-2 cannot be run longer than its ``wpe`` table. Here
the table has ``max_position`` rows (2-D: G x G), sized to the largest evaluation length, and training only ever
looks up positions 0..N-1 (the baselines train without SeqPE's random window shift). The rows past N get no
gradient and no weight decay (the table is in the undecayed group, like GPT-2's embeddings in this package), so
at evaluation they are exactly their N(0, 0.02^2) initialisation: extrapolating a learned table means reading
untrained rows, which is what "learned absolute PE does not extrapolate" refers to. Positions past the table
raise ``ValueError`` (a table has no row for them); :func:`seqpe_kernels.training.train.evaluate` reports such lengths as
not measurable instead.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..reference.seqpe import trunc_normal_

__all__ = ["PE_CHOICES", "VIT_PE_CHOICES", "LearnedPE", "SinusoidalPE", "RoPE", "ALiBi", "NoPE", "alibi_slopes",
           "build_position_module", "sinusoidal_table", "LM_SINUSOIDAL_SCALE"]

PE_CHOICES = ("seqpe", "learned", "sinusoidal", "rope", "alibi", "none")  # the LM's
VIT_PE_CHOICES = ("seqpe", "learned", "sinusoidal", "rope", "none")  # 2-D forms (no 2-D ALiBi here)


def _check_positions(positions: torch.Tensor, data_dim: int, who: str) -> torch.Tensor:
    """[M] or [M, d] integer positions -> [M, d] int64; raises ValueError on anything else."""
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise ValueError(f"{who}: positions must be integers, got {positions.dtype}")
    if positions.dim() == 1 and data_dim == 1:
        positions = positions.unsqueeze(-1)
    if positions.dim() != 2 or positions.shape[-1] != data_dim:
        raise ValueError(f"{who}: expected positions [M]{' or [M, 1]' if data_dim == 1 else ''} "
                         f"{'' if data_dim == 1 else f'[M, {data_dim}]'} for data_dim={data_dim}, "
                         f"got {tuple(positions.shape)}")
    if positions.numel() and int(positions.min()) < 0:
        raise ValueError(f"{who}: positions must be >= 0, got {int(positions.min())}")
    return positions.long()


class _Baseline(nn.Module):
    """Common attributes: ``pe_method`` (how the model applies the output), ``out_dim``, ``data_dim``,
    ``position_limit`` (exclusive bound per axis, or None)."""

    pe_method = "nope"
    position_limit: Optional[int] = None

    def no_weight_decay_keywords(self):
        """Parameter-name keywords kept out of weight decay (train.py's optimizer groups)."""
        return ("table",)

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, data_dim={self.data_dim}, pe_method={self.pe_method!r}"


# ---------------------------------------------------------------------------------------------- learned
class LearnedPE(_Baseline):
    """A learned absolute table: 1-D ``max_position`` rows (GPT-2 ``wpe``), 2-D a G x G grid with
    G = isqrt(max_position) rows per axis, position (r, c) -> row r*G + c (a ViT ``pos_embed`` over 2-D
    positions). Init N(0, 0.02^2) (1-D, GPT-2) or truncated normal std 0.02 (2-D, timm). Positions past the
    table raise ``ValueError``."""

    pe_method = "input_add"

    def __init__(self, dim: int, max_position: int, data_dim: int = 1):
        super().__init__()
        if data_dim not in (1, 2):
            raise ValueError(f"LearnedPE: data_dim must be 1 or 2, got {data_dim}")
        if max_position < 1:
            raise ValueError(f"LearnedPE: max_position must be >= 1, got {max_position}")
        self.out_dim, self.data_dim, self.max_position = dim, data_dim, max_position
        self.position_limit = max_position if data_dim == 1 else math.isqrt(max_position)
        if self.position_limit < 1:
            raise ValueError(f"LearnedPE: max_position {max_position} gives an empty 2-D grid")
        self.table = nn.Embedding(self.position_limit ** data_dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        if self.data_dim == 1:
            nn.init.normal_(self.table.weight, std=0.02)
        else:
            trunc_normal_(self.table.weight, std=0.02)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        p = _check_positions(positions, self.data_dim, "LearnedPE")
        if p.numel() and int(p.max()) >= self.position_limit:
            where = "rows" if self.data_dim == 1 else f"rows per axis (a {self.position_limit}^2 grid)"
            raise ValueError(f"LearnedPE: position {int(p.max())} is past the learned table ({self.position_limit} "
                             f"{where}); a learned absolute table has no row for it")
        idx = p[:, 0] if self.data_dim == 1 else p[:, 0] * self.position_limit + p[:, 1]
        return self.table(idx)


# ---------------------------------------------------------------------------------------------- sinusoidal
def sinusoidal_table(p: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al.'s encoding of integer positions ``p`` [M]: [M, dim] with channel 2i = sin(p w_i),
    2i + 1 = cos(p w_i), w_i = base^(-2i/dim). Computed in float64 (exact angles at large p), returned fp32."""
    if dim % 2:
        raise ValueError(f"sinusoidal encoding needs an even width, got {dim}")
    w = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=p.device) / dim)
    ang = p.to(torch.float64)[:, None] * w[None, :]
    return torch.stack([ang.sin(), ang.cos()], dim=-1).reshape(p.shape[0], dim).float()


class SinusoidalPE(_Baseline):
    """Fixed sin/cos encoding (no parameters). 1-D: :func:`sinusoidal_table`; 2-D: the row's table on the first
    dim/2 channels and the column's on the rest. ``scale`` multiplies the output (1.0: the original)."""

    pe_method = "input_add"

    def __init__(self, dim: int, data_dim: int = 1, base: float = 10000.0, scale: float = 1.0):
        super().__init__()
        if data_dim not in (1, 2):
            raise ValueError(f"SinusoidalPE: data_dim must be 1 or 2, got {data_dim}")
        if dim % (2 * data_dim):
            raise ValueError(f"SinusoidalPE: width {dim} must be a multiple of {2 * data_dim} for data_dim={data_dim}")
        self.out_dim, self.data_dim, self.base, self.scale = dim, data_dim, float(base), float(scale)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        p = _check_positions(positions, self.data_dim, "SinusoidalPE")
        w = self.out_dim // self.data_dim
        out = torch.cat([sinusoidal_table(p[:, a], w, self.base) for a in range(self.data_dim)], dim=-1)
        return out * self.scale if self.scale != 1.0 else out


# ---------------------------------------------------------------------------------------------- RoPE
class RoPE(_Baseline):
    """Rotary position embedding as a table in :func:`seqpe_kernels.training.pe_apply.rotary_tables`'s layout:
    [M, head_dim] = [sin(p w_0) .. sin(p w_{h/2-1}) | cos(p w_0) .. cos(p w_{h/2-1})], so the model's ``rotary``
    method turns the pair (x_{2i}, x_{2i+1}) of q and k by the angle p w_i (GPT-J's interleaved pairs).

    1-D: w_i = base^(-2i/head_dim) (base 10000). 2-D (axial): the first head_dim/4 pairs turn with the row and
    the last head_dim/4 with the column, w_t = base^(-4t/head_dim) on each axis (base 100, as RoPE-ViT).
    Scores then depend on positions only through p_q - p_k (per axis): shifting every position changes nothing.
    """

    pe_method = "rotary"

    def __init__(self, head_dim: int, data_dim: int = 1, base: Optional[float] = None):
        super().__init__()
        if data_dim not in (1, 2):
            raise ValueError(f"RoPE: data_dim must be 1 or 2, got {data_dim}")
        if head_dim % (2 * data_dim):
            raise ValueError(f"RoPE: head dim {head_dim} must be a multiple of {2 * data_dim} for data_dim={data_dim}")
        self.out_dim, self.data_dim = head_dim, data_dim
        self.base = float(base if base is not None else (10000.0 if data_dim == 1 else 100.0))
        n = head_dim // (2 * data_dim)  # rotation pairs per axis
        self.register_buffer("freqs", self.base ** (-torch.arange(n, dtype=torch.float64) / n), persistent=False)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """[M, head_dim / 2] rotation angle of every pair (float64)."""
        p = _check_positions(positions, self.data_dim, "RoPE").to(torch.float64)
        return torch.cat([p[:, a:a + 1] * self.freqs[None, :].to(p.device) for a in range(self.data_dim)], dim=-1)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        ang = self.angles(positions)
        return torch.cat([ang.sin(), ang.cos()], dim=-1).float()


# ---------------------------------------------------------------------------------------------- ALiBi
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Press et al.'s head slopes: 2^(-8/n), 2^(-16/n), ... for n heads (n a power of two); otherwise the slopes of
    the closest smaller power of two followed by every other slope of the next one (their reference code)."""
    if num_heads < 1:
        raise ValueError(f"ALiBi: num_heads must be >= 1, got {num_heads}")

    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        s = pow2(num_heads)
    else:
        c = 2 ** int(math.floor(math.log2(num_heads)))
        s = pow2(c) + pow2(2 * c)[0::2][: num_heads - c]
    return torch.tensor(s, dtype=torch.float32)


class ALiBi(_Baseline):
    """Attention with linear biases (1-D, causal). ``forward(positions)`` -> [M, H] = ``m_h * p``, the per-head
    coordinate from which :func:`seqpe_kernels.training.pe_apply.alibi_attn_mask` builds the additive bias
    ``-m_h (p_i - p_j)`` for keys j <= i (``-inf`` above). :meth:`bias` gives that bias directly."""

    pe_method = "alibi"

    def __init__(self, num_heads: int):
        super().__init__()
        self.out_dim, self.data_dim, self.num_heads = num_heads, 1, num_heads
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)
        # the fp32 slopes, held in float64: their products with integer positions (< 2**29) are exact there
        self.register_buffer("_slopes64", self.slopes.double(), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """[M, H] coordinates m_h * p, in float64 so that they are exact: the mask takes their differences, which
        from fp32 products lose up to ~1e-3 at p ~ 16k when a slope is not a power of two (12 or 16 heads). From
        exact ones, the mask's fp32 -m_h (p_i - p_j) is the one rounding of the exact value, as :meth:`bias`
        and the usual fp32 implementation compute it."""
        p = _check_positions(positions, 1, "ALiBi")[:, 0]
        return p.to(torch.float64)[:, None] * self._slopes64[None, :].to(p.device)

    def bias(self, q_positions: torch.Tensor, k_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[H, Nq, Nk] = -m_h (p_i - p_j) (no causal mask)."""
        k_positions = q_positions if k_positions is None else k_positions
        d = (q_positions.to(torch.float32)[:, None] - k_positions.to(torch.float32)[None, :])
        return -self.slopes.to(d.device)[:, None, None] * d[None]


# ---------------------------------------------------------------------------------------------- none
class NoPE(_Baseline):
    """No position information: ``forward`` returns [M, 0]; the model runs its 'nope' method."""

    pe_method = "nope"

    def __init__(self, data_dim: int = 1):
        super().__init__()
        self.out_dim, self.data_dim = 0, data_dim

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        p = _check_positions(positions, self.data_dim, "NoPE")
        return torch.zeros(p.shape[0], 0, device=p.device)


# ---------------------------------------------------------------------------------------------- factory
LM_SINUSOIDAL_SCALE = 0.02 * math.sqrt(2.0)


def build_position_module(pe: str, data_dim: int, model_dim: int, num_heads: int, max_position: int,
                          sinusoidal_scale: Optional[float] = None) -> nn.Module:
    """The baseline ``pe`` (one of :data:`PE_CHOICES` but 'seqpe') for a model of width ``model_dim`` with
    ``num_heads`` heads; ``data_dim`` 1 (LM) or 2 (ViT).

    ``sinusoidal_scale`` (default: :data:`LM_SINUSOIDAL_SCALE` for the LM, 1.0 for the ViT). Vaswani et al. add
    the unit-amplitude table to token embeddings multiplied by sqrt(d), i.e. of about the same size. Our GPT-2
    adds it to unscaled token embeddings of std 0.02 (tied with the output layer), next to which a unit table
    drowns the tokens: measured on the LM defaults (200 steps, 2 seeds), scale 1.0 or 0.3 leaves the model at
    perplexity ~22 (unigram level), 0.1 gives 16-17, 0.03 gives 10-13.5 like the learned table. So the LM's
    table is scaled to per-channel RMS 0.02 (0.02 * sqrt(2)), the token embeddings' size: the same ratio as the
    original. The ViT's patch embeddings are O(0.1-1) and MAE adds the 2-D table unscaled, so 1.0 there.
    """
    choices = PE_CHOICES if data_dim == 1 else VIT_PE_CHOICES
    if pe not in choices or pe == "seqpe":
        raise ValueError(f"unknown baseline position encoding {pe!r} for data_dim={data_dim}; expected one of "
                         f"{', '.join(c for c in choices if c != 'seqpe')}")
    if model_dim % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide model_dim={model_dim}")
    if pe == "learned":
        return LearnedPE(model_dim, max_position, data_dim)
    if pe == "sinusoidal":
        if sinusoidal_scale is None:
            sinusoidal_scale = LM_SINUSOIDAL_SCALE if data_dim == 1 else 1.0
        return SinusoidalPE(model_dim, data_dim, scale=sinusoidal_scale)
    if pe == "rope":
        return RoPE(model_dim // num_heads, data_dim)
    if pe == "alibi":
        return ALiBi(num_heads)
    return NoPE(data_dim)
