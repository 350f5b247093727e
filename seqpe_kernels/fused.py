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
import torch.nn.functional as F

from . import backend as _backend
from . import encoder as _enc
from .reference.seqpe import SeqPE
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


class FusedSeqPE(SeqPE):
    """Drop-in replacement for :class:`SeqPE` (same constructor plus ``backend``; same state dict).

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
        # Deduplication of repeated work inside one call (seqpe_kernels.dedup): "unique" encodes identical
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
        return self.training and (self.resid_pdrop > 0 or self.attn_pdrop > 0)

    def _dedup_mode(self) -> str:
        """The deduplication this call uses: "off", "unique" or "prefix" (depends on the configuration and the
        train/eval mode only, not on the data)."""
        mode = self.dedup
        if mode == "off" or torch.compiler.is_compiling():  # unique / prefix sync with the host: not in a graph
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
        pos = check_positions(positions, self.max_digits, self.base, self.data_dim, self.check_range)
        if mode == "prefix" and pos.shape[0] > 1:  # the prefix trie of the validated positions
            from .dedup import prefix_shared_forward

            return prefix_shared_forward(self, pos, allow_in_training=True, validated=True)
        if mode == "unique" and pos.shape[0] > 1:
            uniq, inverse = torch.unique(pos, dim=0, return_inverse=True)
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
                return super().forward_digits(digits, pad_mask)
            return self._fused(digits, pad_mask, from_positions=False, name=name)
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
        key = (cdt, training, from_positions, self.resid_pdrop, self.attn_pdrop, self.temperature,
               self.attn_direction, self.scale_attn_weights, self.use_last_layernorm)
        cache = self.__dict__.setdefault("_plans", {})
        plan = cache.get(key)
        if plan is None:
            from .ops._common import CODES

            D, H = self.embed_dim, self.num_heads
            plan = _enc.Plan(
                D=D, H=H, K=self.max_digits, L=self.seq_len - 1, T=self.seq_len, base=self.base,
                data_dim=self.data_dim, nl=self.num_layers, causal=self.attn_direction == "causal",
                sdiv=float(D // H) ** 0.5 if self.scale_attn_weights else 1.0,
                p_res=self.resid_pdrop if training else 0.0, p_att=self.attn_pdrop if training else 0.0,
                inv_tau=1 / self.temperature, eps1=tuple(b.layernorm_1.eps for b in self.transformers),
                eps2=tuple(b.layernorm_2.eps for b in self.transformers),
                epsf=self.layernorm.eps if self.use_last_layernorm else -1.0, from_positions=from_positions,
                cdt_code=CODES[cdt])
            cache[key] = plan
        return plan


    def _fused(self, x, pad_mask, from_positions: bool, name: str):
        """Eager: the whole encoder as one autograd node (seqpe_kernels.encoder). Under torch.compile: the
        per-op dataflow below, whose seqpe:: operators the compiler sees."""
        if torch.compiler.is_compiling():
            return self._fused_ops(x, pad_mask, from_positions, name)
        dev = x.device
        cdt = _compute_dtype(dev, self._parameters["cls_token_embed"].dtype)
        plan = self._plan(cdt, from_positions)
        seeds = None
        if plan.p_res > 0 or plan.p_att > 0:  # per layer: attention probs, attn residual, mlp residual; from
            # torch's RNG (torch.manual_seed reproduces a run; CUDA graphs replay the draw)
            seeds = torch.randint(0, 2 ** 31 - 1, (3 * plan.nl,), device=dev, dtype=torch.int64)
        if pad_mask is not None:
            pad_mask = pad_mask.to(torch.float32).contiguous()
        rec = self.record_dropout_masks
        if rec is not None and seeds is not None:
            from .ops._common import IMPL_EXT, IMPL_TRITON

            self._record_masks(rec, seeds, x.shape[0], plan.p_res, plan.p_att,
                               IMPL_TRITON if name == "triton" else IMPL_EXT)
        params = _enc.flat_params(self)
        if name == "triton":
            return _enc.run(plan, _enc.triton_runner(), x, pad_mask, seeds, params, not self.check_range)
        return _enc.ext_encoder(plan, _ext_ops(), x, pad_mask, seeds, params, not self.check_range)

    def _fused_ops(self, x, pad_mask, from_positions: bool, name: str):
        from . import ops as K  # eager: the ops' bodies via autograd.Function; compiled: the seqpe:: operators
        from .ops._common import IMPL_EXT, IMPL_TRITON

        impl = IMPL_TRITON if name == "triton" else IMPL_EXT  # "cpu" / "cuda": the C++/CUDA extension
        dev = x.device
        M = x.shape[0]
        D, H, T, L = self.embed_dim, self.num_heads, self.seq_len, self.seq_len - 1
        R = M * T
        cdt = _compute_dtype(dev, self.cls_token_embed.dtype)
        cdt_code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}[cdt]
        causal = self.attn_direction == "causal"
        sdiv = float(self.embed_dim // self.num_heads) ** 0.5 if self.scale_attn_weights else 1.0
        p_res = self.resid_pdrop if self.training else 0.0
        p_att = self.attn_pdrop if self.training else 0.0
        nl = self.num_layers
        seeds = None
        if p_res > 0 or p_att > 0:
            from .ops._common import new_seeds

            seeds = new_seeds(3 * nl, dev)  # per layer: attention probs, attn residual, mlp residual
        if pad_mask is not None:
            pad_mask = pad_mask.to(torch.float32).contiguous()
        rec = self.record_dropout_masks
        if rec is not None and seeds is not None:
            self._record_masks(rec, seeds, M, p_res, p_att, impl)

        dim = self.dim_token_embed if self.data_dim > 1 else None
        h0 = K.digit_embed_call(x, self.token_of_seqpe_embed.weight, self.pos_of_seqpe_embed.weight, dim,
                               self.cls_token_embed, from_positions, self.max_digits, impl)
        h = h0.view(R, D)

        # Layer 0 works on a table, not on tokens: a token's embedding, hence LN1 and its q/k/v, depends only on
        # (digit, slot), so LN1 and the c_attn GEMM run on the base*L+1 distinct rows and are gathered per token
        # (exact; no dropout precedes them). This removes the first layer's QKV GEMM over all M*T tokens.
        rows = self._table_rows(x, from_positions)  # [M, T] row ids into the table
        blk0 = self.transformers[0]
        tab = self._embedding_table()
        _, a_tab, _, _ = K.residual_layernorm_call(tab, None, blk0.layernorm_1.weight, blk0.layernorm_1.bias,
                                                  blk0.layernorm_1.eps, 0.0, None, 0, cdt_code, impl)
        a = None  # per-token LN1 output of the current layer (layers >= 1)

        def proj(i, lo, hi):
            """Columns [lo, hi) of layer i's c_attn output for every token: [M, T, hi-lo]."""
            W, b = self.transformers[i].attn.c_attn.weight, self.transformers[i].attn.c_attn.bias
            if i == 0:
                tab_out = torch.addmm(b[lo:hi], a_tab, W[:, lo:hi])
                if tab_out.dtype in (torch.float16, torch.bfloat16):
                    # gather in fp32 so the backward sums the ~M*T/(base*L) gradient rows per table row in
                    # fp32 (as the reference's per-token GEMM does), not in bf16; the forward is lossless
                    return F.embedding(rows, tab_out.float()).to(tab_out.dtype)
                return F.embedding(rows, tab_out)
            return torch.addmm(b[lo:hi], a, W[:, lo:hi]).view(M, T, hi - lo)

        for i in range(nl - 1):  # full blocks
            blk = self.transformers[i]
            nxt = self.transformers[i + 1].layernorm_1
            qkv = proj(i, 0, 3 * D)
            o = K.tiny_attention_call(qkv, None, pad_mask, H, causal, 0, sdiv, p_att, seeds, 3 * i, impl)
            y = torch.addmm(blk.attn.c_proj.bias, o.view(R, D), blk.attn.c_proj.weight)
            ln2 = blk.layernorm_2
            h, a2, _, _ = K.residual_layernorm_call(h, y, ln2.weight, ln2.bias, ln2.eps, p_res, seeds, 3 * i + 1,
                                                   cdt_code, impl)
            z = torch.addmm(blk.mlp.c_fc.bias, a2, blk.mlp.c_fc.weight)
            y = torch.addmm(blk.mlp.c_proj.bias, K.gelu_new_call(z, impl), blk.mlp.c_proj.weight)
            h, a, _, _ = K.residual_layernorm_call(h, y, nxt.weight, nxt.bias, nxt.eps, p_res, seeds, 3 * i + 2,
                                                  cdt_code, impl)

        # last block, CLS row only (plus every row's K/V)
        i = nl - 1
        blk = self.transformers[i]
        Wa, ba = blk.attn.c_attn.weight, blk.attn.c_attn.bias
        kv = proj(i, D, 3 * D)
        if i == 0:  # the CLS query is the same table row for every sequence: one row, broadcast (stride 0)
            q = torch.addmm(ba[:D], a_tab[-1:], Wa[:, :D]).view(1, 1, D).expand(M, 1, D)
        else:
            q = torch.addmm(ba[:D], a.view(M, T, D)[:, T - 1], Wa[:, :D]).view(M, 1, D)
        o = K.tiny_attention_call(q, kv, pad_mask, H, causal, T - 1, sdiv, p_att, seeds, 3 * i, impl)
        y = torch.addmm(blk.attn.c_proj.bias, o.view(M, D), blk.attn.c_proj.weight)
        h_cls = h.view(M, T, D)[:, T - 1].contiguous()
        ln2 = blk.layernorm_2
        h2, a2, _, _ = K.residual_layernorm_call(h_cls, y, ln2.weight, ln2.bias, ln2.eps, p_res, seeds, 3 * i + 1,
                                                cdt_code, impl)
        z = torch.addmm(blk.mlp.c_fc.bias, a2, blk.mlp.c_fc.weight)
        y = torch.addmm(blk.mlp.c_proj.bias, K.gelu_new_call(z, impl), blk.mlp.c_proj.weight)
        if self.use_last_layernorm:
            lnf = self.layernorm
            _, fin, _, _ = K.residual_layernorm_call(h2, y, lnf.weight, lnf.bias, lnf.eps, p_res, seeds, 3 * i + 2,
                                                    cdt_code, impl)
        else:
            fin, _, _, _ = K.residual_layernorm_call(h2, y, None, None, 0.0, p_res, seeds, 3 * i + 2, cdt_code, impl)
        return F.linear(fin, self.out_proj.weight, self.out_proj.bias) * (1 / self.temperature)

    def _embedding_table(self) -> torch.Tensor:
        """[base*L + 1, D]: row b*L + j is the embedding of digit b in slot j ((tok + pos) + dim, the
        reference's order, so rows are bit-identical to the per-token sums); the last row is CLS."""
        D, L, K = self.embed_dim, self.seq_len - 1, self.max_digits
        tab = self.token_of_seqpe_embed.weight[:, None, :] + self.pos_of_seqpe_embed.weight[None, :, :]
        if self.data_dim > 1:
            tab = tab + self.dim_token_embed.expand(-1, K, -1).reshape(1, L, D)
        return torch.cat([tab.reshape(-1, D), self.cls_token_embed.reshape(1, D)], 0)

    def _table_rows(self, x: torch.Tensor, from_positions: bool) -> torch.Tensor:
        """[M, T] row ids into _embedding_table for positions [M, d] or digits [M, L]."""
        L, K, base = self.seq_len - 1, self.max_digits, self.base
        if from_positions:
            pows = base ** torch.arange(K - 1, -1, -1, device=x.device, dtype=torch.int64)
            digits = (torch.div(x.unsqueeze(-1), pows, rounding_mode="floor") % base).reshape(x.shape[0], L)
        else:
            digits = x
        if not self.check_range:  # unvalidated digit ids: keep the gather in bounds (their rows come out NaN)
            digits = digits.clamp(0, base - 1)
        rows = digits * L + torch.arange(L, device=x.device)
        return torch.cat([rows, rows.new_full((x.shape[0], 1), base * L)], 1)

    def _record_masks(self, rec, seeds, M, p_res, p_att, impl):
        """Fill ``rec`` with the keep-masks the kernels will draw, shaped like the reference's sites. Every
        fused backend draws the same Philox stream (offset = flat index of the site's tensor)."""
        from .ops._common import IMPL_EXT

        def keep(idx, shape, p):
            if impl == IMPL_EXT:  # the extension's host copy of the stream (no Triton needed)
                from ._ext import load

                n = 1
                for s_ in shape:
                    n *= s_
                return load().dropout_keep_mask(int(seeds[idx]), n, p, 0).to(seeds.device).view(*shape)
            from .ops import dropout_keep_mask

            return dropout_keep_mask(seeds, idx, shape, p)

        D, H, T, nl = self.embed_dim, self.num_heads, self.seq_len, self.num_layers
        dev = seeds.device
        for i in range(nl):
            last = i == nl - 1
            TQ = 1 if last else T
            if p_att > 0:  # attention offsets ((m*H + h)*TQ + i)*T + j are the flat index of [M, H, TQ, T]
                full = torch.ones(M, H, T, T, device=dev)
                full[:, :, T - TQ:] = keep(3 * i, (M, H, TQ, T), p_att)
                rec[f"attn{i}"] = full
            if p_res > 0:
                for site, idx in ((f"resid_attn{i}", 3 * i + 1), (f"resid_mlp{i}", 3 * i + 2)):
                    if last:
                        full = torch.ones(M, T, D, device=dev)
                        full[:, T - 1] = keep(idx, (M, D), p_res)
                    else:
                        full = keep(idx, (M * T, D), p_res).view(M, T, D)
                    rec[site] = full
