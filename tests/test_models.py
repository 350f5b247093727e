"""Tiny GPT-2-style LM and ViT driven by a position encoder (SEQPE_SPEC §4)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seqpe_kernels.training.models import GPTConfig, SeqPEGPT, SeqPEViT, ViTConfig
from seqpe_kernels.reference.seqpe import SeqPE



GPT_VARIANTS = [("nope", "single", True), ("input_add", "single", True), ("attn_mul", "multi", True),
                ("attn_add", "single", False), ("attn_scalar", "single", True), ("attn_scalar", "none", True),
                ("attn_scalar", "multi", False), ("rotary", "single", False)]


def _enc(out_dim, data_dim=1, max_digits=3, seed=0):
    torch.manual_seed(seed)
    return SeqPE(embed_dim=16, num_heads=2, max_digits=max_digits, data_dim=data_dim, out_dim=out_dim,
                 resid_pdrop=0.0, init="text" if data_dim == 1 else "image")


def _gpt(method, qk, mh, **kw):
    cfg = GPTConfig(pe_method=method, pe_qk=qk, pe_multi_head=mh, **kw)
    enc = None if method == "nope" else _enc(cfg.pe_dim)
    torch.manual_seed(1)
    return SeqPEGPT(cfg, enc).double()


@pytest.mark.parametrize("method,qk,mh", GPT_VARIANTS)
def test_gpt_forward_backward_and_causality(method, qk, mh):
    m = _gpt(method, qk, mh)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    logits, loss = m(ids, labels=ids)
    assert logits.shape == (4, 16, 64) and torch.isfinite(loss)
    loss.backward()
    if method != "nope":
        assert m.pe_encoder.out_proj.weight.grad.abs().sum() > 0
    # causal: changing token 9 leaves the logits of positions < 9 unchanged
    ids2 = ids.clone()
    ids2[:, 9] = (ids2[:, 9] + 1) % 64
    with torch.no_grad():
        a, _ = m(ids)
        b, _ = m(ids2)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("method,qk,mh", [v for v in GPT_VARIANTS if v[0] != "nope"])
def test_gpt_windows_follow_b_mod_p(method, qk, mh):
    m = _gpt(method, qk, mh).eval()
    P, B, N = 2, 4, 12
    ids = torch.randint(0, 64, (B, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pos = torch.cat([torch.arange(N), 200 + torch.arange(N)])
        pe = m.pe_encoder(pos).view(P, N, -1)
        full, _ = m(ids, pe=pe)
        for b in range(B):
            one, _ = m(ids[b:b + 1], pe=pe[b % P:b % P + 1])
            torch.testing.assert_close(full[b], one[0])
        # no pe: the encoder is run on 0..N-1 (or start_pos..)
        torch.testing.assert_close(m(ids)[0], m(ids, pe=pe[:1])[0])
        torch.testing.assert_close(m(ids, start_pos=200)[0], m(ids, pe=pe[1:])[0])
    with pytest.raises(ValueError):
        m(ids[:3], pe=pe)


def test_gpt_requires_encoder_and_shapes():
    with pytest.raises(ValueError):
        SeqPEGPT(GPTConfig(pe_method="attn_mul"), None)
    m = _gpt("attn_mul", "multi", True)
    with pytest.raises(ValueError):
        m(torch.zeros(2, 8, dtype=torch.long), pe=torch.zeros(1, 8, 5, dtype=torch.float64))


VIT_VARIANTS = [("nope", "multi", True), ("input_add", "multi", True), ("attn_mul", "multi", True),
                ("attn_mul", "single", True), ("attn_add", "multi", False), ("attn_scalar", "none", True),
                ("rotary", "multi", False)]


def _vit(method, qk, mh):
    cfg = ViTConfig(pe_method=method, pe_qk=qk, pe_multi_head=mh)
    enc = None if method == "nope" else _enc(cfg.pe_dim, data_dim=2, max_digits=2)
    torch.manual_seed(2)
    return SeqPEViT(cfg, enc).double()


@pytest.mark.parametrize("method,qk,mh", VIT_VARIANTS)
def test_vit_forward_extend_and_windows(method, qk, mh):
    m = _vit(method, qk, mh)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    out = m(x)
    assert out.shape == (4, 10)
    out.square().sum().backward()
    if method != "nope":
        assert m.pe_encoder.out_proj.weight.grad.abs().sum() > 0
        m.eval()
        with torch.no_grad():
            big = m(torch.randn(2, 3, 24, 24, generator=g, dtype=torch.float64))  # 6x6 grid: extend
            assert big.shape == (2, 10)
            pe = torch.cat([m.encode_positions((4, 4)), m.encode_positions((4, 4), (10, 20))])
            full = m(x, pe=pe)
            for b in range(4):
                torch.testing.assert_close(full[b], m(x[b:b + 1], pe=pe[b % 2:b % 2 + 1])[0])
            torch.testing.assert_close(m(x, start_pos=(10, 20)), m(x, pe=pe[1:]))


def test_vit_default_positions_row_major():
    m = _vit("attn_mul", "multi", True)
    assert m.default_positions((2, 3)).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


# --- the wiring a "loss falls" test cannot see (each test below fails on one mutation that trains fine)
@pytest.mark.parametrize("method,qk", [("input_add", "single"), ("attn_scalar", "single")])
def test_gpt_loss_is_next_token_cross_entropy(method, qk):
    """GPT-2's convention: logits at token t are scored against token t+1 (labels shifted inside). Unshifted,
    a model learns to copy its input and its loss still falls."""
    m = _gpt(method, qk, True).eval()
    V = m.config.vocab_size
    ids = torch.randint(0, V, (3, 12))
    logits, loss = m(ids, labels=ids)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want)
    assert not torch.allclose(loss, F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, :-1].reshape(-1)))


@pytest.mark.parametrize("method,qk,mh", [("input_add", "single", True), ("attn_add", "single", False),
                                        ("rotary", "single", False)])
def test_gpt_reads_the_first_rows_of_a_longer_pe_table(method, qk, mh):
    """pe [P, >= N, O]: token t takes row t (the documented API accepts a table longer than the sequence).
    (attn_mul / attn_scalar are left out: at init their PE projections move the logits by < 1e-6.)"""
    m = _gpt(method, qk, mh).eval()
    ids = torch.randint(0, m.config.vocab_size, (2, 8))
    with torch.no_grad():
        long_pe = m.encode_positions(20)
        torch.testing.assert_close(m(ids, pe=long_pe)[0], m(ids, pe=long_pe[:, :8])[0])
        torch.testing.assert_close(m(ids, pe=long_pe)[0], m(ids)[0])


@pytest.mark.parametrize("method,qk,mh", [("attn_mul", "multi", True), ("input_add", "single", True)])
def test_vit_classifies_from_the_cls_token(method, qk, mh):
    m = _vit(method, qk, mh).eval()
    seen = {}
    m.norm.register_forward_hook(lambda mod, inp, out: seen.__setitem__("x", out))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.head(seen["x"][:, 0]))  # token 0 = the CLS token (prepended)


def test_vit_cls_token_takes_the_cls_pe_row_and_patch_t_row_t():
    m = _vit("input_add", "single", True).eval()
    seen = {}
    m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        tokens = torch.cat([m.cls_token.expand(1, -1, -1), m.patch_embed(x).flatten(2).transpose(1, 2)], 1)
        pe = m.encode_positions(m.config.grid)
        want = tokens + torch.cat([m.cls_token_pos_embed, pe], 1)
    torch.testing.assert_close(seen["x"], want)


def test_paper_configs():
    assert GPTConfig.paper().pe_dim == 768 and GPTConfig.paper().block_size == 512
    assert GPTConfig.paper(pe_method="rotary", pe_multi_head=False).pe_dim == 64
    assert ViTConfig.small().pe_dim == 384 and ViTConfig.small().grid == (14, 14)
    assert ViTConfig.base().pe_dim == 768


def test_tiny_lm_trains_with_full_seqpe_pipeline():
    """A few CPU steps of the §5.8 training step: one merged encoder call, LM + contrastive + transfer loss."""
    from seqpe_kernels.reference.losses import contrastive_loss, transfer_loss
    from seqpe_kernels.training.contrastive import ContrastiveSampler
    from seqpe_kernels.training.samplers import (MainWindowSampler, TransferSampler, merge_positions,
                                                 split_outputs, transfer_active)

    torch.manual_seed(0)
    N, B, V = 16, 8, 16
    cfg = GPTConfig(vocab_size=V, block_size=N, pe_method="attn_scalar", pe_qk="single")
    enc = _enc(cfg.pe_dim, max_digits=3)
    model = SeqPEGPT(cfg, enc)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    main_s = MainWindowSampler(N, 1000, use_random_shift=True, shift_rate=0.1, shift_pool_size=32, seed=0)
    ct_s = ContrastiveSampler(1000, 8, 4, pipeline="text", seed=0)
    tr_s = TransferSampler(N, 1000, 4, 2, pipeline="text", seed=0)
    rng = np.random.default_rng(0)
    losses = []
    for step in range(40):
        # task: the token at position t is t mod 4 + an offset per sequence (position-dependent)
        off = torch.as_tensor(rng.integers(0, 4, size=(B, 1)))
        ids = (torch.arange(N)[None] % 4 + off * 4) % V
        m = main_s.next(4)
        c = ct_s.next()
        t = tr_s.next() if transfer_active(m, 0.1) else None
        pos, lay = merge_positions(m.positions, c.pivots, c.candidates, t.positions if t else None,
                                   num_windows=m.num_windows)
        out = split_outputs(enc(pos), lay)
        _, lm = model(ids, pe=out.main, labels=ids)
        loss = lm + 0.1 * contrastive_loss(out.pivots, out.candidates, c.labels)
        if t is not None:
            loss = loss + 0.1 * transfer_loss(out.main, t.pivot_indices, out.transfer, num_heads=2,
                                              batch_size=t.batch_size)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(enc.parameters(), 5.0)
        opt.step()
        losses.append(lm.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
