"""Baseline position encodings (seqpe_kernels/training/baselines.py) and their use by the models and ``train --pe``.

What each test pins: shapes and errors of every module; the learned table's rows past the training length get no
gradient (and stay at their initialisation through AdamW training); RoPE's relative-shift property (scores
depend on positions only through their difference, 1-D and axial 2-D); ALiBi's per-head slopes and bias
-m_h (i - j), and that the model's attention with it equals the explicit formula. Small and single-threaded.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seqpe_kernels.training import baselines as B
from seqpe_kernels.training import train as T
from seqpe_kernels.training.models import GPTConfig, SeqPEGPT, SeqPEViT, ViTConfig
from seqpe_kernels.training.pe_apply import alibi_attn_mask, rotary, rotary_tables
from seqpe_kernels.training.samplers import grid_positions


def _grid(g, h0=0, w0=0):
    return torch.from_numpy(grid_positions(h0, w0, g, g))


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name,dd,out", [("learned", 1, 32), ("sinusoidal", 1, 32), ("rope", 1, 8), ("alibi", 1, 4),
                                         ("none", 1, 0), ("learned", 2, 32), ("sinusoidal", 2, 32), ("rope", 2, 8),
                                         ("none", 2, 0)])
def test_shapes_and_methods(name, dd, out):
    m = B.build_position_module(name, dd, model_dim=32, num_heads=4, max_position=400)
    pos = torch.arange(10) if dd == 1 else _grid(3)
    y = m(pos)
    # (ALiBi's coordinates m_h * p are float64: the mask takes their differences, exact only from exact products)
    assert y.shape == (pos.shape[0], out) and m.out_dim == out
    assert y.dtype == (torch.float64 if name == "alibi" else torch.float32)
    assert m.pe_method == T._BASELINE_METHODS[name]
    assert torch.isfinite(y).all()
    if dd == 1:  # [M] and [M, 1] are the same positions
        torch.testing.assert_close(m(pos[:, None]), y)
    with pytest.raises(ValueError, match=">= 0"):
        m(-pos - 1)
    with pytest.raises(ValueError, match="integers"):
        m(pos.float())


def test_factory_rejects_unknown_and_2d_alibi():
    with pytest.raises(ValueError, match="unknown baseline"):
        B.build_position_module("alibi", 2, 32, 4, 100)
    with pytest.raises(ValueError, match="unknown baseline"):
        B.build_position_module("seqpe", 1, 32, 4, 100)
    with pytest.raises(ValueError, match="multiple of 4"):
        B.SinusoidalPE(30, data_dim=2)


def test_sinusoidal_values():
    m = B.SinusoidalPE(8)
    y = m(torch.tensor([0, 3, 1000]))
    for r, p in enumerate([0, 3, 1000]):
        for i in range(4):
            w = 10000 ** (-2 * i / 8)
            assert y[r, 2 * i].item() == pytest.approx(math.sin(p * w), abs=1e-6)
            assert y[r, 2 * i + 1].item() == pytest.approx(math.cos(p * w), abs=1e-6)
    m2 = B.SinusoidalPE(16, data_dim=2)
    pos = torch.tensor([[3, 7], [0, 5]])
    y2 = m2(pos)
    torch.testing.assert_close(y2[:, :8], B.sinusoidal_table(pos[:, 0], 8))
    torch.testing.assert_close(y2[:, 8:], B.sinusoidal_table(pos[:, 1], 8))


def test_sinusoidal_scale_in_the_models():
    lm = B.build_position_module("sinusoidal", 1, 64, 4, 100)
    vit = B.build_position_module("sinusoidal", 2, 64, 4, 100)
    assert lm.scale == pytest.approx(0.02 * math.sqrt(2)) and vit.scale == 1.0
    rms = lm(torch.arange(64)).pow(2).mean().sqrt().item()
    assert rms == pytest.approx(0.02, rel=0.02)  # the GPT-2 token embeddings' init std


# ------------------------------------------------------------------------------------------------ learned table
def test_learned_table_limits_and_2d_layout():
    m = B.LearnedPE(8, max_position=100)
    assert m.table.weight.shape == (100, 8) and m.position_limit == 100
    with pytest.raises(ValueError, match="past the learned table"):
        m(torch.tensor([99, 100]))
    m2 = B.LearnedPE(8, max_position=100, data_dim=2)  # a 10 x 10 grid
    assert m2.table.weight.shape == (100, 8) and m2.position_limit == 10
    torch.testing.assert_close(m2(torch.tensor([[2, 3]])), m2.table.weight[23:24])
    with pytest.raises(ValueError, match="past the learned table"):
        m2(torch.tensor([[0, 10]]))


def test_learned_rows_past_training_length_get_no_gradient():
    N, L = 16, 64
    enc = B.LearnedPE(32, max_position=L)
    torch.manual_seed(0)
    model = SeqPEGPT(GPTConfig(block_size=N, n_embd=32, n_head=4, pe_method="input_add", pe_qk="none"), enc)
    ids = torch.randint(0, 64, (4, N))
    _, loss = model(ids, pe=enc(torch.arange(N)).view(1, N, -1), labels=ids)
    loss.backward()
    g = enc.table.weight.grad
    assert g.shape == (L, 32)
    assert (g[N:] == 0).all()
    # every trained row gets a gradient but the last: the last token predicts nothing and no query sees it
    assert (g[:N - 1].abs().sum(-1) > 0).all() and (g[N - 1] == 0).all()


def test_learned_rows_past_training_length_stay_at_init_through_training():
    """train --pe learned: AdamW, the table undecayed; the rows the training never reads are bit-identical to init."""
    cfg = T.TrainConfig(task="lm", pe="learned", steps=3, batch_size=2, block_size=8, model_dim=16, model_layers=1,
                        model_heads=2, max_position=32, progress=False, do_eval=False, seed=5)
    r = T.train(cfg, log=lambda *a, **k: None)
    torch.manual_seed(5)  # _build seeds, then the table is the first thing initialised
    init = B.LearnedPE(16, max_position=32).table.weight
    w = r["encoder"].table.weight.detach()
    assert torch.equal(w[8:], init[8:])
    assert not torch.allclose(w[:7], init[:7])


# ------------------------------------------------------------------------------------------------ RoPE
def _scores(q, k, table_q, table_k):
    """q·k after rotating q with the query table and k with the key table: [B, H, Nq, Nk]."""
    cq, sq = rotary_tables(table_q.unsqueeze(0))
    ck, sk = rotary_tables(table_k.unsqueeze(0))
    qr, _ = rotary(q, q, tables=(cq, sq))
    kr, _ = rotary(k, k, tables=(ck, sk))
    return qr @ kr.transpose(-1, -2)


def test_rope_is_a_rotation_of_each_pair():
    m = B.RoPE(8)
    x = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    t = m(torch.arange(5)).double()
    xr, _ = rotary(x, x, tables=rotary_tables(t.unsqueeze(0)))
    torch.testing.assert_close(xr.norm(dim=-1), x.norm(dim=-1))  # rotations keep the norm
    ang = m.angles(torch.tensor([3]))[0]  # pair i of position 3 turned by 3 w_i
    for i in range(4):
        a, b = x[0, 0, 3, 2 * i], x[0, 0, 3, 2 * i + 1]
        c, s = math.cos(ang[i]), math.sin(ang[i])
        assert xr[0, 0, 3, 2 * i].item() == pytest.approx((a * c - b * s).item(), abs=1e-6)
        assert xr[0, 0, 3, 2 * i + 1].item() == pytest.approx((b * c + a * s).item(), abs=1e-6)


@pytest.mark.parametrize("shift", [1, 37, 1000])
def test_rope_relative_shift_1d(shift):
    m = B.RoPE(16)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 12, 16, generator=g), torch.randn(2, 3, 12, 16, generator=g)
    pos = torch.arange(12)
    base = _scores(q, k, m(pos), m(pos))
    moved = _scores(q, k, m(pos + shift), m(pos + shift))
    torch.testing.assert_close(moved, base, atol=2e-5, rtol=1e-5)
    # and it does depend on the relative offset
    other = _scores(q, k, m(pos), m(pos + 1))
    assert not torch.allclose(other, base, atol=1e-3)


@pytest.mark.parametrize("shift", [(0, 5), (7, 0), (11, 3)])
def test_rope_relative_shift_2d_axial(shift):
    m = B.RoPE(16, data_dim=2)
    assert m.base == 100.0
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 16, 16, generator=g), torch.randn(1, 2, 16, 16, generator=g)
    base = _scores(q, k, m(_grid(4)), m(_grid(4)))
    moved = _scores(q, k, m(_grid(4, *shift)), m(_grid(4, *shift)))
    torch.testing.assert_close(moved, base, atol=2e-5, rtol=1e-5)
    # the first half of the pairs turns with the row only, the second with the column only
    a = m.angles(torch.tensor([[2, 0], [0, 3]]))
    assert (a[0, 4:] == 0).all() and (a[1, :4] == 0).all() and (a[0, :4] != 0).any() and (a[1, 4:] != 0).any()


def test_rope_and_alibi_lm_is_shift_invariant():
    """A whole GPT with RoPE (or ALiBi) gives the same logits whatever the first position."""
    for pe, method, mh in (("rope", "rotary", False), ("alibi", "alibi", True)):
        torch.manual_seed(0)
        cfg = GPTConfig(block_size=12, n_embd=32, n_head=4, pe_method=method, pe_qk="none", pe_multi_head=mh)
        enc = B.build_position_module(pe, 1, 32, 4, 10_000)
        model = SeqPEGPT(cfg, enc).double().eval()
        ids = torch.randint(0, 64, (2, 12))
        a, _ = model(ids, pe=enc(torch.arange(12)).double().view(1, 12, -1))
        b, _ = model(ids, pe=enc(torch.arange(12) + 500).double().view(1, 12, -1))
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_vit_rope_cls_is_not_rotated():
    cfg = ViTConfig(img_size=8, patch_size=4, embed_dim=32, num_heads=4, pe_method="rotary", pe_qk="none",
                    pe_multi_head=False, cls_pe="identity")
    enc = B.RoPE(8, data_dim=2)
    vit = SeqPEViT(cfg, enc)
    assert "cls_token_pos_embed" not in dict(vit.named_parameters())
    row = vit.cls_token_pos_embed[0, 0]
    assert (row[:4] == 0).all() and (row[4:] == 1).all()  # [sin | cos] of angle 0
    out = vit(torch.randn(2, 3, 8, 8), pe=enc(_grid(2)).view(1, 4, -1))
    assert out.shape == (2, 10)
    with pytest.raises(ValueError, match="ALiBi"):
        SeqPEViT(ViTConfig(pe_method="alibi", pe_qk="none"), B.ALiBi(4))


# ------------------------------------------------------------------------------------------------ ALiBi
def test_alibi_slopes_follow_press_et_al():
    torch.testing.assert_close(B.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    torch.testing.assert_close(B.alibi_slopes(4), torch.tensor([2.0 ** -(2 * (i + 1)) for i in range(4)]))
    # 6 heads: the 4-head slopes, then every other slope of the 8-head set
    torch.testing.assert_close(B.alibi_slopes(6), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3.]))


def test_alibi_per_head_bias():
    m = B.ALiBi(4)
    N = 6
    pos = torch.arange(N)
    mask = alibi_attn_mask(m(pos).view(1, N, 4))  # [1, H, N, N]
    assert mask.shape == (1, 4, N, N)
    for h in range(4):
        s = m.slopes[h].item()
        for i in range(N):
            for j in range(N):
                want = -s * (i - j) if j <= i else float("-inf")
                assert mask[0, h, i, j].item() == pytest.approx(want)
    torch.testing.assert_close(mask[0].masked_fill(torch.isinf(mask[0]), 0.0),
                               m.bias(pos).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), 0.0))
    # windows: sample b uses window b mod P
    P = alibi_attn_mask(m(torch.cat([pos, pos + 9])).view(2, N, 4), batch_size=4)
    assert P.shape == (4, 4, N, N)
    torch.testing.assert_close(P[2], P[0])


def test_alibi_model_attention_equals_explicit_formula():
    torch.manual_seed(0)
    N, H, C = 7, 4, 32
    m = B.ALiBi(H)
    model = SeqPEGPT(GPTConfig(block_size=N, n_embd=C, n_head=H, pe_method="alibi", pe_qk="none"), m).double().eval()
    pe = m(torch.arange(N)).double().view(1, N, H)
    x = torch.randn(2, N, C, dtype=torch.float64)
    attn = model.blocks[0].attn
    from seqpe_kernels.training.models import _PeContext

    got = attn(x, _PeContext("alibi", mask=alibi_attn_mask(pe, 2)), 0)
    q, k, v = attn.qkv(x).view(2, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    w = q @ k.transpose(-1, -2) / math.sqrt(C // H) + m.bias(torch.arange(N)).double()
    w = w.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    o = F.softmax(w, -1) @ v
    want = attn.proj(o.transpose(1, 2).reshape(2, N, C))
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------ train --pe
@pytest.mark.parametrize("task,pe", [("lm", "learned"), ("lm", "alibi"), ("lm", "none"), ("vit", "rope"),
                                     ("vit", "sinusoidal")])
def test_train_cli_with_baseline(tmp_path, capsys, task, pe):
    js = tmp_path / "r.json"
    size = (["--block-size", "16", "--eval-scales", "1", "4", "--eval-tokens", "256"] if task == "lm" else
            ["--eval-scales", "1", "2", "--eval-samples", "32"])
    rc = T.main(["--task", task, "--pe", pe, "--steps", "4", "--no-progress", "--plot", "", "--json", str(js),
                 "--model-dim", "16", "--model-heads", "2", *size])
    assert rc == 0, capsys.readouterr().err
    d = json.loads(js.read_text())
    assert d["config"]["pe"] == pe and d["config"]["contrastive_weight"] == 0 and d["config"]["shift_rate"] == 0
    assert all(c is None for c in d["contrastive"]) and all(t is None for t in d["transfer"])
    assert d["losses"] == d["main"] and all(np.isfinite(d["losses"]))
    assert all(r["value"] is not None for r in d["eval"]["rows"])
    assert f"{pe} baseline" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["--pe", "learned", "--contrastive-weight", "0.1"], "applies to --pe seqpe only"),
    (["--pe", "rope", "--shift-rate", "0.5"], "applies to --pe seqpe only"),
    (["--pe", "sinusoidal", "--pe-method", "attn_mul"], "its own way"),
    (["--task", "vit", "--pe", "alibi"], "not available for --task vit"),
    (["--pe", "none", "--save", "x.pth"], "SeqPE runs"),
    (["--pe", "learned", "--pe-lr", "1e-3"], "trains at --lr"),
])
def test_train_baseline_usage_errors(capsys, argv, msg):
    rc = T.main(["--steps", "1", "--no-progress", "--plot", "", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_learned_vit_eval_past_its_table_is_reported_not_measured():
    cfg = T.TrainConfig(task="vit", pe="learned", steps=1, batch_size=4, img_size=8, patch_size=4, model_dim=16,
                        model_heads=2, model_layers=1, max_position=16, eval_scales=(1, 3), eval_samples=8,
                        progress=False)  # a 4 x 4 table; 3x the 2 x 2 grid is 6 x 6
    r = T.train(cfg, log=lambda *a, **k: None)
    rows = r["eval"]["rows"]
    assert rows[0]["value"] is not None and rows[1]["value"] is None and "exceeds" in rows[1]["note"]
    assert "n/a" in T.format_eval(r["eval"])


@pytest.mark.parametrize("pe,measured", [("rope", True), ("alibi", True), ("learned", False), ("seqpe", True)])
def test_lm_eval_limits_are_the_encoders(pe, measured):
    """Every PE was refused past max_position ('n/a'); only a learned table (its rows) and SeqPE (its digits:
    max_position 64 -> 2 digits, positions < 100) have a limit."""
    cfg = T.TrainConfig(task="lm", pe=pe, steps=1, batch_size=2, block_size=8, model_dim=16, model_heads=2,
                        model_layers=1, pe_dim=16, pe_heads=2, pe_layers=1, max_position=64, contrastive_size=4,
                        contrastive_batch=2, transfer_size=4, transfer_batch=2, eval_scales=(1, 10, 16),
                        eval_tokens=512, backend="torch", progress=False)
    rows = T.train(cfg, log=lambda *a, **k: None)["eval"]["rows"]
    assert rows[0]["value"] is not None
    assert (rows[1]["value"] is not None) == measured  # length 80 > max_position 64
    if pe == "seqpe":
        assert rows[2]["value"] is None and "100 positions" in rows[2]["note"]  # length 128 > 10**2


def test_lm_eval_never_scores_training_text_as_held_out(tmp_path):
    """A held-out split shorter than the length was replaced by the training text (reported 'ok', its note in the
    JSON only): the 16x column compared training-text perplexity with held-out perplexity."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    cfg = T.TrainConfig(task="lm", pe="rope", steps=1, batch_size=2, block_size=8, model_dim=16, model_heads=2,
                        model_layers=1, max_position=4096, eval_scales=(1, 64), data=str(text), progress=False)
    rows = T.train(cfg, log=lambda *a, **k: None)["eval"]["rows"]
    assert rows[0]["value"] is not None
    assert rows[1]["value"] is None and "held-out text" in rows[1]["note"], rows[1]


@pytest.mark.parametrize("heads", [4, 12, 16])
def test_alibi_mask_is_the_rounded_exact_bias(heads):
    """The mask took differences of fp32 products m_h * p: up to ~1e-3 off at p ~ 16k for slopes that are not
    powers of two. It now equals bias()'s fp32 -m_h (p_i - p_j) bit for bit."""
    al = B.ALiBi(heads)
    N = 2048
    pos = torch.arange(14000, 14000 + N)
    m = alibi_attn_mask(al(pos)[None], causal=True)[0]
    tril = torch.ones(N, N, dtype=torch.bool).tril()
    assert m.dtype == torch.float32 and torch.equal(m[:, tril], al.bias(pos)[:, tril])
    assert bool(torch.isinf(m[:, ~tril]).all())


def test_encoder_lr_defaults():
    """The ViT's SeqPE encoder trains 10x slower than the model (issue 15); a baseline's table at the model's lr."""
    assert T.resolve_config(T.TrainConfig(task="vit")).pe_lr == 1e-4
    assert T.resolve_config(T.TrainConfig(task="vit", pe="learned")).pe_lr is None
    assert T.resolve_config(T.TrainConfig(task="lm")).pe_lr is None
