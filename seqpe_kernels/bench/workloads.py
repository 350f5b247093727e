"""The benchmark's positions are a training step's encoder input, drawn by the training stack's own samplers.

``seqpe-kernels train`` builds one merged encoder call per step from ``MainWindowSampler`` (the main windows,
SEQPE_SPEC §4.5), ``ContrastiveSampler`` (pivots and candidates, §5.1) and ``TransferSampler`` (§5.3), merged
by ``merge_positions`` (§5.7). A bench workload uses the same classes at the paper's per-GPU sizes of a 4-GPU
run (§5.6), so a benchmark step and a training step cannot drift apart:

  text   N = 512-token window (16 windows on a shifted step), 16 pivots x 32 candidates, 16 x 32 transfer
  image  14 x 14 patch grid (32 windows shifted), 32 pivots x 64 candidates, 32 x 64 transfer

A ``*-default`` workload is an unshifted step (the default window, transfer on: 1552 text / 4324 image
positions); ``*-shifted`` forces the random shift (P windows of the shift pool, no transfer: 8720 / 8352).
``uniform`` (custom configurations) draws positions uniformly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..training.contrastive import ContrastiveSampler
from ..training.samplers import MainWindowSampler, MergeLayout, TransferSampler, merge_positions
from .configs import BenchConfig


@dataclass(frozen=True)
class StepShape:
    """Per-GPU sizes of one training step (SEQPE_SPEC §5.6, 4 GPUs)."""
    pipeline: str                      # the samplers' "text" / "image" rules
    window: Union[int, Tuple[int, int]]
    shifted_windows: int               # P on a shifted step
    pivots: int                        # B_c
    candidates: int                    # C per pivot
    transfer_batch: int                # B_t
    transfer_size: int                 # T_n


STEPS = {"text": StepShape("text", 512, 16, 16, 32, 16, 32),
         "vit": StepShape("image", (14, 14), 32, 32, 64, 32, 64)}
SHIFT_POOL = 320  # pe_random_shift_downsample of the paper scripts


class StepSampler:
    """Training steps of one workload: the samplers ``train`` uses, seeded from ``seed`` the way ``train``
    seeds a stream (``np.random.SeedSequence(seed).spawn(3)``: main, contrastive, transfer)."""

    def __init__(self, workload: str, pos_bound: int, data_dim: int, seed: int = 0):
        kind, _, variant = workload.partition("-")
        if kind not in STEPS or variant not in ("default", "shifted"):
            raise ValueError(f"unknown training-step workload {workload!r}")
        s = STEPS[kind]
        self.shape, self.shifted = s, variant == "shifted"
        # the samplers take pe_max_position: the 2-D grid side is its integer square root
        max_position = pos_bound ** data_dim
        main_seed, ct_seed, tr_seed = np.random.SeedSequence(seed).spawn(3)
        self.main = MainWindowSampler(s.window, max_position, data_dim=data_dim, use_random_shift=self.shifted,
                                      shift_rate=1.0, shift_pool_size=SHIFT_POOL, seed=main_seed)
        self.contrastive = ContrastiveSampler(max_position, s.candidates, s.pivots, data_dim=data_dim,
                                              pipeline=s.pipeline, seed=ct_seed)
        self.transfer = None if self.shifted else TransferSampler(
            s.window, max_position, s.transfer_size, s.transfer_batch, data_dim=data_dim, pipeline=s.pipeline,
            seed=tr_seed)

    def next(self) -> Tuple[torch.Tensor, MergeLayout]:
        """One step's merged positions ([M] or [M, 2] int64) and their layout, as ``train`` merges them."""
        main = self.main.next(self.shape.shifted_windows if self.shifted else 1)
        ct = self.contrastive.next()
        tr = self.transfer.next().positions if self.transfer is not None else None
        return merge_positions(main.positions, ct.pivots, ct.candidates, tr, num_windows=main.num_windows)


def training_step(cfg: BenchConfig, seed: int = 0) -> Tuple[torch.Tensor, MergeLayout]:
    """The first training step of ``cfg.workload`` for ``seed`` (its natural size: SEQPE_SPEC §6's M)."""
    return StepSampler(cfg.workload, cfg.pos_bound, cfg.data_dim, seed).next()


def _components(cfg: BenchConfig, sampler: Optional[StepSampler], rng: np.random.Generator
                ) -> List[Tuple[str, torch.Tensor]]:
    if sampler is None:  # uniform
        pos = torch.as_tensor(rng.integers(0, cfg.pos_bound, size=(max(cfg.M, 1), cfg.data_dim)))
        return [("uniform", pos)]
    merged, layout = sampler.next()
    parts = torch.split(merged, list(layout.sizes), dim=0)
    return [(k, p) for k, p in zip(("main", "pivots", "candidates", "transfer"), parts) if p.shape[0]]


def make_positions(cfg: BenchConfig, seed: int = 0, device="cpu") -> torch.Tensor:
    """The positions of ``cfg.workload`` resized to ``cfg.M`` rows (int64 ``[M]`` or ``[M, d]``).

    At the workload's natural M this is exactly one training step's merged encoder input. Otherwise steps are
    drawn until there are at least M rows; every component (main windows / pivots / candidates / transfer) then
    keeps its share of the M rows (windows keep their consecutive prefixes), so the mix of the step and its
    duplicate / shared-prefix structure survive the resizing.
    """
    M = cfg.M
    sampler = None if cfg.workload == "uniform" else StepSampler(cfg.workload, cfg.pos_bound, cfg.data_dim, seed)
    rng = np.random.default_rng(seed)
    comps: Dict[str, List[torch.Tensor]] = {}
    total = 0
    while total < M or not comps:
        for k, v in _components(cfg, sampler, rng):
            comps.setdefault(k, []).append(v.reshape(v.shape[0], -1))
            total += v.shape[0]
    arrays = [(k, torch.cat(v)) for k, v in comps.items()]
    sizes = [v.shape[0] for _, v in arrays]
    keep = [int(math.floor(M * s / total)) for s in sizes]
    rest = M - sum(keep)
    for i in sorted(range(len(sizes)), key=lambda i: -(M * sizes[i] / total - keep[i]))[:rest]:
        keep[i] += 1
    if M > 0:
        pos = torch.cat([v[:n] for (_, v), n in zip(arrays, keep)])
    else:
        pos = torch.zeros((0, cfg.data_dim), dtype=torch.int64)
    t = pos.to(torch.int64).reshape(M, cfg.data_dim)
    if cfg.data_dim == 1:
        t = t.reshape(M)
    return t.to(device)
