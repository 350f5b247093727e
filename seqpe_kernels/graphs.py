"""CUDA-graph replay of a SeqPE encoder's forward and backward (``GraphedSeqPE``).

Why: a SeqPE step launches ~200 small kernels, and on a GPU the encoder's kernels finish faster than Python can
issue them (measured on an H100: the fused Triton step does ~2.8 ms of GPU work behind ~10 ms of host time).
Capturing the step once and replaying it removes the host cost entirely; the positions of a training step
have a fixed shape (SEQPE_SPEC §6: windows + contrastive + transfer positions, the same count every step).

    enc = FusedSeqPE(...).cuda()
    genc = GraphedSeqPE(enc)                 # wraps, shares the parameters
    pe = genc(positions)                     # first call per (shape, mode) captures; later calls replay
    loss(pe).backward()                      # the backward replays a captured graph too

One graph pair per key (positions shape/dtype/device, ``module.training``, grad mode, autocast dtype); a
key seen for the first time is captured after ``warmup`` eager iterations on a side stream (so lazy
initialisation, Triton compilation and cuBLAS workspaces stay out of the graph). Training graphs come from
``torch.cuda.make_graphed_callables`` (forward + backward, parameter gradients accumulated by autograd as
usual); no-grad graphs are a plain forward capture. Dropout stays random: the kernels' Philox seeds are drawn
with torch's CUDA generator inside the graph, and captured generator calls advance on every replay.

Constraints (the usual CUDA-graph ones, checked where cheap):
* the encoder's weights must stay the same tensors (in-place optimizer updates are fine; ``.to()`` or
  ``load_state_dict(assign=True)`` after capture is not: call ``reset()``);
* a call must not synchronise with the host, so deduplication (``torch.unique``) is bypassed: the graph runs
  the plain fused forward, which is exact anyway;
* position validation is the device-side assert of the fused path (``check_range``), which cannot raise a
  Python exception from inside a graph: out-of-range positions abort the CUDA context. Validate untrusted
  positions before calling (``seqpe_kernels.tokenize.check_positions``).
Outputs are cloned out of the graph's static buffer by default (``clone_outputs=False`` saves that copy, but
then a returned tensor is overwritten by the next replay).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["GraphedSeqPE"]


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


class GraphedSeqPE(nn.Module):
    def __init__(self, module: nn.Module, warmup: int = 3, clone_outputs: bool = True):
        super().__init__()
        self.module = module
        self.warmup = int(warmup)
        self.clone_outputs = clone_outputs
        self._graphs: Dict[Tuple, object] = {}
        self._hooks: list = []

    def reset(self):
        """Drop every captured graph (after moving the module or replacing its parameters)."""
        self._graphs.clear()
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _guard_grads(self):
        """make_graphed_callables hands out parameter gradients that live in the graph's static buffers, and
        autograd may install such a tensor as ``p.grad`` as is, so the next replay would overwrite a gradient
        the caller still holds (caught by tests/test_graphs.py on an H100). A post-accumulate hook gives each
        parameter its own copy whenever its .grad is not already its own (one copy of the gradients per step)."""
        if self._hooks:
            return

        def hook(p):
            g = p.grad
            if g is not None and not getattr(g, "_seqpe_own_grad", False):  # a mark, so no reference is kept
                p.grad = g.clone()
                p.grad._seqpe_own_grad = True

        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in self.module.parameters()
                       if p.requires_grad]

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _key(self, positions: torch.Tensor) -> Tuple:
        ac = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        params = list(self.module.parameters())  # one module traversal per call
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        ptrs = tuple((p.data_ptr(), p.dtype) for p in params)
        return (tuple(positions.shape), positions.dtype, positions.device, self.module.training, grad, ac, ptrs)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if not isinstance(positions, torch.Tensor) or not positions.is_cuda:
            raise ValueError("GraphedSeqPE needs positions as a CUDA tensor (CUDA graphs run on the GPU); "
                             f"got {type(positions).__name__}"
                             + (f" on {positions.device}" if isinstance(positions, torch.Tensor) else ""))
        if positions.is_floating_point() or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
        key = self._key(positions)
        g = self._graphs.get(key)
        if g is None:
            g = self._capture(positions, key)
            self._graphs[key] = g
        out = g(positions)
        return out.clone() if self.clone_outputs else out

    def _capture(self, positions: torch.Tensor, key: Tuple):
        _, _, _, training, grad, ac, _ = key
        core = _Core(self.module, ac).train(training)
        if grad:
            # the caller's autocast (if any) is re-entered inside _Core with caching off; make_graphed_callables
            # refuses to capture under a caching autocast, so the outer one is switched off around the capture
            with torch.autocast("cuda", enabled=False):
                graphed = torch.cuda.make_graphed_callables(core, (positions.clone(),),
                                                            num_warmup_iters=self.warmup)
            self._guard_grads()
            return graphed
        # captured outside inference mode, so the static input is a normal tensor that both no_grad and
        # inference_mode callers can copy into (an inference tensor refuses in-place writes outside it)
        with torch.inference_mode(False), torch.no_grad():
            static_in = positions.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(self.warmup):
                    core(static_in)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = core(static_in)

        def replay(pos):
            static_in.copy_(pos)
            graph.replay()
            return static_out
        return replay
