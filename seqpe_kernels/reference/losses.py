"""SeqPE regularisers: contrastive loss, transfer (OOD-alignment) loss and the weight warm-up (SEQPE_SPEC §5).

Re-implemented from the specification; numerically these are the same ops as the authors'
``SeqPeContrastiveCriterion`` / ``SeqPeTransferCriterion`` / ``PeWeightScheduler``:

* :func:`contrastive_loss` -- §5.2, cross-entropy (mean, no label smoothing) over dot-product logits, with
  the (paper-disabled) multi-head variant.
* :func:`transfer_loss` -- §5.4, symmetric KL (or MSE) between the per-head Gram softmaxes of in-window
  (teacher) and shifted-window (student) PEs. The KL uses PyTorch ``kl_div``'s *default* ``reduction='mean'``
  semantics (average over every element, SEQPE_SPEC §8.1 item 7), written out so that no "batchmean"
  warning is emitted; the value is identical.
* :class:`PeWeightScheduler` -- §5.5, linear warm-up of the two regulariser weights.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["contrastive_loss", "contrastive_logits", "transfer_loss", "gram_log_softmax", "kl_div_mean",
           "PeWeightScheduler"]


# --------------------------------------------------------------------------------------------- contrastive
def contrastive_logits(pivots: torch.Tensor, candidates: torch.Tensor, num_heads: int = 1) -> torch.Tensor:
    """Unscaled contrastive logits.

    ``pivots`` [B, O], ``candidates`` [B*C, O] pivot-major (row ``b*C + c`` is candidate c of pivot b).
    Returns [B, C] (``num_heads == 1``) or [B*num_heads, C] in b-major order (row ``b*n_h + h``).
    """
    if pivots.dim() != 2 or candidates.dim() != 2:
        raise ValueError(f"pivots must be [B, O] and candidates [B*C, O], got {tuple(pivots.shape)} and "
                         f"{tuple(candidates.shape)}")
    B, O = pivots.shape
    if candidates.shape[1] != O:
        raise ValueError(f"pivots have width {O} but candidates have width {candidates.shape[1]}")
    if B == 0 or candidates.shape[0] % B:
        raise ValueError(f"candidates rows ({candidates.shape[0]}) must be a positive multiple of the number "
                         f"of pivots ({B})")
    if num_heads < 1 or O % num_heads:
        raise ValueError(f"num_heads={num_heads} must be >= 1 and divide the PE width {O}")
    C = candidates.shape[0] // B
    if num_heads == 1:
        # [B, 1, O] @ [B, O, C] -> [B, 1, C]
        return torch.matmul(pivots.unsqueeze(1), candidates.reshape(B, C, O).transpose(1, 2)).reshape(B, C)
    d = O // num_heads
    w = candidates.reshape(B, C, num_heads, d).permute(0, 2, 1, 3)  # [B, h, C, d]
    z = pivots.reshape(B, 1, num_heads, d).permute(0, 2, 1, 3)  # [B, h, 1, d]
    return torch.matmul(z, w.transpose(-1, -2)).reshape(B * num_heads, C)


_NO_IGNORE = -(2 ** 62)  # cross_entropy's ignore_index: no label is ignored


def _require_indices(t: torch.Tensor, what: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{what}, got {t.dtype}")


def contrastive_loss(pivots: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, scale: float = 1.0,
                     num_heads: int = 1) -> torch.Tensor:
    """Contrastive loss of SEQPE_SPEC §5.2.

    ``L = mean_b CE(scale * <z_b, w_{b,.}>, label_b)``. The candidates contain the positive (the nearest
    position); ``labels`` [B] index it within each pivot's C candidates.

    With ``num_heads > 1`` (implemented but disabled in both of the authors' pipelines) z and w are split
    into ``num_heads`` contiguous chunks, each chunk gives its own logits row, every label is repeated
    ``num_heads`` times and the CE is averaged over all ``B * num_heads`` rows.
    """
    logits = contrastive_logits(pivots, candidates, num_heads)
    B = pivots.shape[0]
    labels = labels.reshape(-1)
    if labels.numel() != B:
        raise ValueError(f"labels must have one entry per pivot ({B}), got {labels.numel()}")
    _require_indices(labels, "labels must be integer indices into each pivot's candidates")
    labels = labels.to(device=logits.device, dtype=torch.long)
    if num_heads > 1:
        labels = labels.repeat_interleave(num_heads)
    # no ignored label: cross_entropy's default ignore_index (-100) would skip such rows silently; every label
    # outside [0, C) is an error (CPU: raised, CUDA: a device-side assert)
    return F.cross_entropy(logits * scale, labels, ignore_index=_NO_IGNORE)


# --------------------------------------------------------------------------------------------- transfer
def kl_div_mean(input_log: torch.Tensor, target_log: torch.Tensor) -> torch.Tensor:
    """``F.kl_div(input_log, target_log, log_target=True)`` with the default ``reduction='mean'``.

    Pointwise ``exp(t) * (t - x)`` averaged over *all* elements (not 'batchmean'), which is what the
    authors' criterion computes; written out so PyTorch does not warn about the reduction.
    """
    return (torch.exp(target_log) * (target_log - input_log)).mean()


def gram_log_softmax(pe: torch.Tensor, batch_size: int, num_heads: int, scale: float = 1.0) -> torch.Tensor:
    """``log_softmax(scale * A A^T)`` over the last axis for ``pe`` [B*T, O] -> [B, n_h, T, T]."""
    BT, O = pe.shape
    if batch_size < 1 or BT % batch_size:
        raise ValueError(f"{BT} rows are not a multiple of batch_size={batch_size}")
    if num_heads < 1 or O % num_heads:
        raise ValueError(f"num_heads={num_heads} must be >= 1 and divide the PE width {O}")
    T = BT // batch_size
    a = pe.reshape(batch_size, T, num_heads, O // num_heads).permute(0, 2, 1, 3)
    return F.log_softmax(torch.matmul(a, a.transpose(-1, -2)) * scale, dim=-1)


def transfer_loss(main_pe: torch.Tensor, main_indices: torch.Tensor, transfer_pe: torch.Tensor, num_heads: int,
                  beta: float = 1.0, metric: str = "kl_div", scale: float = 1.0,
                  batch_size: Optional[int] = None) -> torch.Tensor:
    """Transfer (OOD-alignment) loss of SEQPE_SPEC §5.4 (the always-used multi-head form).

    Args:
      main_pe: [N, O] PE of the default main window (a [P, N, O] tensor is accepted and window 0 is used,
        as the reference does).
      main_indices: in-window slots sampled by the transfer sampler, [B_t*T_n] flattened b-major, or
        [B_t, T_n]. With the flat form ``batch_size`` (= B_t) must be given.
      transfer_pe: [B_t*T_n, O] PE of the shifted positions (``window[index]``), same order.
      num_heads: n_h, the number of chunks O is split into (the reference uses the *encoder's* head count,
        see SEQPE_SPEC §8.1 item 3). ``num_heads=1`` is the unused single-head variant.
      beta: weight of the student-side term; ``1 - beta`` weights the teacher-side term (skipped if beta >= 1
        for 'kl_div', like the reference).
      metric: 'kl_div' or 'mse'.
      scale: s_tr, multiplies the Gram logits.

    Teacher ``log P = log_softmax(s A A^T)`` with A = main_pe[indices]; student ``log Q`` likewise from
    transfer_pe; both [B_t, n_h, T_n, T_n]. A bar is ``.detach()``:

    * kl_div: ``beta*[mean(P̄(log P̄ - log Q)) + mean(Q(log Q - log P̄))]``
      ``+ (beta < 1) (1-beta)*[mean(P(log P - log Q̄)) + mean(Q̄(log Q̄ - log P))]``, every mean over all
      ``B_t*n_h*T_n*T_n`` elements. With beta = 1 (both paper scripts) the main PEs get no gradient.
    * mse: ``beta*MSE(log Q, log P̄) + (1-beta)*MSE(log Q̄, log P)`` (mean reduction, on log-probabilities).
    """
    if main_pe.dim() == 3:
        main_pe = main_pe[0]
    if main_pe.dim() != 2 or transfer_pe.dim() != 2:
        raise ValueError(f"main_pe must be [N, O] (or [P, N, O]) and transfer_pe [B_t*T_n, O], got "
                         f"{tuple(main_pe.shape)} and {tuple(transfer_pe.shape)}")
    if main_indices.dim() == 2:
        if batch_size is not None and batch_size != main_indices.shape[0]:
            raise ValueError(f"batch_size={batch_size} disagrees with main_indices of shape "
                             f"{tuple(main_indices.shape)}")
        batch_size = main_indices.shape[0]
        main_indices = main_indices.reshape(-1)
    elif main_indices.dim() != 1:
        raise ValueError(f"main_indices must be [B_t*T_n] or [B_t, T_n], got {tuple(main_indices.shape)}")
    elif batch_size is None:
        raise ValueError("flat main_indices need batch_size=B_t (or pass them as [B_t, T_n])")
    if transfer_pe.shape[0] != main_indices.numel():
        raise ValueError(f"transfer_pe has {transfer_pe.shape[0]} rows but there are {main_indices.numel()} "
                         "indices")
    if transfer_pe.shape[1] != main_pe.shape[1]:
        raise ValueError(f"PE widths differ: main {main_pe.shape[1]}, transfer {transfer_pe.shape[1]}")
    if batch_size < 1 or main_indices.numel() % batch_size:
        raise ValueError(f"{main_indices.numel()} indices are not a multiple of batch_size={batch_size}")
    if main_indices.numel() == 0:  # (the means below would be NaN; the authors' criterion fails to reshape)
        raise ValueError(f"the transfer loss needs at least one position per sample, got main_indices of shape "
                         f"{tuple(main_indices.shape)} (batch_size={batch_size})")
    _require_indices(main_indices, "main_indices must be integer slots of the main window")
    idx = main_indices.to(main_pe.device).long()
    # a negative slot would wrap to the window's end silently (a too-large one raises in the gather); checked on
    # the device, no host sync on CUDA
    torch._assert_async((idx >= 0).all(), "main_indices must be non-negative slots of the main window")
    teacher = main_pe[idx]
    log_p = gram_log_softmax(teacher, batch_size, num_heads, scale)  # teacher, in-distribution
    log_q = gram_log_softmax(transfer_pe, batch_size, num_heads, scale)  # student, shifted
    if metric == "kl_div":
        lp_bar, lq_bar = log_p.detach(), log_q.detach()
        loss = beta * (kl_div_mean(log_q, lp_bar) + kl_div_mean(lp_bar, log_q))
        if beta < 1:
            loss = loss + (1 - beta) * (kl_div_mean(lq_bar, log_p) + kl_div_mean(log_p, lq_bar))
        return loss
    if metric == "mse":
        return beta * F.mse_loss(log_q, log_p.detach()) + (1 - beta) * F.mse_loss(log_q.detach(), log_p)
    raise ValueError(f"metric must be 'kl_div' or 'mse', got {metric!r}")


# --------------------------------------------------------------------------------------------- schedule
class PeWeightScheduler:
    """Linear warm-up of the regulariser weights (SEQPE_SPEC §5.5; image pipeline only).

    ``step()`` is called once per training iteration (micro-batch) and returns
    ``(ratio * contrastive_weight, ratio * transfer_weight)`` with ratio = 1/W, 2/W, ..., (W-1)/W, then 1 for
    ever, W = max(warmup_steps, 1). ``warmup_steps <= 1`` (the scripts use 0) gives ratio 1 from the start.
    """

    def __init__(self, contrastive_weight: float, transfer_weight: float, warmup_steps: int = 0):
        self.contrastive_weight = float(contrastive_weight)
        self.transfer_weight = float(transfer_weight)
        self.warmup_steps = max(int(warmup_steps), 1)
        self._step = 1

    @property
    def ratio(self) -> float:
        """The ratio the next ``step()`` returns."""
        return 1.0 if self._step >= self.warmup_steps else self._step / self.warmup_steps

    def step(self) -> Tuple[float, float]:
        ratio = self.ratio
        if self._step < self.warmup_steps:
            self._step += 1
        return ratio * self.contrastive_weight, ratio * self.transfer_weight

    def state_dict(self) -> dict:
        return {"contrastive_weight": self.contrastive_weight, "transfer_weight": self.transfer_weight,
                "warmup_steps": self.warmup_steps, "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        self.contrastive_weight = float(state["contrastive_weight"])
        self.transfer_weight = float(state["transfer_weight"])
        self.warmup_steps = int(state["warmup_steps"])
        self._step = int(state["step"])

    def __repr__(self):
        return (f"PeWeightScheduler(contrastive_weight={self.contrastive_weight}, "
                f"transfer_weight={self.transfer_weight}, warmup_steps={self.warmup_steps}, step={self._step})")
