"""CUDA-graph replay of a SeqPE encoder's forward and backward (``GraphedSeqPE``).

Why: a SeqPE step launches tens of small kernels (eager: ~230; fused: 66, or 42 + 22 on Triton), and on a GPU the
encoder's kernels finish faster than Python can issue them (measured on an H100: the fused Triton step did ~2.8 ms
of GPU work behind ~10 ms of host time).
Capturing the step once and replaying it removes the host cost; the positions of a training step come in a
few fixed shapes (SEQPE_SPEC §6: windows + contrastive + transfer positions; the text step alternates two).

    enc = FusedSeqPE(...).cuda()
    genc = GraphedSeqPE(enc)                 # wraps, shares the parameters
    pe = genc(positions)                     # first call per key captures; later calls replay
    loss(pe).backward()                      # the backward replays a captured graph too

Keys: one graph (training: a forward/backward pair) per positions shape / dtype / device, ``module.training``,
grad mode, CUDA autocast dtype, the parameters (objects, addresses, dtypes, requires_grad), the module's live
configuration and backend, and the GEMM numerics ATen reads per call (TF32, reduced-precision reductions,
deterministic algorithms).
``torch.no_grad`` and ``torch.inference_mode`` share one graph: they run the same kernels (inference mode only
changes host-side autograd bookkeeping), and the graph's static input is a normal tensor that both may write.
At most ``max_graphs`` keys are captured; calls with further keys run eagerly (one warning).

Guaranteed (each point has a GPU-marked test in tests/test_graphs.py):
* outputs and every parameter gradient equal the eager module's (fp32: 1e-5 rel) on every replay, with fresh
  positions each time, for training (forward + backward) and no-grad calls;
* the parameter gradients handed to autograd are fresh tensors (cloned out of the graph's static buffers), so
  ``.grad`` tensors, ``torch.autograd.grad`` results, gradient accumulation over micro-batches and an
  optimizer step between replays all behave as in eager; returned outputs are clones as well (unless
  ``clone_outputs=False``: then an output is the graph's static buffer and the next replay overwrites it);
* dropout is fresh per replay and is what the eager module would draw: the kernels' Philox seeds are drawn
  with torch's CUDA generator inside the graph, a replay advances the generator as the eager call does, and the
  generator state is put back after warm-up and capture (the warm-up's draws are undone). With the same seed a
  run with graphs sees the same dropout masks as one without;
* each graph owns a private memory pool, its static tensors and (captured into that pool) its cuBLAS
  workspace: the workspaces are cleared before and after every capture, so no other graph or eager GEMM shares
  memory with it, and clearing workspaces elsewhere (``torch.compile(mode="reduce-overhead")`` does) or
  destroying another graph cannot pull memory from under it. Graphs, pools and static tensors live as long as
  the GraphedSeqPE (no reference cycles: they are freed when it is, or by ``reset()``, after a device
  synchronisation);
* Triton compiles during the ``warmup`` (>= 1) eager calls, which run on the capture's own static input (same
  shapes, dtypes and alignment); a Triton compilation during a capture is detected (Triton's
  ``knobs.runtime.jit_post_compile_hook``) and the capture is refused with the kernel's name;
* a capture works whatever autograd graphs the caller keeps alive (an earlier output, an eager call's output):
  warm-up and capture differentiate with respect to fresh leaves that alias the parameters, whose AccumulateGrad
  nodes are made on the capture stream (the parameters' own may live on the legacy stream, which a capture must
  not touch);
* a capture that fails raises its error and leaves the rest as it was: current stream, CUDA generator (out of
  capture mode, same state), the caching allocator (the capture unregistered from the pool, the pool released),
  cuBLAS workspaces, the module's parameters and its dropout-mask recording hook.

Refused with an error (``GraphReplayError``, a RuntimeError) instead of silently wrong results:
* a second backward through one forward replay (``retain_graph=True`` re-use): the captured backward frees and
  reuses the forward's activations inside its own pool while it runs, so a second replay would read
  overwritten memory (wrong gradients; a garbage index tensor can scatter out of bounds);
* backward of a stale output, i.e. one whose forward replay was followed by a newer forward replay of the same
  graph (``y1 = g(p1); y2 = g(p2); (f(y1) + f(y2)).backward()``: y1's activations were overwritten). Call
  backward before the next forward with the same key, or use two GraphedSeqPE instances. Autograd may already
  have run the other output's backward when the error is raised: zero the gradients before retrying;
* backward of an output after ``reset()``; ``warmup < 1``; positions that are not an integer CUDA tensor on
  the parameters' device; forward / backward hooks on the wrapped module or (as its eager forward does) on its
  submodules, which a replay would not run.

Captures use ``capture_error_mode="thread_local"`` (other threads' CUDA calls, e.g. a DataLoader's pin-memory
thread, neither fail nor invalidate them) and run with anomaly detection off (its NaN check is a host sync);
replayed backward outputs are still checked by it.

Threads: replays of one graph run one at a time (its static buffers are shared: copy-in, replay and output copy
under a lock per graph, and a replay on another stream than the graph's previous use waits for that stream), and
a key is captured once (a lock per GraphedSeqPE). So threads calling one GraphedSeqPE get their own rows; a
training thread whose forward replay another thread's superseded gets the stale-output error above. During a
capture the module's parameters are swapped for aliases and the CUDA generator is put back afterwards: other
threads' eager calls of the same module must not run concurrently with a capture.

The caller's duties (the usual CUDA-graph ones):
* replays run on the caller's current stream, after the copy of ``positions`` into the static input on that
  stream. Positions written on another stream must be waited for first
  (``torch.cuda.current_stream().wait_stream(s)``), exactly as for an eager op;
* the encoder's weights must stay the same tensors (in-place optimizer updates are fine; ``.to()`` or
  ``load_state_dict(assign=True)`` after capture gives new keys and new captures: call ``reset()`` to free the
  old ones). Not for DDP-wrapped modules;
* no host synchronisation inside a call, so deduplication (``torch.unique``) is bypassed: the graph runs the
  plain fused forward (``module._forward_positions``), which is exact anyway;
* position validation is the device-side assert of the fused path (``check_range``), which cannot raise a
  Python exception from inside a graph: out-of-range positions abort the CUDA context. Validate untrusted
  positions before calling (``seqpe_kernels.reference.tokenize.check_positions``).
"""
from __future__ import annotations

import contextlib
import numbers
import sys
import threading
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..precision import tf32_enabled

__all__ = ["GraphedSeqPE", "GraphReplayError", "GraphCaptureError", "ReplayLedger", "ReplayTicket",
           "triton_compile_watch"]


class GraphReplayError(RuntimeError):
    """A call that would replay a captured graph against the wrong activations (see the module docstring)."""


class GraphCaptureError(RuntimeError):
    """A capture that cannot be trusted (e.g. Triton compiled a kernel during it)."""


# ------------------------------------------------------------------------------------------- bookkeeping
class ReplayTicket:
    """One forward replay of a captured forward/backward pair; its backward may run once, while it is the
    newest forward replay of its graph."""

    __slots__ = ("ledger", "generation", "backward_done")

    def __init__(self, ledger: "ReplayLedger", generation: int):
        self.ledger = ledger
        self.generation = generation
        self.backward_done = False

    def claim_backward(self) -> None:
        """Raise GraphReplayError unless this replay's backward may run now; mark it as run."""
        led = self.ledger
        if led.closed:
            raise GraphReplayError(
                f"backward of a GraphedSeqPE output ({led.what}) after reset(): its graphs were freed. Run the "
                "backward before reset(), or recompute the output")
        if self.backward_done:
            raise GraphReplayError(
                f"a second backward through one GraphedSeqPE forward replay ({led.what}, replay "
                f"#{self.generation}): the captured backward overwrites the forward's saved activations while it "
                "runs, so it can replay only once per forward replay (backward(retain_graph=True) re-use is "
                "refused). Call the GraphedSeqPE again for each backward")
        if self.generation != led.generation:
            raise GraphReplayError(
                f"backward of a stale GraphedSeqPE output ({led.what}): its forward replay #{self.generation} was "
                f"superseded by replay #{led.generation} of the same graph, which overwrote its activations. Run "
                "each output's backward before the next call with the same positions shape and mode (or use one "
                "GraphedSeqPE per concurrent output). Gradients of other outputs in the same backward call may "
                "already have been accumulated")
        self.backward_done = True


class ReplayLedger:
    """Forward-replay generations of one captured forward/backward pair (host-side, no CUDA needed)."""

    __slots__ = ("what", "generation", "closed")

    def __init__(self, what: str = "graph"):
        self.what = what
        self.generation = 0
        self.closed = False

    def forward(self) -> ReplayTicket:
        if self.closed:
            raise GraphReplayError(f"GraphedSeqPE graph ({self.what}) used after reset()")
        self.generation += 1
        return ReplayTicket(self, self.generation)

    def close(self) -> None:
        self.closed = True


# ------------------------------------------------------------------------------------------- capture helpers
@contextlib.contextmanager
def triton_compile_watch() -> Iterator[List[str]]:
    """Collect the names of the Triton kernels compiled (or loaded from Triton's disk cache) inside the block,
    through ``triton.knobs.runtime.jit_post_compile_hook`` (chained with any hook already installed). Without
    Triton, or with a Triton without ``knobs`` (< 3.4), nothing is collected."""
    seen: List[str] = []
    rt, prev, installed = None, None, False
    try:
        from triton import knobs

        rt = knobs.runtime
        prev = rt.jit_post_compile_hook

        def hook(*args, **kwargs):
            fn = kwargs.get("fn")
            seen.append(str(getattr(fn, "name", None) or kwargs.get("repr") or "a Triton kernel"))
            return prev(*args, **kwargs) if prev is not None else None

        rt.jit_post_compile_hook = hook
        installed = True
    except Exception:  # no triton / no knobs: nothing to watch
        pass
    try:
        yield seen
    finally:
        if installed:
            rt.jit_post_compile_hook = prev


def _clear_cublas_workspaces() -> None:
    f = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if f is not None:
        f()


# Graphs closed while a capture is in progress (e.g. by the garbage collector, which may run during one): their
# resources are parked here and freed after the capture, because a device synchronisation is illegal during a
# capture and freeing the static input then could hand its memory to an allocation while a replay still reads it.
# Ours are flushed when they end; another's (the user's torch.cuda.graph, torch.compile's) at the next
# GraphedSeqPE call or reset() outside a capture.
_capturing = [0]
_deferred: List[dict] = []


def _foreign_capture() -> bool:
    """Whether this thread's current stream is capturing (someone else's capture: ours count in _capturing)."""
    try:
        return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
    except Exception:  # pragma: no cover - no CUDA
        return False


def _flush_deferred() -> None:
    """Free the parked resources of graphs closed during a capture, once no capture is underway."""
    if not _deferred or _capturing[0] or _foreign_capture():
        return
    try:
        torch.cuda.synchronize()
    finally:
        _deferred.clear()


@contextlib.contextmanager
def _capture_guard(what: str):
    """Around the captures of one graph: (1) cuBLAS workspaces cleared before, so the graph's GEMMs get a
    workspace allocated inside the graph's own pool, not one that lives in another graph's pool or in the
    general pool (where a later clear by someone else, e.g. torch.compile's CUDA-graph trees, would hand it to
    eager tensors); (2) cleared after, so nothing outside this graph keeps using the block in its pool;
    (3) no Triton compilation inside (the warm-up compiles; a kernel compiled during capture can invalidate it);
    (4) graphs closed meanwhile are freed afterwards, not during the capture."""
    torch.cuda.synchronize()
    _clear_cublas_workspaces()
    _capturing[0] += 1
    try:
        with triton_compile_watch() as compiled:
            yield
    finally:
        _capturing[0] -= 1
        _clear_cublas_workspaces()
        if _deferred and not _capturing[0]:
            try:
                torch.cuda.synchronize()
            finally:
                _deferred.clear()
    if compiled:
        raise GraphCaptureError(
            f"Triton compiled {', '.join(sorted(set(compiled)))} during the CUDA-graph capture of {what}, not during "
            "the warm-up calls: the capture is refused (a kernel compiled inside a capture can invalidate it). "
            "Report this with the shapes; a larger warmup= does not change what the warm-up compiles")


@contextlib.contextmanager
def _leaf_aliases(module: nn.Module, params: Tuple[torch.Tensor, ...]) -> Iterator[Tuple[torch.Tensor, ...]]:
    """Inside the block, ``params`` are replaced in ``module`` (in their modules' ``_parameters``, where the
    encoder reads them) by fresh leaf Parameters that share their memory; yields those leaves, in order.

    Why: a captured backward must not touch a stream outside the capture. Autograd hands a leaf's gradient to the
    leaf's AccumulateGrad node, on the stream that node was created on, and the node lives as long as any autograd
    graph that uses the leaf: an earlier replay's output (its _Replay node), an eager call's output the caller
    keeps... each made on the caller's (legacy default) stream. Differentiating the captured forward with respect
    to the parameters themselves then makes the legacy stream wait on the capturing one
    (cudaErrorStreamCaptureImplicit: the capture is invalidated; torch warns "The AccumulateGrad node's stream
    does not match..."). Fresh leaves get their AccumulateGrad nodes where the captured forward first uses them,
    on the capture stream. They alias the parameters' storage (and version counter), so replays read the live
    values, in-place optimizer updates included; the gradients reach the real parameters through _Replay."""
    alias = {id(p): nn.Parameter(p.detach(), requires_grad=True) for p in params}
    swapped = [(sub, name, p) for sub in module.modules() for name, p in sub._parameters.items()
               if p is not None and id(p) in alias]
    try:
        for sub, name, p in swapped:
            sub._parameters[name] = alias[id(p)]
        yield tuple(alias[id(p)] for p in params)
    finally:  # the module's own parameters back, however the block ends
        for sub, name, p in swapped:
            sub._parameters[name] = p


# "thread_local", as torch.compile's CUDA-graph trees capture: in "global" mode any other thread's potentially unsafe
# CUDA call during a capture (a DataLoader pin-memory thread's cudaEventQuery / cuMemHostAlloc, a logging thread's
# .item()) fails that thread or invalidates the capture. The capturing thread stays checked; the autograd worker that
# runs the captured backward launches on the capture stream, whose capture catches it syncing or touching the legacy
# stream in any mode.
_CAPTURE_MODE = "thread_local"


def _end_allocate_to_pool(device: torch.device, pool) -> None:
    torch._C._cuda_endAllocateToPool(device.index, pool)


def _release_pool(device: torch.device, pool) -> None:
    torch._C._cuda_releasePool(device.index, pool)


def _leave_generator_capture_mode(device: torch.device) -> None:
    """Take ``device``'s default CUDA generator out of the capture mode a failed capture left it in.

    torch < 2.13 marks the generator state as capturing in ``capture_begin()`` and unmarks it in ``capture_end()``
    only after cudaStreamEndCapture succeeded, so after an invalidated capture every random op outside a capture
    raises "Offset increment outside graph capture encountered unexpectedly" (and every registered graph's
    replay too). There is no Python call that clears the mark, but a complete capture on the same generator state
    does (its prologue sets it, its epilogue clears it) without touching the seed or the offset. Swapping in a
    fresh state (``graphsafe_set_state``) would not do: graphs already captured hold the old state object. Newer
    torch keys capture state by capture id and has no such mark; this is then a harmless empty-handed capture."""
    with torch.cuda.device(device):
        x = torch.zeros(1, device=device)  # made outside: the graph allocates nothing
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))  # the prologue rewrites the state's replay tensors
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode=_CAPTURE_MODE)
            try:
                x.zero_()  # one node: an empty graph warns
            finally:
                graph.capture_end()
        del graph


def _abandon_capture(graph, pool, device: torch.device, end: bool) -> None:
    """After an exception inside a capture (``end``: the capture may still be open) or from ``capture_end()``:
    undo what capture_begin() set up and a failed capture_end() skipped. Best effort, step by step: the capture's
    own exception is the one the caller sees."""
    if end:
        try:
            graph.capture_end()  # ends the stream capture; raises if the capture was invalidated
        except Exception:
            pass
    try:
        graph.pool()  # succeeds only after a completed capture_end(): torch's bookkeeping is done, the graph's
        return        # own reset() releases its pool
    except Exception:
        pass
    try:  # the allocator still routes the capture's allocations to the pool (and defers event processing)
        _end_allocate_to_pool(device, pool)
    except Exception:
        pass  # capture_end() got that far ("not currently recording")
    for undo, what in ((lambda: _release_pool(device, pool), "release its memory pool (leaked)"),
                       (lambda: _leave_generator_capture_mode(device),
                        "take the CUDA generator out of capture mode: later random ops may raise")):
        try:
            undo()
        except Exception as e:  # pragma: no cover - nothing more to try
            warnings.warn(f"GraphedSeqPE: after a failed CUDA-graph capture, could not {what} ({e})",
                          RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def _graph_capture(graph, pool, stream, device: torch.device) -> Iterator[None]:
    """``torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local")``, except that a
    capture that fails leaves nothing behind. When torch.cuda.graph's ``__exit__`` calls a ``capture_end()`` that
    raises (an invalidated capture: cudaStreamEndCapture fails), torch skips the rest of its bookkeeping: the capture stream
    stays the current stream (``__exit__`` never restores it), the CUDA generator stays in capture mode, the
    caching allocator keeps the capture registered against the pool and the pool keeps the graph's reference
    (``reset()`` releases it only after a completed capture). Here the stream is restored by ``with`` and the
    rest by _abandon_capture. ``pool`` must be a handle (a shared pool: releasing it is this capture's share)."""
    torch.cuda.synchronize()  # as torch.cuda.graph: nothing of earlier work in flight, memory freed for the graph
    torch.cuda.empty_cache()
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode=_CAPTURE_MODE)
        try:
            yield
        except BaseException:
            _abandon_capture(graph, pool, device, end=True)
            raise
        try:
            graph.capture_end()
        except BaseException:
            _abandon_capture(graph, pool, device, end=False)
            raise


def _warm_up(step: Callable[[], None], n: int) -> None:
    """``n`` eager calls on a side stream, as before a capture: Triton compilation, cuBLAS / allocator lazy
    initialisation and autograd's first-call work happen here, outside the graph."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(n):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


class _Core(nn.Module):
    """The captured callable: the encoder's plain (non-deduplicating) forward under a fixed autocast state."""

    def __init__(self, module: nn.Module, ac_dtype: Optional[torch.dtype]):
        super().__init__()
        self.module = module
        self.ac_dtype = ac_dtype

    def forward(self, positions):
        fwd = getattr(self.module, "_forward_positions", self.module.forward)  # FusedSeqPE: skip dedup (syncs)
        with torch.autocast("cuda", dtype=self.ac_dtype or torch.float32, enabled=self.ac_dtype is not None,
                            cache_enabled=False):
            return fwd(positions)


# ------------------------------------------------------------------------------------------- graphs
class _Graph:
    """State common to both kinds: a private pool, a static input, closing."""

    def __init__(self, what: str, clone_outputs: bool):
        self.what = what
        self.clone_outputs = clone_outputs
        self.pool = torch.cuda.graph_pool_handle()
        self.ledger = ReplayLedger(what)
        self.closed = False
        # one use of the static buffers at a time: two threads replaying one graph interleaved copy-in and replay
        # and got each other's rows (and, training, gradients)
        self.lock = threading.Lock()
        self.last_stream = None  # (the stream object, its raw handle) of the previous use

    def _order_streams(self) -> None:
        """Put this use on the current stream after the previous use of the static buffers when that ran on
        another stream (the lock orders the host only; threads may run on streams of their own)."""
        si = self.__dict__.get("static_in")
        if si is None or not si.is_cuda:  # (closed: the caller raises; CPU stand-ins in tests)
            return
        raw = torch._C._cuda_getCurrentRawStream(si.device.index)  # (an int: ~0.2 us, no Stream object)
        last = self.last_stream
        if last is not None and last[1] == raw:
            return
        cur = torch.cuda.current_stream(si.device)
        if last is not None:
            cur.wait_stream(last[0])
        self.last_stream = (cur, raw)

    def _copy_in(self, positions: torch.Tensor) -> None:
        if positions.data_ptr() != self.static_in.data_ptr():
            self.static_in.copy_(positions)  # on the current stream, which the replay then follows

    def _out(self, static_out: torch.Tensor) -> torch.Tensor:
        return static_out.clone() if self.clone_outputs else static_out.detach()

    _RESOURCES = ("static_in", "static_out", "static_grad_out", "static_grads", "graph", "fwd_graph", "bwd_graph",
                  "pool")

    def close(self) -> None:
        """Free the graph(s), the static tensors and the pool. Synchronises first: a replay may still be in
        flight, and the static input lives outside the pool (an eager allocation could reuse it at once).
        During another graph's capture (the garbage collector may close one then) the resources are parked and
        freed after that capture."""
        if getattr(self, "closed", True):
            return
        with self.lock:  # (after a replay in flight on another thread: its buffers are popped below)
            self.closed = True
            self.ledger.close()
            held = {k: self.__dict__.pop(k) for k in self._RESOURCES if k in self.__dict__}
        if _capturing[0] or _foreign_capture():
            # a synchronisation now would invalidate that capture, and freeing without one could hand memory a
            # replay still uses to a new allocation: freed after the capture (_flush_deferred)
            _deferred.append(held)
            return
        try:
            if not sys.is_finalizing() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
        except Exception:  # pragma: no cover - context already torn down
            pass
        held.clear()

    def __del__(self):  # pragma: no cover - exercised on GPUs only
        try:
            self.close()
        except Exception:
            pass


class _TrainingGraph(_Graph):
    """Forward and backward captured into one pool (as torch.cuda.make_graphed_callables does), wrapped in an
    autograd.Function whose backward checks the replay generation and returns fresh gradient tensors."""

    def __init__(self, core: _Core, sample: torch.Tensor, params: Tuple[torch.Tensor, ...], warmup: int,
                 clone_outputs: bool, what: str):
        super().__init__(what, clone_outputs)
        self.params = params
        self.static_in = sample.clone()
        with torch.enable_grad():
            # warm-up and capture differentiate with respect to fresh leaves aliasing the parameters (see
            # _leaf_aliases: the parameters' own AccumulateGrad nodes may sit on the legacy stream)
            def step():
                with _leaf_aliases(core.module, params) as leaves:
                    out = core(self.static_in)
                torch.autograd.grad(out, leaves, grad_outputs=torch.zeros_like(out), allow_unused=True)

            _warm_up(step, warmup)
            self.fwd_graph, self.bwd_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            # one stream for both captures: a backward node runs on the stream its forward ran on, so a backward
            # captured on another stream would sync with a stream outside that capture
            stream = torch.cuda.Stream(sample.device)
            with _capture_guard(what):
                with _leaf_aliases(core.module, params) as leaves, \
                        _graph_capture(self.fwd_graph, self.pool, stream, sample.device):
                    out = core(self.static_in)
                self.static_grad_out = torch.empty_like(out)
                with _graph_capture(self.bwd_graph, self.pool, stream, sample.device):
                    grads = torch.autograd.grad(out, leaves, grad_outputs=self.static_grad_out, allow_unused=True)
        self.static_out = out.detach()
        self.static_grads = tuple(None if g is None else g.detach() for g in grads)

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        return _Replay.apply(self, positions, *self.params)

    def replay_forward(self, positions: torch.Tensor) -> Tuple[ReplayTicket, torch.Tensor]:
        with self.lock:
            ticket = self.ledger.forward()  # before the replay: from here on older tickets are stale
            self._order_streams()
            self._copy_in(positions)
            self.fwd_graph.replay()
            return ticket, self._out(self.static_out)

    def replay_backward(self, ticket: ReplayTicket, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        with self.lock:
            ticket.claim_backward()
            self._order_streams()
            if grad.data_ptr() != self.static_grad_out.data_ptr():
                self.static_grad_out.copy_(grad)
            self.bwd_graph.replay()
            # fresh tensors: autograd may install a returned gradient as p.grad as is, and the next replay
            # rewrites the static buffers (pytorch#181723); one copy of the gradients per step
            return fresh_copies(self.static_grads)


def fresh_copies(ts: Sequence[Optional[torch.Tensor]]) -> Tuple[Optional[torch.Tensor], ...]:
    """``tuple(t.clone() for t in ts)`` (None kept) with the copies in one ``_foreach_copy_``: one multi-tensor
    launch on CUDA instead of a clone kernel per parameter (32 at the paper's two layers, each a launch on the host
    and a few microseconds of a GPU-bound replayed step). Same values, dtypes and strides as ``clone``."""
    src = [t for t in ts if t is not None]
    dst = [torch.empty_like(t) for t in src]
    if src:
        torch._foreach_copy_(dst, src)
    it = iter(dst)
    return tuple(None if t is None else next(it) for t in ts)


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph: _TrainingGraph, positions: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ticket, out = graph.replay_forward(positions)
        ctx.graph, ctx.ticket = graph, ticket
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return (None, None) + ctx.graph.replay_backward(ctx.ticket, grad)


class _InferenceGraph(_Graph):
    """A plain forward capture for no-grad / inference-mode calls."""

    def __init__(self, core: _Core, sample: torch.Tensor, warmup: int, clone_outputs: bool, what: str):
        super().__init__(what, clone_outputs)
        # captured outside inference mode, so the static input is a normal tensor that both no_grad and
        # inference_mode callers can copy into (an inference tensor refuses in-place writes outside it)
        with torch.inference_mode(False), torch.no_grad():
            self.static_in = sample.clone()
            _warm_up(lambda: core(self.static_in), warmup)
            self.graph = torch.cuda.CUDAGraph()
            with _capture_guard(what):
                with _graph_capture(self.graph, self.pool, torch.cuda.Stream(sample.device), sample.device):
                    out = core(self.static_in)
        self.static_out = out

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.ledger.forward()
            self._order_streams()
            self._copy_in(positions)
            self.graph.replay()
            return self._out(self.static_out)


# ------------------------------------------------------------------------------------------- the module
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# the module's attributes a call reads besides its parameters and _live() (a captured graph replays what they were
# at capture): the output scale, attention direction, final LayerNorm, pad masking, the in-kernel range check
# (NaN rows or clamped), the digit base
_GRAPH_CONFIG = ("temperature", "attn_direction", "use_last_layernorm", "mask_padding", "check_range", "base",
                 "backend")

_RPR = tuple(getattr(torch._C, n, None) for n in ("_get_cublas_allow_fp16_reduced_precision_reduction",
                                                  "_get_cublas_allow_bf16_reduced_precision_reduction"))


def _numerics() -> Tuple:
    """What ATen reads per call and a capture bakes in: cuBLAS's fp32 math mode (TF32), its fp16 / bf16
    reduced-precision reductions, and the deterministic-kernel choice (~1 us)."""
    return (tf32_enabled(), *(f() if f is not None else None for f in _RPR),
            torch.are_deterministic_algorithms_enabled())


class GraphedSeqPE(nn.Module):
    """CUDA-graph replay of ``module`` (a FusedSeqPE, or any module with a capturable forward); see the module
    docstring for what is guaranteed and what is refused.

    warmup        eager calls before each capture (>= 1: they compile the Triton kernels)
    clone_outputs return a copy of the graph's output (default); False returns the static buffer itself, which
                  the next replay with the same key overwrites
    max_graphs    keys captured at most; calls with further keys run the module eagerly (one warning)
    """

    def __init__(self, module: nn.Module, warmup: int = 3, clone_outputs: bool = True, max_graphs: int = 8):
        super().__init__()
        if not _is_int(warmup) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1, got {warmup!r}: the warm-up calls compile the "
                             "Triton kernels and initialise cuBLAS outside the capture (compiling inside a capture "
                             "can invalidate it)")
        if not _is_int(max_graphs) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an integer >= 1, got {max_graphs!r}")
        self.module = module
        self.warmup = int(warmup)
        self.clone_outputs = bool(clone_outputs)
        self.max_graphs = int(max_graphs)
        self._graphs: Dict[Tuple, _Graph] = {}
        self._warned_full = False
        self._lock = threading.RLock()  # the graphs dict and captures: one thread captures a key, once

    def __getstate__(self):  # (a lock neither copies nor pickles; nor do captured graphs: a copy captures anew)
        st = dict(self.__dict__)
        st.pop("_lock", None)
        st["_graphs"] = {}
        return st

    def __setstate__(self, st):
        super().__setstate__(st)
        self._lock = threading.RLock()

    def reset(self):
        """Free every captured graph, its static tensors and its pool (after a device synchronisation). Needed
        after moving the module or replacing its parameters; outputs of earlier replays refuse backward."""
        with self._lock:
            for g in self._graphs.values():
                g.close()
            self._graphs.clear()
        _flush_deferred()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _key(self, positions: torch.Tensor) -> Tuple:
        """(shape, dtype, device, training, grad, autocast dtype, (params, live configuration, GEMM numerics)).
        ``grad`` is False under both torch.no_grad and torch.inference_mode: one graph serves both (same kernels)."""
        ac = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        params = list(self.module.parameters())  # one module traversal per call
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        # the Parameter objects too: a training graph routes its gradients to the objects it was captured with
        ptrs = tuple((id(p), p.data_ptr(), p.dtype, p.requires_grad) for p in params)
        # and what the module's plan reads that a user can change (dropout p, LayerNorm eps, ...): a graph
        # replays the kernels and constants it was captured with
        m = self.module
        live = m._live() if hasattr(m, "_live") else None
        cfg = (live, *(getattr(m, a, None) for a in _GRAPH_CONFIG))
        return (tuple(positions.shape), positions.dtype, positions.device, self.module.training, grad, ac,
                (ptrs, cfg, _numerics()))

    @staticmethod
    def _describe(key: Tuple) -> str:
        shape, dtype, device, training, grad, ac, _ = key
        return (f"positions {list(shape)} {str(dtype).replace('torch.', '')} on {device}, "
                f"{'train' if training else 'eval'}, {'grad' if grad else 'no grad'}"
                + (f", autocast {str(ac).replace('torch.', '')}" if ac is not None else ""))

    def _check(self, positions) -> None:
        if not isinstance(positions, torch.Tensor) or not positions.is_cuda:
            raise ValueError("GraphedSeqPE needs positions as a CUDA tensor (CUDA graphs run on the GPU); "
                             f"got {type(positions).__name__}"
                             + (f" on {positions.device}" if isinstance(positions, torch.Tensor) else ""))
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
        p = next(self.module.parameters(), None)
        if p is not None and p.device != positions.device:
            raise ValueError(f"positions are on {positions.device} but the encoder's parameters on {p.device}")

    def _check_hooks(self) -> None:
        """A replay runs the captured kernels only: hooks on the wrapped module (its eager forward runs them) or,
        put there after a capture, on its submodules (its eager forward refuses them) would silently not fire."""
        m = self.module
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            raise RuntimeError("GraphedSeqPE: the wrapped module has forward / backward hooks, which a CUDA-graph "
                               "replay would not run. Register them on the GraphedSeqPE instead")
        chk = getattr(m, "_check_hooks", None)  # FusedSeqPE: submodule hooks (cached until a hook is registered)
        if chk is not None:
            chk()

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        self._check(positions)
        self._check_hooks()
        if _deferred:
            _flush_deferred()
        if positions.numel() == 0:
            return self.module(positions)  # nothing worth a graph
        key = self._key(positions)
        g = self._graphs.get(key)
        if g is None:
            full = False
            with self._lock:
                # the key again: read during another thread's capture it held that capture's parameter aliases
                key = self._key(positions)
                g = self._graphs.get(key)  # (or that thread captured this key meanwhile)
                if g is None:
                    full = len(self._graphs) >= self.max_graphs
                    if not full:
                        g = self._capture(positions, key)
                        self._graphs[key] = g
            if full:  # eagerly, outside the lock
                if not self._warned_full:
                    warnings.warn(f"GraphedSeqPE: {self.max_graphs} graphs captured already (max_graphs); calls "
                                  f"with new keys (here {self._describe(key)}) run eagerly", RuntimeWarning,
                                  stacklevel=2)
                    self._warned_full = True
                return self.module(positions)
        return g(positions)

    def _capture(self, positions: torch.Tensor, key: Tuple) -> _Graph:
        _, _, _, _, grad, ac, _ = key
        what = self._describe(key)
        core = _Core(self.module, ac)
        # the caller's autocast (if any) is re-entered inside _Core with caching off (a cached cast made outside
        # the capture must not be baked into it), so the outer one is switched off around warm-up and capture
        # the CUDA generator is put back after warm-up and capture: the warm-up's dropout draws are undone, so the
        # replay that follows draws what an eager call would have drawn (a capture itself does not advance it)
        rng = torch.cuda.get_rng_state(positions.device)
        # a failed capture leaves the module as it was: the parameters are restored by _leaf_aliases, and the
        # dropout-mask recording hook (which warm-up and capture fill, the capture with tensors of its pool) here
        rec = getattr(self.module, "record_dropout_masks", None)
        rec_before = dict(rec) if isinstance(rec, dict) else None
        try:
            # anomaly mode's NaN check of every backward output is a host sync (.item()): illegal inside the
            # backward capture. Off for warm-up and capture; replays' backward outputs are still checked
            with torch.cuda.device(positions.device), torch.autocast("cuda", enabled=False), \
                    torch.autograd.set_detect_anomaly(False):
                if grad:
                    params = tuple(p for p in self.module.parameters() if p.requires_grad)
                    return _TrainingGraph(core, positions, params, self.warmup, self.clone_outputs, what)
                return _InferenceGraph(core, positions, self.warmup, self.clone_outputs, what)
        except BaseException:
            if rec_before is not None:
                rec.clear()
                rec.update(rec_before)
            raise
        finally:
            # after _graph_capture took the generator out of capture mode, should the capture have failed
            torch.cuda.set_rng_state(rng, positions.device)
