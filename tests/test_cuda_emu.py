"""The CUDA kernels of csrc/ops_cuda.cu, run on CPU by the emulator (csrc/emu/cuda_emu.h), against the C++ CPU ops.

Most sessions and CI have no GPU, so without this the CUDA kernels' logic (indexing, chunked reductions, shared
memory, warp exchanges, barriers) is first run on a leased GPU. Here the same kernels and launchers, compiled as
C++ (``seqpe_kernels._ext.emulator()``: every CUDA thread a fiber, warps and blocks released at their sync points),
are held to the CPU extension's ops on the same inputs: those share the contract and are themselves held to the
Triton kernels and the reference (test_ext.py). Property-based over shapes, dtypes, layouts and options.

Also checked, what a GPU would not report: a divergent barrier or a shuffle in a warp with exited lanes (the
emulator raises), dynamic shared memory read before written (it starts as NaN bytes), and a result that depends on
the order threads and blocks run (a race or a missing barrier: every case runs in forward and reverse order and
must agree bit for bit). The launchers' grid sizes depend on the SM count (2 here, so chunked grids show up at
test sizes); one test varies it.

Bounds: fp32 1e-6 and fp64 1e-12 relative (the same math in another summation order); fp16 / bf16 outputs are
rounded from fp32 by both, so they may differ by one rounding step of their own magnitude.
"""
import os
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

from seqpe_kernels import _ext

from conftest import require_ext

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SETTINGS = dict(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def ops():
    require_ext("cpu")  # no C++ compiler: skipped with the reason; a build error fails
    return _ext.emulator(), _ext.load()


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def assert_close(e, c, what, floor=0.0):
    assert e.shape == c.shape and e.dtype == c.dtype, (what, e.shape, c.shape, e.dtype, c.dtype)
    if not e.is_floating_point():
        assert torch.equal(e, c), what
        return
    if e.numel() == 0:
        return
    assert torch.equal(e.isnan(), c.isnan()), (what, "NaN pattern")
    dt = e.dtype
    e, c = e.double().nan_to_num(), c.double().nan_to_num()
    err = (e - c).abs()
    # floor: a number (the output's error scale), or a tensor of c's shape (each element's own)
    scale = (floor.double().clamp_min(c.abs().max().item()) if isinstance(floor, torch.Tensor)
             else max(c.abs().max().item(), floor))
    if dt in (torch.float16, torch.bfloat16):  # one rounding step of the element's magnitude
        bad = err > torch.finfo(dt).eps * c.abs() + 1e-6 * scale
    else:
        bad = err > (1e-12 if dt == torch.float64 else 1e-6) * scale
    assert not bad.any(), (what, err.max().item(), float(torch.as_tensor(scale).max()))


def run_both(ops, name, args, floors=None):
    """The emulated CUDA op in forward and reverse thread/block order (bit-equal) and the CPU op. ``floors(cpu
    outputs)``: output index -> the magnitude of the terms summed into it (its error scale where they cancel and
    the output is ~0: the same sum in another order differs by rounding of the terms, not of the result)."""
    emu, cpu = ops
    with mock.patch.dict(os.environ, SEQPE_EMU_ORDER="forward"):
        e = _tuple(getattr(emu, name)(*args))
    with mock.patch.dict(os.environ, SEQPE_EMU_ORDER="reverse"):
        r = _tuple(getattr(emu, name)(*args))
    for k, (a, b) in enumerate(zip(e, r)):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()), \
            f"{name} output {k} depends on the order threads run (a race or a missing barrier)"
    c = _tuple(getattr(cpu, name)(*args))
    assert len(e) == len(c)
    fl = floors(c) if floors else {}
    for k, (a, b) in enumerate(zip(e, c)):
        assert_close(a, b, f"{name} output {k}", fl.get(k, 0.0))
    return e


def _colsum_abs(t):
    return t.double().abs().sum(0).max().item() if t.numel() else 0.0


def _seeds():
    return torch.randint(0, 2 ** 31 - 1, (3,))


# ----------------------------------------------------------------------------- tiny attention
@settings(**SETTINGS)
@given(M=st.integers(0, 4), T=st.integers(1, 9), H=st.integers(1, 3), DH=st.sampled_from([1, 5, 16, 33, 64, 65]),
       dtype=st.sampled_from(DTYPES), cross=st.booleans(), causal=st.booleans(), masked=st.booleans(),
       p=st.sampled_from([0.0, 0.3]), strided=st.booleans(), staged=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_attention(ops, M, T, H, DH, dtype, cross, causal, masked, p, strided, staged, seed):
    """Both CUDA kernels: the register-resident one (T <= 8, DH <= 64, fp32 accumulation) and the staged one
    (everything else; forced by SEQPE_EMU_ATTN=staged)."""
    with mock.patch.dict(os.environ, SEQPE_EMU_ATTN="staged" if staged else "auto"):
        _check_attention(ops, M, T, H, DH, dtype, cross, causal, masked, p, strided, seed)


@pytest.mark.parametrize("staged", [False, True], ids=["register", "staged"])
@pytest.mark.parametrize("T,cross", [(6, False), (6, True), (5, False), (3, True)])
def test_attention_paper_shapes(ops, T, cross, staged):
    """Every time (not only when hypothesis draws them): the text (T = 6) and image (T = 5) head shapes, DH = 64,
    causal with padding masks and dropout, bf16 storage, for both kernels."""
    with mock.patch.dict(os.environ, SEQPE_EMU_ATTN="staged" if staged else "auto"):
        _check_attention(ops, 3, T, 2, 64, torch.bfloat16, cross, True, True, 0.3, False, T)
        _check_attention(ops, 2, T, 1, 64, torch.float32, cross, False, False, 0.0, True, T + 1)


@pytest.mark.parametrize("staged", [False, True], ids=["register", "staged"])
@pytest.mark.parametrize("TQ,T", [(6, 2), (9, 8), (5, 4), (8, 3)])
def test_attention_more_queries_than_keys(ops, TQ, T, staged):
    """q [M, TQ, D] with kv [M, T, 2D] and TQ > T: the register kernel stages at most TP query rows, so its TP
    must cover TQ as well as T (it read past its scratch: NaN here, garbage or a fault on a GPU)."""
    torch.manual_seed(TQ * 10 + T)
    M, H, DH = 3, 2, 64
    D = H * DH
    q, kv = torch.randn(M, TQ, D), torch.randn(M, T, 2 * D)
    seeds = _seeds()
    args = (q, kv, None, H, False, 0, float(DH) ** 0.5, 0.3, seeds, 1, None)
    with mock.patch.dict(os.environ, SEQPE_EMU_ATTN="staged" if staged else "auto"):
        run_both(ops, "tiny_attention_fwd", args)
        dout = torch.randn(M, TQ, D)
        terms = dout.abs().max().item() * max(q.abs().max().item(), kv.abs().max().item()) ** 2 * DH * T
        run_both(ops, "tiny_attention_bwd", (dout,) + args, lambda c: {0: terms, 1: terms})


def _check_attention(ops, M, T, H, DH, dtype, cross, causal, masked, p, strided, seed):
    torch.manual_seed(seed)
    D = H * DH
    if cross:  # the CLS-only last block: one query row against the T keys
        q = torch.randn(M, 1, D + 3 * strided, dtype=dtype)[..., :D]
        kv = torch.randn(M, T, 2 * D, dtype=dtype)
        first, second, q_start, TQ = q, kv, T - 1, 1
    else:
        qkv = torch.randn(M, T, 3 * D + 5 * strided, dtype=dtype)
        first, second, q_start, TQ = qkv[..., strided:strided + 3 * D], None, 0, T
    pad = (torch.rand(M, T - 1) > 0.3).float() if masked and T > 1 else None
    seeds = _seeds() if p else None
    sdiv = float(DH) ** 0.5
    args = (first, second, pad, H, causal, q_start, sdiv, p, seeds, 1 if p else 0, None)
    run_both(ops, "tiny_attention_fwd", args)
    dout = torch.randn(M, TQ, D, dtype=dtype)
    if strided:
        dout = torch.randn(M, D, TQ, dtype=dtype).transpose(1, 2)
    # each gradient is a sum over keys / queries of products that cancel (exactly 0 with one key): their scale
    big = max([t.double().abs().max().item() for t in (first, second) if t is not None and t.numel()] + [0.0])
    terms = (dout.double().abs().max().item() if dout.numel() else 0.0) * big * big * DH * T
    run_both(ops, "tiny_attention_bwd", (dout,) + args, lambda c: {0: terms, 1: terms})
    # the indexed form (layer 0): the table operand's rows picked per token by rows [M, T]; the same values, bit
    # for bit, as the gathered operand (the tokens' rows are staged, then the same arithmetic)
    n = 2 * T + 1
    rows = torch.randint(0, n, (M, T))
    width = 2 * D if cross else 3 * D
    tab = torch.randn(n, width + 3 * strided, dtype=dtype)[:, :width]
    gathered = tab[rows]
    iargs = ((first, tab) if cross else (tab, None)) + args[2:-1] + (rows,)
    gargs = ((first, gathered) if cross else (gathered, None)) + args[2:-1] + (None,)
    for a_, b_ in zip(run_both(ops, "tiny_attention_fwd", iargs), _tuple(ops[0].tiny_attention_fwd(*gargs))):
        assert torch.equal(a_, b_), "indexed forward"
    for a_, b_ in zip(run_both(ops, "tiny_attention_bwd", (dout,) + iargs, lambda c: {0: terms, 1: terms}),
                      ops[0].tiny_attention_bwd(dout, *gargs)):
        assert torch.equal(a_, b_), "indexed backward (per-token gradients)"


def test_indexed_attention_refuses_rows_outside_the_table(ops):
    """A table row outside [0, n): the CPU op raises; the CUDA kernel (which cannot check on the host without a
    sync) stages NaN for that token, so its sequence's outputs are NaN and no other sequence's are."""
    emu, cpu = ops
    tab = torch.randn(5, 3 * 8)
    rows = torch.tensor([[0, 1, 4], [2, 5, 1], [3, -1, 0], [4, 4, 4]])
    args = (tab, None, None, 2, False, 0, 2.0, 0.0, None, 0, rows)
    with pytest.raises(RuntimeError, match="table row 5 outside"):
        cpu.tiny_attention_fwd(*args)
    out = emu.tiny_attention_fwd(*args)
    assert out[1].isnan().all() and out[2].isnan().all() and not out[[0, 3]].isnan().any()
    good = cpu.tiny_attention_fwd(tab, None, None, 2, False, 0, 2.0, 0.0, None, 0, rows[[0, 3]])
    assert_close(out[[0, 3]], good, "the sequences with valid rows")
    for op in (cpu, emu):  # a table q takes every row as a query; rows must be int64 [M, T]
        with pytest.raises(RuntimeError, match="q_start 0"):
            op.tiny_attention_fwd(tab, None, None, 2, False, 1, 2.0, 0.0, None, 0, rows.clamp(0, 4))
        with pytest.raises(RuntimeError, match="int64"):
            op.tiny_attention_fwd(tab, None, None, 2, False, 0, 2.0, 0.0, None, 0, rows.int())


# ----------------------------------------------------------------------------- residual + dropout + LayerNorm
@settings(**SETTINGS)
@given(R=st.integers(0, 7), D=st.sampled_from([1, 7, 32, 100, 257, 600, 1100, 4100]), dtype=st.sampled_from(DTYPES),
       with_y=st.booleans(), affine=st.booleans(), p=st.sampled_from([0.0, 0.2]), out_fp32=st.booleans(),
       with_da=st.booleans(), with_dh=st.booleans(), every=st.sampled_from([0, 1, 3]), seed=st.integers(0, 2 ** 16))
def test_residual_layernorm(ops, R, D, dtype, with_y, affine, p, out_fp32, with_da, with_dh, every, seed):
    torch.manual_seed(seed)
    if every:  # the bias form's dh_every: dh holds rows every-1, 2*every-1, ... only, as [R / every, D]
        R -= R % every
    x = torch.randn(R, D, dtype=dtype)
    y = torch.randn(R, D, dtype=dtype) if with_y else None
    w = torch.randn(D, dtype=dtype) if affine else None
    b = torch.randn(D, dtype=dtype) if affine else None
    seeds = _seeds() if p else None
    p = p if with_y else 0.0
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}[dtype]
    out_dtype = 0 if out_fp32 and dtype != torch.float64 else code  # the LN output's dtype code
    fwd = (x, y, w, b, 1e-5, p, seeds, 2, out_dtype)
    # the row mean: a sum of the row's values (cancels to ~0 for some rows)
    terms = (x.double().abs() + (y.double().abs() / (1 - p) if with_y else 0)).max().item() if x.numel() else 0.0
    h, a, mean, rstd = run_both(ops, "residual_layernorm_fwd", fwd, lambda c: {2: terms})
    ln_in = h if with_y else x  # the tensor the LayerNorm normalised
    with_da = affine and with_da  # the LayerNorm output's gradient (no LayerNorm: none)
    with_dh = with_dh or not with_da
    da = torch.randn(R, D, dtype=a.dtype) if with_da else None
    dh = torch.randn(R, D, dtype=dtype) if with_dh else None
    if dh is not None and every:  # zero but for the rows a sparse dh holds
        dh.view(R // every, every, D)[:, :every - 1] = 0
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = da * w (exactly 0 for D = 1), and dy from it; dw, db,
    # the bias gradient: column sums of g * xhat, da, dy
    def floors(c):
        if not (with_da and R):
            return {4: _colsum_abs(c[1])}
        xhat = (ln_in.double() - mean.double()[:, None]) * rstd.double()[:, None]
        dx = (rstd.abs().max() * (da.double() * w.double()).abs().max()).item()
        return {0: dx, 1: dx / (1 - p),  # dy: dx through the branch's dropout
                2: _colsum_abs(da.double() * xhat), 3: _colsum_abs(da), 4: R * dx / (1 - p) + _colsum_abs(c[1])}

    args = (da, dh, ln_in, w, mean, rstd, p, seeds, 2, with_y, code)
    run_both(ops, "residual_layernorm_bwd", args, floors)
    dense = run_both(ops, "residual_layernorm_bwd_bias", args + (0,), floors)
    if dh is not None and every:  # the same dh given sparsely: the same values, bit for bit
        sparse = run_both(ops, "residual_layernorm_bwd_bias",
                          (da, dh.view(R // every, every, D)[:, every - 1], *args[2:], every), floors)
        for k, (a_, b_) in enumerate(zip(dense, sparse)):
            assert torch.equal(a_.nan_to_num(), b_.nan_to_num()), f"dh_every={every}: output {k} differs"


@pytest.mark.parametrize("D", [4096, 12300])
def test_residual_layernorm_wide_rows(ops, D):
    """Widths whose shared memory nears 48 KB: the backward's three partial rows at D = 4096 (exactly 48 KB, which
    with the kernel's static reduction buffer a GPU refuses without the opt-in: the global-partials kernel runs),
    and a forward row of 12300 fp32 values (past 48 KB: the launcher opts in, which the emulator checks)."""
    torch.manual_seed(D)
    R = 3
    x, y, w, b = torch.randn(R, D), torch.randn(R, D), torch.randn(D), torch.randn(D)
    seeds = _seeds()
    h, a, mean, rstd = run_both(ops, "residual_layernorm_fwd", (x, y, w, b, 1e-5, 0.2, seeds, 2, 0),
                                lambda c: {2: 10.0})
    da, dh = torch.randn(R, D), torch.randn(R, D)
    run_both(ops, "residual_layernorm_bwd_bias", (da, dh, h, w, mean, rstd, 0.2, seeds, 2, True, 0, 0),
             lambda c: {k: 100.0 * R for k in range(5)})


# ----------------------------------------------------------------------------- gelu_new
@settings(**SETTINGS)
@given(R=st.integers(0, 40), C=st.sampled_from([1, 3, 31, 256, 300]), dtype=st.sampled_from(DTYPES),
       du_dtype=st.sampled_from([None, torch.float32]), seed=st.integers(0, 2 ** 16))
def test_gelu(ops, R, C, dtype, du_dtype, seed):
    torch.manual_seed(seed)
    z = torch.randn(R, C, dtype=dtype) * 3
    du = torch.randn(R, C, dtype=du_dtype or dtype)
    run_both(ops, "gelu_new_fwd", (z,))
    # dz = du * (0.5 (1 + t) + 0.5 z (1 - t^2) C (1 + 3A z^2)), t = tanh(C (z + A z^3)) = 1 - 2 / (exp(2u) + 1):
    # both kernels round t to ~1 ulp of 1, and dz moves by du * (0.5 - z t C (1 + 3A z^2)) per unit of t -- up to
    # ~15 |du| where t ~ -1 (z ~ -4), whatever dz's own size there (1 + t cancels). Two correct fp32 kernels with
    # different exp (the emulator: the host's expf; the CPU op: a polynomial) differ by that much: seen 5.3e-6 at
    # |dz| <= 2.7 (seed 5, 4 x 256), twice a bound scaled by max |dz| alone. So each element's error scale
    # includes its own sensitivity to t (elsewhere the bound stays 1e-6 max |dz|); the bias gradient's, its column's.
    zd = z.double()
    t = torch.tanh(0.7978845608028654 * (zd + 0.044715 * zd ** 3))
    s = (du.double() * (0.5 - zd * t * 0.7978845608028654 * (1 + 3 * 0.044715 * zd ** 2))).abs()
    run_both(ops, "gelu_new_bwd", (du, z), lambda c: {0: s})
    run_both(ops, "gelu_new_bwd_bias", (du, z),
             lambda c: {0: s, 1: s.sum(0).clamp_min(_colsum_abs(c[0]))})


# ----------------------------------------------------------------------------- digit embedding, layer-0 table
@settings(**SETTINGS)
@given(M=st.integers(0, 20), K=st.integers(1, 4), base=st.sampled_from([2, 10, 16]), data_dim=st.sampled_from([1, 2]),
       D=st.sampled_from([1, 8, 130]), dtype=st.sampled_from(DTYPES), from_positions=st.booleans(),
       with_table=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_digit_embedding(ops, M, K, base, data_dim, D, dtype, from_positions, with_table, seed):
    torch.manual_seed(seed)
    L = K * data_dim
    x = (torch.randint(0, base ** K, (M, data_dim)) if from_positions
         else torch.randint(0, base, (M, L)))
    tok, pos = torch.randn(base, D, dtype=dtype), torch.randn(L, D, dtype=dtype)
    dim = torch.randn(data_dim, 1, D, dtype=dtype) if data_dim > 1 else None
    cls = torch.randn(1, 1, D, dtype=dtype)
    run_both(ops, "digit_embed_fwd", (x, tok, pos, dim, cls, from_positions, K))
    g = torch.randn(M, L + 1, D, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tg = torch.randn(base * L + 1, D, dtype=acc) if with_table else None
    absolute = ops[1].digit_embed_bwd(g.abs(), x, from_positions, K, base, data_dim, None if tg is None else tg.abs())
    run_both(ops, "digit_embed_bwd", (g, x, from_positions, K, base, data_dim, tg),
             lambda c: {k: t.double().abs().max().item() if t.numel() else 0.0 for k, t in enumerate(absolute)})
    for clamp in (False, True):
        rows = run_both(ops, "table_rows", (x, L, K, base, from_positions, clamp))[0]
    for acc_out in (False, True):
        absolute = ops[1].table_grad(g.abs(), rows, base * L + 1, L, acc_out)
        run_both(ops, "table_grad", (g, rows, base * L + 1, L, acc_out),
                 lambda c: {0: absolute.double().max().item() if absolute.numel() else 0.0})


def test_invalid_digits_make_nan_rows(ops):
    """check_range off: an out-of-range position makes its sequence's rows NaN (the Triton kernel's contract);
    the other sequences are exact."""
    emu, cpu = ops
    tok, pos, cls = torch.randn(10, 8), torch.randn(3, 8), torch.randn(1, 1, 8)
    x = torch.tensor([[5], [1000], [-1], [999]])
    out = emu.digit_embed_fwd(x, tok, pos, None, cls, True, 3)
    assert out[1].isnan().all() and out[2].isnan().all() and not out[[0, 3]].isnan().any()
    good = cpu.digit_embed_fwd(x[[0, 3]], tok, pos, None, cls, True, 3)
    assert torch.equal(out[[0, 3]], good)


@pytest.mark.parametrize("sms", [1, 3, 132])
def test_chunked_grids_agree(ops, sms):
    """The reductions' chunk counts follow the SM count; the results must not (beyond summation order)."""
    torch.manual_seed(sms)
    with mock.patch.dict(os.environ, SEQPE_EMU_SMS=str(sms)):
        test_gelu.hypothesis.inner_test(ops, 37, 300, torch.float32, None, sms)
        # 37 sequences on one SM: chunks of 10, each two digit tiles (8 + 2); on 3 SMs chunks of 4
        test_digit_embedding.hypothesis.inner_test(ops, 37, 3, 10, 2, 130, torch.float32, True, True, sms)
        test_residual_layernorm.hypothesis.inner_test(ops, 7, 257, torch.float32, True, True, 0.2, True, True,
                                                      True, 0, sms)
        test_residual_layernorm.hypothesis.inner_test(ops, 9, 257, torch.float32, True, True, 0.2, True, True,
                                                      True, 3, sms)


# ----------------------------------------------------------------------------- the emulator catches what it claims
def test_emulator_reports_divergent_barriers_and_exited_lanes(tmp_path):
    """A kernel with __syncthreads in one branch, and a shuffle after half a warp returned: both raise."""
    src = tmp_path / "bad.cpp"
    emu_h = _ext.CSRC / "emu" / "cuda_emu.h"
    src.write_text(f'''#include "{emu_h}"
#include <torch/library.h>
#include <ATen/ATen.h>
void divergent(float* out) {{ if (threadIdx.x < 16) __syncthreads(); else __syncwarp(); out[threadIdx.x] = 1; }}
void exited(float* out) {{ if (threadIdx.x & 1) return; out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 2); }}
void good(float* out) {{ float v = threadIdx.x; for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                        __syncthreads(); out[threadIdx.x] = v; }}
at::Tensor run(int64_t which) {{
  at::Tensor out = at::zeros({{64}});
  float* p = out.data_ptr<float>();
  if (which == 0) SEQPE_LAUNCH(dim3(1), dim3(64), 0, divergent)(p);
  if (which == 1) SEQPE_LAUNCH(dim3(1), dim3(32), 0, exited)(p);
  if (which == 2) SEQPE_LAUNCH(dim3(2), dim3(64), 0, good)(p);
  return out;
}}
TORCH_LIBRARY(seqpe_emu_selftest, m) {{ m.def("run", &run); }}
''')
    require_ext("cpu")
    from torch.utils import cpp_extension

    cpp_extension.load(name="seqpe_emu_selftest", sources=[str(src)], extra_cflags=["-O1"],
                       build_directory=str(tmp_path), is_python_module=False)
    run = torch.ops.seqpe_emu_selftest.run
    with pytest.raises(RuntimeError, match="deadlock"):
        run(0)
    with pytest.raises(RuntimeError, match="lanes already exited"):
        run(1)
    out = run(2)
    assert torch.equal(out[:32], torch.full((32,), 496.0)) and torch.equal(out[32:], torch.full((32,), 1520.0))


# ----------------------------------------------------------------------------- the whole cuda backend, end to end
# FusedSeqPE(backend="cpu") over torch.ops.seqpe_emu: the C++ encoder taking its CUDA paths (csrc/encoder.cpp's
# on_cuda branches: the table-gradient kernel, fp32-output weight-gradient GEMMs where ATen offers them) over the
# emulated CUDA kernels, against the reference module: output and every parameter gradient.
@pytest.fixture
def emulated_backend(ops, monkeypatch):
    import seqpe_kernels.fused as fused

    monkeypatch.setattr(fused, "_EXT", [ops[0]])


E2E_CONFIGS = [
    dict(embed_dim=32, num_heads=2, max_digits=3),
    dict(embed_dim=48, num_heads=3, max_digits=2, data_dim=2, attn_direction="bi", out_dim=20, num_layers=3, base=16,
         layer_norm_eps=1e-2),
    dict(embed_dim=64, num_heads=1, max_digits=4, mask_padding=True, use_last_layernorm=False, temperature=0.5),
    dict(embed_dim=40, num_heads=5, max_digits=8, data_dim=4, num_layers=1, mask_padding=True),  # T = 33
    dict(embed_dim=96, num_heads=6, max_digits=2, data_dim=2, out_dim=40, init="image"),
    dict(embed_dim=42, num_heads=3, max_digits=1, num_layers=2, scale_attn_weights=False),  # T = 2, head dim 14
    # more digits than the in-kernel tokenizer's power table once held (32: the CUDA backend refused K = 33..62,
    # which base 2 and 3 need, found by test_config_space.py)
    dict(embed_dim=16, num_heads=2, max_digits=40, base=2, num_layers=1),
]


@pytest.mark.parametrize("cfg", E2E_CONFIGS, ids=lambda c: "-".join(f"{k[:4]}{v}" for k, v in c.items()))
def test_cuda_backend_parity(emulated_backend, cfg):
    from test_fused import _seed, check_parity, perturbed_pair, random_positions

    s = _seed()
    ref, fus = perturbed_pair(device="cpu", backend="cpu", **cfg)
    pos = random_positions(13, cfg["max_digits"], cfg.get("data_dim", 1), device="cpu", base=cfg.get("base", 10))
    check_parity(ref, fus, pos, tol=1e-5, seed=s)


def test_cuda_backend_fp64_and_small_batches(emulated_backend):
    from test_fused import _seed, check_parity, perturbed_pair, random_positions

    s = _seed()
    cfg = dict(embed_dim=32, num_heads=2, max_digits=3, mask_padding=True)
    ref, fus = perturbed_pair(device="cpu", dtype=torch.float64, backend="cpu", **cfg)
    check_parity(ref, fus, random_positions(7, 3, 1, device="cpu"), tol=1e-12, seed=s)
    for M in (0, 1):
        ref, fus = perturbed_pair(device="cpu", backend="cpu", **cfg)
        check_parity(ref, fus, random_positions(M, 3, 1, device="cpu"), tol=1e-5, seed=s)


@pytest.mark.parametrize("direction,mask_padding", [("causal", False), ("bi", True)])
def test_cuda_backend_dropout_replays_reference_masks(emulated_backend, direction, mask_padding):
    from test_fused import _seed, check_dropout_replay, perturbed_pair, random_positions

    _seed()
    ref, fus = perturbed_pair(device="cpu", backend="cpu", embed_dim=32, num_heads=2, max_digits=3,
                              resid_pdrop=0.3, attn_pdrop=0.25, attn_direction=direction,
                              mask_padding=mask_padding, num_layers=2)
    check_dropout_replay(ref, fus, random_positions(5, 3, 1, device="cpu"))


def test_cuda_backend_nan_survives_residual_dropout(emulated_backend):
    from test_input_validation import check_nan_survives_residual_dropout

    check_nan_survives_residual_dropout("cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_backend_autocast_two_error_rule(emulated_backend, dtype):
    """Half-precision GEMM outputs into the emulated kernels (mixed dtypes, fp32 residual stream)."""
    from test_fused import _seed, check_two_error_rule

    check_two_error_rule(dtype, dict(embed_dim=64, num_heads=4, max_digits=3, mask_padding=True), 47, device="cpu",
                         backend="cpu", seed=_seed(), what="emulated CUDA backend, CPU autocast")
