"""ops/cast.py: the encoder's weights cast to the autocast dtype, up to eight tensors per launch, bit for bit as
``Tensor.to``. On CPU (the Triton interpreter) the targets are fp16 and fp64: the interpreter converts fp32 to
bf16 by truncation (a GPU rounds to nearest even, as ``Tensor.to``), so bf16 runs on a GPU only."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HAS_CUDA

DEV = "cuda" if HAS_CUDA else "cpu"
TARGETS = [torch.float16, torch.float64] + ([torch.bfloat16] if HAS_CUDA else [])


@settings(max_examples=20, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(st.lists(st.integers(0, 70), min_size=1, max_size=2), min_size=0, max_size=19),
       dt=st.sampled_from(TARGETS), same=st.lists(st.booleans(), min_size=19, max_size=19),
       strided=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_cast_group_equals_tensor_to(shapes, dt, same, strided, seed):
    """Any number of tensors (groups of eight and a remainder), sizes crossing the 2048-element blocks, empty
    tensors, some already in the target dtype (returned as they are), non-contiguous inputs."""
    from seqpe_kernels.ops.cast import cast_group

    gen = torch.Generator().manual_seed(seed)
    ts = []
    for s, keep in zip(shapes, same):
        t = torch.randn(*[n * (41 if i == 0 else 1) for i, n in enumerate(s)], generator=gen) * 100
        t = t.to(dt) if keep else t
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
            assert torch.equal(o, t.to(dt)), (t.shape, (o != t.to(dt)).sum().item())


@pytest.mark.parametrize("dt", TARGETS)
def test_cast_group_every_slot(dt):
    """19 tensors of distinct sizes (every slot of three groups, sizes around the block), none already in dt."""
    from seqpe_kernels.ops.cast import cast_group

    gen = torch.Generator().manual_seed(1)
    sizes = [1, 2047, 2048, 2049, 5000, 3, 4097, 16, 6144, 7, 100, 2500, 1, 8191, 33, 0, 4096, 12, 9000]
    ts = [(torch.randn(n, generator=gen) * 1e3).to(DEV) for n in sizes]
    out = cast_group(ts, dt)
    for t, o in zip(ts, out):
        assert o.dtype == dt and torch.equal(o, t.to(dt)), t.numel()


@pytest.mark.gpu
def test_encoder_casts_in_three_launches_on_cuda():
    """A bf16-autocast Triton training step casts its 18 GEMM weights and biases in 3 launches, and its output and
    gradients equal those of the same step with one cast per tensor."""
    import seqpe_kernels as sk
    from seqpe_kernels import encoder as E

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
    y1, g1 = run(counting)
    y0, g0 = run(None)
    assert calls == [18] and torch.equal(y1, y0) and all(torch.equal(a, b) for a, b in zip(g1, g0))
