"""Position-embedding cache for a SeqPE encoder (SEQPE_SPEC §4.5, §6.2 item 5).

At evaluation the encoder is a deterministic function of the integer position(s), so its output can be
kept in a table and gathered: ``SeqPECache(module).cache(positions)`` returns ``module(positions)``,
computing only the positions it does not hold (in one batched encoder call, duplicates encoded once) and
gathering the rest (one Triton row-gather kernel on CUDA, ``index_select`` elsewhere).

Never stale
    Every call first builds a *state key* of the module and compares it with the key the table was built
    under; any difference drops the table (counted in ``stats()["invalidations"]``) and the positions are
    recomputed. The key holds, for every parameter and buffer: its version counter (``_version``, bumped by
    every in-place op: optimizer steps, ``with torch.no_grad(): p.add_(...)``, ``load_state_dict``'s
    ``copy_``), ``data_ptr``, device, dtype and shape (catching ``.to(...)``, ``param.data = ...``,
    ``load_state_dict(assign=True)``) and, by identity, its storage (a replacement that reuses the freed memory
    and version); the ``training`` flag and the forward hooks of every submodule (train/eval toggles, a hook
    added or removed); the
    module's ``config()``, the dropout ``p`` / LayerNorm ``eps`` of its layers, its ``backend`` attribute; and the
    autocast state of the device.
    PyTorch's *fused* optimizers (``Adam(fused=True)``...) update parameters without bumping their version
    counters, so the cache also installs a global optimizer step post-hook that invalidates every cache
    whose module owns a parameter the optimizer holds. The one mutation that no key can see is an in-place
    write through ``param.data`` (``p.data.copy_(...)``: ``.data`` is a detached alias with its own version
    counter); call ``invalidate()`` after such edits, or construct with ``verify_values=True``, which adds a
    content fingerprint of every tensor (float64 dot products with two fixed pseudo-random vectors, so that
    moved or swapped entries change it; one pass over the weights per call). *Inference tensors* (parameters
    created or loaded under ``torch.inference_mode()``) have no version counter: those are always
    fingerprinted.

Modes
    ``mode="sparse"`` (default) for scattered positions: a position tuple is packed into one int64 key
    (mixed radix ``base**max_digits`` per axis); a sorted key array and ``torch.searchsorted`` map keys to
    table rows, all on the module's device (a Python dict keyed by the position tuple is used only when the
    packed key would overflow int64). Rows carry a last-use tick; when the table is full the least recently
    used rows are evicted (plus 1/8 slack so evictions are amortised).
    ``mode="dense"`` for ranges: ``precompute(ranges)`` encodes whole boxes (``range(32768)``, a 100x100
    grid ``(range(100), range(100))``) into contiguous table blocks, and lookups are pure index arithmetic.
    Positions outside every box are computed on the fly and not stored (counted as misses). When a new box
    would exceed ``max_bytes`` the least recently used boxes are evicted; a box larger than ``max_bytes`` on
    its own raises. After an invalidation a box is recomputed the next time a query touches it.
    ``precompute`` in sparse mode simply inserts every position of the boxes.

Gradients
    The cache returns constants. If grad mode is on and the module has parameters that require grad, a call
    raises (a silently detached PE would stop the encoder's training without any error). Wrap evaluation in
    ``torch.no_grad()`` / ``torch.inference_mode()``, freeze the encoder with ``requires_grad_(False)``, or
    pass ``allow_grad=True`` to accept detached outputs knowingly. A module in training mode with active
    dropout is refused as well: its output is random and caching would freeze one sample.

Positions are validated like the module validates them (integer dtype, shape ``[M]`` or ``[M, data_dim]``,
``0 <= p < base**max_digits`` per axis: always checked here, since an out-of-range position would alias a
valid key).
"""
from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..backend import triton_status
from .dedup import dropout_active, unique_positions
from ..reference.tokenize import check_positions

__all__ = ["SeqPECache"]

_INDEX_BYTES_PER_ROW = 24  # sparse mode: key + row + tick (int64 each)


def _gather(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table[rows]: the Triton row gather on CUDA (benchmarks/bench_cache.py measures it against the copy
    bandwidth), index_select elsewhere (the interpreter would be far slower than torch on CPU)."""
    if table.is_cuda and table.dim() == 2 and triton_status(table.device)[0]:
        from ..ops.gather import gather_rows

        return gather_rows(table, rows)
    return table.index_select(0, rows)

# ------------------------------------------------------------------------------------ optimizer step hook
_LIVE_CACHES: "weakref.WeakSet[SeqPECache]" = weakref.WeakSet()
_HOOK_HANDLE = None


def _optimizer_step_post_hook(optimizer, args, kwargs):
    if not _LIVE_CACHES:
        return
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for c in list(_LIVE_CACHES):
        if c._param_ids & ids:
            # (no lock: a training thread's step must not wait for an evaluation thread's encoder call; a bump
            # lost to a concurrent one still changes the epoch after both steps' updates)
            c._external_epoch += 1


def _install_hook():
    global _HOOK_HANDLE
    if _HOOK_HANDLE is None:
        _HOOK_HANDLE = register_optimizer_step_post_hook(_optimizer_step_post_hook)


def _fingerprint(t: torch.Tensor, weights: dict) -> tuple:
    """Two float64 dot products of t's values with fixed pseudo-random vectors: any edit short of one that keeps
    both (vanishingly unlikely by chance) changes it, moving or swapping entries included (a plain sum would
    not see those). One host sync. ``weights`` ((numel, device) -> [2, numel] float64) is the calling cache's:
    the vectors live as long as it does (a module-level table kept 1.3x the encoder's parameters for good)."""
    n, dev = t.numel(), t.device
    w = weights.get((n, str(dev)))
    if w is None:
        g = torch.Generator().manual_seed(n)
        w = weights[(n, str(dev))] = torch.rand(2, n, generator=g, dtype=torch.float64).add_(0.5).to(dev)
    with torch.no_grad():
        v = t.detach().reshape(-1).to(torch.float64)
        return tuple((w @ v).tolist())


# ------------------------------------------------------------------------------------ dense blocks
@dataclass
class _Block:
    start: List[int]
    stop: List[int]
    step: List[int]
    sizes: List[int]
    row_offset: int = 0
    tick: int = 0
    valid: bool = False

    @property
    def n(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n

    def positions(self, device) -> torch.Tensor:
        axes = [torch.arange(a, b, s, device=device, dtype=torch.int64)
                for a, b, s in zip(self.start, self.stop, self.step)]
        if len(axes) == 1:
            return axes[0].unsqueeze(1)
        return torch.cartesian_prod(*axes).reshape(-1, len(axes))  # row-major (first axis outer)

    def locate(self, pos: torch.Tensor):
        """(inside [M] bool, local row index [M]) for positions [M, d]."""
        inside = torch.ones(pos.shape[0], dtype=torch.bool, device=pos.device)
        local = torch.zeros(pos.shape[0], dtype=torch.int64, device=pos.device)
        for a in range(pos.shape[1]):
            rel = pos[:, a] - self.start[a]
            inside &= (rel >= 0) & (pos[:, a] < self.stop[a])
            if self.step[a] != 1:
                inside &= (rel % self.step[a]) == 0
                rel = torch.div(rel, self.step[a], rounding_mode="floor")
            local = local * self.sizes[a] + rel
        return inside, local


def _as_range(r) -> range:
    if isinstance(r, range):
        return r
    if isinstance(r, int):
        return range(r)
    if isinstance(r, (tuple, list)) and 2 <= len(r) <= 3 and all(isinstance(x, int) for x in r):
        return range(*r)
    raise TypeError(f"cannot read {r!r} as a range: give range(...), an int N (0..N-1) or (start, stop[, step])")


# ------------------------------------------------------------------------------------ the cache
class SeqPECache:
    """Cache of ``module(positions)`` rows keyed by position; see the module docstring.

    Args:
        module: a ``SeqPE`` (or subclass). Its ``forward`` (or ``compute``) produces the rows.
        max_bytes: bound on the table (plus, in sparse mode, its index), default 256 MiB.
        mode: "sparse" (scattered positions, LRU rows) or "dense" (``precompute``d boxes, LRU boxes).
        allow_grad: return detached rows even when grad mode is on and the module requires grad.
        verify_values: also fingerprint parameter contents on each call (catches ``p.data`` edits).
        compute: ``fn(module, positions) -> [M, O]`` used for misses (default ``module(positions)``); e.g.
            ``seqpe_kernels.savings.dedup.prefix_shared_forward`` for causal encoders.
        chunk_size: encode misses in chunks of this many positions (default: one call).
    """

    def __init__(self, module: nn.Module, max_bytes: int = 256 * 2 ** 20, mode: str = "sparse",
                 allow_grad: bool = False, verify_values: bool = False,
                 compute: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
                 chunk_size: Optional[int] = None):
        if mode not in ("sparse", "dense"):
            raise ValueError(f"mode must be 'sparse' or 'dense', got {mode!r}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.module = module
        self.max_bytes = int(max_bytes)
        self.mode = mode
        self.allow_grad = allow_grad
        self.verify_values = verify_values
        self.compute = compute
        self.chunk_size = chunk_size
        self.data_dim = module.data_dim
        self.max_digits = module.max_digits
        self.base = getattr(module, "base", 10)
        self._radix = self.base ** self.max_digits
        self._packable = self._radix ** self.data_dim <= 2 ** 63 - 1
        self._external_epoch = 0
        self._key = None
        self._key_storages: list = []  # weak references to the keyed tensors' storages (see _refresh)
        self._clock = 0
        self._hits = self._misses = self._computed = self._invalidations = self._evictions = 0
        self._table: Optional[torch.Tensor] = None
        # sparse state
        self._keys = None      # sorted int64 keys [n]
        self._rows = None      # row of each sorted key [n]
        self._ticks = None     # last use per row [cap]
        self._n = 0
        self._dict = None      # fallback index when keys do not pack into int64
        # dense state
        self._blocks: List[_Block] = []
        self._encode_inference = False
        # one call at a time: lookups, inserts, evictions and the state key share the index (threads filling one
        # cache at once handed each other's rows back and corrupted the index for good)
        self._lock = threading.RLock()
        self._fp_weights: dict = {}  # verify_values' fingerprint vectors (_fingerprint): this cache's
        self._register()

    def _register(self) -> None:
        """Under the optimizer hook's watch (fused optimizers bump no version): this cache, and each copy of it."""
        self._param_ids = {id(p) for p in self.module.parameters()}
        _install_hook()
        _LIVE_CACHES.add(self)

    # ------------------------------------------------------------------ public API
    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        return self.cache(positions)

    def __getstate__(self):
        # (copy / pickle: not the lock; not the storages' weak references either: a copied StorageWeakRef frees
        # the same weak reference twice, a heap corruption; the copy refreshes its key on its first call)
        st = dict(self.__dict__)
        st.pop("_lock", None)
        st["_fp_weights"] = {}  # (rebuilt on demand)
        st["_key_storages"], st["_key"] = [], None
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)
        self._lock = threading.RLock()
        self._register()  # a copy is a cache of its own

    def cache(self, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[M, out_dim]`` of positions ``[M]`` or ``[M, data_dim]``, equal to ``module(positions)``.
        Thread-safe: concurrent calls run one at a time (the encoder call of a miss included)."""
        with self._lock:
            return self._cache(positions)

    def _cache(self, positions: torch.Tensor) -> torch.Tensor:
        self._check_usable()
        pos = self._validate(positions)
        # the cache's own tensors are always normal (non-inference) tensors, so that it can be used both
        # inside and outside torch.inference_mode(); only the encoder call runs in the caller's mode
        self._encode_inference = torch.is_inference_mode_enabled()
        with torch.inference_mode(False), torch.no_grad():
            self._refresh()
            if self.mode == "sparse":
                return self._sparse_lookup(pos)
            return self._dense_lookup(pos)

    def precompute(self, ranges) -> None:
        """Encode whole boxes now.

        1-D: ``range(a, b[, s])``, an int N (0..N-1), ``(a, b[, s])``, or a list of those.
        n-D: a sequence of ``data_dim`` per-axis ranges (one box, row-major, first axis outer), or a list
        of such boxes, e.g. ``(range(100), range(100))`` for a 100x100 grid.
        """
        with self._lock:
            self._precompute(ranges)

    def _precompute(self, ranges) -> None:
        self._check_usable()
        boxes = [b for b in self._parse_boxes(ranges) if b.n > 0]
        self._encode_inference = torch.is_inference_mode_enabled()
        with torch.inference_mode(False), torch.no_grad():
            self._refresh()
            if not boxes:
                return
            if self.mode == "sparse":
                pos = torch.cat([b.positions(self._device()) for b in boxes], dim=0)
                self._validate(pos)
                self._sparse_lookup(pos, count=False)
                return
            for b in boxes:
                self._validate(torch.tensor([b.start, [e - s for e, s in zip(b.stop, b.step)]], dtype=torch.int64))
                self._dense_add(b)

    def invalidate(self) -> None:
        """Drop every cached row (e.g. after editing weights through ``param.data``)."""
        with self._lock:
            self._external_epoch += 1

    def clear(self) -> None:
        """Drop all cached rows and, in dense mode, forget the precomputed boxes."""
        with self._lock:
            self._drop_table()
            self._blocks = []
            self._key = None

    def stats(self) -> dict:
        with self._lock:
            return dict(mode=self.mode, hits=self._hits, misses=self._misses, computed=self._computed,
                        invalidations=self._invalidations, evictions=self._evictions, entries=self.num_entries,
                        bytes=self.nbytes, max_bytes=self.max_bytes)

    def reset_stats(self) -> None:
        with self._lock:
            self._hits = self._misses = self._computed = self._invalidations = self._evictions = 0

    @property
    def num_entries(self) -> int:
        if self.mode == "sparse":
            return self._n
        return sum(b.n for b in self._blocks if b.valid)

    @property
    def nbytes(self) -> int:
        if self._table is None:
            return 0
        row = self._table.shape[1] * self._table.element_size()
        if self.mode == "sparse":
            return self._n * (row + _INDEX_BYTES_PER_ROW)
        return sum(b.n for b in self._blocks) * row

    # ------------------------------------------------------------------ checks and state key
    def _device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def _check_usable(self):
        m = self.module
        if (torch.is_grad_enabled() and not self.allow_grad
                and any(p.requires_grad for p in m.parameters())):
            raise RuntimeError(
                "SeqPECache returns cached constants, but grad mode is on and the encoder has parameters that "
                "require grad: the encoder would silently receive no gradient. Use the cache under "
                "torch.no_grad() / torch.inference_mode(), freeze the encoder (requires_grad_(False)), or "
                "construct SeqPECache(..., allow_grad=True) to accept detached outputs.")
        if dropout_active(m):
            raise RuntimeError(
                "SeqPECache: the encoder is in training mode with active dropout, so its output is random and "
                "caching would freeze one sample. Call module.eval() (or set the dropout probabilities to 0).")

    def _validate(self, positions: torch.Tensor) -> torch.Tensor:
        pos = check_positions(positions, self.max_digits, self.base, self.data_dim, check_range=True)
        return pos.to(self._device())

    def _state_key(self):
        """(key, tensors): the key compared by value, and the parameters / buffers it describes (whose storages
        ``_refresh`` also compares by identity)."""
        m = self.module
        items = []
        ids = set()
        tensors = []
        for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
            ids.add(id(t))
            tensors.append(t)
            try:
                ver = t._version
            except RuntimeError:  # inference tensor: no version counter, so in-place writes show in the values only
                ver = None
            items.append((name, ver, t.data_ptr(), str(t.device), t.dtype, tuple(t.shape)))
            if (self.verify_values or ver is None) and t.numel():
                items.append(_fingerprint(t, self._fp_weights))
        self._param_ids = ids
        # train / eval flags, and the forward hooks (their registration ids: a hook added or removed changes the
        # output module(...) gives; what a hook does later is its own business)
        training = tuple((sub.training, tuple(sub._forward_hooks), tuple(sub._forward_pre_hooks))
                         for sub in m.modules())
        try:
            cfg = m.config() if hasattr(m, "config") and callable(m.config) else None
        except ValueError:  # layers configured unevenly (no single eps / p): _live below still tells them apart
            cfg = None
        cfg = tuple(sorted(cfg.items())) if isinstance(cfg, dict) else None
        live = m._live() if callable(getattr(m, "_live", None)) else None
        dev = self._device().type
        try:
            autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        except (RuntimeError, TypeError, AttributeError):  # device type without autocast
            autocast = None
        masks = getattr(m, "dropout_masks", None)
        return (tuple(items), training, cfg, live, str(getattr(m, "backend", None)), getattr(m, "temperature", None),
                autocast, id(masks) if masks is not None else None, self._external_epoch), tensors

    def _refresh(self):
        key, tensors = self._state_key()
        # a replaced tensor can land at the freed one's address with the same version (the CUDA caching allocator
        # hands a same-sized block straight back), so the key's data_ptr / _version cannot tell it from the old
        # one: the storages are also compared by identity, through weak references taken with the key (a weak
        # reference keeps the storage object's address from being reused; expired means it was freed)
        same = key == self._key and len(tensors) == len(self._key_storages) and all(
            not r.expired() and r.cdata == t.untyped_storage()._cdata for r, t in zip(self._key_storages, tensors))
        if not same:
            if self._key is not None and (self.num_entries > 0 or self._table is not None):
                self._invalidations += 1
            self._key = key
            self._key_storages = [StorageWeakRef(t.untyped_storage()) for t in tensors]
            self._drop_table()

    def _drop_table(self):
        self._table = None
        self._keys = self._rows = self._ticks = None
        self._dict = None
        self._n = 0
        for b in self._blocks:
            b.valid = False

    # ------------------------------------------------------------------ encoder calls
    def _encode(self, pos: torch.Tensor) -> torch.Tensor:
        """Rows for unique positions [U, d] (int64, on the module's device)."""
        arg = pos[:, 0] if self.data_dim == 1 else pos
        fn = self.compute
        with torch.inference_mode(self._encode_inference), torch.no_grad():
            if self.chunk_size is None or arg.shape[0] <= self.chunk_size:
                out = fn(self.module, arg) if fn is not None else self.module(arg)
            else:
                out = torch.cat([fn(self.module, c) if fn is not None else self.module(c)
                                 for c in arg.split(self.chunk_size)], dim=0)
        self._computed += int(arg.shape[0])
        return out.detach()

    def _row_bytes(self, out: torch.Tensor) -> int:
        return out.shape[1] * out.element_size()

    @staticmethod
    def _new_storage(rows: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(rows, like.shape[1], dtype=like.dtype, device=like.device)

    @staticmethod
    def _write(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor):
        dst.index_copy_(0, index, src)

    # ------------------------------------------------------------------ sparse mode
    def _pack(self, pos: torch.Tensor) -> torch.Tensor:
        key = pos[:, 0]
        for a in range(1, pos.shape[1]):
            key = key * self._radix + pos[:, a]
        return key

    def _unpack(self, key: torch.Tensor) -> torch.Tensor:
        cols = []
        for _ in range(self.data_dim):
            cols.append(key % self._radix)
            key = torch.div(key, self._radix, rounding_mode="floor")
        return torch.stack(cols[::-1], dim=1)

    def _sparse_capacity(self, row_bytes: int) -> int:
        return self.max_bytes // (row_bytes + _INDEX_BYTES_PER_ROW)

    def _sparse_find(self, pos: torch.Tensor):
        """(found [M] bool, rows [M] int64) for positions [M, d]."""
        M = pos.shape[0]
        dev = pos.device
        if self._n == 0:
            return torch.zeros(M, dtype=torch.bool, device=dev), torch.zeros(M, dtype=torch.int64, device=dev)
        if not self._packable:
            rows = [self._dict.get(t, -1) for t in map(tuple, pos.tolist())]
            rows = torch.tensor(rows, dtype=torch.int64, device=dev)
            return rows >= 0, rows.clamp(min=0)
        keys = self._pack(pos)
        idx = torch.searchsorted(self._keys, keys).clamp_(max=self._n - 1)
        found = self._keys.index_select(0, idx) == keys
        rows = self._rows.index_select(0, idx)
        return found, rows

    def _sparse_lookup(self, pos: torch.Tensor, count: bool = True) -> torch.Tensor:
        M = pos.shape[0]
        found, rows = self._sparse_find(pos)
        n_hit = int(found.sum()) if M else 0
        if count:
            self._hits += n_hit
            self._misses += M - n_hit
        self._clock += 1
        if n_hit == M and M > 0:
            self._ticks.index_fill_(0, rows, self._clock)
            return _gather(self._table, rows)
        miss = ~found
        miss_pos = pos[miss]
        if self._packable:
            uk, inv = torch.unique(self._pack(miss_pos), sorted=True, return_inverse=True)
            upos = self._unpack(uk)
        else:
            upos, inv = unique_positions(miss_pos, self._radix)
        y = self._encode(upos)
        if M == 0:
            return y[:0]
        out = torch.empty(M, y.shape[1], dtype=y.dtype, device=y.device)
        if n_hit:
            hit_rows = rows[found]
            self._ticks.index_fill_(0, hit_rows, self._clock)
            out[found] = _gather(self._table, hit_rows)
        out[miss] = y.index_select(0, inv)
        self._sparse_insert(upos, y, protect=rows[found] if n_hit else None)
        return out

    def _sparse_insert(self, upos: torch.Tensor, y: torch.Tensor, protect: Optional[torch.Tensor]):
        row_bytes = self._row_bytes(y)
        cap = self._sparse_capacity(row_bytes)
        U = upos.shape[0]
        if cap <= 0 or U == 0:
            return
        if U > cap:  # keep the last `cap` of them
            upos, y, U = upos[-cap:], y[-cap:], cap
        if self._table is not None and (self._table.dtype != y.dtype or self._table.device != y.device
                                        or self._table.shape[1] != y.shape[1]):
            self._drop_table()
        if self._n + U > cap:
            self._sparse_evict(self._n + U - cap + cap // 8, protect)
        need = self._n + U
        if self._table is None or self._table.shape[0] < need:
            new_cap = min(cap, max(need, 2 * (self._table.shape[0] if self._table is not None else 0), 64))
            table = self._new_storage(new_cap, y)
            ticks = torch.zeros(new_cap, dtype=torch.int64, device=y.device)
            if self._table is not None and self._n:
                table[:self._n] = self._table[:self._n]
                ticks[:self._n] = self._ticks[:self._n]
            self._table, self._ticks = table, ticks
        new_rows = torch.arange(self._n, need, device=y.device)
        self._write(self._table, new_rows, y)
        self._ticks[self._n:need] = self._clock
        if self._packable:
            keys = self._pack(upos)
            all_keys = keys if self._keys is None else torch.cat([self._keys, keys])
            all_rows = new_rows if self._rows is None else torch.cat([self._rows, new_rows])
            order = torch.argsort(all_keys)
            self._keys, self._rows = all_keys[order], all_rows[order]
        else:
            if self._dict is None:
                self._dict = {}
            for t, r in zip(map(tuple, upos.tolist()), new_rows.tolist()):
                self._dict[t] = r
        self._n = need

    def _sparse_evict(self, n_evict: int, protect: Optional[torch.Tensor]):
        """Drop the ``n_evict`` least recently used rows and compact the table."""
        n_evict = min(n_evict, self._n)
        if n_evict <= 0:
            return
        ticks = self._ticks[:self._n].clone()
        if protect is not None and protect.numel():
            ticks[protect] = torch.iinfo(torch.int64).max  # rows gathered by the current call stay
        keep_rows = torch.sort(torch.topk(ticks, self._n - n_evict, largest=True).indices).values
        n_keep = keep_rows.shape[0]
        remap = torch.full((self._n,), -1, dtype=torch.int64, device=ticks.device)
        remap[keep_rows] = torch.arange(n_keep, device=ticks.device)
        self._table[:n_keep] = self._table.index_select(0, keep_rows)
        self._ticks[:n_keep] = self._ticks.index_select(0, keep_rows)
        if self._packable:
            new_rows = remap.index_select(0, self._rows)
            keep = new_rows >= 0
            self._keys, self._rows = self._keys[keep], new_rows[keep]
        else:
            rm = remap.tolist()
            self._dict = {t: rm[r] for t, r in self._dict.items() if rm[r] >= 0}
        self._evictions += self._n - n_keep
        self._n = n_keep

    # ------------------------------------------------------------------ dense mode
    def _parse_boxes(self, ranges) -> List[_Block]:
        d = self.data_dim

        def box(axes) -> _Block:
            rs = [_as_range(a) for a in axes]
            if len(rs) != d:
                raise ValueError(f"a box needs {d} per-axis range(s) for data_dim={d}, got {len(rs)}")
            for r in rs:
                if r.step <= 0:
                    raise ValueError(f"ranges must have a positive step, got {r}")
            rs = [range(r.start, r.start + len(r) * r.step, r.step) for r in rs]  # normalised stop
            return _Block(start=[r.start for r in rs], stop=[r.stop for r in rs], step=[r.step for r in rs],
                          sizes=[len(r) for r in rs])

        def is_axis(x):
            return isinstance(x, (range, int)) or (
                isinstance(x, tuple) and 2 <= len(x) <= 3 and all(isinstance(v, int) for v in x))

        if d == 1:
            if is_axis(ranges):
                return [box([ranges])]
            return [box([r]) for r in ranges]
        if isinstance(ranges, (list, tuple)) and len(ranges) == d and all(is_axis(x) for x in ranges):
            return [box(ranges)]
        if is_axis(ranges) or not all(isinstance(b, (list, tuple)) for b in ranges):
            raise ValueError(f"data_dim={d}: pass one box as {d} per-axis ranges, e.g. "
                             f"({', '.join(['range(100)'] * d)}), or a list of such boxes; got {ranges!r}")
        return [box(b) for b in ranges]

    def _dense_total_rows(self) -> int:
        return sum(b.n for b in self._blocks)

    def _dense_add(self, blk: _Block):
        for b in self._blocks:
            if b.start == blk.start and b.stop == blk.stop and b.step == blk.step:
                if not b.valid:
                    self._dense_compute([b])
                self._clock += 1
                b.tick = self._clock
                return
        # the row size: the table's once it exists (what compute= returns may be wider than the parameters),
        # else estimated from the parameter dtype (the first compute checks the exact size)
        est_row = (self._table.shape[1] * self._table.element_size() if self._table is not None
                   else self.module.out_dim * next(self.module.parameters()).element_size())
        if blk.n * est_row > self.max_bytes:
            raise ValueError(f"box of {blk.n} positions needs about {blk.n * est_row} bytes, more than "
                             f"max_bytes={self.max_bytes}")
        self._clock += 1
        blk.tick = self._clock
        self._blocks.append(blk)
        self._dense_evict(est_row, keep=blk)
        self._dense_layout()
        self._dense_compute([blk])

    def _dense_evict(self, row_bytes: int, keep: _Block):
        while self._dense_total_rows() * row_bytes > self.max_bytes:
            victims = [b for b in self._blocks if b is not keep]
            if not victims:
                raise ValueError(f"box of {keep.n} positions does not fit in max_bytes={self.max_bytes}")
            v = min(victims, key=lambda b: b.tick)
            self._blocks.remove(v)
            self._evictions += v.n

    def _dense_layout(self):
        """Assign contiguous row ranges; moves valid blocks' rows into a new table when the layout changes."""
        old = [(b, b.row_offset) for b in self._blocks]
        off = 0
        for b in self._blocks:
            b.row_offset = off
            off += b.n
        if self._table is None:
            return
        table = self._new_storage(off, self._table)
        for b, o in old:
            if b.valid:
                table[b.row_offset:b.row_offset + b.n] = self._table[o:o + b.n]
        self._table = table

    def _dense_compute(self, blocks: Sequence[_Block], extra: Optional[torch.Tensor] = None):
        """Encode the given (stale or new) blocks and ``extra`` positions in one encoder call; returns the
        rows of ``extra``."""
        dev = self._device()
        parts = [b.positions(dev) for b in blocks]
        if extra is not None:
            parts.append(extra)
        y = self._encode(torch.cat(parts, dim=0))
        total = self._dense_total_rows()
        if self._table is None or self._table.dtype != y.dtype or self._table.device != y.device \
                or self._table.shape[1] != y.shape[1] or self._table.shape[0] != total:
            if self._table is not None:
                for b in self._blocks:
                    b.valid = False
            row_bytes = self._row_bytes(y)
            if total * row_bytes > self.max_bytes:  # actual dtype larger than estimated
                keep = blocks[-1] if blocks else None
                self._dense_evict(row_bytes, keep)
                total = self._dense_total_rows()
                self._dense_layout()
            self._table = self._new_storage(total, y)
        off = 0
        for b in blocks:
            if b in self._blocks:
                self._write(self._table, torch.arange(b.row_offset, b.row_offset + b.n, device=y.device),
                            y[off:off + b.n])
                b.valid = True
            off += b.n
        return y[off:]

    def _dense_lookup(self, pos: torch.Tensor) -> torch.Tensor:
        M = pos.shape[0]
        dev = pos.device
        rows = torch.full((M,), -1, dtype=torch.int64, device=dev)
        in_stale = torch.zeros(M, dtype=torch.bool, device=dev)
        stale: List[_Block] = []
        self._clock += 1
        for b in self._blocks:
            inside, local = b.locate(pos)
            inside &= rows < 0
            if bool(inside.any()):
                rows = torch.where(inside, local + b.row_offset, rows)
                b.tick = self._clock
                if not b.valid:  # invalidated since it was computed: recomputed below, counted as misses
                    stale.append(b)
                    in_stale |= inside
        found = rows >= 0
        n_hit = int(found.sum()) if M else 0
        n_fresh = n_hit - (int(in_stale.sum()) if stale else 0)
        self._hits += n_fresh
        self._misses += M - n_fresh
        if n_hit == M and not stale and M > 0:
            return _gather(self._table, rows)
        miss = ~found
        upos, inv = unique_positions(pos[miss], self._radix) if M - n_hit else (pos[:0], None)
        table, layout = self._table, [(b, b.row_offset) for b in self._blocks]
        y_extra = self._dense_compute(stale, upos)
        if M == 0:
            return y_extra[:0]
        if self._table is not table or [(b, b.row_offset) for b in self._blocks] != layout:
            # the compute re-laid out the table (rows wider than estimated: blocks evicted, offsets moved, or a
            # new table): the row indices above are stale. Look up again (rare; counted once)
            self._hits -= n_fresh
            self._misses -= M - n_fresh
            return self._dense_lookup(pos)
        if n_hit == M:
            return _gather(self._table, rows)
        out = torch.empty(M, y_extra.shape[1], dtype=y_extra.dtype, device=y_extra.device)
        if n_hit:
            out[found] = _gather(self._table, rows[found])
        out[miss] = y_extra.index_select(0, inv)
        return out
