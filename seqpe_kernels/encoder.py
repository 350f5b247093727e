"""The whole fused encoder as one autograd boundary (eager mode).

Why: a SeqPE step is ~60 small ops. Run one op at a time, each with its own autograd node and dispatch, the
host cost (Python, dispatcher, autograd engine) exceeds the kernels' own time at the paper's sizes on a GPU
(H100: 2.8 ms of GPU work behind ~10 ms of host time) and dominates on CPU. Here one ``autograd.Function``
runs every layer forward and saves what the backward needs; its backward computes every parameter gradient
in one pass. The kernels are the registered operators' (``seqpe_kernels.ops`` launchers for Triton; the
``seqpe_ext`` operators for the C++/CUDA backends), called directly.

The layer sequence itself (which kernel, which GEMM, what is saved) is written twice, deliberately: here in
Python for the Triton backend, and in C++ (``csrc/encoder.cpp``, one extension call per direction) for the
``cpu`` / ``cuda`` backends, where it replaces ~60 Python-level calls by one. Under torch.compile the same
Python sequence runs over the registered operators (``operator_prims``), which is what the compiler traces;
tests (test_encoder.py, test_fused.py, test_ext.py) hold all three to the reference.

GEMMs: explicit casts to the compute dtype (each weight cast once per call; fp32: no cast), then
``torch.addmm`` -- the same values autocast produces for the reference's ``Conv1D`` / ``nn.Linear``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# dtype codes carried through the operator schemas (as seqpe_kernels.ops._common, without importing triton)
DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Plan:
    """Everything about one encoder call that does not depend on the data (cached per module state)."""
    D: int
    H: int
    K: int
    L: int
    T: int
    base: int
    data_dim: int
    nl: int
    causal: bool
    sdiv: float
    p_res: float
    p_att: float
    inv_tau: float
    eps1: Tuple[float, ...]
    eps2: Tuple[float, ...]
    epsf: float           # final LayerNorm eps; < 0: no final LayerNorm
    from_positions: bool
    cdt_code: int         # compute dtype of the GEMMs / LN outputs (autocast dtype, else the parameters')

    @property
    def cdt(self) -> torch.dtype:
        return DTYPES[self.cdt_code]

    def ext_config(self, clamp_rows: bool):
        """(icfg, fcfg) lists of csrc/encoder.cpp."""
        cache = self.__dict__.get("_ext_cfg")
        if cache is None:
            icfg = [self.D, self.H, self.K, self.L, self.T, self.base, self.data_dim, self.nl, int(self.causal),
                    int(self.from_positions), self.cdt_code]
            fcfg = [self.sdiv, self.p_res, self.p_att, self.inv_tau, self.epsf, *self.eps1, *self.eps2]
            cache = (icfg + [0], icfg + [1], fcfg)
            object.__setattr__(self, "_ext_cfg", cache)
        return (cache[1] if clamp_rows else cache[0]), cache[2]


def flat_params(m) -> List[Optional[torch.Tensor]]:
    """The module's parameters in the order the encoder functions take them:
    tok, pos, dim (or None), cls; per layer ln1.w, ln1.b, c_attn.w, c_attn.b, attn.c_proj.w, .b, ln2.w, ln2.b,
    c_fc.w, c_fc.b, mlp.c_proj.w, .b; final ln.w, .b (or None, None); out_proj.w, .b.
    Read through the modules' own dicts (nn.Module.__getattr__ made this ~45 us per call on the dev CPU), so a
    replaced parameter or submodule is always picked up. A tensor missing from those dicts is read through
    getattr, for every tensor: a parametrized one (torch.nn.utils.parametrize: weight_norm, orthogonal, ...; the
    fused node's gradient then flows into its parametrization), an nn.DataParallel replica's (replicate() empties
    ``_parameters`` and sets the broadcast copies as plain attributes), a plain tensor put where a parameter was
    (``del lin.weight; lin.weight = w``, as hypernetworks do)."""
    try:
        return _flat_params(m, _own)
    except KeyError:
        try:
            return _flat_params(m, _Computed)
        except AttributeError as e:
            raise AttributeError(f"the SeqPE encoder is missing a weight of its layout ({e}); it cannot run "
                                 "fused") from None


def _own(mod):  # (a plain function: torch.compile traces flat_params, and Dynamo cannot trace attrgetter)
    return mod._parameters


class _Computed:
    """A module's tensors through nn.Module.__getattr__ (parametrizations computed), read like its _parameters."""
    __slots__ = ("mod",)

    def __init__(self, mod):
        self.mod = mod

    def __getitem__(self, k):
        return getattr(self.mod, k)

    def get(self, k, default=None):
        return getattr(self.mod, k, default)


def _flat_params(m, params) -> List[Optional[torch.Tensor]]:
    mods, prm = m._modules, params(m)
    # (dim_token_embed exists only for data_dim > 1: read with [] then, so that a plain tensor in its slot falls
    # back to getattr like any other instead of reading as absent)
    ps = [params(mods["token_of_seqpe_embed"])["weight"], params(mods["pos_of_seqpe_embed"])["weight"],
          prm["dim_token_embed"] if m.data_dim > 1 else prm.get("dim_token_embed"), prm["cls_token_embed"]]
    for blk in mods["transformers"]._modules.values():
        bm = blk._modules
        at, ml = bm["attn"]._modules, bm["mlp"]._modules
        l1, l2 = params(bm["layernorm_1"]), params(bm["layernorm_2"])
        ca, cp, fc, mp = (params(at["c_attn"]), params(at["c_proj"]), params(ml["c_fc"]), params(ml["c_proj"]))
        ps += [l1["weight"], l1["bias"], ca["weight"], ca["bias"], cp["weight"], cp["bias"], l2["weight"], l2["bias"],
               fc["weight"], fc["bias"], mp["weight"], mp["bias"]]
    ln = mods.get("layernorm")
    if ln is not None and m.use_last_layernorm:
        lp = params(ln)
        ps += [lp["weight"], lp["bias"]]
    else:
        ps += [None, None]
    op = params(mods["out_proj"])
    ps += [op["weight"], op["bias"]]
    return ps


class Prims:
    """One backend's kernels, called directly (no torch.library dispatch, no per-op autograd node).
    ``gather``: layer 0's per-token gather of the table's q/k/v rows; ``gather_bwd`` its backward (the table
    gradient)."""

    def __init__(self, embed_fwd, embed_bwd, rln_fwd, rln_bwd, attn_fwd, attn_bwd, gelu_fwd, gelu_bwd,
                 gather=None, gather_bwd=None, embed_rows: bool = False, attn_rows: bool = False,
                 cast_group=None, rln_row_view: bool = False, ln_partial_rows=None):
        self.embed_fwd, self.embed_bwd = embed_fwd, embed_bwd
        # embed_fwd(..., with_rows=True, with_table=True) also returns layer 0's table rows and the table itself
        self.embed_rows = embed_rows
        # attn_fwd / attn_bwd(..., rows=rows) read layer 0's q/k/v from the table by row index (no gather)
        self.attn_rows = attn_rows
        # cast_group(tensors, dtype): the GEMM weights' casts in one launch; not differentiable, so only for
        # runners whose backward is the encoder's own (the traced path casts tensor by tensor for autograd)
        self.cast_group = cast_group
        # rln_fwd reads a row view of the residual stream in place (the last block's CLS rows: no copy)
        self.rln_row_view = rln_row_view
        # ln_partial_rows(R, device): programs of a LayerNorm backward; rln_bwd(..., part=, dh_every=) then writes
        # its partial sums into a slice of one workspace for backward's single reduction (_LNParts)
        self.ln_partial_rows = ln_partial_rows
        self.rln_fwd, self.rln_bwd = rln_fwd, rln_bwd
        self.attn_fwd, self.attn_bwd = attn_fwd, attn_bwd
        self.gelu_fwd, self.gelu_bwd = gelu_fwd, gelu_bwd
        self.gather = gather or _gather
        self.gather_bwd = gather_bwd or _gather_bwd


def operator_prims(impl: int) -> Prims:
    """The registered ``seqpe::`` operators (fake + autograd formula each) as prims, for the traced path: under
    torch.compile ``forward`` runs over these and autograd differentiates it op by op (no ``backward`` here).
    The layer-0 gather then runs in fp32 so that autograd's embedding backward accumulates in fp32."""
    from .ops import digit_embed_call, gelu_new_call, residual_layernorm_call, tiny_attention_call

    def embed_fwd(x, tok, pos, dim, cls, from_positions, K):
        return digit_embed_call(x, tok, pos, dim, cls, from_positions, K, impl)

    def rln_fwd(x, y, w, b, eps, p, seeds, idx, code):
        return residual_layernorm_call(x, y, w, b, eps, p, seeds, idx, code, impl)

    def attn_fwd(q, kv, pad, H, causal, q_start, sdiv, p, seeds, idx):
        return tiny_attention_call(q, kv, pad, H, causal, q_start, sdiv, p, seeds, idx, impl)

    def gelu_fwd(z):
        return gelu_new_call(z, impl)

    return Prims(embed_fwd, None, rln_fwd, None, attn_fwd, None, gelu_fwd, None, gather=_gather_fp32)


_TRITON: list = []
_TRITON_RUNNER: list = []


def triton_runner() -> "PythonRunner":
    if not _TRITON_RUNNER:
        _TRITON_RUNNER.append(PythonRunner(triton_prims()))
    return _TRITON_RUNNER[0]


def triton_prims() -> Prims:
    if not _TRITON:
        from .ops.attention import tiny_attention_backward, tiny_attention_forward
        from .ops.digit_embed import digit_embed_backward, digit_embed_forward
        from .ops.gelu import gelu_backward, gelu_forward
        from .ops.layernorm import partial_rows, residual_layernorm_backward, residual_layernorm_forward
        from .ops.table_grad import table_grad

        def gather_bwd(g, rows, n):  # g [M, T, C], T = L + 1; the sums in fp32 (fp64), as _gather_bwd
            return table_grad(g, rows, n, g.shape[1] - 1, acc_out=True)

        def rln_fwd(x, y, w, b, eps, p, seeds, idx, code):
            return residual_layernorm_forward(x, y, w, b, eps, p, seeds, idx, code, row_view=True)

        _TRITON.append(Prims(digit_embed_forward, digit_embed_backward, rln_fwd, residual_layernorm_backward,
                             tiny_attention_forward, tiny_attention_backward, gelu_forward, gelu_backward,
                             gather_bwd=gather_bwd, embed_rows=True, attn_rows=True, cast_group=cast_group,
                             rln_row_view=True, ln_partial_rows=partial_rows))
    return _TRITON[0]


# ------------------------------------------------------------------------------------------- helpers
def embedding_table(tok, pos, dim, cls, L: int, K: int, data_dim: int) -> torch.Tensor:
    """[base*L + 1, D]: row b*L + j is digit b in slot j ((tok + pos) + dim: the reference's order, so rows are
    bit-identical to its per-token sums); the last row is CLS."""
    D = tok.shape[1]
    tab = tok[:, None, :] + pos[None, :, :]
    if data_dim > 1:
        tab = tab + dim.expand(-1, K, -1).reshape(1, L, D)
    return torch.cat([tab.reshape(-1, D), cls.reshape(1, D)], 0)


def table_rows(x: torch.Tensor, from_positions: bool, L: int, K: int, base: int, clamp: bool) -> torch.Tensor:
    """[M, T] row ids into embedding_table for positions [M, d] or digits [M, L]."""
    if from_positions:
        pows = base ** torch.arange(K - 1, -1, -1, device=x.device, dtype=torch.int64)
        digits = (torch.div(x.unsqueeze(-1), pows, rounding_mode="floor") % base).reshape(x.shape[0], L)
    else:
        digits = x
    if clamp:  # unvalidated digit ids (check_range=False): keep the gather in bounds (their rows come out NaN)
        digits = digits.clamp(0, base - 1)
    rows = digits * L + torch.arange(L, device=x.device)
    return torch.cat([rows, rows.new_full((x.shape[0], 1), base * L)], 1)


def _gather(tab_out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # a gather is lossless in any dtype: one kernel (the per-op path gathers in fp32 so that autograd's backward
    # accumulates in fp32; here the backward is _gather_bwd, which does that explicitly)
    return F.embedding(rows, tab_out)


def _gather_fp32(tab_out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    if tab_out.dtype in (torch.float16, torch.bfloat16):
        return F.embedding(rows, tab_out.float()).to(tab_out.dtype)
    return F.embedding(rows, tab_out)


def _gather_bwd(g: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    # the table gradient in the accumulation dtype: the ~M*T/(base*L) gradient rows per table row summed in fp32
    # (as the reference's per-token GEMM accumulates) and not rounded back to bf16 (the table's GEMMs are tiny)
    if g.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten.embedding_dense_backward(g.float(), rows, n, -1, False)
    return torch.ops.aten.embedding_dense_backward(g, rows, n, -1, False)


def _cast(t: Optional[torch.Tensor], dt: torch.dtype):
    return t if t is None or t.dtype == dt else t.to(dt)


_MM_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=) usable on CUDA (probed on first use)


def _wgrad(A: torch.Tensor, B: torch.Tensor, like: Optional[torch.Tensor]) -> torch.Tensor:
    """A @ B as the gradient of parameter ``like``, in its dtype. For half GEMM inputs and an fp32 parameter on
    CUDA: one cuBLAS GEMM writing fp32 (``torch.mm(..., out_dtype=torch.float32)``) instead of a half result and a
    cast kernel per weight (about a dozen per text step), and the fp32 accumulator is not rounded to half first.
    Elsewhere, or where this torch has no such GEMM: mm, then the cast (``_to``)."""
    dt = like.dtype if like is not None else A.dtype
    if (dt == torch.float32 and A.dtype in (torch.bfloat16, torch.float16) and A.is_cuda and _MM_OUT_DTYPE[0]):
        try:
            return torch.mm(A, B, out_dtype=dt)
        except (TypeError, RuntimeError, NotImplementedError):  # no such overload / dtype here: cast as before
            _MM_OUT_DTYPE[0] = False
    return _to(A.mm(B), like)


def _bsum(t: torch.Tensor, like: Optional[torch.Tensor]) -> torch.Tensor:
    """Column sums of t [R, C] as a bias gradient in ``like``'s dtype, accumulated and written in it (one reduction,
    no half result to cast)."""
    dt = like.dtype if like is not None else t.dtype
    return t.sum(0, dtype=dt) if dt != t.dtype and dt.is_floating_point else t.sum(0)


def _to(g: Optional[torch.Tensor], like: Optional[torch.Tensor]):
    """A gradient in its parameter's dtype (the backward of autocast's cast)."""
    return g if g is None or like is None or g.dtype == like.dtype else g.to(like.dtype)


def cast_group(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:
    """``[t.to(dtype) for t in tensors]`` with the casts in one ``_foreach_copy_``: one multi-tensor launch on CUDA
    (its fast path copies across dtypes when the sources share a dtype and each pair its sizes and strides; else
    tensor by tensor), the same ``static_cast`` as ``Tensor.to`` (bit-equal). Tensors already in ``dtype`` are
    returned as they are; the casts are new contiguous tensors. csrc/encoder.cpp's gemm_params does the same."""
    out = list(tensors)
    todo = [j for j, t in enumerate(tensors) if t.dtype != dtype]
    if todo:
        src = [tensors[j] for j in todo]
        dst = [torch.empty(t.shape, dtype=dtype, device=t.device) for t in src]
        torch._foreach_copy_(dst, src)
        for j, d in zip(todo, dst):
            out[j] = d
    return out


def _gemm_params(P: "Prims", plan: Plan, params) -> dict:
    """{parameter index: tensor in the compute dtype} for every GEMM weight and bias, each cast once per call (as
    autocast casts them); with P.cast_group all in one launch (18 cast kernels at the paper's two layers)."""
    fo = 4 + 12 * plan.nl
    idx = [o0 + j for o0 in range(4, fo, 12) for j in (2, 3, 4, 5, 8, 9, 10, 11)] + [fo + 2, fo + 3]
    ts = [params[j] for j in idx]
    if P.cast_group is not None:
        return dict(zip(idx, P.cast_group(ts, plan.cdt)))
    return {j: _cast(t, plan.cdt) for j, t in zip(idx, ts)}


# ------------------------------------------------------------------------------------------- forward
def forward(plan: Plan, P: Prims, x: torch.Tensor, pad: Optional[torch.Tensor], seeds: Optional[torch.Tensor],
            params: Sequence[Optional[torch.Tensor]], save: bool, clamp_rows: bool = False):
    """Returns (out [M, O], saved: dict name -> tensor or None (empty unless ``save``))."""
    D, H, T, L, K, nl = plan.D, plan.H, plan.T, plan.L, plan.K, plan.nl
    cdt, code = plan.cdt, plan.cdt_code
    M = x.shape[0]
    R = M * T
    tok, pos, dim, cls = params[0], params[1], params[2], params[3]
    S = {}
    W = _gemm_params(P, plan, params)

    if P.embed_rows:  # the embedding kernel computes the digits anyway: it writes the table rows and the table too
        h, rows, tab = P.embed_fwd(x, tok, pos, dim, cls, plan.from_positions, K, with_rows=True, with_table=True)
        h = h.view(R, D)
    else:
        h = P.embed_fwd(x, tok, pos, dim, cls, plan.from_positions, K).view(R, D)
        rows = table_rows(x, plan.from_positions, L, K, plan.base, clamp_rows)
        tab = embedding_table(tok, pos, dim, cls, L, K, plan.data_dim)
    _, a_tab, mt, rt = P.rln_fwd(tab, None, params[4], params[5], plan.eps1[0], 0.0, None, 0, code)
    if save:
        S.update(rows=rows, tab=tab, a_tab=a_tab, mt=mt, rt=rt)
    a = None  # LN1 output of the current layer (layers >= 1)
    for i in range(nl):
        o0 = 4 + 12 * i
        Wa, ba, Wo, bo = (W[j] for j in range(o0 + 2, o0 + 6))
        Wf, bf, Wp, bp = (W[j] for j in range(o0 + 8, o0 + 12))
        ln2w, ln2b = params[o0 + 6], params[o0 + 7]
        last = i == nl - 1
        if save:
            S.update({f"Wa{i}": Wa, f"Wo{i}": Wo, f"Wf{i}": Wf, f"Wp{i}": Wp})
        # layer 0: the c_attn output is a [base*L+1, *] table; the attention reads its rows by index, or (prims
        # without that) it is gathered per token first
        indexed = {"rows": rows} if i == 0 and P.attn_rows else {}
        if not last:
            if i == 0:
                qkv = torch.addmm(ba, a_tab, Wa)
                qkv = qkv if indexed else P.gather(qkv, rows)
            else:
                qkv = torch.addmm(ba, a, Wa).view(M, T, 3 * D)
            o = P.attn_fwd(qkv, None, pad, H, plan.causal, 0, plan.sdiv, plan.p_att, seeds, 3 * i, **indexed)
            y = torch.addmm(bo, o.view(R, D), Wo)
            hb, a2, m1, r1 = P.rln_fwd(h, y, ln2w, ln2b, plan.eps2[i], plan.p_res, seeds, 3 * i + 1, code)
            z = torch.addmm(bf, a2, Wf)
            u = P.gelu_fwd(z)
            y = torch.addmm(bp, u, Wp)
            nw, nb = params[o0 + 12], params[o0 + 13]
            h, a, m2, r2 = P.rln_fwd(hb, y, nw, nb, plan.eps1[i + 1], plan.p_res, seeds, 3 * i + 2, code)
            if save:  # hb: the stream after the attention residual (LN2's input), h after the MLP's
                S.update({f"qkv{i}": qkv, f"o{i}": o, f"hb{i}": hb, f"m1_{i}": m1, f"r1_{i}": r1, f"a2_{i}": a2,
                          f"z{i}": z, f"u{i}": u, f"hm{i}": h, f"m2_{i}": m2, f"r2_{i}": r2, f"a{i}": a})
            continue
        # last block: CLS query only, every row's K/V
        if i == 0:
            kv = torch.addmm(ba[D:], a_tab, Wa[:, D:])
            kv = kv if indexed else P.gather(kv, rows)
            q = torch.addmm(ba[:D], a_tab[-1:], Wa[:, :D]).view(1, 1, D).expand(M, 1, D)
        else:
            kv = torch.addmm(ba[D:], a, Wa[:, D:]).view(M, T, 2 * D)
            q = torch.addmm(ba[:D], a.view(M, T, D)[:, T - 1], Wa[:, :D]).view(M, 1, D)
        o = P.attn_fwd(q, kv, pad, H, plan.causal, T - 1, plan.sdiv, plan.p_att, seeds, 3 * i, **indexed)
        y = torch.addmm(bo, o.view(M, D), Wo)
        h_cls = h.view(M, T, D)[:, T - 1]  # each sequence's CLS row
        h_cls = h_cls if P.rln_row_view else h_cls.contiguous()
        h2, a2, m1, r1 = P.rln_fwd(h_cls, y, ln2w, ln2b, plan.eps2[i], plan.p_res, seeds, 3 * i + 1, code)
        z = torch.addmm(bf, a2, Wf)
        u = P.gelu_fwd(z)
        y = torch.addmm(bp, u, Wp)
        fo = 4 + 12 * nl
        if plan.epsf >= 0:
            h3, fin, m2, r2 = P.rln_fwd(h2, y, params[fo], params[fo + 1], plan.epsf, plan.p_res, seeds,
                                        3 * i + 2, code)
        else:
            h3, _, m2, r2 = P.rln_fwd(h2, y, None, None, 0.0, plan.p_res, seeds, 3 * i + 2, code)
            fin = h3
        Wout, bout = W[fo + 2], W[fo + 3]
        fin_c = _cast(fin, cdt)
        out = torch.addmm(bout, fin_c, Wout.t())
        if plan.inv_tau != 1.0:
            out = out * plan.inv_tau
        if save:
            S.update(q=q, kv=kv, o_last=o, h2=h2, m1_last=m1, r1_last=r1, a2_last=a2, z_last=z, u_last=u, h3=h3,
                     m2_last=m2, r2_last=r2, fin=fin_c, Wout=Wout)
        return out, S
    raise AssertionError("unreachable: nl >= 1")


# ------------------------------------------------------------------------------------------- backward
def backward(plan: Plan, P: Prims, gout: torch.Tensor, x: torch.Tensor, pad: Optional[torch.Tensor],
             seeds: Optional[torch.Tensor], params: Sequence[Optional[torch.Tensor]], S: dict,
             needs: Sequence[bool]) -> List[Optional[torch.Tensor]]:
    """Gradients of every parameter (None where ``needs`` is False or the parameter is absent)."""
    D, H, T, L, K, nl = plan.D, plan.H, plan.T, plan.L, plan.K, plan.nl
    cdt = plan.cdt
    M = x.shape[0]
    R = M * T
    n = len(params)
    grads: List[Optional[torch.Tensor]] = [None] * n
    yc = plan.cdt_code  # dtype code of every branch output y (GEMM outputs are in the compute dtype)
    rows, nrows = S["rows"], plan.base * L + 1

    def put(idx, g):
        if g is not None and needs[idx]:
            grads[idx] = _to(g, params[idx])

    parts = _LNParts(P, plan, M, S["tab"])

    # out = addmm(bout, fin, Wout^T) * inv_tau
    g = gout * plan.inv_tau if plan.inv_tau != 1.0 else gout
    g = _cast(g, cdt)
    fo = 4 + 12 * nl
    dfin = g.mm(S["Wout"])
    if needs[fo + 2]:
        put(fo + 2, _wgrad(g.t(), S["fin"], params[fo + 2]))
    if needs[fo + 3]:
        put(fo + 3, _bsum(g, params[fo + 3]))
    i = nl - 1
    o0 = 4 + 12 * i
    if plan.epsf >= 0:  # (the partials of: final LN weight, bias, and the MLP c_proj bias that made y)
        dh2, dy = P.rln_bwd(dfin, None, S["h3"], params[fo], S["m2_last"], S["r2_last"], plan.p_res, seeds,
                            3 * i + 2, True, yc, True, part=parts.take(fo, fo + 1, o0 + 11))
    else:
        dh2, dy = P.rln_bwd(None, _to(dfin, S["h3"]), S["h3"], None, S["m2_last"], S["r2_last"], plan.p_res,
                            seeds, 3 * i + 2, True, yc, True, part=parts.take(o0 + 11))
    da2 = _mlp_bwd(P, dy, S["a2_last"], S["z_last"], S["u_last"], S[f"Wf{i}"], S[f"Wp{i}"], o0, put, needs,
                   params)
    dhc, dyat = P.rln_bwd(da2, dh2, S["h2"], params[o0 + 6], S["m1_last"], S["r1_last"], plan.p_res, seeds,
                          3 * i + 1, True, yc, True, part=parts.take(o0 + 6, o0 + 7, o0 + 5))
    Wo = S[f"Wo{i}"]
    do = dyat.mm(Wo.t())
    if needs[o0 + 4]:
        put(o0 + 4, _wgrad(S["o_last"].view(M, D).t(), dyat, params[o0 + 4]))
    indexed = {"rows": rows} if i == 0 and P.attn_rows else {}  # layer 0's k/v (and q) read from the table
    dq, dkv = P.attn_bwd(do.view(M, 1, D), S["q"], S["kv"], pad, H, plan.causal, T - 1, plan.sdiv, plan.p_att,
                         seeds, 3 * i, **indexed)
    # the residual stream's gradient below the last block is nonzero on the CLS rows only: dhc [M, D]. The next
    # LayerNorm backward reads it as such (dh_every = T); only the embedding backward (one layer) needs [R, D]
    if nl == 1:
        dh = torch.zeros((R, D), dtype=dhc.dtype, device=dhc.device)
        dh.view(M, T, D)[:, T - 1] = dhc
        dh_every = 0
    else:
        dh, dh_every = dhc, T
    Wa = S[f"Wa{i}"]
    need_W, need_b = needs[o0 + 2], needs[o0 + 3]
    d_a_tab = None
    if i == 0:
        # the table's gradient stays in the accumulation dtype (fp32 under autocast): its per-row sums are not
        # rounded to bf16 before the table's GEMMs, which are tiny ([base*L+1] rows) and take the fp32 weight
        dtab_kv = P.gather_bwd(dkv, rows, nrows)
        adt = dtab_kv.dtype
        dq_row = dq.sum(0, dtype=adt)  # [1, D]: the CLS query is one table row broadcast to every sequence
        a_tab = _cast(S["a_tab"], adt)
        Wa = _cast(params[o0 + 2], adt)
        d_a_tab = dtab_kv.mm(Wa[:, D:].t())
        d_a_tab[-1:] += dq_row.mm(Wa[:, :D].t())
        if need_W:
            put(o0 + 2, torch.cat([_wgrad(a_tab[-1:].t(), dq_row, params[o0 + 2]),
                                   _wgrad(a_tab.t(), dtab_kv, params[o0 + 2])], 1))
        if need_b:
            put(o0 + 3, torch.cat([_bsum(dq_row, params[o0 + 3]), _bsum(dtab_kv, params[o0 + 3])]))
        da = None
    else:
        a = S[f"a{i - 1}"]
        dkv2 = dkv.view(R, 2 * D)
        dq2 = dq.view(M, D)
        da = dkv2.mm(Wa[:, D:].t())
        # (not addmm_ in place: under CPU fp16 autocast that moved layer 0's LN1 weight gradient from 0.91 to 1.04 of
        # the two-error bound on one seed of tests/test_ext.py; one launch is not worth a numerics change unmeasured)
        da.view(M, T, D)[:, T - 1] += dq2.mm(Wa[:, :D].t())
        if need_W:
            put(o0 + 2, torch.cat([_wgrad(a.view(M, T, D)[:, T - 1].t(), dq2, params[o0 + 2]),
                                   _wgrad(a.t(), dkv2, params[o0 + 2])], 1))
        if need_b:
            put(o0 + 3, torch.cat([_bsum(dq2, params[o0 + 3]), _bsum(dkv2, params[o0 + 3])]))

    for i in range(nl - 2, -1, -1):  # full blocks, last to first
        o0 = 4 + 12 * i
        dh1, dy = P.rln_bwd(da, dh, S[f"hm{i}"], params[o0 + 12], S[f"m2_{i}"], S[f"r2_{i}"], plan.p_res, seeds,
                            3 * i + 2, True, yc, True, part=parts.take(o0 + 12, o0 + 13, o0 + 11), dh_every=dh_every)
        dh_every = 0
        da2 = _mlp_bwd(P, dy, S[f"a2_{i}"], S[f"z{i}"], S[f"u{i}"], S[f"Wf{i}"], S[f"Wp{i}"], o0, put, needs,
                       params)
        dh, dyat = P.rln_bwd(da2, dh1, S[f"hb{i}"], params[o0 + 6], S[f"m1_{i}"], S[f"r1_{i}"], plan.p_res, seeds,
                             3 * i + 1, True, yc, True, part=parts.take(o0 + 6, o0 + 7, o0 + 5))
        Wo = S[f"Wo{i}"]
        do = dyat.mm(Wo.t())
        if needs[o0 + 4]:
            put(o0 + 4, _wgrad(S[f"o{i}"].view(R, D).t(), dyat, params[o0 + 4]))
        indexed = {"rows": rows} if i == 0 and P.attn_rows else {}
        dqkv, _ = P.attn_bwd(do.view(M, T, D), S[f"qkv{i}"], None, pad, H, plan.causal, 0, plan.sdiv, plan.p_att,
                             seeds, 3 * i, **indexed)
        Wa = S[f"Wa{i}"]
        if i == 0:
            dtab_out = P.gather_bwd(dqkv, rows, nrows)  # in the accumulation dtype, as in the last block above
            adt = dtab_out.dtype
            d_a_tab = dtab_out.mm(_cast(params[o0 + 2], adt).t())
            put(o0 + 2, _wgrad(_cast(S["a_tab"], adt).t(), dtab_out, params[o0 + 2]) if needs[o0 + 2] else None)
            put(o0 + 3, _bsum(dtab_out, params[o0 + 3]) if needs[o0 + 3] else None)
            da = None
        else:
            dq2 = dqkv.view(R, 3 * D)
            a = S[f"a{i - 1}"]
            da = dq2.mm(Wa.t())
            put(o0 + 2, _wgrad(a.t(), dq2, params[o0 + 2]) if needs[o0 + 2] else None)
            put(o0 + 3, _bsum(dq2, params[o0 + 3]) if needs[o0 + 3] else None)

    # layer 0's LN1 runs on the embedding table; the residual stream's gradient reaches the token embeddings
    dtab, _ = P.rln_bwd(d_a_tab, None, S["tab"], params[4], S["mt"], S["rt"], 0.0, None, 0, False, 0, True,
                        part=parts.take(4, 5))
    parts.reduce(put)
    # the table's gradient folded into the embedding gradients by the op (Triton: in its output launch)
    dtok, dpos, ddim, dcls = P.embed_bwd(dh.view(M, T, D), x, plan.from_positions, K, plan.base, plan.data_dim,
                                         dtab)
    put(0, dtok)
    put(1, dpos)
    if plan.data_dim > 1:
        put(2, ddim)
    put(3, dcls)
    return grads


class _LNParts:
    """The per-program partial sums of every LayerNorm backward of one encoder backward (each LN's weight and bias
    gradients, and the bias gradient of the GEMM whose output entered its residual) in one [bands, n, D]
    workspace, reduced by one launch at the end instead of one per LayerNorm (five at the paper's two layers)."""

    def __init__(self, P: "Prims", plan: "Plan", M: int, tab: torch.Tensor):
        bands = (3 if plan.epsf >= 0 else 1) + 3 + 6 * (plan.nl - 1) + 2
        R = max(M * plan.T, tab.shape[0])
        acc = torch.float64 if tab.dtype == torch.float64 else torch.float32
        # M = 0: the LayerNorms over the sequences launch nothing, so their bands must read as zeros
        new = tab.new_zeros if M == 0 else tab.new_empty
        self.ws = new((bands, P.ln_partial_rows(R, tab.device), tab.shape[1]), dtype=acc)
        self.dest: List[int] = []  # parameter index per band, in band order

    def take(self, *idx: int) -> torch.Tensor:
        """The next len(idx) bands, for the gradients of parameters ``idx`` (in the LayerNorm's part order)."""
        n = len(self.dest)
        self.dest += idx
        return self.ws[n:n + len(idx)]

    def reduce(self, put) -> None:
        assert len(self.dest) == self.ws.shape[0], (len(self.dest), self.ws.shape)
        sums = self.ws.sum(1)
        for b, j in enumerate(self.dest):
            put(j, sums[b])


def _mlp_bwd(P, dy, a2, z, u, Wf, Wp, o0, put, needs, params):
    """y = addmm(bp, gelu(addmm(bf, a2, Wf)), Wp): returns d a2, puts three parameter gradients (bp's came out of
    the LayerNorm backward that produced dy); bf's comes out of the gelu backward's pass."""
    du = dy.mm(Wp.t())
    if needs[o0 + 10]:
        put(o0 + 10, _wgrad(u.t(), dy, params[o0 + 10]))
    dz, dbf = P.gelu_bwd(du, z, True)
    put(o0 + 9, dbf)
    if needs[o0 + 8]:
        put(o0 + 8, _wgrad(a2.t(), dz, params[o0 + 8]))
    return dz.mm(Wf.t())


# ------------------------------------------------------------------------------------------- autograd
def _keep_graph() -> bool:
    """Whether the running backward was asked to retain the graph (True when unknown: then the saved state is
    freed with the graph instead of right after the backward)."""
    f = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if f is None else bool(f())


class PythonRunner:
    """The layer sequence above over one backend's kernels (Triton). Its state is a plain Python object."""

    def __init__(self, prims: Prims):
        self.prims = prims

    def forward(self, plan, x, pad, seeds, params, save: bool, clamp_rows: bool):
        out, S = forward(plan, self.prims, x, pad, seeds, params, save, clamp_rows)
        if not save:
            return out, None
        try:
            versions = [p._version if p is not None else 0 for p in params]
        except RuntimeError:  # an inference tensor (no version counter)
            versions = [_version(p) for p in params]
        # the backward reads the digit ids / positions and the pad mask again (the C++ node saves them, which
        # checks the same): modified in place before it, the gradients would silently follow the new values
        versions += [_input_version(x), _input_version(pad)]
        return out, [x, pad, seeds, params, versions, S]

    def backward(self, plan, gout, state, needs, release: bool):
        if state[0] is None:
            raise RuntimeError(_SECOND_BACKWARD)
        x, pad, seeds, params, versions, S = state
        for i, (p, v) in enumerate(zip(params, versions)):
            if p is not None and p._version != v:
                raise RuntimeError(_modified(i, p._version, v))
        for what, t, v in (("digit ids / positions", x, versions[-2]), ("pad mask", pad, versions[-1])):
            if v is not None and t._version != v:
                raise RuntimeError(_input_modified(what, t._version, v))
        grads = backward(plan, self.prims, gout, x, pad, seeds, params, S, needs)
        if release:
            state[:] = [None] * len(state)
        return grads


def _version(p: Optional[torch.Tensor]) -> int:
    if p is None:
        return 0
    if p.is_inference():  # (no version counter): PyTorch's own error for saving one, not "do not track version"
        raise RuntimeError("Inference tensors cannot be saved for backward. To work around you can make a clone to "
                           "get a normal tensor and use it in autograd. (A parameter of the fused SeqPE encoder was "
                           "created under torch.inference_mode(); rebuild or clone it outside inference mode to "
                           "train it.)")
    return p._version


def _input_version(t: Optional[torch.Tensor]) -> Optional[int]:
    """An input's version, or None for none or an inference tensor (no counter; it cannot be modified outside
    inference mode)."""
    return None if t is None or t.is_inference() else t._version


def _input_modified(what, now, then):
    return ("one of the variables needed for gradient computation has been modified by an inplace operation: the "
            f"{what} of the fused SeqPE encoder (its backward reads them again) at version {now}; expected "
            f"version {then} instead. Modify it after backward (optimizer.step() after backward), or pass a copy.")


_SECOND_BACKWARD = ("Trying to backward through the fused SeqPE encoder a second time (its saved activations were "
                    "freed after the first backward). Pass retain_graph=True to the first backward if you need a "
                    "second one.")


def _modified(i, now, then):
    return ("one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"parameter {i} of the fused SeqPE encoder (in the order of seqpe_kernels.encoder.flat_params) is at "
            f"version {now}; expected version {then} instead. Update parameters (optimizer.step()) after backward, "
            "not between forward and backward.")


def ext_encoder(plan: Plan, ops, x, pad, seeds, params, clamp_rows: bool) -> torch.Tensor:
    """The C++/CUDA backends: one ``seqpe_ext::encoder`` call, which carries its own C++ autograd node
    (csrc/encoder.cpp); the parameters are passed as the list of those present."""
    icfg, fcfg = plan.ext_config(clamp_rows)
    present = [p for p in params if p is not None]
    out = ops.encoder.default(x, pad, seeds, present, icfg, fcfg)
    if out.grad_fn is not None and torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        _guard_saved(out.grad_fn, x, pad, present)
    return out


def _guard_saved(node, x, pad, params) -> None:
    """Under saved-tensor hooks autograd does not check the versions of what a node saved (and ``save_on_cpu``
    keeps a CPU tensor by reference, not a copy): a parameter, digit-id or position tensor modified in place before
    the backward would silently give the gradients of its new values, as eager's do there. The C++ node's inputs
    are checked before its backward instead (the Triton node checks its own always). The hook holds the positions
    and mask on their device past an offloading hook's copy: [M, d] / [M, L], small beside the activations."""
    seen = [(f"parameter {i}", p, _input_version(p)) for i, p in enumerate(params)]
    seen += [("digit ids / positions", x, _input_version(x)), ("pad mask", pad, _input_version(pad))]

    def check(grad_outputs):
        for what, t, v in seen:
            if v is not None and t._version != v:
                raise RuntimeError(_input_modified(what, t._version, v))

    node.register_prehook(check)


class EncoderFunction(torch.autograd.Function):
    """One autograd node for the whole encoder call: inputs (plan, runner, x, pad, seeds, clamp_rows, *params),
    output [M, O]. The runner keeps what the backward needs (not save_for_backward: ~100 tensors per call cost
    more host time than the kernels at small sizes) and frees it after the backward unless the graph is
    retained; parameters modified in place between forward and backward raise, as with saved tensors."""

    @staticmethod
    def forward(ctx, plan, runner, x, pad, seeds, clamp_rows, *params):
        out, state = runner.forward(plan, x, pad, seeds, params, True, clamp_rows)
        ctx.plan, ctx.runner, ctx.state = plan, runner, state
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None and not (
                x.is_cuda and torch.cuda.is_current_stream_capturing()):  # (a hook's copy would break a capture)
            _save_through_hooks(ctx, state)
        return out

    @staticmethod
    def backward(ctx, gout):
        # create_graph=True runs this in grad mode: the gradients below come from kernels, so a second-order term
        # through them would be silently zero (once_differentiable raises only when the incoming gradient itself
        # requires grad, which y.sum()'s does not). Refuse, as the C++ node does.
        if torch.is_grad_enabled():
            raise RuntimeError("seqpe fused encoder: its backward is not differentiable, so gradients taken with "
                               "create_graph=True cannot carry second-order terms through it; use "
                               "backend='torch' for those")
        state = ctx.state if ctx.state is not None else _state_from_hooks(ctx)
        grads = ctx.runner.backward(ctx.plan, gout, state, ctx.needs_input_grad[6:], not _keep_graph())
        return (None, None, None, None, None, None, *grads)


def _save_through_hooks(ctx, state) -> None:
    """Under saved-tensor hooks (``torch.autograd.graph.save_on_cpu``, non-reentrant activation checkpointing,
    any ``saved_tensors_hooks``) what the backward needs goes through ``ctx.save_for_backward``, so the hooks
    offload / drop / recompute it like any node's; without hooks the runner's list is kept as it is (cheaper).
    Saved: each activation's base (views of one base share it: aliasing and strides survive a hook that copies),
    and per tensor how to view it again. Kept by reference instead: the parameters and what is a parameter or a
    view of one (fp32 GEMM weights are the parameters themselves: an offloading hook would copy them every step
    and free nothing), and the positions, pad mask and seeds (small; an inference-mode positions tensor cannot be
    saved)."""
    x, pad, seeds, params, versions, S = state
    pids = {id(p) for p in params if p is not None}
    bases, index, views, rest = [], {}, {}, {}
    for name, t in S.items():
        if not isinstance(t, torch.Tensor) or id(t) in pids or (t._base is not None and id(t._base) in pids):
            rest[name] = t
            continue
        b = t._base if t._base is not None else t
        j = index.setdefault(id(b), len(bases))
        if j == len(bases):
            bases.append(b)
        views[name] = (j, None if t is b else (t.size(), t.stride(), t.storage_offset() - b.storage_offset()))
    ctx.save_for_backward(*bases)
    ctx.hooked = ((x, pad, seeds), params, versions, views, rest)  # (versions: the in-place check)
    ctx.state = None


def _state_from_hooks(ctx):
    saved = ctx.saved_tensors
    (x, pad, seeds), params, versions, views, rest = ctx.hooked
    S = dict(rest)
    for name, (j, v) in views.items():
        b = saved[j]
        S[name] = b if v is None else b.as_strided(v[0], v[1], b.storage_offset() + v[2])
    return [x, pad, seeds, params, versions, S]


def run(plan: Plan, runner, x, pad, seeds, params, clamp_rows: bool) -> torch.Tensor:
    """The encoder's output; one autograd node when a parameter needs a gradient, else a plain forward that
    saves nothing."""
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
        return EncoderFunction.apply(plan, runner, x, pad, seeds, clamp_rows, *params)
    return runner.forward(plan, x, pad, seeds, params, False, clamp_rows)[0]
