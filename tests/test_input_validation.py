"""Bad input and changed state must raise or come out NaN, never give a plausible wrong number (found by an audit
of the public entry points, 2026-12-01). Each test covers the class (every backend / path / dtype that reaches
the same code), not just the case found."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import authors_seqpe as A
import seqpe_kernels as sk
from conftest import fused_backends, require_ext
from test_fused import rel
from seqpe_kernels.layout import PatchError
from seqpe_kernels.reference.losses import contrastive_loss, gram_log_softmax, transfer_loss
from seqpe_kernels.training import pe_apply
from seqpe_kernels.training.samplers import MainWindowSampler, TransferSampler

CPU = torch.device("cpu")
# the backends this machine runs on CPU tensors: the eager path of FusedSeqPE, the C++ CPU extension, and Triton
# where the interpreter is on (conftest sets TRITON_INTERPRET=1 without a GPU)
BACKENDS = ["torch"] + [b for b in ("cpu", "triton") if b in fused_backends(CPU)]
pytestmark = pytest.mark.backend_needs_ext  # a broken extension fails its cases (conftest)


def _pair(backend, seed=0, dedup="auto", **cfg):
    cfg = {**dict(embed_dim=16, num_heads=2, max_digits=2), **cfg}
    torch.manual_seed(seed)
    ref = sk.SeqPE(**cfg)
    enc = sk.FusedSeqPE.from_reference(ref, backend=backend, dedup=dedup)
    return ref, enc


def _patched_authors():
    """A patched authors' encoder (tests/authors_seqpe.py), called once, and its digit inputs."""
    m = A.SequentialPE(pe_embed_dim=16, num_attention_heads=2, layer_num=2, max_digits=2, use_last_layernorm=True,
                       mask_padding=False, resid_pdrop=0.0, attn_pdrop=0.0).eval()
    x, pad = A.PeUtils.prepare_seqpe_data(list(range(6)), 2)
    sk.patch(m, backend="cpu" if "cpu" in BACKENDS else "triton")
    m(x, pad)
    return m, x, pad


# ------------------------------------------------------------------------- check_range=False: NaN rows, every path
@settings(max_examples=12, deadline=None)
@given(backend=st.sampled_from(BACKENDS), data_dim=st.sampled_from([1, 2]), mask_padding=st.booleans(),
       dedup=st.sampled_from(["off", "unique"]), train=st.booleans(), seed=st.integers(0, 2 ** 16),
       M=st.integers(1, 6))
def test_unchecked_out_of_range_positions_give_nan_rows_on_every_path(backend, data_dim, mask_padding, dedup, train,
                                                                     seed, M):
    """check_range=False gives up the error message only: an out-of-range position's row is NaN and every other
    row is what the checked call gives, also where the positions go through the tokenizer first (mask_padding,
    the eager backend) -- those wrapped such positions to their low digits, a plausible wrong row."""
    ref, enc = _pair(backend, seed, data_dim=data_dim, mask_padding=mask_padding, dedup=dedup, resid_pdrop=0.0)
    enc.train(train)
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 100, (M, data_dim), generator=g)
    bad = torch.rand(M, generator=g) < 0.5
    bad[0] = True
    wild = torch.where(torch.rand(M, data_dim, generator=g) < 0.5, torch.tensor(-7), torch.tensor(100 + 37 * seed))
    pos_bad = torch.where(bad[:, None], wild, pos)
    pos_bad[bad, 0] = wild[bad, 0]  # at least one coordinate out of range in every bad row
    pos_bad[bad, 0] = torch.where(pos_bad[bad, 0] >= 0, pos_bad[bad, 0].clamp_min(100), pos_bad[bad, 0])
    with pytest.raises(ValueError):
        enc(pos_bad)
    if backend == "cpu" and not mask_padding:
        return  # the C++ CPU backend's in-kernel tokenizer raises even unchecked (documented)
    enc.check_range = False
    out = enc(pos_bad)
    assert out.isnan().all(1).tolist() == bad.tolist()
    enc.check_range = True
    good = enc(torch.where(bad[:, None], torch.zeros_like(pos), pos))
    torch.testing.assert_close(out[~bad], good[~bad], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pos", [[5, 1005], [-995, 5], [3, 100]])
def test_prefix_shared_forward_called_directly_checks_the_range(pos):
    """The public function: with the module's check_range=False, out-of-range positions were tokenized to their
    low digits and shared a valid position's row."""
    from seqpe_kernels.savings.dedup import prefix_shared_forward

    for m in (sk.SeqPE(16, 2, 2).eval(), sk.FusedSeqPE(16, 2, 2, backend="torch").eval()):
        m.check_range = False
        with pytest.raises(ValueError, match="position"):
            prefix_shared_forward(m, torch.tensor(pos))


def test_prefix_sharing_always_checks_the_range():
    """dedup='prefix' builds a trie on the host anyway: unchecked positions are checked there (raise)."""
    _, enc = _pair("torch", dedup="prefix", attn_direction="causal")
    enc.eval()
    enc.check_range = False
    with pytest.raises(ValueError, match="max_digits"):
        enc(torch.tensor([1000, 2]))


# ------------------------------------------------------------------------- configuration read live, every backend
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_layers_p_is_what_every_backend_applies(backend):
    """The dropout layers' own p is the truth (the idiom `for m in model.modules(): m.p = 0`); resid_pdrop /
    attn_pdrop read and write them; layers of one kind that differ are refused on the fused path."""
    ref, enc = _pair(backend, resid_pdrop=0.1, attn_pdrop=0.1)
    ref.train(), enc.train()
    pos = torch.arange(12)
    for m in list(ref.modules()) + list(enc.modules()):
        if hasattr(m, "p"):
            m.p = 0.0
    assert enc.resid_pdrop == 0.0 and enc.attn_pdrop == 0.0
    torch.testing.assert_close(enc(pos), ref(pos), rtol=1e-5, atol=1e-6)  # deterministic: no dropout anywhere
    enc.resid_pdrop = 0.3
    assert [m.p for m in enc.modules() if hasattr(m, "p")] == [0.0, 0.3, 0.3, 0.0, 0.3, 0.3]
    enc.transformers[1].mlp.dropout.p = 0.2
    if backend == "torch":
        enc(pos)  # the eager path applies each layer's own p
    else:
        with pytest.raises(ValueError, match="differ"):
            enc(pos)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        enc.attn_pdrop = 1.0


@pytest.mark.parametrize("dedup", ["auto", "prefix"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layernorm_eps_changed_after_the_first_call(backend, dedup):
    ref, enc = _pair(backend, dedup=dedup, resid_pdrop=0.0)
    ref.eval(), enc.eval()
    pos = torch.arange(10)
    enc(pos)
    for m in (ref, enc):
        m.transformers[0].layernorm_1.eps = 1e-2
        m.layernorm.eps = 3e-2
    torch.testing.assert_close(enc(pos), ref(pos), rtol=1e-5, atol=1e-6)
    enc.transformers[1].layernorm_2.eps = -1e-9  # (a negative eps was the encoder's "no final LayerNorm" sentinel)
    if backend != "torch" and dedup != "prefix":  # (eager and prefix sharing call F.layer_norm, as the reference)
        with pytest.raises(ValueError, match="eps"):
            enc(pos)


@pytest.mark.parametrize("dedup", ["off", "unique", "prefix"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_hooks_on_submodules_are_refused_on_the_fused_path(backend, dedup):
    _, enc = _pair(backend, dedup=dedup)
    enc.eval()  # (prefix sharing: eval mode, or dropout off)
    pos = torch.tensor([1, 12, 13, 12, 5, 0])
    enc(pos)
    fired = []
    h = enc.transformers[0].attn.c_attn.register_forward_pre_hook(lambda *a: fired.append(1))
    with pytest.raises(RuntimeError, match=r"transformers\.0\.attn\.c_attn"):
        enc(pos)
    h.remove()
    enc(pos)
    enc.register_forward_hook(lambda *a: fired.append(2))  # on the encoder itself: it runs
    enc(pos)
    assert fired == [2]


def test_patched_module_changed_after_patching_is_refused():
    """An authors' module patched, called, then a submodule swapped (gelu_new -> ReLU): the fused forward would
    compute the old module; the next call re-checks the layout instead."""
    m, x, pad = _patched_authors()
    m.transformers[0].mlp.act = torch.nn.ReLU()
    with pytest.raises(PatchError, match="ReLU"):
        m(x, pad)
    sk.unpatch(m)
    m(x, pad)


# ------------------------------------------------------------------------- pad masks, positions, dtypes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, float("nan")])
def test_non_binary_pad_masks_are_refused_where_they_are_read(backend, value):
    ref, enc = _pair(backend, mask_padding=True)
    digits, pad = sk.tokenize(torch.tensor([3, 45, 7]), 2)
    pad = pad.clone()
    pad[1, 0] = value
    with pytest.raises(ValueError, match="0 or 1"):
        enc.forward_digits(digits, pad)
    enc.forward_digits(digits, pad.bool() if value == value else pad.nan_to_num(1.0).bool())  # bool: fine
    _, enc_nomask = _pair(backend, mask_padding=False)
    enc_nomask.forward_digits(digits, pad)  # not read: not refused


@pytest.mark.parametrize("raw", [[1.5, 2.9], [1, 2.0], [True, False], ["12"], [2 ** 70]])
def test_prepare_seqpe_data_refuses_what_is_not_an_integer(raw):
    with pytest.raises(TypeError):
        sk.prepare_seqpe_data(raw, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)])
def test_unsigned_position_and_digit_dtypes(backend, dtype):
    ref, enc = _pair(backend)
    ref.eval(), enc.eval()
    pos = torch.tensor([0, 5, 99, 42])
    torch.testing.assert_close(enc(pos.to(dtype)), ref(pos), rtol=1e-5, atol=1e-6)
    digits, pad = sk.tokenize(pos, 2)
    torch.testing.assert_close(enc.forward_digits(digits.to(dtype), pad), ref.forward_digits(digits, pad),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        enc(torch.tensor([100]).to(dtype))


@pytest.mark.parametrize("kwargs,err", [
    (dict(num_heads=2.0), TypeError), (dict(embed_dim=True), TypeError), (dict(max_digits="3"), TypeError),
    (dict(out_dim=16.0), TypeError), (dict(layer_norm_eps=-1e-9), ValueError),
    (dict(layer_norm_eps=float("nan")), ValueError), (dict(temperature=float("nan")), ValueError),
    (dict(temperature=float("inf")), ValueError), (dict(resid_pdrop="0.1"), TypeError)])
@pytest.mark.parametrize("cls", [sk.SeqPE, sk.FusedSeqPE])
def test_constructor_refuses_wrong_types_and_values(cls, kwargs, err):
    with pytest.raises(err):
        cls(**{**dict(embed_dim=16, num_heads=2, max_digits=3), **kwargs})


def test_constructor_takes_numpy_integers():
    m = sk.SeqPE(np.int64(16), np.int32(2), np.int64(3))
    assert type(m.embed_dim) is int and type(m.num_heads) is int


# ------------------------------------------------------------------------- training side
def test_attn_scalar_and_pe_attention_fold_causal_into_a_given_mask():
    torch.manual_seed(0)
    B, H, N, d = 2, 2, 5, 4
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    pq, pk = torch.randn(1, H, N, 3), torch.randn(1, H, N, 3)
    want = pe_apply.attn_scalar(q, k, v, pq, pk, causal=True)
    for mask in (torch.ones(B, 1, N, N, dtype=torch.bool), torch.zeros(B, 1, N, N)):
        torch.testing.assert_close(pe_apply.attn_scalar(q, k, v, pq, pk, causal=True, attn_mask=mask), want)
    want = pe_apply.pe_attention(q, k, v, "nope", causal=True)
    got = pe_apply.pe_attention(q, k, v, "nope", causal=True, attn_mask=torch.zeros(B, 1, N, N))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("vshape", [(2, 2, 6, 4), (2, 3, 5, 4), (1, 2, 5, 4)])
def test_attention_refuses_mismatched_v(vshape):
    q = k = torch.randn(2, 2, 5, 4)
    v = torch.randn(*vshape)
    with pytest.raises(ValueError):
        pe_apply.attn_scalar(q, k, v, torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 3))
    with pytest.raises(ValueError):
        pe_apply.pe_attention(q, k, v, "nope")


def test_losses_refuse_bad_labels_and_indices():
    piv, cand = torch.randn(4, 8), torch.randn(20, 8)
    contrastive_loss(piv, cand, torch.tensor([0, 1, 2, 3]))
    for labels, err in ((torch.tensor([-100, 1, 2, 3]), IndexError), (torch.tensor([0, 1, 2, 5]), IndexError),
                        (torch.tensor([0.0, 1, 2, 3]), TypeError)):
        with pytest.raises(err):
            contrastive_loss(piv, cand, labels)
    mp, tp = torch.randn(10, 8), torch.randn(6, 8)
    transfer_loss(mp, torch.arange(6), tp, 2, batch_size=2)
    with pytest.raises(RuntimeError, match="non-negative"):
        transfer_loss(mp, torch.tensor([-1, 1, 2, 3, 4, 5]), tp, 2, batch_size=2)
    with pytest.raises(TypeError):
        transfer_loss(mp, torch.arange(6).float(), tp, 2, batch_size=2)
    with pytest.raises(ValueError):
        gram_log_softmax(torch.randn(6, 8), 0, 2)


@pytest.mark.parametrize("make", [
    lambda: TransferSampler(16, 200, 4, batch_size=-1), lambda: TransferSampler(16, 200, 4, batch_size=0),
    lambda: TransferSampler(16, 200, 4, batch_size=2, n_batch_per_epoch=-3),
    lambda: TransferSampler(16, 200, 4, batch_size=2, min_start=-5),
    lambda: MainWindowSampler(16, 200, pointer_reset=0), lambda: MainWindowSampler(16, 200, default_start=-3),
    lambda: MainWindowSampler(16, 200, default_start=190), lambda: MainWindowSampler(16, 8),
    lambda: MainWindowSampler((4, 4), 100, data_dim=2, default_start=(7, 0))])
def test_samplers_refuse_bad_arguments(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("ext", ["pth", "safetensors"])
def test_fp64_checkpoint_loads_as_fp64(tmp_path, ext):
    """Loading into the fp32 module the constructor builds would round an fp64 file's weights silently."""
    m = sk.SeqPE(16, 2, 3).double()
    f = tmp_path / f"enc.{ext}"
    sk.save_checkpoint(m, str(f))
    for cls in (sk.SeqPE, sk.FusedSeqPE):
        got = sk.load_checkpoint(str(f), module_cls=cls)
        for (k, a), b in zip(m.state_dict().items(), got.state_dict().values()):
            assert b.dtype == torch.float64 and torch.equal(a, b), k


@pytest.mark.parametrize("bad,err", [(dict(base=10.0), TypeError), (dict(base=2.5), TypeError),
                                     (dict(max_digits=2.0), TypeError)])
def test_tokenize_refuses_non_integer_base_and_digits(bad, err):
    with pytest.raises(err):
        sk.tokenize(torch.tensor([3, 4]), **{**dict(max_digits=2), **bad})


def test_positions_must_be_dense_tensors():
    with pytest.raises(TypeError, match="dense"):
        sk.FusedSeqPE(16, 2, 2, backend="torch")(torch.tensor([1, 2]).to_sparse())
    with pytest.raises(TypeError, match="meta"):
        sk.FusedSeqPE(16, 2, 2, backend="torch")(torch.empty(3, dtype=torch.int64, device="meta"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("check_range", [True, False])
def test_positions_without_coordinates_are_refused(backend, check_range):
    """[M, 0] positions: M rows with no digits at all (the encoder would run on its CLS token alone)."""
    with pytest.raises(ValueError, match="no coordinates"):
        sk.tokenize(torch.zeros(3, 0, dtype=torch.int64), max_digits=2, check_range=check_range)
    mod = sk.FusedSeqPE(16, 2, 2, backend=backend)
    mod.check_range = check_range
    with pytest.raises(ValueError, match="no coordinates"):
        mod(torch.zeros(3, 0, dtype=torch.int64))


def test_dense_cache_precompute_names_the_box_format():
    enc = sk.SeqPE(16, 2, 2, data_dim=2).eval().requires_grad_(False)
    cache = sk.SeqPECache(enc, mode="dense")
    with pytest.raises(ValueError, match="per-axis ranges"):
        cache.precompute(range(10))
    cache.precompute((range(3), range(4)))
    assert cache.num_entries == 12


@pytest.mark.parametrize("value", ["abc", [1], True])
def test_study_from_json_refuses_non_numeric_rows(tmp_path, value, capsys):
    import json

    from seqpe_kernels import cli

    f = tmp_path / "s.json"
    f.write_text(json.dumps([dict(task="lm", pe="seqpe", seed=0, scale=1, length=64, metric="ppl", value=value)]))
    assert cli.main(["study", "--from-json", str(f)]) == 2
    assert "must be a number" in capsys.readouterr().err


def test_config_records_the_modules_eps_and_dropout(tmp_path):
    """config() (what save_checkpoint records and from_reference copies) reads the modules, not the constructor
    arguments: a changed eps / p survives a save and load, and from_reference."""
    m = sk.SeqPE(16, 2, 3, layer_norm_eps=1e-6, resid_pdrop=0.1)
    m.layer_norm_eps = 1e-3
    for layer in m.modules():
        if hasattr(layer, "p"):
            layer.p = 0.0
    f = tmp_path / "enc.pth"
    sk.save_checkpoint(m, str(f))
    for got in (sk.load_checkpoint(str(f)), sk.FusedSeqPE.from_reference(m, backend="torch")):
        assert got.layer_norm_eps == 1e-3 and got.resid_pdrop == 0.0
        assert {x.eps for x in got.modules() if isinstance(x, torch.nn.LayerNorm)} == {1e-3}
    m.transformers[0].layernorm_1.eps = 2e-3
    with pytest.raises(ValueError, match="eps differ"):
        m.config()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_attn_weights_is_the_attention_layers(backend):
    """Set on the encoder (it sets every attention layer) after the first call: every backend follows, and
    config() records it; num_heads is the layers' and read-only."""
    ref, enc = _pair(backend, resid_pdrop=0.0)
    ref.eval(), enc.eval()
    pos = torch.arange(10)
    enc(pos)
    for m in (ref, enc):
        m.scale_attn_weights = False
    assert all(not b.attn.scale_attn_weights for b in enc.transformers) and not enc.config()["scale_attn_weights"]
    torch.testing.assert_close(enc(pos), ref(pos), rtol=1e-5, atol=1e-6)
    with pytest.raises(AttributeError):
        enc.num_heads = 4


def test_cache_invalidates_on_a_layer_configuration_change():
    m = sk.SeqPE(16, 2, 3).eval().requires_grad_(False)
    cache = sk.SeqPECache(m)
    pos = torch.arange(5)
    first = cache.cache(pos)
    m.transformers[0].layernorm_1.eps = 1e-2  # one layer only: config() has no single eps, the layers tell
    torch.testing.assert_close(cache.cache(pos), m(pos), rtol=0, atol=0)
    assert not torch.equal(first, m(pos)) and cache.stats()["invalidations"] == 1


def _strided_like(t: torch.Tensor, how: int) -> torch.Tensor:
    """The same values with other strides: 0 transposed copy (2-D), 1 every other element of a wider buffer,
    2 an offset into a larger storage."""
    if how == 0 and t.dim() == 2:
        return t.t().contiguous().t()
    if how == 1:
        return torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0]
    buf = torch.full((t.numel() + 3,), float("nan"), dtype=t.dtype)
    buf[3:] = t.reshape(-1)
    return buf[3:].view(t.shape)


@settings(max_examples=8, deadline=None)
@given(backend=st.sampled_from(BACKENDS), data_dim=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16),
       hows=st.lists(st.integers(0, 2), min_size=40, max_size=40))
def test_parameters_with_any_strides(backend, data_dim, seed, hows):
    """Parameters assigned from views (load_state_dict(assign=True) of a state dict of views, ...) have other
    strides than their shape's: every backend reads them by their strides (the Triton launchers indexed the
    embedding tables and LayerNorm weights as if dense). Output and every parameter gradient vs the reference."""
    ref, enc = _pair(backend, seed, data_dim=data_dim, resid_pdrop=0.0)
    ref.train(), enc.train()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # LayerNorm weights away from 1, biases away from 0
    sd = {k: _strided_like(v, h) for (k, v), h in zip(ref.state_dict().items(), hows)}
    assert any(not v.is_contiguous() or v.storage_offset() for v in sd.values())
    enc.load_state_dict(sd, assign=True)
    for p in enc.parameters():
        p.requires_grad_(True)
    pos = torch.randint(0, 100, (7, data_dim), generator=torch.Generator().manual_seed(seed))
    out, want = enc(pos), ref(pos)
    g = torch.randn_like(want)
    got_g = torch.autograd.grad(out, list(enc.parameters()), g)
    want_g = torch.autograd.grad(want, list(ref.parameters()), g)
    for name, a, b in [("output", out, want)] + list(zip([n for n, _ in ref.named_parameters()], got_g, want_g)):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()  # KERNEL_GUIDE §5: fp32, 1e-5 of max
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"  # (a strided misread is ~1e-2 .. 1)


def test_compile_fullgraph_in_a_fresh_process():
    """torch.compile(fullgraph=True) of a C++-backend encoder as the first thing a process does: the backend's
    status (the extension build / load, under a lock Dynamo cannot trace) is resolved outside the trace."""
    require_ext("cpu")
    import subprocess
    import sys

    code = ("import torch, seqpe_kernels as sk\n"
            "torch.manual_seed(0)\n"
            "ref = sk.SeqPE(16, 2, 3, resid_pdrop=0.0)\n"
            "fus = sk.FusedSeqPE.from_reference(ref, backend='cpu')\n"
            "y = torch.compile(fus, fullgraph=True, backend='aot_eager')(torch.arange(5))\n"
            "err = ((y - ref(torch.arange(5))).abs().max() / ref(torch.arange(5)).abs().max()).item()\n"
            "assert err <= 1e-5, err\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_follows_each_layers_train_eval_mode(backend):
    """nn.Dropout applies p only in train mode, its own: dropout layers switched to eval inside a training encoder
    drop nothing (equal to the reference, deterministic); layers left in train mode inside an eval encoder
    (Monte-Carlo dropout) drop; layers of one kind in different modes are refused on the fused path."""
    ref, enc = _pair(backend, resid_pdrop=0.1, attn_pdrop=0.1)
    pos = torch.arange(9)
    for m in (ref, enc):
        m.train()
        for d in m.modules():
            if hasattr(d, "p"):
                d.eval()
    a = enc(pos)
    torch.testing.assert_close(a, ref(pos), rtol=1e-5, atol=1e-6)
    assert torch.equal(a, enc(pos))
    enc.eval()
    for d in enc.modules():
        if hasattr(d, "p"):
            d.train()
    assert not torch.equal(enc(pos), enc(pos))  # fresh masks per call
    enc.transformers[0].mlp.dropout.eval()
    if backend != "torch":
        with pytest.raises(ValueError, match="different probabilities"):
            enc(pos)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_double_backward_through_the_fused_encoder_is_refused(backend):
    """create_graph=True: the fused backward is kernels, not differentiable ops; a gradient penalty through it
    would lose its second-order term silently."""
    _, enc = _pair(backend, resid_pdrop=0.0)
    y = enc(torch.arange(5))
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(y.sum(), [enc.transformers[0].mlp.c_fc.weight], create_graph=True)
    enc(torch.arange(5)).sum().backward()  # the plain backward is unaffected


def test_patched_module_scale_changed_on_one_block_after_a_call():
    m, x, pad = _patched_authors()
    m.transformers[1].attn.scale_attn_weights = False
    with pytest.raises(PatchError, match="scale_attn_weights"):
        m(x, pad)
    m.transformers[0].attn.scale_attn_weights = False
    got = m(x, pad)
    sk.unpatch(m)
    torch.testing.assert_close(got, m(x, pad), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("image", [False, True])
@pytest.mark.parametrize("patched", [False, True])
def test_save_checkpoint_of_an_authors_module_records_its_configuration(tmp_path, image, patched):
    """The authors' module's settings are in its attributes: save_checkpoint records them (it recorded nothing, and
    load_checkpoint then guessed: 2 heads instead of 4, no pad masking -> rel. err 0.73), patched or not."""
    import warnings

    cls = A.ImageSequentialPE if image else A.SequentialPE
    m = cls(pe_embed_dim=48, num_attention_heads=4, layer_num=2, max_digits=2, use_last_layernorm=True,
            mask_padding=True, resid_pdrop=0.0, attn_pdrop=0.0).eval()
    if patched:
        sk.patch(m, backend="cpu" if "cpu" in BACKENDS else "triton")
    x, pad = A.PeUtils.prepare_seqpe_data([0, 7, 42, 99], 2)
    f = tmp_path / "enc.pth"
    sk.save_checkpoint(m, str(f))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing guessed
        got = sk.load_checkpoint(str(f)).eval()
    assert (got.num_heads, got.mask_padding, got.init_scheme) == (4, True, "image" if image else "text")
    torch.testing.assert_close(got.forward_digits(x, pad), m(x, pad), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ composability with torch features
def _ref_and_fused(backend, seed=0):
    torch.manual_seed(seed)
    ref = sk.SeqPE(16, 2, 2, resid_pdrop=0.0, attn_pdrop=0.0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return ref, sk.FusedSeqPE.from_reference(ref, backend=backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("grad_mode", [False, True])
def test_forward_mode_ad_tangents_match_the_reference(backend, grad_mode):
    """Dual parameters under no_grad (the memory-saving way to take JVPs) or detached: the fused paths skipped
    their autograd node and dropped the tangent (C++: None) or got it wrong (Triton: rel. err 1.06), silently."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    ref, fus = _ref_and_fused(backend)
    pos = torch.tensor([0, 7, 42, 99, 5])
    names = [n for n, _ in ref.named_parameters()]
    tangents = {n: torch.randn_like(p) for n, p in ref.named_parameters()}
    outs = []
    for m in (ref, fus):
        with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
            duals = {n: fwAD.make_dual(p.detach(), tangents[n]) for n, p in m.named_parameters() if n in names}
            y = functional_call(m, duals, (pos,))
            outs.append((y.detach().clone(), fwAD.unpack_dual(y).tangent))
    (y0, t0), (y1, t1) = outs
    assert t1 is not None
    assert rel(y1, y0) <= 1e-5 and rel(t1, t0) <= 1e-5  # KERNEL_GUIDE §5's fp32 measure


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_torch_func_transforms_match_the_reference(backend):
    """torch.func.jvp and vmap over stacked parameters ended in internal errors ('Cannot access storage of
    TensorWrapper', 'Batching rule not implemented for seqpe_ext::encoder')."""
    from torch.func import functional_call, jvp, stack_module_state, vmap

    ref, fus = _ref_and_fused(backend)
    pos = torch.tensor([0, 7, 42, 99, 5])
    results = []
    for m in (ref, fus):
        params = {n: p.detach() for n, p in m.named_parameters()}
        torch.manual_seed(1)
        tang = {n: torch.randn_like(p) for n, p in params.items()}
        y, t = jvp(lambda ps: functional_call(m, ps, (pos,)), (params,), (tang,))
        stacked, _ = stack_module_state([m, m])
        yv = vmap(lambda ps: functional_call(m, ps, (pos,)))(stacked)
        # vmap over positions (range check off: a data-dependent branch has no batching rule, in the reference
        # too) in eval mode, where FusedSeqPE deduplicates: torch.unique has no batching rule either ("vmap: We
        # do not support batching operators that can output dynamic shape"): no deduplication under transforms
        m.eval()
        was, m.check_range = m.check_range, False
        yp = vmap(m)(torch.stack([pos, pos.flip(0)]))
        m.check_range = was
        results.append((y, t, yv, yp))
    for a, b in zip(*results):
        assert rel(b, a) <= 1e-5, rel(b, a)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_parametrized_layers_run_fused_with_the_references_gradients(backend):
    """register_parametrization / weight_norm keep the weight outside _parameters: the fused path raised a bare
    KeyError. It now reads the computed tensors, and gradients reach the parametrizations' originals."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class Scale(torch.nn.Module):
        def forward(self, w):
            return 1.5 * w

    ref, fus = _ref_and_fused(backend)
    for m in (ref, fus):
        parametrize.register_parametrization(m.transformers[0].attn.c_attn, "weight", Scale())
        parametrize.register_parametrization(m, "cls_token_embed", Scale())
        weight_norm(m.out_proj)
    pos = torch.tensor([0, 7, 42, 99, 5])
    g = torch.randn(5, ref.out_dim)
    grads = []
    for m in (ref, fus):
        y = m(pos)
        (y * g).sum().backward()
        grads.append((y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    assert "Encoder" in type(y.grad_fn).__name__ or "seqpe" in y.grad_fn.name().lower()  # the fused node ran
    assert rel(grads[1][0], grads[0][0]) <= 1e-5
    assert grads[1][1].keys() == grads[0][1].keys()
    for n in grads[0][1]:
        assert rel(grads[1][1][n], grads[0][1][n]) <= 1e-5, n


def test_backend_environment_variable_is_normalised_and_named(monkeypatch):
    """SEQPE_KERNELS_BACKEND=' CPU ' raised "unknown backend 'CPU'" at the first call, and an override that cannot
    run was reported as if the caller had passed backend='...'."""
    from seqpe_kernels.backend import BackendUnavailable

    pos = torch.arange(4)
    monkeypatch.setenv("SEQPE_KERNELS_BACKEND", " Torch ")
    assert sk.FusedSeqPE(16, 2, 2).resolved_backend(pos.device) == "torch"
    monkeypatch.setenv("SEQPE_KERNELS_BACKEND", "cpux")
    with pytest.raises(ValueError, match="SEQPE_KERNELS_BACKEND='cpux'"):
        sk.FusedSeqPE(16, 2, 2)(pos)
    monkeypatch.setenv("SEQPE_KERNELS_BACKEND", "cuda")  # (no GPU here: the override cannot run)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="SEQPE_KERNELS_BACKEND=cuda cannot run here"):
            sk.FusedSeqPE(16, 2, 2)(pos)


def test_auto_fallback_warning_points_at_the_caller_and_repeats_under_w_error(tmp_path):
    """Under -W error the first fallback warning raised and later calls fell back silently; the warning pointed
    inside the package."""
    import subprocess
    import sys

    script = tmp_path / "s.py"
    script.write_text(
        "import os, warnings\n"
        "os.environ['SEQPE_KERNELS_NO_EXT'] = '1'\n"
        "import torch, seqpe_kernels as sk\n"
        "for i in range(2):\n"
        "    try:\n"
        "        sk.FusedSeqPE(16, 2, 2)(torch.arange(3))\n"
        "        print('ran', i)\n"
        "    except RuntimeWarning as e:\n"
        "        print('raised', i)\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import seqpe_kernels.backend as b; b._warned.clear()\n"
        "    sk.FusedSeqPE(16, 2, 2)(torch.arange(3))  # line 14\n"
        "print('at', [(os.path.basename(x.filename), x.lineno) for x in w])\n")
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", str(script)], capture_output=True, text=True,
                       timeout=120)
    assert "raised 0" in r.stdout and "raised 1" in r.stdout, r.stdout + r.stderr
    assert "('s.py', 14)" in r.stdout, r.stdout


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_plain_tensor_in_a_parameter_slot_is_read(backend):
    """``del lin.weight; lin.weight = w`` (hypernetworks, meta-learning) leaves a plain tensor attribute where a
    parameter was: the fused path raised a bare KeyError('weight'). It now reads w (output and w's gradient as the
    reference's); a weight missing altogether is named."""
    ref, enc = _pair(backend, seed=4)
    ref.eval(), enc.eval()  # (no dropout: outputs comparable)
    pos = torch.tensor([0, 7, 42, 99, 5])
    ws = []
    for m in (ref, enc):
        w = (m.out_proj.weight.detach() * 1.5).requires_grad_(True)
        del m.out_proj.weight
        m.out_proj.weight = w
        ws.append(w)
        (m(pos) ** 2).sum().backward()
    assert rel(enc(pos), ref(pos)) <= 1e-5 and rel(ws[1].grad, ws[0].grad) <= 1e-5
    del enc.out_proj.weight
    with pytest.raises(AttributeError, match="missing a weight.*weight"):
        enc(pos)
    # the slot that exists only for data_dim > 1 (read as absent, i.e. no dim embedding, silently)
    ref, enc = _pair(backend, seed=6, data_dim=2)
    ref.eval(), enc.eval()
    pos2 = torch.tensor([[0, 7], [42, 9], [5, 5]])
    for m in (ref, enc):
        w = m.dim_token_embed.detach() * 3.0
        del m.dim_token_embed
        m.dim_token_embed = w
    torch.testing.assert_close(enc(pos2), ref(pos2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_tensor_parameters_in_a_training_call(backend):
    """Parameters built under torch.inference_mode() used with grad: every backend raises PyTorch's own "cannot
    be saved for backward" (Triton said "Inference tensors do not track version counter", from its bookkeeping)."""
    torch.manual_seed(0)
    with torch.inference_mode():
        enc = sk.FusedSeqPE(16, 2, max_digits=2, backend=backend)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        enc(torch.tensor([3, 14, 15])).sum().backward()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_plan_built_while_another_thread_switches_mode_is_not_kept(backend, monkeypatch):
    """A call's plan is cached under the train / eval state read at its start; another thread switching the mode
    while the plan was built cached the other mode's dropout under this key, so every later eval call dropped
    (the forced interleaving below). Such a plan is now used once and not kept."""
    ref, enc = _pair(backend, seed=5, resid_pdrop=0.3)
    enc.eval()
    pos = torch.tensor([1, 22, 33, 7])
    orig = type(enc)._build_plan

    def build(self, *a, **k):
        self.train()  # the other thread's switch, mid-build
        return orig(self, *a, **k)

    monkeypatch.setattr(type(enc), "_build_plan", build)
    with torch.no_grad():
        enc(pos)
    monkeypatch.setattr(type(enc), "_build_plan", orig)
    enc.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(pos), ref(pos), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(enc(pos), enc(pos), rtol=0, atol=0)


def check_nan_survives_residual_dropout(backend):
    """A NaN in a branch's output (here a projection bias) reaches every row as in the reference, training mode with
    residual (and attention) dropout: the fused kernels dropped with a select (keep ? y * scale : 0), so each row where that element
    was dropped came out finite, where F.dropout's multiply keeps NaN * 0 = NaN (a diverged model looked partly
    healthy). Shared with test_cuda_emu (the CUDA kernels, emulated)."""
    for name, resid, attn in (("transformers.1.mlp.c_proj.bias", 0.5, 0.0), ("transformers.0.attn.c_proj.bias", 0.5, 0.0),
                              ("transformers.0.attn.c_attn.bias", 0.0, 0.9)):  # (last: NaN queries, attention
        # rows whose every probability is dropped: 0 with a select, NaN as F.dropout gives)
        torch.manual_seed(0)
        ref = sk.SeqPE(16, 2, max_digits=2, num_layers=2, resid_pdrop=resid, attn_pdrop=attn).train()
        enc = sk.FusedSeqPE.from_reference(ref, backend=backend).train()
        pos = torch.arange(24)
        rows = []
        for m in (ref, enc):
            with torch.no_grad():
                dict(m.named_parameters())[name][0] = float("nan")
            rows.append(torch.isnan(m(pos)).all(1))
        assert rows[0].all() and torch.equal(rows[1], rows[0]), (name, rows[1].tolist())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_nan_survives_residual_dropout(backend):
    check_nan_survives_residual_dropout(backend)
