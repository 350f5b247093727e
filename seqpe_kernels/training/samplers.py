"""Position samplers of the SeqPE training pipeline (SEQPE_SPEC §4.5, §5.3, §5.7; the contrastive one, §5.1, is
:mod:`seqpe_kernels.training.contrastive`).

Re-implemented from the specification. Differences from the authors' samplers that do not change the
distribution of what is sampled:

* Everything is driven by one ``numpy.random.Generator`` per sampler (``seed`` = int, SeedSequence or
  Generator). There is no forked prefetch process and no global RNG, so a seed reproduces a run exactly;
  the authors' streams (Python ``random`` in a forked process) cannot be reproduced bit for bit anyway
  (SEQPE_SPEC §9).
* Samplers return integer *positions* (``[M]`` for 1-D, ``[M, 2]`` (row, col) for 2-D, int64 tensors), which
  the encoders in this package take directly (``SeqPE.forward(positions)``); digits are derived inside the
  encoder. Epochs are built lazily (the pivot / start order is fixed per epoch, batches are prepared when
  asked for), with the same epoch structure as the reference.
* Uniform sampling without replacement, distances, labels and window construction are vectorised; only
  the hard-negative string surgery (§5.1), which is inherently sequential, is a Python loop.

Reference bugs / surprises (SEQPE_SPEC §8) and how they are handled here -- the default reproduces what the
published checkpoints were trained with, a keyword gives the fix:

* §8.3 item 13, transfer starts exclude the last valid start (text 1-D: p <= max-N-1, image 2-D never
  reaching row/col G-1): reproduced; ``TransferSampler(include_last_start=True)`` includes it.
* §8.3 item 13, image 1-D distributional windows are not range-limited and get truncated at the end:
  reproduced for ``pipeline='image'``; ``ContrastiveSampler(range_limited_dist_window=True)`` draws the start
  from [0, max - len] as the text pipeline does.
* §8.1 item 2, in-training validation draws from the training sampler (random shift on, pointer advanced):
  not reproduced by any helper; use :meth:`MainWindowSampler.default` for validation (no RNG, no pointer).
* §8.1 item 6, a shift can fire while P = 1 was requested and the transfer loss then uses a shifted "main"
  window: :func:`transfer_active` reproduces it (active when P == 1); ``require_default_window=True`` fixes it.
* §8.1 item 5, ``qa_sft.py`` applies the transfer loss on every step with ``main_pe[0]`` as teacher:
  ``transfer_active(..., every_step=True)``; ``transfer_loss`` takes window 0 of a [P, N, O] main PE.
* §8.1 item 1, the image config never resolves ``pe_main_batch_size = -1``: this is a config bug, not a
  sampler one; :func:`resolve_main_batch_size` implements the text pipeline's (correct) resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch


__all__ = ["MainWindowSampler", "MainSample", "TransferSampler",
           "TransferBatch", "MergeLayout", "SplitOutputs", "merge_positions", "split_outputs",
           "transfer_active", "resolve_main_batch_size", "grid_positions", "epoch_order"]

SeedLike = Union[None, int, np.random.SeedSequence, np.random.Generator]


def _as_rng(seed: SeedLike) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def _window_shape(window_shape, data_dim: int) -> Tuple[int, ...]:
    if isinstance(window_shape, (int, np.integer)):
        shape = (int(window_shape),)
    else:
        shape = tuple(int(s) for s in window_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"window_shape must be positive, got {window_shape}")
    if data_dim == 2 and len(shape) != 2:
        raise ValueError(f"2-D windows need window_shape=(h, w), got {window_shape}")
    if data_dim not in (1, 2):
        raise ValueError(f"data_dim must be 1 or 2, got {data_dim}")
    return shape


def grid_positions(h0: int, w0: int, h: int, w: int) -> np.ndarray:
    """Row-major (row outer, column inner) grid of positions [h*w, 2] with top-left corner (h0, w0)."""
    r = np.repeat(np.arange(h0, h0 + h, dtype=np.int64), w)
    c = np.tile(np.arange(w0, w0 + w, dtype=np.int64), h)
    return np.stack([r, c], axis=1)


def _ordered_sample(rng: np.random.Generator, n: int, k: int, rows: int) -> np.ndarray:
    """[rows, k] indices: each row an independent uniformly random *ordered* k-subset of range(n)."""
    if k > n:
        raise ValueError(f"cannot draw {k} distinct items from {n}")
    if rows == 0 or k == 0:
        return np.zeros((rows, k), dtype=np.int64)
    if 4 * k <= n:
        # sparse case: an i.i.d. uniform stream, keeping first occurrences, is sequential sampling without
        # replacement; draw a few spare values per row and redraw the (rare) rows that run short
        m = k + 8 + (4 * k * k) // n
        draws = rng.integers(0, n, size=(rows, m))
        order = np.argsort(draws, axis=1, kind="stable")
        srt = np.take_along_axis(draws, order, axis=1)
        dup_sorted = np.zeros(srt.shape, dtype=bool)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]  # stable sort: the earliest occurrence is never marked
        dup = np.empty_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        short = (~dup).sum(axis=1) < k
        first = np.argsort(dup, axis=1, kind="stable")[:, :k]  # first k non-duplicates, in draw order
        out = np.take_along_axis(draws, first, axis=1)
        if short.any():
            out[short] = _ordered_sample(rng, n, k, int(short.sum()))
        return out.astype(np.int64)
    keys = rng.random((rows, n))
    if k < n:
        idx = np.argpartition(keys, k - 1, axis=1)[:, :k]
    else:
        idx = np.broadcast_to(np.arange(n), (rows, n)).copy()
    order = np.argsort(np.take_along_axis(keys, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


def epoch_order(rng: np.random.Generator, n_items: int, n_batch: int, batch_size: int) -> np.ndarray:
    """One epoch's item order (SEQPE_SPEC §5.1 "Pivot set").

    If ``n_batch * batch_size`` is smaller than the set, every item appears once plus a random top-up to the
    next multiple of ``batch_size``; otherwise the set is replicated ``n_batch*batch_size // n`` times plus a
    random (without replacement) remainder to exactly ``n_batch*batch_size``. The result is shuffled.
    """
    if n_items < 1:
        raise ValueError("the item set is empty")
    total = n_batch * batch_size
    if total < n_items:
        n_rep, n_rem = 1, (batch_size - n_items % batch_size) % batch_size
    else:
        n_rep, n_rem = total // n_items, total % n_items
    order = np.concatenate([np.tile(np.arange(n_items), n_rep),
                            rng.choice(n_items, size=n_rem, replace=False) if n_rem else np.zeros(0, np.int64)])
    rng.shuffle(order)
    return order.astype(np.int64)


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


# ============================================================================================ main windows
@dataclass
class MainSample:
    """One step's main-task positions (SEQPE_SPEC §4.5).

    ``positions``: [P*N] (1-D) or [P*N, 2] (2-D) int64, window-major; ``num_windows`` P; ``window_len`` N;
    ``shifted``: True if drawn from the random-shift pool; ``starts``: [P] or [P, 2] window starts.
    ``num_windows`` is what the reference returns as ``batch_size`` (1 for the default window, or for a shifted
    window when only one was asked for).
    """
    positions: torch.Tensor
    num_windows: int
    window_len: int
    shifted: bool
    starts: np.ndarray


def resolve_main_batch_size(batch_size: int, pe_main_batch_size: int = -1) -> int:
    """P to request from :meth:`MainWindowSampler.next` for a main batch of ``batch_size`` samples.

    Text-pipeline semantics (SEQPE_SPEC §5.6): P = batch_size if pe_main_batch_size == -1 else
    min(pe_main_batch_size, batch_size); P is requested only if batch_size % P == 0, otherwise 1.
    (The image config never resolves -1 -- SEQPE_SPEC §8.1 item 1 -- so there random shift needs an explicit
    ``pe_main_batch_size``; the scripts give one.)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pe_main_batch_size == -1:
        p = batch_size
    elif pe_main_batch_size >= 1:
        p = min(pe_main_batch_size, batch_size)
    else:
        raise ValueError(f"pe_main_batch_size must be -1 or >= 1, got {pe_main_batch_size}")
    return p if batch_size % p == 0 else 1


class MainWindowSampler:
    """Main-task window sampler with the random-shift pool (``SeqPeMainTaskPosSampler``, SEQPE_SPEC §4.5).

    Args:
      window_shape: N (1-D, e.g. the text block size 512) or (h, w) (2-D patch grid, e.g. (14, 14); with
        ``data_dim=1`` a tuple is flattened to N = h*w, the image-1D setting).
      max_position: ``pe_max_position``. 1-D pool starts: 0..max-N (all valid); 2-D: corners
        (i, j) in {0..G-h} x {0..G-w}, G = floor(sqrt(max_position)). (The reference uses G-h for both axes;
        identical for the square grids it is used with.)
      use_random_shift / shift_rate: with probability ``shift_rate`` (one uniform draw per ``next``) a step
        returns P consecutive windows of the pool instead of the default window.
      shift_pool_size: ``pe_random_shift_downsample``: the pool is shuffled once at construction and only the
        first ``shift_pool_size`` windows are kept for the whole run (<= 0 keeps all, as the text pipeline).
      default_start: start (int, or (row, col)) of the default window; 0 / (0, 0) by default.
      pointer_reset: the pool pointer starts at, and is reset to, a uniform integer in [0, pointer_reset)
        when it runs past the pool (no reshuffle), as in the reference (32).
    """

    def __init__(self, window_shape, max_position: int, data_dim: int = 1, use_random_shift: bool = False,
                 shift_rate: float = 0.1, shift_pool_size: int = 320, default_start=None, seed: SeedLike = None,
                 pointer_reset: int = 32):
        shape = _window_shape(window_shape, data_dim)
        self.data_dim = data_dim
        self.window_shape = shape
        self.window_len = int(np.prod(shape))
        self.max_position = int(max_position)
        self.use_random_shift = bool(use_random_shift)
        if not 0.0 <= shift_rate <= 1.0:
            raise ValueError(f"shift_rate must be in [0, 1], got {shift_rate}")
        self.shift_rate = float(shift_rate)
        self.pointer_reset = int(pointer_reset)
        if self.pointer_reset < 1:
            raise ValueError(f"pointer_reset must be >= 1, got {pointer_reset}")
        if self.max_position < self.window_len:
            raise ValueError(f"max_position={max_position} is smaller than the window ({self.window_len} positions)")
        self.rng = _as_rng(seed)
        if data_dim == 1:
            n_starts = self.max_position - self.window_len + 1
            if default_start is None:
                default_start = 0
            self.default_start = np.array([int(default_start)], dtype=np.int64)
            if not 0 <= self.default_start[0] <= self.max_position - self.window_len:
                raise ValueError(f"default_start={default_start}: the default window must lie in "
                                 f"[0, {self.max_position}) (starts 0..{self.max_position - self.window_len})")
            self._offsets = np.arange(self.window_len, dtype=np.int64)
        else:
            G = math.isqrt(self.max_position)
            h, w = shape
            self.grid_size = G
            n_rows, n_cols = G - h + 1, G - w + 1
            n_starts = n_rows * n_cols if n_rows > 0 and n_cols > 0 else 0
            if default_start is None:
                default_start = (0, 0)
            self.default_start = np.array([tuple(int(v) for v in default_start)], dtype=np.int64)
            r0, c0 = self.default_start[0]
            if not (0 <= r0 <= G - h and 0 <= c0 <= G - w):
                raise ValueError(f"default_start={tuple(default_start)}: the default {h}x{w} window must lie in "
                                 f"the {G}x{G} grid (corners (0..{G - h}, 0..{G - w}))")
            self._offsets = grid_positions(0, 0, h, w)
        if self.use_random_shift:
            if n_starts < 1:
                raise ValueError(f"no shifted window of shape {shape} fits below max_position={max_position}")
            perm = self.rng.permutation(n_starts)
            if shift_pool_size > 0:
                perm = perm[:shift_pool_size]
            if data_dim == 1:
                self.pool = perm.astype(np.int64)
            else:
                self.pool = np.stack([perm // n_cols, perm % n_cols], axis=1).astype(np.int64)
        else:
            self.pool = self.default_start[:0]
        self.pool_len = len(self.pool) if self.use_random_shift else 1
        self.ptr = int(self.rng.integers(0, self.pointer_reset))

    def _positions(self, starts: np.ndarray) -> np.ndarray:
        if self.data_dim == 1:
            return (starts[:, None] + self._offsets[None, :]).reshape(-1)
        return (starts[:, None, :] + self._offsets[None, :, :]).reshape(-1, 2)

    def default(self) -> MainSample:
        """The default window (P = 1), without touching the RNG or the pool pointer (use for validation)."""
        return MainSample(_to_tensor(self._positions(self.default_start)), 1, self.window_len, False,
                          self.default_start.copy())

    def next(self, num_windows: int = 1) -> MainSample:
        """One training step's windows. ``num_windows`` = P requested (see :func:`resolve_main_batch_size`)."""
        if num_windows < 1:
            raise ValueError(f"num_windows must be >= 1, got {num_windows}")
        if self.ptr >= self.pool_len:
            self.ptr = int(self.rng.integers(0, self.pointer_reset))
        u = self.rng.random()
        if self.use_random_shift and u < self.shift_rate:
            if num_windows > self.pool_len:
                raise ValueError(f"asked for {num_windows} windows but the shift pool has {self.pool_len}")
            s = min(self.pool_len - num_windows, self.ptr)
            self.ptr += num_windows
            starts = self.pool[s:s + num_windows]
            return MainSample(_to_tensor(self._positions(starts)), num_windows, self.window_len, True,
                              starts.copy())
        return self.default()

    def state_dict(self) -> dict:
        return {"ptr": self.ptr, "pool": self.pool.copy(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.ptr = int(state["ptr"])
        self.pool = np.asarray(state["pool"], dtype=np.int64)
        self.pool_len = len(self.pool) if self.use_random_shift else 1
        self.rng.bit_generator.state = state["rng"]


def transfer_active(main: MainSample, transfer_weight: float, require_default_window: bool = False,
                    every_step: bool = False) -> bool:
    """Whether this step computes the transfer loss (SEQPE_SPEC §5.5).

    Reference (train.py / image main.py): ``transfer_weight > 0 and P == 1``, which is also true for a single
    *shifted* window when P = 1 was requested (§8.1 item 6); ``require_default_window=True`` additionally
    requires the unshifted default window (the fix). ``every_step=True`` reproduces ``qa_sft.py`` (§8.1 item 5).
    """
    if transfer_weight <= 0:
        return False
    if every_step:
        return True
    if main.num_windows != 1:
        return False
    return not (require_default_window and main.shifted)


_PIPELINES = {
    # (P(simple only), P(hard), P(distributional)), hard-negative ratio, distributional range R
    "text": ((0.0, 0.4, 0.6), 0.25, 256),
    "image": ((0.5, 0.3, 0.2), 0.2, 196),
}


@dataclass
class TransferBatch:
    """One transfer batch (SEQPE_SPEC §5.3).

    ``positions`` [B_t*T_n] / [B_t*T_n, 2]: the shifted positions ``window_b[index]``; ``pivot_indices``
    [B_t*T_n], b-major: in-window slot of each (row-major in 2-D), i.e. the row of the default main window's
    PE it is aligned with; ``starts`` [B_t] / [B_t, 2].
    """
    positions: torch.Tensor
    pivot_indices: torch.Tensor
    batch_size: int
    transfer_size: int
    starts: np.ndarray


class TransferSampler:
    """Transfer (OOD-alignment) sampler (``SeqPeTransferDataSampler``, SEQPE_SPEC §5.3).

    Args:
      window_shape: N (text block size) or (h, w) (2-D grid; with ``data_dim=1`` flattened, image 1-D).
      max_position: ``pe_max_position`` (2-D: G = floor(sqrt(max_position)) per axis).
      transfer_size: T_n in-window slots per start, drawn without replacement in random order.
      batch_size: B_t starts per batch; n_batch_per_epoch as :class:`ContrastiveSampler`.
      pipeline: 1-D lowest start: N//4 for 'text' (so the windows overlap the training range, §8.3 item 19),
        N for 'image'. ``min_start`` overrides it.
      include_last_start: the reference excludes the last valid start (1-D: starts < max-N; 2-D: corners
        < G-h / G-w, keeping those with i >= h or j >= w) -- §8.3 item 13. True includes it.
    """

    def __init__(self, window_shape, max_position: int, transfer_size: int, batch_size: int,
                 n_batch_per_epoch: Optional[int] = None, data_dim: int = 1, pipeline: str = "text",
                 min_start: Optional[int] = None, include_last_start: bool = False, seed: SeedLike = None):
        shape = _window_shape(window_shape, data_dim)
        if pipeline not in _PIPELINES:
            raise ValueError(f"pipeline must be 'text' or 'image', got {pipeline!r}")
        self.data_dim = data_dim
        self.window_shape = shape
        self.window_len = N = int(np.prod(shape))
        self.max_position = int(max_position)
        self.T = int(transfer_size)
        if not 2 <= self.T <= N:  # one position: a 1x1 Gram, whose softmax is 1, so the loss is 0 (a silent no-op)
            raise ValueError(f"transfer_size must be in [2, {N}] (the transfer loss compares the similarities "
                             f"among a sample's positions; with one it is identically 0), got {transfer_size}")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if n_batch_per_epoch is not None and int(n_batch_per_epoch) < 0:
            raise ValueError(f"n_batch_per_epoch must be >= 0 (0 / None: one pass over the starts), got "
                             f"{n_batch_per_epoch}")
        if min_start is not None and int(min_start) < 0:
            raise ValueError(f"min_start must be >= 0, got {min_start}")
        extra = 1 if include_last_start else 0
        if data_dim == 1:
            lo = (N // 4 if pipeline == "text" else N) if min_start is None else int(min_start)
            self.starts = np.arange(lo, self.max_position - N + extra, dtype=np.int64)
            self._offsets = np.arange(N, dtype=np.int64)
        else:
            G = math.isqrt(self.max_position)
            h, w = shape
            corners = grid_positions(0, 0, max(G - h + extra, 0), max(G - w + extra, 0)) \
                if G - h + extra > 0 and G - w + extra > 0 else np.zeros((0, 2), np.int64)
            keep = (corners[:, 0] >= h) | (corners[:, 1] >= w)
            self.starts = corners[keep]
            self._offsets = grid_positions(0, 0, h, w)
        if len(self.starts) == 0:
            raise ValueError(f"no transfer window of shape {shape} fits below max_position={max_position}")
        self.n_batch_per_epoch = int(n_batch_per_epoch) if n_batch_per_epoch else \
            -(-len(self.starts) // self.batch_size)
        self.rng = _as_rng(seed)
        self.epoch = -1
        self._new_epoch()

    def _new_epoch(self):
        self.epoch += 1
        self._order = epoch_order(self.rng, len(self.starts), self.n_batch_per_epoch, self.batch_size)
        self.batch_ptr = 0

    def __iter__(self):
        return self

    def __next__(self) -> TransferBatch:
        return self.next()

    def next(self) -> TransferBatch:
        if self.batch_ptr >= self.n_batch_per_epoch:
            self._new_epoch()
        s = self.batch_ptr * self.batch_size
        self.batch_ptr += 1
        return self.prepare_batch(self.starts[self._order[s:s + self.batch_size]])

    def prepare_batch(self, starts: np.ndarray) -> TransferBatch:
        starts = np.asarray(starts, dtype=np.int64)
        B = len(starts)
        idx = _ordered_sample(self.rng, self.window_len, self.T, B)  # [B, T]
        if self.data_dim == 1:
            pos = starts[:, None] + idx
            pos = pos.reshape(-1)
        else:
            pos = (starts[:, None, :] + self._offsets[idx]).reshape(-1, 2)
        return TransferBatch(_to_tensor(pos), _to_tensor(idx.reshape(-1)), B, self.T, starts.copy())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_ptr": self.batch_ptr, "order": self._order.copy(),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_ptr = int(state["epoch"]), int(state["batch_ptr"])
        self._order = np.asarray(state["order"], dtype=np.int64)
        self.rng.bit_generator.state = state["rng"]


# ============================================================================================ merge / split
@dataclass(frozen=True)
class MergeLayout:
    """Row counts of the merged encoder call, in order main / pivots / candidates / transfer (0 = absent)."""
    main: int
    pivots: int
    candidates: int
    transfer: int
    num_windows: int = 1

    @property
    def sizes(self) -> Tuple[int, int, int, int]:
        return (self.main, self.pivots, self.candidates, self.transfer)

    @property
    def total(self) -> int:
        return sum(self.sizes)


@dataclass
class SplitOutputs:
    main: torch.Tensor  # [P, N, O]
    pivots: Optional[torch.Tensor]  # [B_c, O]
    candidates: Optional[torch.Tensor]  # [B_c*C, O]
    transfer: Optional[torch.Tensor]  # [B_t*T_n, O]


def merge_positions(main: torch.Tensor, pivots: Optional[torch.Tensor] = None,
                    candidates: Optional[torch.Tensor] = None, transfer: Optional[torch.Tensor] = None,
                    num_windows: int = 1) -> Tuple[torch.Tensor, MergeLayout]:
    """Concatenate the step's position sets for one encoder call (SEQPE_SPEC §5.7).

    Fixed order: ``[main (P*N) ; pivots (B_c) ; candidates (B_c*C) ; transfer (B_t*T_n)]``. The contrastive
    part (pivots and candidates together) and the transfer part are optional. Works on any row-indexed
    tensors (positions [m] / [m, d], or digit ids [m, L] / pad masks) as long as all parts agree in their
    trailing shape. Returns the merged tensor and the :class:`MergeLayout` for :func:`split_outputs`.
    """
    if (pivots is None) != (candidates is None):
        raise ValueError("pivots and candidates must be given together (the contrastive part)")
    parts = [main, pivots, candidates, transfer]
    present = [p for p in parts if p is not None]
    trail = tuple(main.shape[1:])
    for p in present:
        if tuple(p.shape[1:]) != trail:
            raise ValueError(f"all parts must share their trailing shape {trail}, got {tuple(p.shape)}")
    if num_windows < 1 or main.shape[0] % num_windows:
        raise ValueError(f"main has {main.shape[0]} rows, not a multiple of num_windows={num_windows}")
    if pivots is not None and (pivots.shape[0] == 0 or candidates.shape[0] % pivots.shape[0]):
        raise ValueError(f"candidate rows ({candidates.shape[0]}) must be a multiple of pivot rows "
                         f"({pivots.shape[0]})")
    layout = MergeLayout(*(0 if p is None else int(p.shape[0]) for p in parts), num_windows=int(num_windows))
    merged = torch.cat([p.to(main.device) for p in present], dim=0) if len(present) > 1 else main
    return merged, layout


def split_outputs(y: torch.Tensor, layout: MergeLayout) -> SplitOutputs:
    """Split the encoder output y [M, O] of a merged call back into its parts (views, no copies).

    main -> [P, N, O]; pivots, candidates, transfer -> their rows (None where absent).
    """
    if y.shape[0] != layout.total:
        raise ValueError(f"encoder output has {y.shape[0]} rows, the layout expects {layout.total}")
    main, piv, cand, tr = torch.split(y, list(layout.sizes), dim=0)
    P = layout.num_windows
    main = main.reshape(P, layout.main // P, *y.shape[1:])
    return SplitOutputs(main, piv if layout.pivots else None, cand if layout.candidates else None,
                        tr if layout.transfer else None)
