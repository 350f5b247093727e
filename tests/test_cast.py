"""encoder.cast_group: the Triton encoder's GEMM weights cast to the autocast dtype in one _foreach_copy_ (one
multi-tensor launch on CUDA), bit for bit as ``Tensor.to``."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HAS_CUDA

DEV = "cuda" if HAS_CUDA else "cpu"
TARGETS = [torch.bfloat16, torch.float16, torch.float64]


@settings(max_examples=30, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(st.lists(st.integers(0, 70), min_size=1, max_size=2), min_size=0, max_size=19),
       dt=st.sampled_from(TARGETS), same=st.lists(st.booleans(), min_size=19, max_size=19),
       strided=st.booleans(), mixed=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_cast_group_equals_tensor_to(shapes, dt, same, strided, mixed, seed):
    """Any number of tensors, sizes crossing the multi-tensor chunks, empty tensors, some already in the target
    dtype (returned as they are), non-contiguous inputs, sources of two dtypes (the tensor-by-tensor path);
    values beyond the half range and between two bf16 values (rounding to nearest even)."""
    from seqpe_kernels.encoder import cast_group

    gen = torch.Generator().manual_seed(seed)
    ts = []
    for i, (s, keep) in enumerate(zip(shapes, same)):
        t = torch.randn(*[n * (41 if i == 0 else 1) for i, n in enumerate(s)], generator=gen) * 1e3
        if t.numel():
            t.view(-1)[0] = 7e4  # past fp16's largest finite value: inf, as Tensor.to gives
        t = t.to(dt) if keep else (t.double() if mixed and i % 3 == 0 else t)
        if strided and t.dim() == 2 and t.shape[1] > 1:
            t = t[:, ::2]
        ts.append(t.to(DEV))
    out = cast_group(ts, dt)
    assert len(out) == len(ts)
    for t, o in zip(ts, out):
        if t.dtype == dt:
            assert o is t
        else:
            assert o.dtype == dt and o.shape == t.shape and o.is_contiguous()
            assert torch.equal(o, t.to(dt)), t.shape


def test_cast_group_rounds_like_tensor_to():
    """Round to nearest even at every fp32 bit pattern of a bf16 / fp16 tie region (the multi-tensor copy is the
    same static_cast as Tensor.to; a truncating or round-half-up cast fails here)."""
    from seqpe_kernels.encoder import cast_group

    base = torch.tensor([1.0, 3.0, 1000.0, -7.5, 2.0 ** -20], dtype=torch.float32)
    bits = base.view(torch.int32)[:, None] + torch.arange(0, 1 << 16, 97, dtype=torch.int32)[None, :]
    x = bits.reshape(-1).view(torch.float32).to(DEV)
    for dt in (torch.bfloat16, torch.float16):
        (o,) = cast_group([x], dt)
        assert torch.equal(o, x.to(dt)), dt


@pytest.mark.gpu
def test_encoder_casts_in_one_launch_on_cuda():
    """A bf16-autocast Triton training step casts its 18 GEMM weights and biases with one _foreach_copy_ (one
    multi-tensor kernel), and its output and gradients equal those of the same step with one cast per tensor."""
    import seqpe_kernels as sk
    from seqpe_kernels import encoder as E
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    ref = sk.SeqPE(64, 2, 3, num_layers=2, resid_pdrop=0.0).cuda()
    fus = sk.FusedSeqPE.from_reference(ref, backend="triton")
    pos = torch.randint(0, 1000, (37,), device="cuda")
    P = E.triton_prims()

    def run(group):
        saved = P.cast_group
        P.cast_group = group
        try:
            for p in fus.parameters():
                p.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fus(pos)
            y.float().sum().backward()
            return y.detach(), [p.grad.clone() for p in fus.parameters()]
        finally:
            P.cast_group = saved

    calls = []

    def counting(ts, dt):
        calls.append(sum(t.dtype != dt for t in ts))
        return saved_group(ts, dt)

    saved_group = P.cast_group
    run(counting)  # compile / warm up
    calls.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y1, g1 = run(counting)
    y0, g0 = run(None)
    assert calls == [18] and torch.equal(y1, y0) and all(torch.equal(a, b) for a, b in zip(g1, g0))
    names = [e.name for e in prof.events()]
    assert names.count("aten::_foreach_copy_") == 1, names.count("aten::_foreach_copy_")
