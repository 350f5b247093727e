"""Random encoder configurations on every fused backend, against the reference run in float64.

The parity matrices (test_fused / test_ext / test_cuda_emu) hold each configuration option to the reference in
hand-picked rows that set every option at least once; the layout properties (test_layouts) vary the inputs at one
configuration. Here hypothesis draws the configuration itself together with the call: head count and head width
(1 to 24, powers of two and not), digits and data_dim (so T from 2 up to each backend's limit), base, layers,
attention direction, pad masking, the final LayerNorm, eps, temperature, attention scaling, out_dim, the init,
M (0 included, repeated positions included), deduplication (auto, off, unique, prefix), the positions or digits
interface, float32 or float64, training with dropout (its masks recorded by the fused call and replayed by the
reference) or eval, and the output gradient's layout. The last test does the same for ``patch()`` on the
authors' module. Options interact in the kernels (padded head widths, the table rows of
layer 0, masks over T, the last layer computing the CLS row only): a defect that shows only for some combination
of values that each appear in some matrix row passes those matrices.

The oracle is the reference module in float64 with the same parameters and dropout masks: a float64 fused call is
held to 1e-12 and a float32 one to the fp32 rule (KERNEL_GUIDE §5: 1e-5 of max |exact|), outputs and every
parameter gradient. Drawn configurations include ill-conditioned ones, where the fp32 *reference* is further than
1e-5 from float64; there a float32 call passes by the two-error rule instead (check.judge_two_error: no less
accurate than torch's own fp32 run of the reference, given the same inputs).

Where the rules hold (measured 2026-12-02 on the C++ encoder, before settling these bounds): D >= 3 in float64,
D >= 8 and out_dim >= 4 in float32. At D = 1 every LayerNorm outputs its bias, so the gradients into LayerNorm
inputs are exactly zero and any summation order leaves rounding noise there; at D = 2 LayerNorm outputs +-1
scaled by its eps term and amplifies rounding by 1/sqrt(var + eps) (float64 up to 6.5e-11 off its own reference,
float32 up to 5e-2 with the fp32 reference as far off); below out_dim = 4 an output-projection bias gradient is
one sum of M output-gradient entries per element, and where those cancel its error relative to max |exact| is the
rounding of the terms (one float32 draw in 15,000). Within these bounds, without a failure: 12,000 drawn cases on the
C++ encoder, 750 on the emulated CUDA kernels, 150 on Triton (interpreted) and 3,000 patched authors' modules.
The emulated CUDA backend's first draws found it refusing max_digits > 32 (its in-kernel tokenizer's power
table), which base 2 and 3 need; fixed.

Backends: the C++ CPU encoder (many examples: it is fast), the CUDA kernels through the CPU emulator (csrc/emu)
and the Triton kernels under the interpreter (fewer: each example costs seconds there); on a GPU, Triton compiled
and the CUDA encoder (``gpu``).
"""
import copy
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqpe_kernels as sk
from seqpe_kernels.backend import MAX_TRITON_T
from seqpe_kernels.check import FP32_RTOL, ErrStats, judge_two_error

from conftest import HAS_CUDA, require_ext
from test_fused import perturbed_pair, rel
from test_layouts import _grad_out

# backend -> (examples per run, the largest T = data_dim * max_digits + 1 it is asked to run)
BACKENDS = {"cpu": (60, 40), "cuda-emu": (25, 40), "triton": (8, MAX_TRITON_T), "cuda": (40, 40)}
TRITON_DEV = "cuda" if HAS_CUDA else "cpu"
HEAD_WIDTHS = [1, 2, 3, 5, 8, 16, 24]


def _heads_and_width(draw, min_D):
    """(heads, width D): head widths from HEAD_WIDTHS, D at least ``min_D`` (see the module docstring)."""
    H = draw(st.integers(1, 4))
    dh = draw(st.sampled_from(HEAD_WIDTHS))
    if dh * H > 64:  # (the interpreter's and the emulator's cost grows with width)
        dh = 16
    while dh * H < min_D:
        dh += 1
    return H, dh * H


@st.composite
def case(draw, max_T):
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    H, D = _heads_and_width(draw, 3 if dtype == torch.float64 else 8)
    d = draw(st.integers(1, 3))
    K = draw(st.integers(1, min(6, (max_T - 1) // d)))
    if draw(st.integers(0, 7)) == 0:  # now and then the longest sequence the backend takes
        K = (max_T - 1) // d
    base = draw(st.sampled_from([2, 3, 10, 16]))
    while base ** K > 2 ** 62:  # (positions are int64)
        base -= 1
    cfg = dict(embed_dim=D, num_heads=H, max_digits=K, data_dim=d, base=base,
               num_layers=draw(st.integers(1, 3)), attn_direction=draw(st.sampled_from(["causal", "bi"])),
               mask_padding=draw(st.booleans()), use_last_layernorm=draw(st.booleans()),
               temperature=draw(st.sampled_from([0.5, 1.0, 2.0])),
               layer_norm_eps=draw(st.sampled_from([1e-5, 1e-2])), scale_attn_weights=draw(st.booleans()),
               out_dim=draw(st.one_of(st.none(), st.integers(1 if dtype == torch.float64 else 4, 40))),
               init=draw(st.sampled_from(["text", "image"])))
    train = draw(st.booleans())
    cfg["resid_pdrop"] = draw(st.sampled_from([0.1, 0.5])) if train else 0.0
    cfg["attn_pdrop"] = draw(st.sampled_from([0.0, 0.3])) if train else 0.0
    M = draw(st.sampled_from([0, 1, 2, 5, 9]))
    # deduplication (savings.dedup): exact where no dropout is active; "prefix" shares causal prefixes only
    dedup = draw(st.sampled_from(["auto", "off"] if train else
                                 ["auto", "off", "unique"] + (["prefix"] if cfg["attn_direction"] == "causal" else [])))
    return dict(cfg=cfg, train=train, M=M, dedup=dedup, repeats=draw(st.booleans()), ends=draw(st.booleans()),
                digits=draw(st.booleans()), dtype=dtype,
                gout=draw(st.sampled_from(["dense", "transposed", "stride0"])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _positions(c, device):
    cfg = c["cfg"]
    M, d, top = c["M"], cfg["data_dim"], cfg["base"] ** cfg["max_digits"]
    pos = torch.randint(0, top, (M, d), device=device)
    if c["ends"] and M:  # the smallest and the largest position (all digits base - 1)
        pos[0] = 0
        pos[-1] = top - 1
    if c["repeats"] and M > 1:  # repeated rows: eval-mode deduplication encodes each once
        pos[M // 2:] = pos[: M - M // 2].clone()
    return pos[:, 0] if d == 1 else pos


def _run(backend, c, device="cpu"):
    torch.manual_seed(c["seed"])
    cfg, dtype = c["cfg"], c["dtype"]
    ref, fus = perturbed_pair(device=device, dtype=dtype, backend="cpu" if backend == "cuda-emu" else backend, **cfg)
    exact = copy.deepcopy(ref).double()  # (for float64, ref is the same computation: it is not run)
    fus.dedup = c["dedup"]
    runs = [fus, exact] + ([ref] if dtype == torch.float32 else [])
    pos = _positions(c, device)
    dg, pm = ref.tokenize(pos)
    what = f"{backend} on {device}, {dtype} {'train' if c['train'] else 'eval'} M={c['M']} dedup={c['dedup']} {cfg}"
    for m in runs:
        m.train(c["train"])
    if c["train"]:
        fus.record_dropout_masks = {}
    ys = [fus.forward_digits(dg, pm) if c["digits"] else fus(pos)]
    if c["train"]:  # the masks the fused call drew, replayed by the references
        for m in runs[1:]:
            m.dropout_masks = dict(fus.record_dropout_masks)
    ys += [m.forward_digits(dg, pm) if c["digits"] else m(pos) for m in runs[1:]]
    assert ys[0].shape == ys[1].shape and ys[0].dtype == dtype, what
    quantities = {"output": [y.detach() for y in ys]}
    if c["M"]:
        g = _grad_out(tuple(ys[1].shape), c["gout"], dtype, device)  # (every run sees the same values)
        for m, y in zip(runs, ys):
            y.backward(g.to(y.dtype))
        for (n, pf), *others in zip(*(m.named_parameters() for m in runs)):
            assert pf.grad is not None, f"{what}: no gradient for {n}"
            quantities[f"grad {n}"] = [pf.grad] + [p.grad for _, p in others]
    if dtype == torch.float64:
        bad = [f"{n}: rel err {rel(f, e):.3e}" for n, (f, e) in quantities.items() if not rel(f, e) <= 1e-12]
    else:
        bad = _fp32_failures(quantities, "the fp32 reference")
    assert not bad, f"{what}: " + "; ".join(bad)


def _fp32_failures(quantities, torch_run: str):
    """name -> (fused fp32, exact fp64, torch's fp32): the fp32 rule, or where the problem is too ill-conditioned
    for it (torch's fp32 run itself that far off: ~1 draw in 2,000 at these widths) the two-error rule."""
    judged = {q.name: q for q in judge_two_error(
        {n: ErrStats.of(f, r, e) for n, (f, e, r) in quantities.items()}, torch.float32)}
    return [f"{n}: rel err {rel(f.double(), e):.3e} ({torch_run}'s {rel(r.double(), e):.3e}); {judged[n].why}"
            for n, (f, e, r) in quantities.items() if not rel(f.double(), e) <= FP32_RTOL and not judged[n].ok]


def _examples(backend):
    n, max_T = BACKENDS[backend]
    return settings(max_examples=n, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]), max_T


_CPU, _CPU_T = _examples("cpu")
_EMU, _EMU_T = _examples("cuda-emu")
_TRI, _TRI_T = _examples("triton")
_GPU, _GPU_T = _examples("cuda")


@_CPU
@given(c=case(_CPU_T))
def test_cpu_encoder_any_configuration(c):
    require_ext("cpu")
    _run("cpu", c)


@_EMU
@given(c=case(_EMU_T))
def test_emulated_cuda_encoder_any_configuration(c):
    """The C++ encoder's CUDA paths over the emulated CUDA kernels (as test_cuda_emu.test_cuda_backend_parity)."""
    require_ext("cpu")
    import seqpe_kernels.fused as fused
    from seqpe_kernels import _ext

    with mock.patch.object(fused, "_EXT", [_ext.emulator()]):
        _run("cuda-emu", c)


@_TRI
@given(c=case(_TRI_T))
def test_triton_encoder_any_configuration(c):
    """Interpreted on a CPU-only machine; compiled on a GPU (each configuration compiles its own kernels there)."""
    ok, why = sk.available_backends(TRITON_DEV)["triton"]
    assert ok, f"Triton must run on {TRITON_DEV} (conftest sets TRITON_INTERPRET=1 without a GPU): {why}"
    _run("triton", c, TRITON_DEV)


@pytest.mark.gpu
@_GPU
@given(c=case(_GPU_T))
def test_gpu_cuda_encoder_any_configuration(c):
    require_ext("cuda")  # (TF32 is off in gpu tests: conftest.py)
    _run("cuda", c, "cuda")


# ----------------------------------------------------------------------------- the authors' module, patched
@st.composite
def authors_case(draw):
    H, D = _heads_and_width(draw, 8)  # (float32)
    d = draw(st.integers(1, 3))
    train = draw(st.booleans())
    cfg = dict(pe_embed_dim=D, num_attention_heads=H, layer_num=draw(st.integers(1, 3)),
               max_digits=draw(st.integers(1, 12 // d)), data_dim=d,
               attn_direction=draw(st.sampled_from(["causal", "bi"])), use_last_layernorm=draw(st.booleans()),
               mask_padding=draw(st.booleans()), layer_norm_epsilon=draw(st.sampled_from([1e-5, 1e-2])),
               scale_attn_weights=draw(st.booleans()), out_proj_dim=draw(st.sampled_from([-1, 4, 17])),
               seqpe_temperature=draw(st.sampled_from([0.5, 1.0, 2.0])),
               # distinct p's in training: a residual / attention dropout swap in the mapping changes the result
               resid_pdrop=draw(st.sampled_from([0.2, 0.5])) if train else 0.0,
               attn_pdrop=draw(st.sampled_from([0.1, 0.3])) if train else 0.0)
    return dict(cfg=cfg, image=draw(st.booleans()), train=train, M=draw(st.sampled_from([1, 2, 5, 9])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


@settings(max_examples=40, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(c=authors_case())
def test_patched_authors_module_any_configuration(c):
    """``patch()`` on the authors' module (tests/authors_seqpe.py, their interface) of a drawn configuration, in
    training with dropout (the fused call's masks replayed into the unpatched copy) or eval: output and every
    parameter gradient against this package's reference built from the same weights (``to_fused(...,
    backend="torch")``) in float64, by the float32 rule above, torch's fp32 run being the unpatched module."""
    import authors_seqpe as A
    from seqpe_kernels.patch import patch_state, to_fused
    from test_patch import authors, digits_for, fused_node_in, replay_into

    require_ext("cpu")
    torch.manual_seed(c["seed"])
    cfg = c["cfg"]
    noise = 0.1 * min(1.0, (64 / cfg["pe_embed_dim"]) ** 0.5) * (1.0 if cfg["scale_attn_weights"] else 0.5)
    m = authors(perturb=noise, cls=A.ImageSequentialPE if c["image"] else A.SequentialPE, **cfg)
    unpatched = copy.deepcopy(m)
    exact = to_fused(m, backend="torch").double()
    sk.patch(m, backend="cpu")
    runs = [m, exact, unpatched]
    for r in runs:
        r.train(c["train"])
    x, pm = digits_for(m, c["M"])
    what = f"patched authors' module, {'train' if c['train'] else 'eval'} M={c['M']} {cfg}"
    if c["train"]:
        patch_state(m).record_dropout_masks = {}
    y = m(x, pm)
    if c["train"]:
        masks = patch_state(m).record_dropout_masks
        replay_into(unpatched, masks)
        exact.dropout_masks = dict(masks)
    ys = [y, exact.forward_digits(x, pm), unpatched(x, pm)]
    assert y.shape == ys[1].shape and y.dtype == torch.float32, what
    assert fused_node_in(y), f"{what}: the fused encoder did not run"
    g = torch.randn_like(y)
    for r in ys:
        r.backward(g.to(r.dtype))
    quantities = {"output": [t.detach() for t in ys]}
    for (n, pf), (ne, pe), (nu, pu) in zip(*(r.named_parameters() for r in runs)):
        assert n == ne == nu, (n, ne, nu)
        assert pf.grad is not None, f"{what}: no gradient for {n}"
        quantities[f"grad {n}"] = [pf.grad, pe.grad, pu.grad]
    bad = _fp32_failures(quantities, "the unpatched module")
    assert not bad, f"{what}: " + "; ".join(bad)
