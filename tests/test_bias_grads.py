"""Bias gradients computed inside the backward kernels (issue 11 item 3), against plain PyTorch math.

The encoder's backward (Triton, and the C++/CUDA extension's ``*_bias`` operators) takes three bias gradients per
layer from kernels it runs anyway instead of separate column reductions: the GEMM biases in front of each residual junction (attention's and the MLP's
c_proj) from the residual + LayerNorm backward (the column sums of dy, after the dropout mask), and c_fc's from
the gelu backward (the column sums of dz). Property tests over shapes that cross the kernels' blocks (rows per
program, the gelu kernel's 8-row and 128-column tiles), dtypes, dropout and with / without the LayerNorm;
each returned tensor against fp64 math on the same inputs. The encoder-level parity (every parameter gradient
against the reference) is tests/test_encoder.py's.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HAS_CUDA, require_ext
from test_fused import rel

DEV = "cuda" if HAS_CUDA else "cpu"
SETTINGS = settings(max_examples=15, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# fp32 inputs, fp32 accumulation, compared with fp64 math: KERNEL_GUIDE §5's 1e-5; fp64 at 1e-12
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


IMPLS = ["triton", "ext"]


def _gelu_bwd(impl):
    if impl == "triton":
        from seqpe_kernels.ops.gelu import gelu_backward

        return lambda du, z: gelu_backward(du, z, True), gelu_backward
    require_ext(DEV)
    from seqpe_kernels.ops._common import ext_ops

    ops = ext_ops()
    return ops.gelu_new_bwd_bias, ops.gelu_new_bwd


def _rln_bwd(impl):
    if impl == "triton":
        from seqpe_kernels.ops.layernorm import residual_layernorm_backward

        return (lambda *a: residual_layernorm_backward(*a, True)), residual_layernorm_backward
    require_ext(DEV)
    from seqpe_kernels.ops._common import ext_ops

    ops = ext_ops()
    return ops.residual_layernorm_bwd_bias, ops.residual_layernorm_bwd


def _gelu_grad64(du, z):
    z = z.double().requires_grad_(True)
    u = F.gelu(z, approximate="tanh")
    (dz,) = torch.autograd.grad(u, z, du.double())
    return dz


def _scaled_err(a, b, scale):
    """max |a - b| over ``scale``: gelu' lies in [-0.17, 1.13], so |dz| <= 1.13 |du| and |db| <= 1.13 sum |du|;
    relative to max |ref| instead, a tensor of one element near gelu''s zero (z ~ -0.75) has no scale at all."""
    return ((a.double() - b.double()).abs().max() / scale.double().clamp_min(1e-30)).item() if b.numel() else 0.0


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(R=st.integers(0, 70), C=st.integers(1, 300), dt=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_gelu_backward_bias_grad(impl, R, C, dt, seed):
    with_bias, gelu_backward = _gelu_bwd(impl)
    gen = torch.Generator().manual_seed(seed)  # the data belong to the example (hypothesis replays it exactly)
    z = (torch.randn(R, C, dtype=dt, generator=gen) * 2).to(DEV)
    du = torch.randn(R, C, dtype=dt, generator=gen).to(DEV)
    dz, db = with_bias(du, z)
    ref = _gelu_grad64(du, z)
    assert dz.dtype == dt and db.shape == (C,) and db.dtype == dt
    assert _scaled_err(dz, ref, du.abs().max() if du.numel() else du.new_ones(())) <= TOL[dt]
    assert _scaled_err(db, ref.sum(0), du.abs().sum(0).max() if du.numel() else du.new_ones(())) <= TOL[dt]
    # without the bias: the same dz (the same formula in the same precision; a compiler may contract it
    # differently in the two kernels, so not necessarily bit for bit)
    assert _scaled_err(gelu_backward(du, z), dz, du.abs().max() if du.numel() else du.new_ones(())) <= TOL[dt]


@pytest.mark.parametrize("impl", IMPLS)
def test_gelu_backward_bias_grad_low_precision(impl):
    # bf16 / fp16 pre-activations: dz is stored rounded, the bias gradient sums the unrounded fp32 dz
    with_bias, _ = _gelu_bwd(impl)
    for dt in (torch.bfloat16, torch.float16):
        z = torch.randn(37, 200).to(DEV, dt)
        du = torch.randn(37, 200).to(DEV, dt)
        dz, db = with_bias(du, z)
        ref = _gelu_grad64(du, z)
        assert dz.dtype == dt and db.dtype == torch.float32
        assert rel(dz, ref) <= 2 ** -7  # one rounding to the storage dtype
        assert rel(db, ref.sum(0)) <= 1e-5


def _rln64(da, dh, h, w, p_keep_mask, has_ln):
    """(dx, dy) of h = x + y*mask*scale; a = LN(h) in fp64, given the incoming da (LN output) and dh."""
    h64 = h.double().requires_grad_(True)
    total = h64.new_zeros(())
    if has_ln:
        a = F.layer_norm(h64, (h.shape[1],), w.double(), None, 1e-5)
        total = total + (a * da.double()).sum()
    if dh is not None:
        total = total + (h64 * dh.double()).sum()
    (dh_total,) = torch.autograd.grad(total, h64) if total.requires_grad else (torch.zeros_like(h64),)
    return dh_total, dh_total * p_keep_mask


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(R=st.integers(0, 40), D=st.integers(1, 70), dt=st.sampled_from([torch.float32, torch.float64]),
       has_ln=st.booleans(), has_dh=st.booleans(), dropout=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_residual_layernorm_backward_bias_grad(impl, R, D, dt, has_ln, has_dh, dropout, seed):
    from seqpe_kernels.ops._common import dtype_code, new_seeds
    from seqpe_kernels.ops.layernorm import dropout_keep_mask, residual_layernorm_forward

    with_bias, residual_layernorm_backward = _rln_bwd(impl)

    p = 0.3 if dropout else 0.0
    torch.manual_seed(seed)  # the data (and the dropout seeds) belong to the example
    x = torch.randn(R, D, dtype=dt).to(DEV)
    y = torch.randn(R, D, dtype=dt).to(DEV)
    w = (1 + 0.5 * torch.randn(D, dtype=dt)).to(DEV) if has_ln else None
    b = torch.randn(D, dtype=dt).to(DEV) if has_ln else None
    seeds = new_seeds(3, DEV)
    h, _, mean, rstd = residual_layernorm_forward(x, y, w, b, 1e-5, p, seeds, 1, dtype_code(dt))
    da = torch.randn(R, D, dtype=dt).to(DEV) if has_ln else None
    dh = torch.randn(R, D, dtype=dt).to(DEV) if has_dh or not has_ln else None
    out = with_bias(da, dh, h, w, mean, rstd, p, seeds, 1, True, dtype_code(dt))
    assert len(out) == 5
    dx, dy, dw, db, dyb = out
    keep = dropout_keep_mask(seeds, 1, (R, D), p).double() / (1 - p) if dropout else torch.ones(R, D).double()
    dx64, dy64 = _rln64(da, dh, h, w, keep.to(DEV), has_ln)
    assert dyb.shape == (D,) and dyb.dtype == dt
    # the scale of the terms dx sums (|da w| rstd, |dh|), not max |dx|: the LayerNorm of one column has an exact
    # zero gradient, which fp32 reaches only up to the rounding of da * w (an FMA keeps it), times rstd
    terms = [dx64.abs().max()] if dx64.numel() else [dx64.new_ones(())]
    if has_ln and R:
        terms.append((da.abs() * w.abs()).max().double() * rstd.max().double())
    if dh is not None and R:
        terms.append(dh.abs().max().double())
    scale = torch.stack([t.double().cpu() for t in terms]).max()
    drop = 1 / (1 - p) if dropout else 1.0
    assert _scaled_err(dx, dx64, scale) <= TOL[dt] and _scaled_err(dy, dy64, scale * drop) <= TOL[dt]
    # a column sum can cancel to ~0: its error is measured against the bound of its magnitude, R rows of the scale
    assert _scaled_err(dyb, dy64.sum(0), scale * drop * max(R, 1)) <= TOL[dt]
    if has_ln:  # the LayerNorm's weight and bias gradients, column sums too: the same measure
        h64 = h.double()
        xhat = (h64 - h64.mean(1, keepdim=True)) / torch.sqrt(h64.var(1, unbiased=False, keepdim=True) + 1e-5)
        da64 = da.double()
        assert dw.shape == db.shape == (D,)
        one = torch.ones((), dtype=torch.float64, device=h.device)
        dmax, xmax = (da64.abs().max(), xhat.abs().max()) if R else (one, one)
        assert _scaled_err(dw, (da64 * xhat).sum(0), max(R, 1) * dmax * xmax) <= TOL[dt]
        assert _scaled_err(db, da64.sum(0), max(R, 1) * dmax) <= TOL[dt]
    # the four tensors the operator returns are the same values without bias_grad
    plain = residual_layernorm_backward(da, dh, h, w, mean, rstd, p, seeds, 1, True, dtype_code(dt))
    assert len(plain) == 4
    for got, want in zip(out[:4], plain):
        assert torch.equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_layernorm_bias_grad_without_branch(impl):
    # the layer-0 LayerNorm on the embedding table has no branch input: no fifth gradient, dw / db unchanged
    from seqpe_kernels.ops.layernorm import residual_layernorm_forward

    with_bias, residual_layernorm_backward = _rln_bwd(impl)

    x = torch.randn(13, 24, device=DEV)
    w, b = torch.randn(24, device=DEV), torch.randn(24, device=DEV)
    _, a, mean, rstd = residual_layernorm_forward(x, None, w, b, 1e-5, 0.0, None, 0, 0)
    da = torch.randn_like(a)
    out = with_bias(da, None, x, w, mean, rstd, 0.0, None, 0, False, 0)
    plain = residual_layernorm_backward(da, None, x, w, mean, rstd, 0.0, None, 0, False, 0)
    assert out[4] is None if impl == "triton" else out[4].numel() == 0  # the extension's absent output: (0,)
    for got, want in zip(out[:4], plain):
        assert torch.equal(got, want)
    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    (F.layer_norm(x64, (24,), w64, b.double(), 1e-5) * da.double()).sum().backward()
    assert rel(out[0], x64.grad) <= 1e-5 and rel(out[2], w64.grad) <= 1e-5 and rel(out[3], da.double().sum(0)) <= 1e-5


@given(p=st.floats(0.0, 0.999), dt=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
def test_dropout_scale_pairs_carry_the_fp64_scale(p, dt):
    """Triton passes a Python float as fp32: the Triton kernels' dropout scale is the fp32 pair (hi, lo) summed
    in the accumulation dtype. For fp64 the pair must give 1 / (1 - p) to fp64 accuracy (an H200 run measured
    fp64 dropout gradients 2.4e-8 off with hi alone); for the other dtypes lo must be 0, hi the fp32 scale."""
    import numpy as np

    from seqpe_kernels.ops._common import drop_scales

    s = 1.0 / (1.0 - p)
    hi, lo = drop_scales(p, dt)
    assert hi == float(np.float32(s)) and float(np.float32(lo)) == lo  # both exact as fp32 kernel scalars
    if dt == torch.float64:
        assert abs((hi + lo) - s) <= 2.0 ** -47 * s
    else:
        assert lo == 0.0


def _cls_dh_case(M, T, D, dt, has_ln, dropout, seed):
    """A LayerNorm backward's inputs whose incoming dh is nonzero on every T-th row only: (h, w, mean, rstd, p,
    seeds, da, dh_cls [M, D], dh [M*T, D] zero-filled around dh_cls)."""
    from seqpe_kernels.ops._common import dtype_code, new_seeds
    from seqpe_kernels.ops.layernorm import residual_layernorm_forward

    p = 0.3 if dropout else 0.0
    R = M * T
    torch.manual_seed(seed)  # the data (and the dropout seeds) belong to the example
    x, y = torch.randn(R, D, dtype=dt).to(DEV), torch.randn(R, D, dtype=dt).to(DEV)
    w = (1 + 0.5 * torch.randn(D, dtype=dt)).to(DEV) if has_ln else None
    b = torch.randn(D, dtype=dt).to(DEV) if has_ln else None
    seeds = new_seeds(3, DEV)
    h, _, mean, rstd = residual_layernorm_forward(x, y, w, b, 1e-5, p, seeds, 2, dtype_code(dt))
    da = torch.randn(R, D, dtype=dt).to(DEV) if has_ln else None
    dh_cls = torch.randn(M, D, dtype=dt).to(DEV)
    dh = torch.zeros(R, D, dtype=dt, device=DEV)
    dh.view(M, T, D)[:, T - 1] = dh_cls
    return h, w, mean, rstd, p, seeds, da, dh_cls, dh


@SETTINGS
@given(M=st.integers(0, 9), T=st.integers(1, 6), D=st.integers(1, 40), n=st.integers(1, 60),
       dt=st.sampled_from([torch.float32, torch.float64]), has_ln=st.booleans(), dropout=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_residual_layernorm_backward_deferred_partials_and_cls_dh(M, T, D, n, dt, has_ln, dropout, seed):
    """The encoder's form of the Triton LayerNorm backward: partials written into a slice of one workspace with
    any number of programs n (more or fewer than rows), and an incoming dh that is nonzero on every T-th row
    only, given as those rows ([M, D], dh_every=T). Against the operator's form on the same inputs with dh
    zero-filled to [M*T, D]: dx and dy bit for bit (the same per-row arithmetic; masked loads read the zeros),
    the reduced partials to the tolerance of a sum in another order."""
    from seqpe_kernels.ops._common import dtype_code
    from seqpe_kernels.ops.layernorm import residual_layernorm_backward

    R = M * T
    h, w, mean, rstd, p, seeds, da, dh_cls, dh = _cls_dh_case(M, T, D, dt, has_ln, dropout, seed)
    want = residual_layernorm_backward(da, dh, h, w, mean, rstd, p, seeds, 2, True, dtype_code(dt), True)
    acc = torch.float64 if dt == torch.float64 else torch.float32
    k = 2 * has_ln + 1
    ws = torch.full((k + 2, n, D), float("nan"), dtype=acc, device=DEV)  # NaN: a band left unwritten shows
    got = residual_layernorm_backward(da, dh_cls, h, w, mean, rstd, p, seeds, 2, True, dtype_code(dt), True,
                                      part=ws[1:1 + k], dh_every=T)
    assert len(got) == 2 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    sums = ws[1:1 + k].sum(1)
    assert ws[0].isnan().all() and ws[k + 1].isnan().all()  # the neighbouring bands are untouched
    if R == 0:  # nothing launched: the caller's workspace is zeroed for an empty batch (encoder._LNParts)
        return
    # each column sum against the other order's, relative to the sum of its terms' magnitudes
    xhat = (h.double() - mean.double()[:, None]) * rstd.double()[:, None]
    ref = ([(want[2], da.double() * xhat), (want[3], da.double())] if has_ln else []) + [(want[4], want[1].double())]
    assert len(sums) == len(ref)
    for s_, (r_, terms) in zip(sums, ref):
        assert _scaled_err(s_, r_, terms.abs().sum(0).max()) <= TOL[dt]


@SETTINGS
@given(M=st.integers(0, 9), T=st.integers(1, 6), D=st.integers(1, 40),
       dt=st.sampled_from([torch.float32, torch.float64]), has_ln=st.booleans(), dropout=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_ext_residual_layernorm_cls_dh(M, T, D, dt, has_ln, dropout, seed):
    """The extension's form for the C++ encoder (residual_layernorm_bwd_bias's dh_every): dh nonzero on every T-th
    row only, given as those rows [M, D]. Against the same operator with dh zero-filled to [M*T, D]: all five
    outputs bit for bit (the same arithmetic per row; the rows it skips add a zero)."""
    require_ext(DEV)
    from seqpe_kernels.ops._common import dtype_code, ext_ops

    op = ext_ops().residual_layernorm_bwd_bias
    h, w, mean, rstd, p, seeds, da, dh_cls, dh = _cls_dh_case(M, T, D, dt, has_ln, dropout, seed)
    want = op(da, dh, h, w, mean, rstd, p, seeds, 2, True, dtype_code(dt))
    got = op(da, dh_cls, h, w, mean, rstd, p, seeds, 2, True, dtype_code(dt), T)
    for k, (g_, w_) in enumerate(zip(got, want)):
        assert torch.equal(g_, w_), f"output {k}"


def test_ext_residual_layernorm_cls_dh_refuses_misuse():
    require_ext(DEV)
    from seqpe_kernels.ops._common import ext_ops
    from seqpe_kernels.ops.layernorm import residual_layernorm_forward

    op = ext_ops().residual_layernorm_bwd_bias
    R, D = 12, 8
    h, _, mean, rstd = residual_layernorm_forward(torch.randn(R, D, device=DEV), torch.randn(R, D, device=DEV),
                                                  torch.randn(D, device=DEV), torch.randn(D, device=DEV), 1e-5, 0.0,
                                                  None, 0, 0)
    w, da = torch.randn(D, device=DEV), torch.randn(R, D, device=DEV)
    for dh, every, msg in ((torch.randn(R, D, device=DEV), 6, "must be \\[R / 6, D\\]"),
                           (torch.randn(3, D, device=DEV), 5, "a multiple"),
                           (torch.randn(2, D + 1, device=DEV), 6, "must be"),
                           (torch.randn(R, D, device=DEV), -1, ">= 0"),
                           (torch.randn(R // 2, D, device=DEV), 0, "must match ln_in")):
        with pytest.raises(RuntimeError, match=msg):
            op(da, dh, h, w, mean, rstd, 0.0, None, 0, True, 0, every)
    with pytest.raises(RuntimeError, match="da must match"):
        op(da[:-1], None, h, w, mean, rstd, 0.0, None, 0, True, 0, 0)


def test_residual_layernorm_encoder_forms_refuse_misuse():
    """A workspace slice of the wrong shape or dtype and a dh that does not match dh_every raise (a kernel would
    otherwise read or write out of place); a row view of x needs a branch y (the backward normalises h)."""
    from seqpe_kernels.ops.layernorm import residual_layernorm_backward, residual_layernorm_forward

    R, D = 12, 8
    x, y, w, b = (torch.randn(R, D, device=DEV), torch.randn(R, D, device=DEV), torch.randn(D, device=DEV),
                  torch.randn(D, device=DEV))
    h, _, mean, rstd = residual_layernorm_forward(x, y, w, b, 1e-5, 0.0, None, 0, 0)
    da = torch.randn(R, D, device=DEV)
    args = (da, None, h, w, mean, rstd, 0.0, None, 0, True, 0, True)
    for bad in (torch.empty(2, 4, D, device=DEV), torch.empty(3, 4, D + 1, device=DEV),
                torch.empty(3, 4, D, device=DEV, dtype=torch.float64), torch.empty(3, 4, 2 * D, device=DEV)[..., :D]):
        with pytest.raises(ValueError, match="part must be"):
            residual_layernorm_backward(*args, part=bad)
    for dh, every in ((torch.randn(R, D, device=DEV), 6), (torch.randn(3, D, device=DEV), 5), (None, 6)):
        with pytest.raises(ValueError, match="dh_every"):
            residual_layernorm_backward(da, dh, h, w, mean, rstd, 0.0, None, 0, True, 0, True, dh_every=every)
    # a row view (every other row of a [2R, D] stream) is read in place, bit for bit as its copy
    big = torch.randn(2 * R, D, device=DEV)
    view = big.view(R, 2, D)[:, 1]
    for got, want in zip(residual_layernorm_forward(view, y, w, b, 1e-5, 0.0, None, 0, 0, row_view=True),
                         residual_layernorm_forward(view.contiguous(), y, w, b, 1e-5, 0.0, None, 0, 0)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="contiguous"):
        residual_layernorm_forward(view, None, w, b, 1e-5, 0.0, None, 0, 0, row_view=True)
    with pytest.raises(ValueError, match="contiguous"):
        residual_layernorm_forward(view, y, w, b, 1e-5, 0.0, None, 0, 0)
