"""The reference SeqPE against an independent implementation of SEQPE_SPEC §2.3 written here, plus the
state-dict layout (§3.1), initialisation (§2.6), dropout behaviour and input validation.

Weights are re-randomised with a fresh seed on every run (set SEQPE_TEST_SEED to replay one); the seed is
printed and included in every assertion message.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from seqpe_kernels.reference import SeqPE, tokenize

from conftest import current_seed

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TOL = {torch.float32: 1e-5, torch.float64: 1e-11}



# ============================================================================ seeds and weights
@pytest.fixture
def seed():
    """The test's seed from conftest.py (fresh per test, SEQPE_TEST_SEED=N replays it; it is also appended to any
    failure report), so the seed a failure names is the one that replays these weights."""
    s = current_seed()
    print(f"SEQPE_TEST_SEED={s}")  # shown with the failure report
    return s


def perturb(module, gen):
    """Randomise every parameter (LayerNorm weights and biases included) at scales that keep activations O(1)
    and make attention far from uniform."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.4 * r)
            elif name.endswith("bias"):
                p.copy_(0.2 * r)
            elif name.endswith(CONV1D_SUFFIXES):  # [in, out]
                gain = 1.0
                p.copy_(r * gain / math.sqrt(p.shape[0]))
            elif name == "out_proj.weight":  # [out, in]
                p.copy_(r / math.sqrt(p.shape[1]))
            else:  # embeddings, cls, dim tokens
                p.copy_(r)


def random_positions(gen, M, K, d):
    """Positions with a random number of real digits per axis (so pad masks vary), row 0 = all zeros."""
    ndig = torch.randint(1, K + 1, (M, d), generator=gen)
    hi = (10 ** ndig).double()
    pos = (torch.rand(M, d, generator=gen, dtype=torch.float64) * hi).long().clamp_max(10 ** K - 1)
    pos[0] = 0
    return pos if d > 1 else pos[:, 0]


# ============================================================================ independent implementation
def extract(module):
    """Leaf copies of every parameter, Conv1D weights turned into nn.Linear layout [out, in]."""
    out = {}
    for k, v in module.state_dict().items():
        t = v.detach().clone()
        if k.endswith(CONV1D_SUFFIXES):
            t = t.t().contiguous()
        out[k] = t.requires_grad_(True)
    return out


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased variance
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu_tanh(z):
    return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z * z * z)))


def linear(x, P, name):
    return x @ P[name + ".weight"].t() + P[name + ".bias"]


def naive_seqpe(P, digits, pad_mask, *, D, H, K, d, layers, direction, mask_padding, last_ln, tau, eps=1e-5,
                masks=None, p_attn=0.0, p_resid=0.0, record=None):
    """SEQPE_SPEC §2.3 step by step. ``masks`` = {site: keep-mask} applies dropout as x * m / (1 - p)."""
    M, L = digits.shape
    T = L + 1
    de = D // H

    def drop(x, site, p):
        if masks is None or site not in masks:
            return x
        return x * masks[site].to(x.dtype) / (1.0 - p)

    # 1. embeddings; CLS appended after the last digit, without digit-position or dimension embedding
    j = torch.arange(L)
    h = P["token_of_seqpe_embed.weight"][digits] + P["pos_of_seqpe_embed.weight"][j].unsqueeze(0)
    if d > 1:
        h = h + P["dim_token_embed"][j // K, 0].unsqueeze(0)
    h = torch.cat([h, P["cls_token_embed"].reshape(1, 1, D).expand(M, 1, D)], dim=1)
    # 2. allowed-attention matrix A[m, q, k]; only keys are masked, the CLS key never
    A = torch.ones(M, T, T, dtype=torch.bool)
    if direction == "causal":
        A &= torch.ones(T, T).tril().bool()
    if mask_padding:
        keys = torch.cat([pad_mask.bool(), torch.ones(M, 1, dtype=torch.bool)], dim=1)
        A &= keys[:, None, :]
    A = A[:, None]  # broadcast over heads
    has_key = A.any(-1, keepdim=True)
    # 3. blocks
    for l in range(layers):
        pre = f"transformers.{l}."
        a = layer_norm(h, P[pre + "layernorm_1.weight"], P[pre + "layernorm_1.bias"], eps)
        qkv = linear(a, P, pre + "attn.c_attn")
        q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(M, T, H, de) for i in range(3))
        S = torch.einsum("mqhe,mkhe->mhqk", q, k) / math.sqrt(de)
        # softmax over allowed keys; a row with no allowed key is uniform over all T keys
        S = torch.where(has_key, S.masked_fill(~A, float("-inf")), torch.zeros_like(S))
        prob = torch.softmax(S, dim=-1)
        prob = drop(prob, f"attn{l}", p_attn)
        o = torch.einsum("mhqk,mkhe->mqhe", prob, v).reshape(M, T, D)
        if record is not None:
            record.setdefault("attn_out", []).append(o.detach())
            record.setdefault("fully_masked", []).append(~has_key[:, 0, :, 0])
            record.setdefault("v", []).append(v.detach().reshape(M, T, D))
        h = h + drop(linear(o, P, pre + "attn.c_proj"), f"resid_attn{l}", p_resid)
        a = layer_norm(h, P[pre + "layernorm_2.weight"], P[pre + "layernorm_2.bias"], eps)
        u = gelu_tanh(linear(a, P, pre + "mlp.c_fc"))
        h = h + drop(linear(u, P, pre + "mlp.c_proj"), f"resid_mlp{l}", p_resid)
    # 4. final LayerNorm; 5. out_proj of the CLS state, divided by the temperature
    if last_ln:
        h = layer_norm(h, P["layernorm.weight"], P["layernorm.bias"], eps)
    return linear(h[:, T - 1], P, "out_proj") * (1.0 / tau)


def naive_kwargs(m: SeqPE):
    return dict(D=m.embed_dim, H=m.num_heads, K=m.max_digits, d=m.data_dim, layers=m.num_layers,
                direction=m.attn_direction, mask_padding=m.mask_padding, last_ln=m.use_last_layernorm,
                tau=m.temperature, eps=m.layer_norm_eps)


# ============================================================================ comparison helpers
def assert_rel(got, ref, tol, what, seed):
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    assert math.isfinite(err), f"{what}: non-finite values (SEQPE_TEST_SEED={seed})"
    assert err <= tol * scale or err == 0.0, (
        f"{what}: max|diff| = {err:.3e} > {tol:g} * max|ref| = {tol * scale:.3e} (SEQPE_TEST_SEED={seed})")
    return err / scale if scale else 0.0


def compare_grads(module, P, tol, seed):
    names = dict(module.named_parameters())
    assert set(names) == set(P), set(names) ^ set(P)
    worst = 0.0
    for k, p in names.items():
        assert p.grad is not None, f"{k} got no gradient"
        ref = P[k].grad
        got = p.grad.t() if k.endswith(CONV1D_SUFFIXES) else p.grad
        worst = max(worst, assert_rel(got, ref, tol, f"grad {k}", seed))
    return worst


def run_parity(cfg, seed, dtype=torch.float32, M=13, train_masks=None):
    gen = torch.Generator().manual_seed(seed)
    m = SeqPE(**cfg)
    perturb(m, gen)
    m = m.to(dtype)
    pos = random_positions(gen, M, m.max_digits, m.data_dim)
    digits, pad = tokenize(pos, m.max_digits, data_dim=m.data_dim)
    P = extract(m)
    if train_masks:
        m.train()
        m.dropout_masks = train_masks
    else:
        m.eval()
    y = m(pos)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    (y * g).sum().backward()
    yr = naive_seqpe(P, digits, pad, masks=train_masks, p_attn=m.attn_pdrop, p_resid=m.resid_pdrop,
                     **naive_kwargs(m))
    (yr * g).sum().backward()
    assert y.dtype == dtype and y.shape == (M, m.out_dim)
    e_out = assert_rel(y.detach(), yr.detach(), TOL[dtype], "output", seed)
    e_grad = compare_grads(m, P, TOL[dtype], seed)
    return e_out, e_grad


# ============================================================================ parity grid
SMALL = {1: dict(embed_dim=40, num_heads=5, max_digits=4, data_dim=1, out_dim=24),
         2: dict(embed_dim=40, num_heads=5, max_digits=2, data_dim=2, out_dim=56),
         3: dict(embed_dim=36, num_heads=3, max_digits=2, data_dim=3, out_dim=20)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("temperature", [1.0, 0.37])
@pytest.mark.parametrize("last_ln", [True, False], ids=["lastLN", "noLastLN"])
@pytest.mark.parametrize("mask_padding", [False, True], ids=["nomask", "maskpad"])
@pytest.mark.parametrize("direction", ["causal", "bi"])
@pytest.mark.parametrize("data_dim", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_parity_small(seed, data_dim, direction, mask_padding, last_ln, temperature, dtype):
    cfg = dict(SMALL[data_dim], attn_direction=direction, mask_padding=mask_padding, use_last_layernorm=last_ln,
               temperature=temperature, resid_pdrop=0.1, attn_pdrop=0.1)  # eval: dropout inactive
    e_out, e_grad = run_parity(cfg, seed, dtype)
    print(f"rel err out {e_out:.2e} grad {e_grad:.2e}")


@pytest.mark.parametrize("layers, out_dim", [(1, None), (3, -1), (2, 7)])
def test_parity_layers_and_out_dim(seed, layers, out_dim):
    cfg = dict(embed_dim=24, num_heads=2, max_digits=3, num_layers=layers, out_dim=out_dim, mask_padding=True)
    run_parity(cfg, seed)


@pytest.mark.parametrize("mask_padding", [False, True], ids=["nomask", "maskpad"])
@pytest.mark.parametrize("direction", ["causal", "bi"])
@pytest.mark.parametrize("paper", ["text", "image"])
def test_parity_paper_configs(seed, paper, direction, mask_padding):
    if paper == "text":
        cfg = dict(embed_dim=768, num_heads=12, max_digits=5, data_dim=1, out_dim=768, init="text")
    else:
        cfg = dict(embed_dim=384, num_heads=6, max_digits=2, data_dim=2, out_dim=768, init="image")
    cfg.update(attn_direction=direction, mask_padding=mask_padding, use_last_layernorm=True)
    e_out, e_grad = run_parity(cfg, seed, M=7)
    print(f"{paper} rel err out {e_out:.2e} grad {e_grad:.2e}")


def test_base_other_than_10(seed):
    gen = torch.Generator().manual_seed(seed)
    m = SeqPE(32, 4, 3, base=7, out_dim=16, mask_padding=True).eval()
    perturb(m, gen)
    pos = torch.randint(0, 7 ** 3, (11,), generator=gen)
    digits, pad = tokenize(pos, 3, base=7)
    P = extract(m)
    assert_rel(m(pos).detach(), naive_seqpe(P, digits, pad, **naive_kwargs(m)).detach(), 1e-5, "output", seed)


# ============================================================================ fully masked rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_fully_masked_rows_are_uniform_over_all_keys(seed, dtype):
    """causal + mask_padding: leading pad query rows have no allowed key; the spec makes them uniform over all
    T keys (future included). Check the attention output of every row of every layer (captured at the input of
    attn.c_proj) against the independent implementation, then the final output and gradients."""
    gen = torch.Generator().manual_seed(seed)
    m = SeqPE(40, 4, 5, out_dim=24, attn_direction="causal", mask_padding=True).eval()
    perturb(m, gen)
    m = m.to(dtype)
    pos = torch.tensor([0, 7, 45, 123, 9999, 19999, 3])  # 4, 4, 3, 2, 1, 0, 4 pad digits
    digits, pad = tokenize(pos, 5)
    captured = []
    hooks = [blk.attn.c_proj.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
             for blk in m.transformers]
    y = m(pos)
    for h in hooks:
        h.remove()
    P = extract(m)
    rec = {}
    yr = naive_seqpe(P, digits, pad, record=rec, **naive_kwargs(m))
    fm = rec["fully_masked"][0]  # [M, T]
    assert fm.sum(-1).tolist() == [4, 4, 3, 2, 1, 0, 4]
    for l in range(m.num_layers):
        # independent statement of the semantics: a fully masked row is the mean of V over all T tokens
        mean_v = rec["v"][l].mean(1, keepdim=True).expand_as(rec["v"][l])
        assert_rel(rec["attn_out"][l][fm], mean_v[fm], TOL[dtype], f"naive uniform rows, layer {l}", seed)
        assert_rel(captured[l], rec["attn_out"][l], TOL[dtype], f"attention output, layer {l}", seed)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    assert_rel(y.detach(), yr.detach(), TOL[dtype], "output", seed)
    compare_grads(m, P, TOL[dtype], seed)


def test_no_fully_masked_rows_without_causal_or_masking():
    for direction, mp in (("bi", True), ("causal", False), ("bi", False)):
        rec = {}
        m = SeqPE(16, 2, 3, attn_direction=direction, mask_padding=mp).eval()
        digits, pad = tokenize(torch.tensor([0, 5, 42]), 3)
        naive_seqpe(extract(m), digits, pad, record=rec, **naive_kwargs(m))
        assert not rec["fully_masked"][0].any()


# ============================================================================ dropout
def _masks_for(m, M, gen, dtype=torch.float32):
    T, D, H = m.seq_len, m.embed_dim, m.num_heads
    masks = {}
    for l in range(m.num_layers):
        masks[f"attn{l}"] = (torch.rand(M, H, T, T, generator=gen) >= m.attn_pdrop).to(dtype)
        masks[f"resid_attn{l}"] = (torch.rand(M, T, D, generator=gen) >= m.resid_pdrop).to(dtype)
        masks[f"resid_mlp{l}"] = (torch.rand(M, T, D, generator=gen) >= m.resid_pdrop).to(dtype)
    return masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("data_dim", [1, 2])
def test_dropout_masks_hook_matches_independent_dropout(seed, data_dim, dtype):
    gen = torch.Generator().manual_seed(seed + 1)
    cfg = dict(SMALL[data_dim], attn_pdrop=0.2, resid_pdrop=0.3, mask_padding=True)
    probe = SeqPE(**cfg)
    masks = _masks_for(probe, 13, gen)
    run_parity(cfg, seed, dtype, M=13, train_masks=masks)


def test_dropout_active_in_train_inactive_in_eval(seed):
    torch.manual_seed(seed)
    m = SeqPE(32, 4, 3, resid_pdrop=0.3, attn_pdrop=0.2, out_dim=16)
    perturb(m, torch.Generator().manual_seed(seed))
    pos = torch.arange(20) * 37
    m.train()
    a, b = m(pos), m(pos)
    assert not torch.equal(a, b), "two training-mode calls gave identical outputs: dropout inactive"
    # every row of a call is perturbed independently; duplicated positions get different encodings
    dup = m(torch.tensor([5, 5]))
    assert not torch.equal(dup[0], dup[1])
    m.eval()
    c, d = m(pos), m(pos)
    assert torch.equal(c, d)
    # eval equals the dropout-free independent implementation
    digits, pad = tokenize(pos, 3)
    ref = naive_seqpe(extract(m), digits, pad, **naive_kwargs(m))
    assert_rel(c.detach(), ref.detach(), 1e-5, "eval output", seed)
    # and dropout masks given to the hook are ignored in eval
    m.dropout_masks = {k: torch.zeros_like(v) for k, v in _masks_for(m, 20, torch.Generator()).items()}
    assert torch.equal(m(pos), c)


def test_dropout_zero_probability_train_equals_eval(seed):
    m = SeqPE(32, 4, 3, resid_pdrop=0.0, attn_pdrop=0.0)
    perturb(m, torch.Generator().manual_seed(seed))
    pos = torch.arange(9) * 111
    assert torch.equal(m.train()(pos), m.eval()(pos))


def test_dropout_hook_reproduces_F_dropout(seed):
    """Record the keep-masks F.dropout drew in a training call, replay them through ``dropout_masks``: the
    output and gradients are those of the F.dropout call (the hook computes x * m / (1 - p))."""
    m = SeqPE(32, 4, 3, data_dim=2, resid_pdrop=0.3, attn_pdrop=0.25, out_dim=16, mask_padding=True).train()
    perturb(m, torch.Generator().manual_seed(seed))
    pos = torch.randint(0, 1000, (9, 2), generator=torch.Generator().manual_seed(seed))
    drops = {}
    for blk in m.transformers:
        for mod in (blk.attn.attn_dropout, blk.attn.resid_dropout, blk.mlp.dropout):
            drops[mod.site] = mod
    recorded = {}
    hooks = [mod.register_forward_hook(lambda mod, args, out: recorded.__setitem__(mod.site, (out != 0).float()))
             for mod in drops.values()]
    torch.manual_seed(seed)
    y1 = m(pos)
    for h in hooks:
        h.remove()
    assert set(recorded) == {f"{s}{l}" for l in range(2) for s in ("attn", "resid_attn", "resid_mlp")}
    g = torch.randn_like(y1)
    grads1 = torch.autograd.grad((y1 * g).sum(), list(m.parameters()))
    m.dropout_masks = recorded
    torch.manual_seed(seed + 12345)  # a different RNG state: the masks come from the hook
    y2 = m(pos)
    grads2 = torch.autograd.grad((y2 * g).sum(), list(m.parameters()))
    assert_rel(y2.detach(), y1.detach(), 1e-6, "replayed output", seed)
    for (name, _), g1, g2 in zip(m.named_parameters(), grads1, grads2):
        assert_rel(g2, g1, 1e-5, f"replayed grad {name}", seed)
    # the keep rate is about 1 - p
    keep = recorded["resid_mlp0"].mean().item()
    assert abs(keep - 0.7) < 0.08


# ============================================================================ state dict (SEQPE_SPEC §3.1)
def expected_state_dict(D, K, d, O, layers=2, last_ln=True):
    e = {}
    if d > 1:
        e["dim_token_embed"] = (d, 1, D)
    e["cls_token_embed"] = (1, 1, D)
    e["pos_of_seqpe_embed.weight"] = (d * K, D)
    e["token_of_seqpe_embed.weight"] = (10, D)
    for l in range(layers):
        p = f"transformers.{l}."
        e[p + "attn.c_attn.weight"] = (D, 3 * D)
        e[p + "attn.c_attn.bias"] = (3 * D,)
        e[p + "attn.c_proj.weight"] = (D, D)
        e[p + "attn.c_proj.bias"] = (D,)
        e[p + "layernorm_1.weight"] = (D,)
        e[p + "layernorm_1.bias"] = (D,)
        e[p + "layernorm_2.weight"] = (D,)
        e[p + "layernorm_2.bias"] = (D,)
        e[p + "mlp.c_fc.weight"] = (D, 4 * D)
        e[p + "mlp.c_fc.bias"] = (4 * D,)
        e[p + "mlp.c_proj.weight"] = (4 * D, D)
        e[p + "mlp.c_proj.bias"] = (D,)
    if last_ln:
        e["layernorm.weight"] = (D,)
        e["layernorm.bias"] = (D,)
    e["out_proj.weight"] = (O, D)
    e["out_proj.bias"] = (O,)
    return e


@pytest.mark.parametrize("name, kwargs, count", [
    ("text", dict(embed_dim=768, num_heads=12, max_digits=5, out_dim=768), 14_780_160),
    ("vit_b", dict(embed_dim=384, num_heads=6, max_digits=2, data_dim=2, out_dim=768, init="image"), 3_851_904),
    ("vit_s", dict(embed_dim=384, num_heads=6, max_digits=2, data_dim=2, out_dim=384, init="image"),
     3_851_904 - 147_840),
])
def test_state_dict_layout_and_parameter_count(name, kwargs, count):
    m = SeqPE(**kwargs, use_last_layernorm=True)
    sd = m.state_dict()
    exp = expected_state_dict(kwargs["embed_dim"], kwargs["max_digits"], kwargs.get("data_dim", 1), kwargs["out_dim"])
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert got == exp
    assert list(got) == list(exp)  # the authors' key order, too
    assert sum(p.numel() for p in m.parameters()) == count
    assert sum(v.numel() for v in sd.values()) == count
    assert list(m.buffers()) == []  # no mask/bias buffers


def test_state_dict_without_last_layernorm():
    m = SeqPE(64, 4, 3, use_last_layernorm=False, num_layers=3)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == expected_state_dict(64, 3, 1, 64, layers=3, last_ln=False)


@pytest.mark.parametrize("data_dim", [1, 2])
def test_no_weight_decay_keywords_are_the_authors(data_dim):
    """What an optimizer's grouping skips (SEQPE_SPEC §2): every LayerNorm, both embeddings, CLS, the dim tokens;
    against the authors' transcription (a training test that used the module's own list as its oracle could not
    see a LayerNorm dropped from it). The authors' set has CLS only with use_cls_token, which SeqPE always has."""
    import authors_seqpe as A

    ours = SeqPE(16, 2, 2, data_dim=data_dim).no_weight_decay_keywords()
    theirs = A.SequentialPE(16, 2, 1, 2, data_dim=data_dim).no_weight_decay_keywords()
    assert set(ours) == set(theirs) == {"pos_of_seqpe_embed", "token_of_seqpe_embed", "layernorm",
                                        "cls_token_embed"} | ({"dim_token_embed"} if data_dim > 1 else set())
    skipped = {n for n, _ in SeqPE(16, 2, 2, data_dim=data_dim, use_last_layernorm=True).named_parameters()
               if any(k in n for k in ours)}
    assert {n for n in skipped if "layernorm" in n} == {f"transformers.{i}.layernorm_{j}.{w}" for i in range(2)
                                                        for j in (1, 2) for w in ("weight", "bias")} | \
        {"layernorm.weight", "layernorm.bias"}


# ============================================================================ initialisation (§2.6, §2.7)
def _check_normal(t, std, name, n_sigma=6.0):
    n = t.numel()
    x = t.detach().double().flatten()
    assert abs(x.mean().item()) < n_sigma * std / math.sqrt(n), f"{name}: mean {x.mean().item():.2e}"
    assert abs(x.std().item() - std) < n_sigma * std / math.sqrt(2 * n) + 1e-6, f"{name}: std {x.std().item():.5f}"


@pytest.mark.parametrize("init, norm_weight", [("text", 1.0), ("image", 1.0), ("text", 0.5)])
def test_init_statistics(init, norm_weight):
    m = SeqPE(384, 6, 2, data_dim=2, out_dim=768, init=init, init_norm_weight=norm_weight)
    for name, p in m.named_parameters():
        if "layernorm" in name:
            expect = norm_weight if name.endswith("weight") else 0.0
            assert torch.all(p == expect), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # Conv1D/Linear weights, embeddings, cls and dim tokens
            _check_normal(p, 0.02, name)
            assert p.abs().max().item() < 2.0  # the ±2 truncation of the image init never bites at std 0.02


def test_image_init_uses_truncated_normal_text_init_does_not(monkeypatch):
    calls = []
    orig = torch.nn.init.trunc_normal_

    def spy(t, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        calls.append((tuple(t.shape), std, a, b))
        return orig(t, mean=mean, std=std, a=a, b=b)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", spy)
    m = SeqPE(64, 4, 2, data_dim=2, out_dim=32, init="image")
    drawn = [n for n, p in m.named_parameters() if "layernorm" not in n and not n.endswith("bias")]
    assert len(calls) == len(drawn)
    assert all(std == 0.02 and a == -2.0 and b == 2.0 for _, std, a, b in calls)
    calls.clear()
    SeqPE(64, 4, 2, data_dim=2, out_dim=32, init="text")
    assert calls == []


def test_image_init_has_no_atom_at_the_truncation_bounds(monkeypatch):
    """torch < 2.13's trunc_normal_ draws by inverse CDF and clamps erfinv(-1) = -inf to a: about one ViT-S image
    init in five held a -2.0 weight (100 sigma). Simulated here (an nn.init.trunc_normal_ that returns bound
    values), so the check runs under every torch."""
    from seqpe_kernels.reference.seqpe import trunc_normal_

    orig = torch.nn.init.trunc_normal_

    def with_atoms(t, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        orig(t, mean=mean, std=std, a=a, b=b)
        t.view(-1)[:3] = torch.tensor([a, b, a], dtype=t.dtype)
        return t

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", with_atoms)
    assert trunc_normal_(torch.empty(1000), std=0.02).abs().max().item() < 0.2
    m = SeqPE(64, 4, 2, data_dim=2, out_dim=32, init="image")
    assert max(p.abs().max().item() for p in m.parameters()) < 1.5  # LayerNorm weights are 1


# ============================================================================ bad inputs
@pytest.mark.parametrize("kwargs, match", [
    (dict(embed_dim=40, num_heads=3), "num_heads=3 does not divide embed_dim=40"),
    (dict(embed_dim=40, num_heads=0), "must be positive"),
    (dict(attn_direction="left"), "attn_direction must be 'causal' or 'bi'"),
    (dict(attn_direction="bidirectional"), "attn_direction"),
    (dict(resid_pdrop=1.0), r"resid_pdrop must be in \[0, 1\)"),
    (dict(resid_pdrop=-0.1), "resid_pdrop"),
    (dict(attn_pdrop=1.5), r"attn_pdrop must be in \[0, 1\)"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(init="xavier"), "init must be"),
    (dict(max_digits=0), "must be >= 1"),
    (dict(out_dim=-5), "out_dim must be positive"),
])
def test_bad_constructor_arguments(kwargs, match):
    base = dict(embed_dim=32, num_heads=4, max_digits=3)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SeqPE(**base)


def test_bad_forward_inputs():
    m = SeqPE(32, 4, 3, data_dim=2, out_dim=8).eval()
    ok = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"digits must have shape \[M, 6\]"):
        m.forward_digits(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="digits must have shape"):
        m.forward_digits(torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"digit ids must lie in \[0, 10\)"):
        m.forward_digits(ok + 10)
    with pytest.raises(ValueError, match=r"digit ids must lie in \[0, 10\).*-1"):
        m.forward_digits(ok - 1)
    with pytest.raises(TypeError, match="integer ids"):
        m.forward_digits(ok.float())
    with pytest.raises(ValueError, match="pad_mask shape"):
        m.forward_digits(ok, torch.ones(2, 5))
    with pytest.raises(ValueError, match="data_dim=2"):
        m(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="needs more than max_digits=3"):
        m(torch.tensor([[1000, 2]]))
    with pytest.raises(TypeError, match="integer dtype"):
        m(torch.tensor([[1.0, 2.0]]))


@pytest.mark.parametrize("data_dim", [1, 2])
def test_empty_batch(data_dim):
    m = SeqPE(32, 4, 3, data_dim=data_dim, out_dim=12)
    pos = torch.zeros((0,) if data_dim == 1 else (0, data_dim), dtype=torch.long)
    y = m(pos)
    assert y.shape == (0, 12) and y.dtype == torch.float32
    y.sum().backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in m.parameters())
    assert m.forward_digits(torch.zeros(0, 3 * data_dim, dtype=torch.long)).shape == (0, 12)


def test_forward_digits_default_pad_mask_equals_positions_path():
    m = SeqPE(32, 4, 3, mask_padding=False).eval()
    pos = torch.tensor([0, 5, 42, 999])
    digits, pad = tokenize(pos, 3)
    assert torch.equal(m(pos), m.forward_digits(digits))
    assert torch.equal(m(pos), m.forward_digits(digits, pad))


@pytest.mark.parametrize("backend", [None, "torch", "cpu", "triton"])
def test_an_encoder_is_freed_when_its_last_reference_goes(backend):
    """Each dropout layer held a reference back to its SeqPE (for the dropout_masks test hook): every encoder was
    a reference cycle, its parameters (on a GPU, their memory) freed only when the cycle collector ran. A SeqPE
    (backend None) and a FusedSeqPE on each backend, after training and eval calls."""
    import gc
    import weakref

    import seqpe_kernels as sk
    from conftest import require_ext

    if backend == "cpu":
        require_ext("cpu")
    gc.collect()
    gc.disable()
    try:
        cfg = dict(resid_pdrop=0.1, attn_pdrop=0.1)
        m = sk.SeqPE(16, 2, 3, **cfg) if backend is None else sk.FusedSeqPE(16, 2, 3, **cfg, backend=backend)
        m.dropout_masks = None
        m.train()(torch.arange(5)).sum().backward()
        with torch.no_grad():
            m.eval()(torch.arange(5))
        w = weakref.ref(m.out_proj.weight)
        del m
        assert w() is None
    finally:
        gc.enable()
