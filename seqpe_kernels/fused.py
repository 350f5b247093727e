"""FusedSeqPE: the reference module's parameters and state dict, with a fused forward/backward.

Per block: [residual + dropout + LayerNorm] -> c_attn GEMM -> tiny attention -> c_proj GEMM -> [residual +
dropout + LN] -> c_fc GEMM -> gelu_new -> c_proj GEMM -> ... GEMMs stay in cuBLAS (torch.addmm, so autocast
casts them exactly as in the reference); everything between them is one Triton op. The last block runs
CLS-only (SEQPE_SPEC §2.8): non-CLS rows only need LN1 and their K/V projections, because only the CLS row
of the final layer reaches the output. Backends are chosen in seqpe_kernels.backend.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch.utils.hooks import RemovableHandle

from . import backend as _backend
from . import encoder as _enc
from .reference.seqpe import LIVE_PER_BLOCK, SeqPE, _check_eps
from .reference.tokenize import check_positions, tokenize


def _compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    # autocast casts float32 GEMM inputs to its dtype and leaves float64 alone
    if param_dtype != torch.float64 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


_EXT: list = []


def _ext_ops():
    """torch.ops.seqpe_ext, loaded once (the backend resolver already checked that it loads)."""
    if not _EXT:
        from . import _ext

        _EXT.append(_ext.load())
    return _EXT[0]


def _refuse_submodule_hooks(m) -> None:
    """The fused path never calls the encoder's submodules, so hooks on them would silently not fire: refuse."""
    hooked, todo = [], [("", m)]
    while todo:
        prefix, mod = todo.pop()
        for name, c in mod._modules.items():
            full = prefix + name
            if c._forward_hooks or c._forward_pre_hooks or c._backward_hooks or c._backward_pre_hooks:
                hooked.append(full)
            todo.append((full + ".", c))
    if hooked:
        raise RuntimeError(f"hooks on the encoder's submodule(s) {', '.join(sorted(hooked))}: the fused forward "
                           "does not run the submodules, so they would not fire. Remove them (hooks on the encoder "
                           "module itself are fine), or run it unfused (backend='torch'; a patched module: "
                           "seqpe_kernels.unpatch).")


_fwd_ad = torch.autograd.forward_ad
if not hasattr(_fwd_ad, "_current_level"):  # pragma: no cover - a torch without it: no dual level is ever seen
    _fwd_ad = type("_NoLevel", (), {"_current_level": -1})
_functorch_level = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)


class FusedSeqPE(SeqPE):
    """Drop-in replacement for :class:`SeqPE` (same constructor plus ``backend``, ``dedup`` and
    ``dedup_in_training``; same state dict).

    backend: "auto" (Triton on CUDA tensors, else the best CPU path, else eager), "triton", "cuda", "cpu" or
    "torch" (the eager reference). An explicit backend that cannot run raises BackendUnavailable with the
    reason; "auto" warns once when it falls back.
    """

    def __init__(self, *args, backend: str = "auto", dedup: str = "auto", dedup_in_training: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if backend not in ("auto",) + _backend.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose auto, {', '.join(_backend.BACKENDS)}")
        if dedup not in ("auto", "off", "unique", "prefix"):
            raise ValueError(f"unknown dedup {dedup!r}; choose auto, off, unique or prefix")
        self.backend = backend
        # Deduplication of repeated work inside one call (seqpe_kernels.savings.dedup): "unique" encodes identical
        # positions once; "prefix" (causal only) computes each shared decimal prefix once. Both are exact
        # when dropout is inactive; with dropout active they correlate masks across sequences, so they run
        # in training only with dedup_in_training=True. "auto" = "unique" exactly where it is exact.
        self.dedup = dedup
        self.dedup_in_training = dedup_in_training
        # test hook: when set to {}, the fused path fills it with the dropout keep-masks it drew, in the
        # reference's site names and shapes, so SeqPE.dropout_masks can replay them (parity with dropout on)
        self.record_dropout_masks: Optional[Dict[str, torch.Tensor]] = None

    @classmethod
    def from_reference(cls, module: SeqPE, backend: str = "auto", **options) -> "FusedSeqPE":
        """A FusedSeqPE with the same configuration and weights (copied) as a reference SeqPE."""
        p = next(module.parameters())
        new = cls(**module.config(), backend=backend, **options).to(device=p.device, dtype=p.dtype)
        new.load_state_dict(module.state_dict(), strict=True)
        new.train(module.training)
        new.check_range = module.check_range
        return new

    def extra_repr(self):
        return super().extra_repr() + f", backend={self.backend!r}"

    def resolved_backend(self, device) -> str:
        device = torch.device(device)
        if torch.compiler.is_compiling():
            return _backend.resolve(self, self.backend, device)
        if _fwd_ad._current_level >= 0 or _functorch_level() is not None:
            # forward-mode AD (a dual level is open) or a torch.func transform (jvp, vmap, grad): the fused kernels
            # carry no tangents and have no batching rule (tangents came out missing or wrong, silently), the eager
            # reference's ATen ops have both. ~0.05 us per call
            return "torch"
        # cached per (device, requested backend): availability does not change within a process, and the
        # checks (environment, extension status, config) cost ~10 us per call on the host
        key = (device, _backend.requested_backend(self.backend))
        cache = self.__dict__.setdefault("_resolved", {})
        name = cache.get(key)
        if name is None:
            name = cache[key] = _backend.resolve(self, self.backend, device)
        return name

    # ------------------------------------------------------------------ entry points
    def _dropout_active(self) -> bool:
        """Whether any dropout layer drops now (its own p and train / eval mode, as nn.Dropout)."""
        live = self._live()
        return any(live[i] > 0 for i in range(len(live) - 1) if i % LIVE_PER_BLOCK < 3)  # (3 dropout p's first)

    def _dedup_mode(self) -> str:
        """The deduplication this call uses: "off", "unique" or "prefix" (depends on the configuration and the
        train/eval mode only, not on the data)."""
        mode = self.dedup
        # unique / prefix sync with the host and give data-dependent shapes: not in a compiled graph, nor under a
        # torch.func transform (vmap has no batching rule for unique; the call runs the eager reference anyway)
        if mode == "off" or torch.compiler.is_compiling() or _functorch_level() is not None:
            return "off"
        exact = not self._dropout_active()
        if mode == "auto":
            return "unique" if exact else "off"
        if not exact and not self.dedup_in_training:
            raise RuntimeError(f"dedup={self.dedup!r} with dropout active correlates dropout masks across "
                               "sequences (not the reference's training); pass dedup_in_training=True to "
                               "accept that, or use dedup='auto'")
        return mode

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Integer positions ``[M]`` / ``[M, data_dim]`` -> ``[M, out_dim]``: choose the plan (dedup mode) once,
        validate the positions once, run."""
        mode = self._dedup_mode()
        # prefix sharing syncs with the host anyway (its trie): it always checks the range
        pos = check_positions(positions, self.max_digits, self.base, self.data_dim,
                              self.check_range or mode == "prefix")
        if mode == "prefix" and pos.shape[0] > 1:  # the prefix trie of the validated positions
            from .savings.dedup import prefix_shared_forward

            self._check_hooks()  # (the prefix path reads the weights directly, as the fused kernels do)
            return prefix_shared_forward(self, pos, allow_in_training=True, validated=True)
        if mode == "unique" and pos.shape[0] > 1:
            from .savings.dedup import unique_positions

            uniq, inverse = unique_positions(pos, self.base ** self.max_digits)
            if uniq.shape[0] < pos.shape[0]:
                return self._encode(uniq)[inverse]
        return self._encode(pos)

    def _forward_positions(self, positions: torch.Tensor, validated: bool = False) -> torch.Tensor:
        """The plain forward (no deduplication, no host sync besides the range check): what GraphedSeqPE captures.
        ``validated``: the range check already ran on these positions (it is a host sync): not again."""
        check = self.check_range and not validated
        return self._encode(check_positions(positions, self.max_digits, self.base, self.data_dim, check))

    def _encode(self, pos: torch.Tensor) -> torch.Tensor:
        """Validated int64 positions [M, d] -> [M, out_dim] on the resolved backend."""
        name = self.resolved_backend(pos.device)
        if name == "torch" or self.mask_padding:  # the pad mask tensor: the tokenizer builds it on device
            digits, pad_mask = tokenize(pos, self.max_digits, self.base, self.data_dim, check_range=False)
            if name == "torch":
                out = super().forward_digits(digits, pad_mask)
            else:
                out = self._fused(digits, pad_mask, from_positions=False, name=name)
            if not self.check_range:  # unvalidated: the tokenizer wrapped out-of-range positions to their low
                # digits; their rows come out NaN, as the in-kernel tokenizer's do (no host sync)
                bad = ((pos < 0) | (pos >= self.base ** self.max_digits)).any(1, keepdim=True)
                out = out.masked_fill(bad, float("nan"))
            return out
        return self._fused(pos, None, from_positions=True, name=name)

    def forward_digits(self, digits: torch.Tensor, pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        name = self.resolved_backend(digits.device)
        if name == "torch":
            return super().forward_digits(digits, pad_mask)
        digits, pad_mask = self._check_digits(digits, pad_mask)
        return self._fused(digits, pad_mask if self.mask_padding else None, from_positions=False, name=name)

    # ------------------------------------------------------------------ fused path
    def _plan(self, cdt: torch.dtype, from_positions: bool) -> "_enc.Plan":
        """The data-independent facts of a call, cached per (compute dtype, mode, input kind); rebuilt when a
        configuration attribute it reads has changed."""
        training = self.training
        if torch.compiler.is_compiling():  # traced once per graph: no cache to mutate
            return self._build_plan(cdt, from_positions)
        self._check_hooks()
        key = (cdt, training, from_positions, self._live(), self.temperature, self.attn_direction,
               self.use_last_layernorm)
        cache = self.__dict__.setdefault("_plans", {})
        plan = cache.get(key)
        if plan is None:
            plan = self._build_plan(cdt, from_positions)
            if self._live() == key[3] and self.training == training:
                # (kept only if nothing it reads changed while it was built: another thread switching train /
                # eval in between would otherwise leave a plan with the other mode's dropout under this key)
                cache[key] = plan
        return plan

    def _check_hooks(self):
        """Hooks on submodules never fire on the fused paths: refused (looked at again only when a hook was
        registered anywhere since the last look: every hook gets a handle)."""
        if self.__dict__.get("_hooks_seen") != RemovableHandle.next_id:
            _refuse_submodule_hooks(self)
            self.__dict__["_hooks_seen"] = RemovableHandle.next_id

    def _build_plan(self, cdt: torch.dtype, from_positions: bool) -> "_enc.Plan":
        D, H = self.embed_dim, self.num_heads
        p_res, p_att = self._active_dropout()  # the dropout layers' own p and mode, not the module's flag
        for ln in self._layernorms():  # (a negative eps is the encoder's "no final LayerNorm" sentinel)
            _check_eps(ln.eps, "a LayerNorm's eps")
        return _enc.Plan(
            D=D, H=H, K=self.max_digits, L=self.seq_len - 1, T=self.seq_len, base=self.base,
            data_dim=self.data_dim, nl=self.num_layers, causal=self.attn_direction == "causal",
            sdiv=float(D // H) ** 0.5 if self.scale_attn_weights else 1.0,
            p_res=p_res, p_att=p_att,
            inv_tau=1 / self.temperature, eps1=tuple(b.layernorm_1.eps for b in self.transformers),
            eps2=tuple(b.layernorm_2.eps for b in self.transformers),
            epsf=self.layernorm.eps if self.use_last_layernorm else -1.0, from_positions=from_positions,
            cdt_code=_enc.DTYPE_CODES[cdt])


    def _fused(self, x, pad_mask, from_positions: bool, name: str):
        """Eager: the whole encoder as one autograd node (seqpe_kernels.encoder: Triton in Python, the C++/CUDA
        backends in C++). Under torch.compile: the same layer sequence over the registered seqpe:: operators
        (each with its fake and autograd formula), which is what the compiler traces."""
        dev = x.device
        cls = self._parameters.get("cls_token_embed")
        cdt = _compute_dtype(dev, (cls if cls is not None else self.cls_token_embed).dtype)  # (parametrized: computed)
        plan = self._plan(cdt, from_positions)
        seeds = None
        rec = self.record_dropout_masks
        compiling = torch.compiler.is_compiling()
        if (plan.p_res > 0 or plan.p_att > 0) and (name == "triton" or rec is not None or compiling):
            # per layer: attention probs, attn residual, mlp residual; from torch's RNG (torch.manual_seed
            # reproduces a run; CUDA graphs replay the draw). The C++ encoder draws the same itself when given
            # none (one Python-level call less per step).
            seeds = torch.randint(0, 2 ** 31 - 1, (3 * plan.nl,), device=dev, dtype=torch.int64)
        if pad_mask is not None:
            given = pad_mask
            pad_mask = pad_mask.to(torch.float32).contiguous()
            if pad_mask is given and torch.is_grad_enabled() and not compiling:
                # the backward reads the mask again: a private copy, so that a caller refilling theirs before the
                # backward gets the gradients of this call, as from the eager module (which keeps none of it)
                pad_mask = pad_mask.clone()
        if rec is not None and seeds is not None:
            from .ops._common import IMPL_EXT, IMPL_TRITON

            self._record_masks(rec, seeds, x.shape[0], plan.p_res, plan.p_att,
                               IMPL_TRITON if name == "triton" else IMPL_EXT)
        params = _enc.flat_params(self)
        clamp = not self.check_range
        if compiling:
            from .ops._common import IMPL_EXT, IMPL_TRITON

            prims = _enc.operator_prims(IMPL_TRITON if name == "triton" else IMPL_EXT)
            return _enc.forward(plan, prims, x, pad_mask, seeds, params, save=False, clamp_rows=clamp)[0]
        if name == "triton":
            return _enc.run(plan, _enc.triton_runner(), x, pad_mask, seeds, params, clamp)
        return _enc.ext_encoder(plan, _ext_ops(), x, pad_mask, seeds, params, clamp)

    def _record_masks(self, rec, seeds, M, p_res, p_att, impl):
        """Fill ``rec`` with the keep-masks the kernels will draw, shaped like the reference's sites. Every
        fused backend draws the same Philox stream (offset = flat index of the site's tensor). The call's masks
        go in with one ``dict.update`` (atomic under the GIL): calls from several threads leave one call's
        complete set, never a mix of two calls' sites."""
        from .ops._common import IMPL_EXT

        # the C++ backend's stream drawn by the Triton kernel where Triton runs on CUDA (the same Philox stream,
        # tests/test_ext.py; on the device, so no host read of the seeds: recording works inside a CUDA-graph
        # capture, where that read fails the capture); elsewhere by the extension's host copy of the stream
        host = impl == IMPL_EXT and not (seeds.is_cuda and _backend.triton_status(seeds.device)[0])

        def keep(idx, shape, p):
            if host:
                from ._ext import load

                n = 1
                for s_ in shape:
                    n *= s_
                return load().dropout_keep_mask(int(seeds[idx]), n, p, 0).to(seeds.device).view(*shape)
            from .ops import dropout_keep_mask

            return dropout_keep_mask(seeds, idx, shape, p)

        D, H, T, nl = self.embed_dim, self.num_heads, self.seq_len, self.num_layers
        dev = seeds.device
        out = {}
        for i in range(nl):
            last = i == nl - 1
            TQ = 1 if last else T
            if p_att > 0:  # attention offsets ((m*H + h)*TQ + i)*T + j are the flat index of [M, H, TQ, T]
                full = torch.ones(M, H, T, T, device=dev)
                full[:, :, T - TQ:] = keep(3 * i, (M, H, TQ, T), p_att)
                out[f"attn{i}"] = full
            if p_res > 0:
                for site, idx in ((f"resid_attn{i}", 3 * i + 1), (f"resid_mlp{i}", 3 * i + 2)):
                    if last:
                        full = torch.ones(M, T, D, device=dev)
                        full[:, T - 1] = keep(idx, (M, D), p_res)
                    else:
                        full = keep(idx, (M * T, D), p_res).view(M, T, D)
                    out[site] = full
        held = dict(rec)  # the masks replaced stay alive until after the update: a tensor freed inside it can
        rec.update(out)   # let another thread run (measured: mixed sets without this)
        del held
