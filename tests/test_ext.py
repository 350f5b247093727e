"""The C++/CUDA extension (csrc/, loaded by seqpe_kernels._ext) against the Triton ops and the reference.

* FusedSeqPE(backend="cpu") vs the reference SeqPE: outputs and every parameter gradient at 1e-5 relative
  (fp64 at 1e-12) over test_fused's configuration matrix, plus sizes the interpreter cannot afford.
* Every ext op against the Triton op on the same inputs (Triton under TRITON_INTERPRET=1 on CPU).
* Dropout: keep-masks bit-equal to Triton's tl.rand masks, read back through the ops themselves, and the
  dropout-on parity test with the masks recorded from the fused module.
* torch.library.opcheck and fp64 gradcheck of the seqpe:: ops with impl=1; torch.compile(fullgraph) parity;
  two Python threads on one module; the loader's failure reasons; the CUDA sources compile where possible.

The extension must build wherever a C++ compiler exists: a compile or load error fails this module loudly, with
the compiler log's path. It is skipped only when switched off on purpose (SEQPE_KERNELS_NO_EXT=1) or when this
machine cannot build it for a documented reason that is not a build error (no C++ compiler); the CUDA part
likewise (skipped for a CPU-only torch, no nvcc, a torch/nvcc major-version mismatch or no visible GPU; a CUDA
build that failed fails). The rule is conftest.require_ext, tested in test_harness.py.
"""
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import seqpe_kernels as sk
from seqpe_kernels import _ext
from seqpe_kernels.backend import BackendUnavailable

from seqpe_kernels.check import FP32_RTOL

from conftest import EXT_SKIP_REASONS, HAS_CUDA, require_ext
from test_fused import (CONFIGS, _op_samples, _seed, check_dropout_replay, check_two_error_rule,
                        check_parity, check_parity_vs_fp64, perturbed_pair, random_positions, rel)

DEV = "cuda" if HAS_CUDA else "cpu"  # where the Triton ops run (interpreted on CPU)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def ext_ops():
    require_ext("cpu")  # skip only if switched off / no compiler; a build or load error fails
    return _ext.load()


def ext_pair(device="cpu", dtype=torch.float32, backend="cpu", **cfg):
    """Reference with every parameter perturbed and an extension-backed FusedSeqPE copy of it."""
    return perturbed_pair(device=device, dtype=dtype, backend=backend, **cfg)


def _cfg_id(c):
    return "-".join(f"{k[:4]}{v}" for k, v in c.items())


# ----------------------------------------------------------------------------- parity with the reference
EXTRA_CONFIGS = [
    dict(embed_dim=96, num_heads=6, max_digits=6, data_dim=3, mask_padding=True, attn_direction="bi"),  # T=19
    dict(embed_dim=40, num_heads=5, max_digits=8, data_dim=4, num_layers=1, mask_padding=True),  # T=33 > Triton's 32
    dict(embed_dim=72, num_heads=3, max_digits=1, data_dim=1, num_layers=2),  # T=2
]


@pytest.mark.parametrize("cfg", CONFIGS + EXTRA_CONFIGS, ids=_cfg_id)
def test_parity_matrix(cfg):
    s = _seed()
    M = 37 if cfg["embed_dim"] >= 384 else 53  # primes; the C++ path is cheap, unlike the interpreter
    ref, fus = ext_pair(**cfg)
    pos = random_positions(M, cfg["max_digits"], cfg.get("data_dim", 1), device="cpu", base=cfg.get("base", 10))
    check_parity(ref, fus, pos, tol=1e-5, seed=s)


@pytest.mark.parametrize("name,cfg,M", [
    ("text", dict(embed_dim=768, num_heads=12, max_digits=5, out_dim=768), 211),
    ("vits", dict(embed_dim=384, num_heads=6, max_digits=2, data_dim=2, out_dim=384, init="image"), 401),
], ids=["text", "vits"])
def test_parity_paper_shapes(name, cfg, M):
    s = _seed()
    ref, fus = ext_pair(**cfg)
    pos = random_positions(M, cfg["max_digits"], cfg.get("data_dim", 1), device="cpu")
    check_parity(ref, fus, pos, tol=1e-5, seed=s)


@pytest.mark.parametrize("M", [0, 1, 5])
def test_small_batches(M):
    _seed()
    ref, fus = ext_pair(embed_dim=32, num_heads=2, max_digits=3)
    check_parity(ref, fus, random_positions(M, 3, 1, device="cpu"), tol=1e-5)


@pytest.mark.parametrize("grad_out", ["noncontig", "stride0"])
def test_output_grad_layouts(grad_out):
    _seed()
    ref, fus = ext_pair(embed_dim=32, num_heads=2, max_digits=2, data_dim=2)
    check_parity(ref, fus, random_positions(5, 2, 2, device="cpu"), tol=1e-5, grad_out=grad_out)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_forward_digits_interface(mask_padding):
    _seed()
    ref, fus = ext_pair(embed_dim=32, num_heads=2, max_digits=4, mask_padding=mask_padding)
    check_parity(ref, fus, random_positions(6, 4, 1, device="cpu"), tol=1e-5, digits=True)


@pytest.mark.parametrize("cfg", [dict(embed_dim=32, num_heads=2, max_digits=3, mask_padding=True),
                                 dict(embed_dim=48, num_heads=3, max_digits=2, data_dim=2, attn_direction="bi",
                                      out_dim=20, num_layers=3),
                                 CONFIGS[-1]], ids=["causal-mask", "2d-bi-3layers", "unscaled-bi-tau2"])
def test_fp64_parity(cfg):
    _seed()
    ref, fus = ext_pair(dtype=torch.float64, **cfg)
    check_parity(ref, fus, random_positions(11, cfg["max_digits"], cfg.get("data_dim", 1), device="cpu"),
                 tol=1e-12)


def test_eval_mode_deterministic_and_bad_digits():
    _seed()
    ref, fus = ext_pair(embed_dim=32, num_heads=2, max_digits=3, resid_pdrop=0.3, attn_pdrop=0.2)
    ref.eval(), fus.eval()
    pos = random_positions(9, 3, 1, device="cpu")
    with torch.no_grad():
        assert rel(fus(pos), ref(pos)) <= 1e-5
        assert torch.equal(fus(pos), fus(pos))
    fus.check_range = False  # the kernel itself must still refuse digits outside [0, base)
    with pytest.raises(RuntimeError, match="outside"):
        fus.forward_digits(torch.full((2, 3), 11))


def test_extension_error_reaches_python_in_a_fresh_process(capsys):
    """benchmarks/ext_error_path.py, the diagnostic for the leased GPUs' crash on extension errors, on this
    machine's CPU op: a failed TORCH_CHECK inside the extension is a RuntimeError, also with triton imported
    first, and the script says so (on a GPU machine it adds the CUDA cases and a crash's native stack); its
controls, torch's own TORCH_CHECK with and without the extension loaded, raise as well."""
    from conftest import benchmark_module

    require_ext("cpu")
    assert benchmark_module("ext_error_path").main(["--modes", "aten", "aten+ext", "cpu", "cpu+triton"]) == 0
    out = capsys.readouterr().out
    assert out.count("rc=   0  raised RuntimeError: seqpe_ext::table_rows: x has 2 columns") == 2, out
    assert out.count("rc=   0  raised RuntimeError: shape '[7]' is invalid") == 2, out


# Triton runs under the interpreter here (~35 s a draw), and the interpreter (triton 3.9) converts fp32 -> bf16 by
# truncation, not round-to-nearest-even as a GPU does (measured: half of all conversions differ, always toward
# zero; fp16 goes through numpy and matches exactly): a systematic bias that can break the rule on CPU without
# saying anything about the GPU kernels. So the Triton case runs in fp16; bf16 Triton numerics are tested on GPUs
# (test_fused.test_gpu_parity_low_precision).
@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, "cpu"), (torch.float16, "cpu"), (torch.float16, "triton")],
                         ids=["bf16-cpu", "fp16-cpu", "fp16-triton"])
def test_cpu_autocast_two_error_rule(dtype, backend):
    """Under CPU autocast (low-precision GEMMs, mixed-dtype ops): seqpe_kernels.check's two-error rule
    (judge_two_error: err(fused) <= 2 err(reference) + atol, both against the fp32 reference, KERNEL_GUIDE §5,
    with one element's rounding noise told apart from a less accurate path). M and D are large enough that an extra low-precision accumulation anywhere in the fused path shows
    (e.g. a bf16 gather whose backward sums ~M/10 gradients). The Triton backend runs here under the
    interpreter (conftest), with its bias gradients taken inside the LayerNorm / gelu backward kernels."""
    # three draws (check_two_error_rule pools them); two for the interpreted Triton case (~35 s a draw)
    check_two_error_rule(dtype, dict(embed_dim=96, num_heads=4, max_digits=3, mask_padding=True), 211, device="cpu",
                         backend=backend, seed=_seed(), draws=2 if backend == "triton" else 3, what="CPU autocast")


# ----------------------------------------------------------------------------- ext ops vs Triton ops
def _to(t, device):
    return t.detach().to(device) if isinstance(t, torch.Tensor) else t


def _grads_of(op, args, seed):
    """Outputs and input gradients of ``op(*args)`` for a fixed random cotangent."""
    args = tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)
    out = op(*args)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outs:
        if o.numel() and o.is_floating_point():
            loss = loss + (o * torch.randn(o.shape, generator=gen).to(o.device)).sum()
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach().cpu() for o in outs], [None if g is None else g.cpu() for g in grads]


def test_ops_match_triton():
    """Each seqpe:: op with impl=1 (C++ on CPU tensors) against impl=0 (Triton) on the same inputs: outputs
    and input gradients, dropout included (same seeds, so the same masks)."""
    import seqpe_kernels.ops  # noqa: F401

    for k, (op, a_tri) in enumerate(_op_samples(0)):  # (inputs from the test's fresh seed: conftest)
        a_ext = tuple(_to(a, "cpu").requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                      and a.is_floating_point() else _to(a, "cpu") for a in a_tri[:-1]) + (1,)
        o_t, g_t = _grads_of(op, a_tri, k)
        o_e, g_e = _grads_of(op, a_ext, k)
        for x, y in zip(o_e, o_t):
            assert x.shape == y.shape and x.dtype == y.dtype, (op, k, x.shape, y.shape)
            assert rel(x, y) <= 1e-6, (op, k, rel(x, y))
        for x, y in zip(g_e, g_t):
            assert (x is None) == (y is None)
            if x is not None:
                assert rel(x, y) <= 1e-6, (op, k, "grad", rel(x, y))


def test_direct_ext_calls_strided_inputs(ext_ops):
    """q/k/v as strided views of a wider buffer, expanded and transposed incoming gradients."""
    from seqpe_kernels.ops.attention import tiny_attention_backward, tiny_attention_forward
    from seqpe_kernels.ops.layernorm import residual_layernorm_backward, residual_layernorm_forward

    torch.manual_seed(1)
    M, T, D, H = 5, 6, 24, 3
    buf = torch.randn(M, T, 3 * D + 7)
    qkv = buf[..., 3:3 + 3 * D]  # non-contiguous rows, contiguous last dim
    seeds = torch.randint(0, 2 ** 31 - 1, (3,))
    for p in (0.0, 0.3):
        o_e = ext_ops.tiny_attention_fwd(qkv, None, None, H, True, 0, 2.0, p, seeds, 2)
        o_t = tiny_attention_forward(qkv.to(DEV), None, None, H, True, 0, 2.0, p, seeds.to(DEV), 2).cpu()
        assert rel(o_e, o_t) <= 1e-6
        dout = torch.randn(M, D, T).transpose(1, 2)  # non-contiguous
        de = ext_ops.tiny_attention_bwd(dout, qkv, None, None, H, True, 0, 2.0, p, seeds, 2)
        dt = tiny_attention_backward(dout.to(DEV), qkv.to(DEV), None, None, H, True, 0, 2.0, p, seeds.to(DEV), 2)
        assert de[0].is_contiguous() and de[0].shape == qkv.shape and de[1].numel() == 0
        assert rel(de[0], dt[0].cpu()) <= 1e-6
    x, y = torch.randn(M * T, D), torch.randn(M * T, D)
    w, b = torch.randn(D), torch.randn(D)
    h, a, mean, rstd = ext_ops.residual_layernorm_fwd(x, y, w, b, 1e-5, 0.2, seeds, 1, 0)
    ref = residual_layernorm_forward(x.to(DEV), y.to(DEV), w.to(DEV), b.to(DEV), 1e-5, 0.2, seeds.to(DEV), 1, 0)
    for u, v in zip((h, a, mean, rstd), ref):
        assert rel(u, v.cpu()) <= 1e-6
    da = torch.ones(()).expand(M * T, D)  # stride 0
    dh = torch.randn(D, M * T).t()
    out_e = ext_ops.residual_layernorm_bwd(da, dh, h, w, mean, rstd, 0.2, seeds, 1, True, 0)
    out_t = residual_layernorm_backward(da.to(DEV), dh.to(DEV), h.to(DEV), w.to(DEV), mean.to(DEV), rstd.to(DEV),
                                        0.2, seeds.to(DEV), 1, True, 0)
    for u, v in zip(out_e, out_t):
        assert rel(u, v.cpu()) <= 1e-5
    # outputs never alias inputs or each other
    ptrs = [t.data_ptr() for t in out_e if t.numel()]
    assert len(set(ptrs)) == len(ptrs) and not set(ptrs) & {h.data_ptr(), w.data_ptr(), mean.data_ptr()}


# ----------------------------------------------------------------------------- dropout masks
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_keep_masks_bit_equal_to_triton(ext_ops, p):
    from seqpe_kernels.ops import attention_keep_mask, dropout_keep_mask

    seeds = torch.tensor([0, 1, 2 ** 31 - 2, 123456789], dtype=torch.int64)
    for i in range(len(seeds)):
        tri = dropout_keep_mask(seeds.to(DEV), i, (13, 97), p).cpu().flatten()
        ext = ext_ops.dropout_keep_mask(int(seeds[i]), tri.numel(), p)
        assert torch.equal(ext, tri), (p, i, (ext != tri).sum().item())
    tri = attention_keep_mask(seeds.to(DEV), 3, 7, 3, 6, 6, p).cpu()
    assert torch.equal(ext_ops.dropout_keep_mask(int(seeds[3]), tri.numel(), p).view_as(tri), tri)


def test_ops_apply_the_triton_masks(ext_ops):
    """The masks the ops apply, read back through the ops: LN with x = 0, y = 1 gives h = keep * scale;
    attention with q = k = 0 (uniform probabilities) and one-hot v gives out[i, j] = keep_ij * scale / T."""
    from seqpe_kernels.ops import attention_keep_mask, dropout_keep_mask

    p, scale = 0.3, 1 / (1 - 0.3)
    seeds = torch.randint(0, 2 ** 31 - 1, (4,))
    R, D = 37, 53
    h, _, _, _ = ext_ops.residual_layernorm_fwd(torch.zeros(R, D), torch.ones(R, D), None, None, 0.0, p, seeds, 2, 0)
    keep = dropout_keep_mask(seeds.to(DEV), 2, (R, D), p).cpu()
    assert torch.equal(h, keep * torch.tensor(scale, dtype=torch.float32))
    dx, dy, _, _ = ext_ops.residual_layernorm_bwd(None, torch.ones(R, D), torch.zeros(R, D), None, torch.zeros(R),
                                                  torch.zeros(R), p, seeds, 2, True, 0)
    assert torch.equal(dy, keep * torch.tensor(scale, dtype=torch.float32)) and torch.equal(dx, torch.ones(R, D))
    M, H, T = 7, 3, 6
    DH = T
    # full block: qkv [M, T, 3D]
    qkv = torch.zeros(M, T, 3 * H * DH)
    for h_ in range(H):
        for j in range(T):
            qkv[:, j, 2 * H * DH + h_ * DH + j] = 1.0
    out = ext_ops.tiny_attention_fwd(qkv, None, None, H, False, 0, 1.0, p, seeds, 1)
    got = (out.view(M, T, H, DH).permute(0, 2, 1, 3) * T / scale).round()
    assert torch.equal(got, attention_keep_mask(seeds.to(DEV), 1, M, H, T, T, p).cpu())
    # CLS-only block: q [M, 1, D] + kv [M, T, 2D], offsets with TQ = 1
    kv = torch.cat([torch.zeros(M, T, H * DH), qkv[..., 2 * H * DH:]], dim=-1)
    out = ext_ops.tiny_attention_fwd(torch.zeros(M, 1, H * DH), kv, None, H, False, T - 1, 1.0, p, seeds, 0)
    got = (out.view(M, 1, H, DH).permute(0, 2, 1, 3) * T / scale).round()
    assert torch.equal(got, attention_keep_mask(seeds.to(DEV), 0, M, H, 1, T, p).cpu())


def test_keep_mask_offsets_wrap_like_int32(ext_ops):
    """Offsets are int32 in the Triton kernels ((row * D + col).to(tl.int32)): past 2^32 they wrap, and
    offsets in [2^31, 2^32) are the negative int32 values."""
    a = ext_ops.dropout_keep_mask(77, 4096, 0.5, 0)
    assert torch.equal(ext_ops.dropout_keep_mask(77, 4096, 0.5, 2 ** 32), a)
    assert torch.equal(ext_ops.dropout_keep_mask(77, 4096, 0.5, 3 * 2 ** 32), a)
    hi = ext_ops.dropout_keep_mask(77, 4096, 0.5, 2 ** 31 - 2048)  # crosses into negative int32 offsets
    assert 0.4 < hi.mean().item() < 0.6 and not torch.equal(hi, a)


def _philox_keep(seed: int, start: int, n: int, p: float):
    """tl.rand(seed, offset) > p for offsets start .. start+n-1 wrapped to uint32, in numpy (the formula of
    csrc/philox.h, written independently of it and of its 8-lane AVX2 path)."""
    import numpy as np

    M32 = np.uint64(0xFFFFFFFF)
    c0 = (np.arange(n, dtype=np.uint64) + np.uint64(start % 2 ** 64)) & M32
    c1 = np.zeros(n, np.uint64)
    c2 = np.zeros(n, np.uint64)
    c3 = np.zeros(n, np.uint64)
    s = seed % 2 ** 64
    k0, k1 = s & 0xFFFFFFFF, s >> 32
    for _ in range(10):
        pb, pa = np.uint64(0xCD9E8D57) * c2, np.uint64(0xD2511F53) * c0
        c0, c2, c1, c3 = ((pb >> np.uint64(32)) ^ c1 ^ np.uint64(k0), (pa >> np.uint64(32)) ^ c3 ^ np.uint64(k1),
                          pb & M32, pa & M32)
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    x = c0.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return torch.from_numpy(((x.astype(np.float32) * np.float32(4.6566127342e-10)) > np.float32(p)).astype(np.float32))


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(-2 ** 63, 2 ** 63 - 1), start=st.one_of(st.integers(0, 2 ** 34), st.integers(2 ** 32 - 40, 2 ** 32 + 40)),
       n=st.integers(0, 300), p=st.floats(0.0, 0.99))
def test_keep_mask_matches_philox_formula(ext_ops, seed, start, n, p):
    """The extension's keep flags (8 offsets per Philox evaluation with AVX2, scalar tails) equal the formula
    lane for lane: any int64 seed, offsets wrapping past 2^32 inside a block, lengths that are not multiples of
    8 (the kernels draw their rows in blocks, so every row length and offset reaches this path)."""
    got = ext_ops.dropout_keep_mask(seed, n, p, start)
    assert torch.equal(got, _philox_keep(seed, start, n, p))


@pytest.mark.parametrize("direction,mask_padding", [("causal", False), ("bi", True)])
def test_dropout_replays_reference_masks(direction, mask_padding):
    """With p > 0 the ext path equals the reference driven by the keep-masks it records."""
    _seed()
    ref, fus = ext_pair(embed_dim=32, num_heads=2, max_digits=3, resid_pdrop=0.3, attn_pdrop=0.25,
                        attn_direction=direction, mask_padding=mask_padding, num_layers=2)
    check_dropout_replay(ref, fus, random_positions(5, 3, 1, device="cpu"))


def test_dropout_fraction_and_fresh_masks(ext_ops):
    for p in (0.1, 0.5):
        keep = ext_ops.dropout_keep_mask(987654321, 1 << 16, p)
        frac = 1 - keep.mean().item()
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / keep.numel()), (p, frac)
    _seed()
    _, fus = ext_pair(embed_dim=32, num_heads=2, max_digits=2, resid_pdrop=0.5)
    fus.train()
    pos = random_positions(4, 2, 1, device="cpu")
    with torch.no_grad():
        assert not torch.equal(fus(pos), fus(pos))
    torch.manual_seed(3)
    a = fus(pos)
    torch.manual_seed(3)
    assert torch.equal(a, fus(pos))  # seeds come from torch's RNG


# ----------------------------------------------------------------------------- registration
def _ext_samples():
    if DEV == "cuda":
        require_ext("cuda")  # a CUDA torch + nvcc whose CUDA build failed fails here
    return _op_samples(IMPL=1)


def test_opcheck_ext_ops():
    import seqpe_kernels.ops  # noqa: F401

    for op, args in _ext_samples():
        torch.library.opcheck(op, args)


def test_fp64_gradcheck_ext_ops():
    import seqpe_kernels.ops  # noqa: F401

    for op, args in _ext_samples():
        args = tuple(a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                     and a.is_floating_point() else a for a in args)
        if op is torch.ops.seqpe.residual_layernorm.default:
            args = args[:8] + (3,) + args[9:]  # LN output in fp64 too (out_dtype code 3)

        def f(*xs, op=op):
            out = op(*xs)
            # differentiable outputs only (residual_layernorm's mean/rstd are marked non-differentiable)
            return tuple(o for o in (out if isinstance(out, tuple) else (out,)) if o.numel() and o.requires_grad)

        assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-5, nondet_tol=0.0)


def test_compile_fullgraph_parity():
    _seed()
    torch._dynamo.reset()
    ref, fus = ext_pair(embed_dim=32, num_heads=2, max_digits=3)
    compiled = torch.compile(fus, fullgraph=True, backend="aot_eager")
    for M in (5, 9):  # two shapes
        pos = random_positions(M, 3, 1, device="cpu")
        fus.zero_grad(), ref.zero_grad()
        yc, yr = compiled(pos), ref(pos)
        assert rel(yc, yr) <= 1e-5
        g = torch.randn_like(yr)
        yc.backward(g), yr.backward(g)
        for (n, pr), (_, pf) in zip(ref.named_parameters(), fus.named_parameters()):
            assert rel(pf.grad, pr.grad) <= 1e-5, n


def test_two_threads_one_module():
    _seed()
    ref, fus = ext_pair(embed_dim=64, num_heads=4, max_digits=4, data_dim=1)
    ref.eval(), fus.eval()
    inputs = [random_positions(97 + 10 * i, 4, 1, device="cpu") for i in range(2)]
    with torch.no_grad():
        expected = [ref(p) for p in inputs]
    errors = []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            for _ in range(20):
                with torch.no_grad():
                    y = fus(inputs[i])
                err = rel(y, expected[i])
                if err > 1e-5:
                    errors.append((i, err))
            # training step in the thread too: gradients of a private copy
            y = fus(inputs[i]).sum()
            torch.autograd.grad(y, list(fus.parameters()))
        except Exception as e:  # pragma: no cover - reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_concurrent_first_load_in_fresh_process():
    """Several threads of a fresh process race to load(): one load, the same ops object everywhere."""
    code = textwrap.dedent("""
        import threading
        from seqpe_kernels import _ext
        res = []
        ts = [threading.Thread(target=lambda: res.append(_ext.load())) for _ in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        assert len(res) == 4 and all(r is res[0] for r in res), res
        import torch
        x = torch.randn(8, 16)
        assert torch.allclose(res[0].gelu_new_fwd(x), torch.nn.functional.gelu(x, approximate="tanh"), atol=1e-6)
        print("OK", _ext.status("cpu")[1])
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------- loader behaviour
@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The loader's cached state reset (restored afterwards) and an empty extensions directory."""
    monkeypatch.setattr(_ext, "_ops", None)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setattr(_ext, "_status", {})
    monkeypatch.setattr(_ext, "_info", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return tmp_path


def test_no_ext_switch(monkeypatch):
    monkeypatch.setenv("SEQPE_KERNELS_NO_EXT", "1")
    ok, why = _ext.status("cpu")
    assert not ok and "SEQPE_KERNELS_NO_EXT=1" in why
    with pytest.raises(RuntimeError, match="SEQPE_KERNELS_NO_EXT"):
        _ext.load()
    fus = sk.FusedSeqPE(32, 2, 3, backend="cpu")
    with pytest.raises(BackendUnavailable, match="SEQPE_KERNELS_NO_EXT"):
        fus(torch.arange(4))


def test_build_error_reason_names_the_log(fresh_loader, monkeypatch):
    src = fresh_loader / "csrc"
    src.mkdir()
    for name in _ext.CPU_SOURCES:  # the other sources as they are, ops_cpu.cpp broken
        (src / name).write_text((_ext.CSRC / name).read_text())
    (src / "ops_cpu.cpp").write_text('#error "deliberately broken source for the loader test"\n')
    monkeypatch.setattr(_ext, "CSRC", src)
    ok, why = _ext.status("cpu")
    assert not ok and "error" in why and "deliberately broken" in why, why
    log = why.split("full compiler output: ")[1].rstrip(")")
    assert os.path.exists(log) and "deliberately broken" in Path(log).read_text()
    assert _ext.status("cpu") == (ok, why)  # cached
    with pytest.raises(RuntimeError, match="deliberately broken"):
        _ext.load()


def test_missing_compiler_reason(fresh_loader, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("PATH", str(fresh_loader))  # no g++ either
    ok, why = _ext.status("cpu")
    assert not ok and "no C++ compiler" in why, why


def test_cuda_status_reason():
    ok, why = _ext.status("cuda")
    if not torch.version.cuda:
        assert not ok and "CPU-only build" in why, why
    elif not HAS_CUDA:
        assert not ok, why
    assert isinstance(why, str) and why


def test_setup_builds_nothing_by_default():
    code = ("import setuptools, os; os.environ.pop('SEQPE_KERNELS_BUILD_EXT', None); "
            "setuptools.setup = lambda **kw: print('EXT', len(kw.get('ext_modules', []))); "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "EXT 0" in out.stdout, out.stderr


def test_cuda_sources_compile():
    """Compiles csrc/ops_cuda.cu (the JIT build includes it when torch is a CUDA build and nvcc matches)."""
    plan, why = _ext.cuda_plan()
    if not plan:
        if not any(r in why for r in EXT_SKIP_REASONS):  # e.g. an nvcc that does not report its version
            pytest.fail(f"the CUDA sources are not compiled for an undocumented reason: {why}", pytrace=False)
        print(f"CUDA compile check skipped: {why}")
        pytest.skip(f"cannot compile the CUDA sources here: {why} (CI's venv has the CPU wheel of torch; "
                    "the CUDA build is checked on GPU machines and with a CUDA torch + nvcc)")
    assert _ext.has_cuda_kernels(), f"CUDA sources were not compiled in: {_ext.info()}"


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_cuda_ext_parity(cfg):
    require_ext("cuda")  # TF32 is off in gpu tests (conftest.py)
    s = _seed()
    ref, fus = ext_pair(device="cuda", backend="cuda", **cfg)
    pos = random_positions(4099, cfg["max_digits"], cfg.get("data_dim", 1), device="cuda", base=cfg.get("base", 10))
    check_parity_vs_fp64(ref, fus, pos, tol=FP32_RTOL, seed=s)


def test_sanitized_builds_are_named_apart(monkeypatch):
    """SEQPE_KERNELS_SANITIZE (.ci/sanitize) gives the sanitized libraries their own build names (a plain run never
    loads an instrumented library, which would need the sanitizer runtime preloaded), refuses unknown sanitizers,
    and is off when unset."""
    monkeypatch.delenv("SEQPE_KERNELS_SANITIZE", raising=False)
    plain = _ext.build_name(False)
    assert _ext._sanitizers() == ([], "")
    monkeypatch.setenv("SEQPE_KERNELS_SANITIZE", "undefined, address")
    flags, tag = _ext._sanitizers()
    assert "-fsanitize=undefined,address" in flags and tag == "_san_address_undefined"
    assert _ext.build_name(False) == plain + tag
    # an ASan library loaded without its runtime preloaded would end the process: refused with the way to run it
    monkeypatch.setenv("LD_PRELOAD", "")
    with pytest.raises(_ext.ExtensionUnavailable, match="LD_PRELOAD"):
        _ext._require_sanitizer_runtime(flags)
    _ext._require_sanitizer_runtime(["-fsanitize=undefined"])  # UBSan alone needs no preload
    monkeypatch.setenv("SEQPE_KERNELS_SANITIZE", "address,thread")
    with pytest.raises(ValueError, match="thread"):
        _ext._sanitizers()


def test_cuda_plan_names_a_cuda_home_without_the_runtime(monkeypatch, tmp_path):
    """torch guesses CUDA_HOME as the folder above the nvcc on PATH; where that nvcc is a wrapper script the guess
    has no libcudart and the CUDA link failed late, after minutes of compiling: cuda_plan says so up front (and
    what to set), and takes a toolkit root that has the runtime in lib64 or lib."""
    import torch.utils.cpp_extension as cpp_extension

    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    plan, why = _ext.cuda_plan()
    assert not plan and "has no lib64/libcudart.so" in why and "set CUDA_HOME" in why, why
    for sub in ("lib", "lib64"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "libcudart.so.13").write_bytes(b"")
        assert _ext.cuda_plan() == (True, f"nvcc 13.0 at {tmp_path}")
        (tmp_path / sub / "libcudart.so.13").unlink()


# ------------------------------------------------------------------ the build: locks, sources, stale libraries
def test_a_build_killed_midway_leaves_no_lock_that_hangs_later_ones(tmp_path):
    """torch's JIT lock (a file waited on forever) outlived a build killed by a signal and hung every later first
    use. Builds take an OS file lock first; a torch lock found while holding it is a leftover and goes."""
    import fcntl
    import threading

    (tmp_path / "lock").write_text("")  # what a killed build leaves
    with _ext._build_lock(str(tmp_path)):
        assert not (tmp_path / "lock").exists()
    # a live build elsewhere holds the OS lock: the next one waits for it, then runs
    holder = open(tmp_path / "seqpe.lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)
    entered = threading.Event()

    def second():
        with _ext._build_lock(str(tmp_path)):
            entered.set()

    t = threading.Thread(target=second)
    t.start()
    assert not entered.wait(0.6)
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    assert entered.wait(10)
    t.join()


def test_source_hash_sees_contents_not_timestamps(tmp_path):
    """A source copied with an older timestamp (tar, rsync -a, cp -p) was not rebuilt: ninja compares times."""
    import os
    import shutil

    from seqpe_kernels._srchash import source_hash

    src = tmp_path / "csrc"
    shutil.copytree(_ext.CSRC, src)
    h0 = source_hash(src)
    f = src / "ops_cpu.cpp"
    st = f.stat()
    f.write_text(f.read_text() + "\n// changed\n")
    os.utime(f, (st.st_atime - 10 ** 6, st.st_mtime - 10 ** 6))  # older than before
    assert source_hash(src) != h0
    assert f"-DSEQPE_SOURCE_HASH={_ext.source_hash()}" in _ext._version_defines()


def test_a_prebuilt_library_from_other_sources_or_under_sanitizers_is_not_loaded(tmp_path, monkeypatch, caplog):
    """An ahead-of-time seqpe_kernels._C was loaded whatever csrc/ held since (git pull), and also under
    SEQPE_KERNELS_SANITIZE (the sanitizer run then tested uninstrumented code)."""
    import importlib.util
    import types

    monkeypatch.delenv("SEQPE_KERNELS_SANITIZE", raising=False)  # (.ci/sanitize runs this file with it set)
    lib = tmp_path / "_C.so"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: types.SimpleNamespace(origin=str(lib)) if name == "seqpe_kernels._C" else None)
    lib.write_bytes(b"\0ELF SEQPE_EXT_BUILD_INFO{torch=x;cuda=none;src=0123456789ab}\0")
    with caplog.at_level("WARNING", logger="seqpe_kernels._ext"):
        assert _ext._load_aot() is None
    assert "built from other sources" in caplog.text
    monkeypatch.setenv("SEQPE_KERNELS_SANITIZE", "undefined")
    lib.write_bytes(b"\0ELF SEQPE_EXT_BUILD_INFO{torch=x;cuda=none;src=" + _ext.source_hash().encode() + b"}\0")
    caplog.clear()
    with caplog.at_level("WARNING", logger="seqpe_kernels._ext"):
        assert _ext._load_aot() is None
    assert "SANITIZE" in caplog.text


def test_build_environment_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(_ext.ExtensionUnavailable, match="no C\\+\\+ compiler: CXX='/nonexistent/g\\+\\+' is not an"):
        _ext._jit_build()
    monkeypatch.delenv("CXX")
    for v, want in (("1", True), ("TRUE", True), (" yes ", True), ("on", True), ("0", False), ("", False),
                    ("off", False)):
        monkeypatch.setenv("SEQPE_KERNELS_NO_EXT", v)
        assert _ext.env_flag("SEQPE_KERNELS_NO_EXT") is want
    monkeypatch.setenv("SEQPE_KERNELS_NO_EXT", "ture")
    with pytest.raises(ValueError, match="SEQPE_KERNELS_NO_EXT='ture'"):
        _ext.disabled()


def test_a_wheel_carries_the_sources_the_extension_is_built_from(tmp_path):
    """A non-editable install had no csrc/ (only the checkout does), so the C++ backend could never be built there:
    'auto' fell back to eager with a warning. A wheel's package build (setup.py's build_py, which pip runs to make
    the wheel) now puts csrc/ inside the package, and _ext finds it there."""
    import shutil

    src = tmp_path / "src"
    skip = {".venv", ".git", "build", "dist", "out", ".hypothesis", ".pytest_cache", "__pycache__", ".benchmarks"}
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in skip or n.endswith(".egg-info")
                                                        or n.endswith(".so")])
    lib = tmp_path / "lib"
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=src,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("ops_cpu.cpp", "encoder.cpp", "ops_cuda.cu", "seqpe_ext.h", "emu/cuda_emu.h"):
        assert (lib / "seqpe_kernels" / "csrc" / f).is_file(), f
    code = "from seqpe_kernels import _ext; print(_ext.CSRC); print(_ext.source_hash())"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(lib)})
    assert r.returncode == 0, r.stderr[-2000:]
    where, digest = r.stdout.split()
    assert where == str(lib / "seqpe_kernels" / "csrc")
    assert digest == _ext.source_hash()  # the same sources as this checkout's


def _readonly_cache_child(tmp_path, lib: bytes, extra: str = "") -> subprocess.CompletedProcess:
    """A fresh process whose TORCH_EXTENSIONS_DIR cannot be written (``os.access`` says so, as it does on a
    read-only mount; root ignores file modes, so a chmod would not do) and holds ``lib`` as its JIT build, with no
    compiler and no ninja reachable."""
    code = textwrap.dedent(f"""
        import os, sys
        from seqpe_kernels import _ext
        root = {str(tmp_path / "ext")!r}
        name = _ext.build_name(False)
        os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, name, name + ".so"), "wb") as f:
            f.write(open({str(tmp_path / "lib.so")!r}, "rb").read())
        real = os.access
        os.access = lambda p, m, *a, **k: False if (m & os.W_OK and str(p).startswith(root)) else real(p, m, *a, **k)
        os.environ["CXX"] = "no-such-compiler-xyz"
        import torch.utils.cpp_extension as ce
        ce.is_ninja_available = lambda: False
        {extra}
        ok, why = _ext.status("cpu")
        print("STATUS", ok, why)
        if ok:
            import torch
            x = torch.randn(8, 16)
            assert torch.allclose(_ext.load().gelu_new_fwd(x), torch.nn.functional.gelu(x, approximate="tanh"),
                                  atol=1e-6)
            print("OK")
    """)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "lib.so").write_bytes(lib)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)


def _jit_library() -> Path:
    require_ext("cpu")
    if "path" not in _ext._info or _ext._info.get("source") != "JIT build":
        pytest.skip("this process loaded a prebuilt seqpe_kernels._C, not a JIT build to copy")
    return Path(_ext._info["path"])


def test_a_library_cut_short_is_rebuilt_or_refused_never_loaded(tmp_path, monkeypatch):
    """A cached library cut short (a build killed while linking, a full disk, an interrupted copy of a shared
    cache) was loaded as it was: ninja calls it up to date, and the loader's first touch of a missing page ended
    the process with SIGBUS, every run after. Now: a writable cache relinks it, a read-only cache and a prebuilt
    seqpe_kernels._C are refused with the reason."""
    import importlib.util
    import random
    import shutil
    import types

    so = _jit_library()
    lib = so.read_bytes()
    assert _ext._truncated(str(so)) is None
    rng = random.Random(_seed())
    cut = tmp_path / "cut.so"
    for n in [0, 3, 30, 63, 64, 65, 4096, len(lib) - 1] + [rng.randrange(len(lib)) for _ in range(12)]:
        cut.write_bytes(lib[:n])
        assert _ext._truncated(str(cut)), n  # (the section headers end the file: any cut is seen)
    cut.write_bytes(b"#!/bin/sh\n")  # not ELF: left to the loader
    assert _ext._truncated(str(cut)) is None

    # a writable JIT cache: relinked (the objects are kept), loaded, warned about, in a fresh process
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    where = subprocess.run([sys.executable, "-c", "from seqpe_kernels import _ext; "
                            f"print(_ext._build_directory({so.stem!r}))"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120).stdout.strip()
    shutil.copytree(so.parent, where, dirs_exist_ok=True)  # (torch made the folder when asked for it)
    copy = Path(where) / so.name
    copy.write_bytes(lib[:len(lib) // 3])
    code = textwrap.dedent("""
        import torch
        from seqpe_kernels import _ext
        x = torch.randn(8, 16)
        assert torch.allclose(_ext.load().gelu_new_fwd(x), torch.nn.functional.gelu(x, approximate="tanh"), atol=1e-6)
        print("OK", _ext.info()["path"])
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "cut short" in out.stderr and str(copy) in out.stdout
    assert _ext._truncated(str(copy)) is None and copy.stat().st_size > len(lib) // 3

    # a read-only cache: refused, saying why and what to do
    out = _readonly_cache_child(tmp_path / "ro", lib[:len(lib) // 2])
    assert out.returncode == 0 and "STATUS False" in out.stdout and "cut short" in out.stdout, \
        out.stdout + out.stderr[-3000:]

    # a prebuilt seqpe_kernels._C: refused before it is imported
    monkeypatch.delenv("SEQPE_KERNELS_SANITIZE", raising=False)
    aot = tmp_path / "_C.so"
    aot.write_bytes(lib[:len(lib) // 2])
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: types.SimpleNamespace(origin=str(aot)) if name == "seqpe_kernels._C" else None)
    with pytest.raises(_ext.ExtensionUnavailable, match="cut short"):
        _ext._load_aot()


def test_a_read_only_extension_cache_loads_what_it_holds(tmp_path):
    """A read-only JIT cache (shared by a cluster's users, or in a container image) failed on its lock file
    ("building ... failed: Read-only file system") although it held the right library. Now: the library is
    loaded as it is when built from these sources for this torch, with no toolchain; else a clear error."""
    lib = _jit_library().read_bytes()
    out = _readonly_cache_child(tmp_path, lib)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-3000:]
    # one from other sources (a git pull since the cache was built): refused, saying what to do
    stale = lib.replace(f"src={_ext.source_hash()}".encode(), b"src=0123456789ab")
    assert stale != lib
    out = _readonly_cache_child(tmp_path / "stale", stale)
    assert out.returncode == 0 and "STATUS False" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "read-only" in out.stdout and "from other sources" in out.stdout and "TORCH_EXTENSIONS_DIR" in out.stdout
    # an empty one: the same, naming the folder
    out = _readonly_cache_child(tmp_path / "empty", lib, extra="import shutil; shutil.rmtree(os.path.join(root, name))")
    assert "STATUS False" in out.stdout and "holds no" in out.stdout, out.stdout + out.stderr[-3000:]
