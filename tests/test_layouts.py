"""Every input layout and integer dtype, on every usable fused backend, against the reference.

Property tests (hypothesis): positions of any layout (contiguous, column-major, row/column steps, a column
window of a wider tensor, stride-0 expanded rows, 1-D views) and integer dtype, 1-D to 3-D, with output
gradients of any layout (dense, transposed, stride 0, a strided slice); the same for ``forward_digits``
inputs (digits and pad masks of any layout and dtype). Outputs and every parameter gradient must match the
reference at the fp32 tolerance (KERNEL_GUIDE §5: 1e-5 relative to max |ref|). Before this file, every parity
test fed contiguous int64 positions, and the Triton digit embedding read column-major [M, 2] positions with
the wrong column stride (5e-2 off, silently).

Also: with ``check_range=False`` out-of-range input never crashes the process or reads outside a table.
"""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import seqpe_kernels as sk

from conftest import HAS_CUDA, current_seed, fused_backends
from test_fused import rel

DEV = "cuda" if HAS_CUDA else "cpu"
FUSED = fused_backends(DEV)
pytestmark = pytest.mark.backend_needs_ext  # a broken extension fails its cases (conftest)
INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
_INFO = {dt: torch.iinfo(dt) for dt in INT_DTYPES}
SETTINGS = settings(max_examples=4, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_a_fused_backend_is_checked():
    # the property tests below are vacuous without a fused backend: on CPU the Triton interpreter
    # (conftest sets TRITON_INTERPRET=1) and the C++ extension are both expected to be usable
    assert FUSED, f"no fused backend usable on {DEV}: {sk.available_backends(DEV)}"


def _module_pair(backend, D, H, K, d, layers, direction, mask_padding, seed):
    torch.manual_seed(seed)
    ref = sk.SeqPE(D, H, K, num_layers=layers, data_dim=d, attn_direction=direction, mask_padding=mask_padding,
                   resid_pdrop=0.0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref = ref.to(DEV)
    return ref, sk.FusedSeqPE.from_reference(ref, backend=backend)


def _layout(base: torch.Tensor, layout: str) -> torch.Tensor:
    """``base`` [M, c] -> a tensor with the same values and the named memory layout."""
    M, c = base.shape
    if layout == "contiguous":
        return base.contiguous()
    if layout == "column_major":  # stride (1, M): what torch.stack([rows, cols]).T gives
        return base.t().contiguous().t()
    if layout == "row_step":  # every other row of a taller tensor
        big = torch.zeros(2 * M, c, dtype=base.dtype, device=base.device)
        big[::2] = base
        return big[::2]
    if layout == "col_step":  # every other column of a wider tensor: stride (2c, 2)
        big = torch.zeros(M, 2 * c, dtype=base.dtype, device=base.device)
        big[:, ::2] = base
        return big[:, ::2]
    if layout == "narrow":  # a column window of a wider tensor, offset storage
        big = torch.zeros(M, c + 3, dtype=base.dtype, device=base.device)
        big[:, 2:2 + c] = base
        return big.narrow(1, 2, c)
    if layout == "expanded":  # one row repeated with stride 0
        return base[:1].expand(M, c)
    raise AssertionError(layout)


LAYOUTS = ["contiguous", "column_major", "row_step", "col_step", "narrow", "expanded"]


def _grad_out(shape, layout, dtype, device=DEV):
    if layout == "dense":
        return torch.randn(shape, device=device, dtype=dtype)
    if layout == "transposed":
        return torch.randn(shape[1], shape[0], device=device, dtype=dtype).t()
    if layout == "stride0":  # what .sum() hands back
        return torch.ones((), device=device, dtype=dtype).expand(shape)
    return torch.randn(shape[0], 2 * shape[1], device=device, dtype=dtype)[:, 1::2]  # "sliced"


def _compare(ref, fus, call_ref, call_fus, gout_layout, what):
    yr, yf = call_ref(), call_fus()
    assert yf.shape == yr.shape and yf.dtype == yr.dtype, what
    assert rel(yf, yr) <= 1e-5, f"{what}: output rel err {rel(yf, yr):.3e}"
    g = _grad_out(tuple(yr.shape), gout_layout, yr.dtype)
    yr.backward(g)
    yf.backward(g)
    for (n, pr), (_, pf) in zip(ref.named_parameters(), fus.named_parameters()):
        assert pf.grad is not None, f"{what}: no gradient for {n}"
        assert rel(pf.grad, pr.grad) <= 1e-5, f"{what}: grad {n} rel err {rel(pf.grad, pr.grad):.3e}"


@st.composite
def position_case(draw):
    d = draw(st.sampled_from([1, 2, 2, 3]))  # mostly n-D: a column stride only matters there
    K = draw(st.integers(1, 3 if d == 1 else 2))
    dtype = draw(st.sampled_from(INT_DTYPES[:1] + INT_DTYPES))  # int64 (kept as is: no copy) most often
    hi = min(10 ** K, _INFO[dtype].max + 1)
    M = draw(st.integers(1, 6))
    vals = draw(st.lists(st.integers(0, hi - 1), min_size=M * d, max_size=M * d))
    one_d = d == 1 and draw(st.booleans())  # data_dim 1: [M] as well as [M, 1]
    return dict(d=d, K=K, dtype=dtype, M=M, vals=vals, one_d=one_d,
                direction=draw(st.sampled_from(["causal", "bi"])), mask_padding=draw(st.booleans()),
                # layers >= 2 mostly: with one layer only the CLS row of the embedding reaches the output
                layers=draw(st.sampled_from([1, 2, 2])), gout=draw(st.sampled_from(["dense", "transposed", "stride0",
                                                                            "sliced"])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", FUSED)
@SETTINGS
@given(case=position_case())
# always run: int64 [M, 2] positions (the dtype check_positions passes through without a copy, so the
# kernel sees the caller's strides) -- the reported column-major case failed only for these
@example(case=dict(d=2, K=2, dtype=torch.int64, M=5, vals=[3, 12, 99, 5, 0, 0, 41, 7, 10, 98], one_d=False,
                   direction="causal", mask_padding=False, layers=2, gout="dense", seed=1))
def test_positions_any_layout_and_dtype(backend, layout, case):
    case["layout"] = layout
    ref, fus = _module_pair(backend, 16, 2, case["K"], case["d"], case["layers"], case["direction"],
                            case["mask_padding"], case["seed"])
    base = torch.tensor(case["vals"], dtype=case["dtype"], device=DEV).view(case["M"], case["d"])
    pos = _layout(base, case["layout"])
    if case["one_d"]:
        pos = pos[:, 0]  # a strided 1-D view for every layout but contiguous
    assert torch.equal(pos.long().reshape(case["M"], -1), base.long()) or case["layout"] == "expanded"
    _compare(ref, fus, lambda: ref(pos), lambda: fus(pos), case["gout"],
             f"{backend} positions {case['layout']} {case['dtype']} {tuple(pos.shape)} stride {pos.stride()}")


@st.composite
def digits_case(draw):
    d = draw(st.integers(1, 2))
    K = draw(st.integers(1, 3))
    L = d * K  # digits are [M, L]: every layout below has a column stride that matters
    M = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(INT_DTYPES[:1] + INT_DTYPES))
    digits = draw(st.lists(st.integers(0, 9), min_size=M * L, max_size=M * L))
    mask = draw(st.lists(st.booleans(), min_size=M * L, max_size=M * L))
    return dict(d=d, K=K, M=M, dtype=dtype, digits=digits, mask=mask, mask_layout=draw(st.sampled_from(LAYOUTS)),
                mask_dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bool, torch.int64, None])),
                direction=draw(st.sampled_from(["causal", "bi"])), mask_padding=draw(st.booleans()),
                gout=draw(st.sampled_from(["dense", "transposed", "stride0", "sliced"])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", FUSED)
@SETTINGS
@given(case=digits_case())
@example(case=dict(d=2, K=2, M=3, dtype=torch.int64, digits=[1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2], mask=[True] * 12,
                   mask_layout="contiguous", mask_dtype=None, direction="bi", mask_padding=False, gout="dense",
                   seed=2))
def test_forward_digits_any_layout_and_dtype(backend, layout, case):
    case["layout"] = layout
    ref, fus = _module_pair(backend, 16, 2, case["K"], case["d"], 2, case["direction"], case["mask_padding"],
                            case["seed"])
    L = case["d"] * case["K"]
    dg = _layout(torch.tensor(case["digits"], dtype=case["dtype"], device=DEV).view(case["M"], L),
                 case["layout"])
    if case["mask_dtype"] is None:
        pm = None
    else:
        pm = torch.tensor(case["mask"], device=DEV).view(case["M"], L).to(case["mask_dtype"])
        pm = _layout(pm, case["mask_layout"])
    _compare(ref, fus, lambda: ref.forward_digits(dg, pm), lambda: fus.forward_digits(dg, pm), case["gout"],
             f"{backend} digits {case['layout']} {case['dtype']} mask {case['mask_layout']} {case['mask_dtype']}")


def test_issue_column_major_2d_positions():
    """The reported case: column-major 2-D positions (stride (1, 25)) through every fused backend."""
    x = torch.cartesian_prod(torch.arange(5), torch.arange(5)).t().contiguous().t().to(DEV)
    assert x.stride() == (1, 25)
    for backend in FUSED:
        torch.manual_seed(current_seed())  # (the same weights for each backend, fresh per run)
        ref = sk.SeqPE(64, 4, 2, data_dim=2, resid_pdrop=0.0).to(DEV).eval()
        fus = sk.FusedSeqPE.from_reference(ref, backend=backend).eval()
        with torch.no_grad():
            assert rel(fus(x), ref(x)) <= 1e-5, backend


# ------------------------------------------------------------------ refused by name
@pytest.mark.parametrize("backend", FUSED + ["torch"])
def test_refuses_what_it_cannot_encode(backend):
    fus = sk.FusedSeqPE(16, 2, 2, data_dim=2, backend=backend).to(DEV)
    with pytest.raises(TypeError, match="integer dtype"):
        fus(torch.zeros(3, 2, device=DEV))
    with pytest.raises(TypeError, match="integer dtype"):
        fus(torch.zeros(3, 2, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="data_dim=2"):
        fus(torch.zeros(3, 3, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match=r"shape \[M\] or \[M, d\]"):
        fus(torch.zeros(2, 3, 2, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match="non-negative"):
        fus(torch.tensor([[1, -1]], device=DEV))
    with pytest.raises(ValueError, match="max_digits=2"):
        fus(torch.tensor([[1, 100]], device=DEV))
    with pytest.raises(TypeError, match="integer ids"):
        fus.forward_digits(torch.zeros(3, 4, device=DEV))
    with pytest.raises(ValueError, match=r"digit ids must lie in \[0, 10\)"):
        fus.forward_digits(torch.full((3, 4), 10, device=DEV))
    with pytest.raises(ValueError, match="pad_mask shape"):
        fus.forward_digits(torch.zeros(3, 4, dtype=torch.long, device=DEV), torch.ones(3, 5, device=DEV))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("bad", ["digit_huge", "digit_negative", "position_negative", "position_too_big"])
def test_unchecked_out_of_range_never_crashes(backend, bad):
    """check_range=False gives up the error, not memory safety: a fused backend either raises or returns NaN
    for the offending sequence (and exact results for the others), never reads outside its tables (the
    Triton interpreter segfaulted on a digit id of 10**9 before)."""
    torch.manual_seed(1)
    ref = sk.SeqPE(16, 2, 3, resid_pdrop=0.0).to(DEV).eval()
    fus = sk.FusedSeqPE.from_reference(ref, backend=backend).eval()
    fus.check_range = False
    good = torch.tensor([5, 123, 999], device=DEV)
    if bad.startswith("digit"):
        dg, pm = ref.tokenize(good)
        dg = dg.clone()
        dg[1, 0] = 10 ** 9 if bad == "digit_huge" else -7
        call = lambda: fus.forward_digits(dg, pm)  # noqa: E731
    else:
        pos = good.clone()
        pos[1] = -4 if bad == "position_negative" else 10 ** 12
        call = lambda: fus(pos)  # noqa: E731
    try:
        with torch.no_grad():
            y = call()
    except (RuntimeError, ValueError, IndexError) as e:  # refusing is allowed
        assert "range" in str(e) or "outside" in str(e), str(e)
        return
    assert torch.isnan(y[1]).all(), f"{backend}: out-of-range row not NaN: {y[1]}"
    with torch.no_grad():
        yr = ref(good)
    assert rel(y[[0, 2]], yr[[0, 2]]) <= 1e-5
