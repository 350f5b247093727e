"""PE application (SEQPE_SPEC §4.2-§4.4) against direct transcriptions of the spec written here."""
import math

import pytest
import torch

from conftest import seed_for_case
from seqpe_kernels.training.pe_apply import (PeQK, attn_scalar, attn_scalar_explicit, input_add, pe_attention,
                                    pe_out_dim, rotary_tables, split_pe_qk, tile_windows)



DT = torch.float64


def _rand(*shape, g, req=True):
    return torch.randn(*shape, generator=g, dtype=DT).requires_grad_(req)


def _transcribe(method, q, k, v, P, pq=None, pk=None, pe=None, s=1.0, causal=False):
    """§4.4, literally: per sample b (window b mod P) and head h."""
    B, H, N, d = q.shape
    out = torch.zeros(B, H, N, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        p = b % P
        for h in range(H):
            qe, ke, ve = q[b, h], k[b, h], v[b, h]
            extra = 0.0
            if method in ("attn_mul", "attn_add", "attn_scalar"):
                hp = h if pq.shape[1] > 1 else 0
                Pq, Pk = pq[p, hp], pk[p, hp]
                if method == "attn_mul":
                    qe, ke = qe * Pq, ke * Pk
                elif method == "attn_add":
                    qe, ke = qe + Pq, ke + Pk
                else:
                    extra = s * (Pq @ Pk.T)
            elif method == "rotary":
                a, bb = pe[p, :, : d // 2], pe[p, :, d // 2:]
                a2 = torch.zeros(N, d, dtype=q.dtype)
                b2 = torch.zeros(N, d, dtype=q.dtype)
                for t in range(d // 2):
                    a2[:, 2 * t] = a2[:, 2 * t + 1] = a[:, t]
                    b2[:, 2 * t] = b2[:, 2 * t + 1] = bb[:, t]

                def rot(x):
                    r = torch.zeros_like(x)
                    for t in range(d // 2):
                        r[:, 2 * t] = -x[:, 2 * t + 1]
                        r[:, 2 * t + 1] = x[:, 2 * t]
                    return r

                qe, ke = qe * b2 + rot(qe) * a2, ke * b2 + rot(ke) * a2
            logits = (qe @ ke.T + extra) / math.sqrt(d)
            if causal:
                logits = logits.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
            out[b, h] = torch.softmax(logits, -1) @ ve
    return out


CASES = [(1, 4), (2, 4), (4, 4)]  # (P, B)


@pytest.mark.parametrize("method", ["attn_mul", "attn_add", "attn_scalar"])
@pytest.mark.parametrize("P,B", CASES)
@pytest.mark.parametrize("multi_head", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_attn_methods_match_transcription(method, P, B, multi_head, causal):
    g = torch.Generator().manual_seed(seed_for_case(method, P, multi_head, causal))
    H, N, d = 3, 5, 4
    q, k, v = (_rand(B, H, N, d, g=g) for _ in range(3))
    hp = H if multi_head else 1
    pq, pk = _rand(P, hp, N, d, g=g), _rand(P, hp, N, d, g=g)
    got = pe_attention(q, k, v, method, pq=pq, pk=pk, scalar_scale=0.7, causal=causal)
    ref = _transcribe(method, q, k, v, P, pq, pk, s=0.7, causal=causal)
    torch.testing.assert_close(got, ref)
    gout = _rand(*got.shape, g=g, req=False)  # and the gradients of every input (the PE tables train through them)
    inputs = [q, k, v, pq, pk]
    for name, a, b in zip("q k v pq pk".split(), torch.autograd.grad(got, inputs, gout, allow_unused=True),
                          torch.autograd.grad(ref, inputs, gout, allow_unused=True)):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("P,B", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_rotary_matches_transcription(P, B, causal):
    g = torch.Generator().manual_seed(7 + P)
    H, N, d = 2, 6, 8
    q, k, v = (_rand(B, H, N, d, g=g) for _ in range(3))
    pe = _rand(P, N, d, g=g)  # O = d_h, one table shared by the heads
    got = pe_attention(q, k, v, "rotary", rope=rotary_tables(pe), causal=causal)
    torch.testing.assert_close(got, _transcribe("rotary", q, k, v, P, pe=pe, causal=causal))


def test_rotary_is_a_rotation_for_unit_pe():
    """With a = sin θ, b = cos θ the learned form reduces to RoPE: norms kept, dot products depend on Δθ."""
    N, d = 5, 4
    theta = torch.arange(N, dtype=DT)[:, None] * torch.tensor([1.0, 0.1], dtype=DT)
    pe = torch.cat([theta.sin(), theta.cos()], -1)[None]  # [1, N, d]
    from seqpe_kernels.training.pe_apply import rotary
    x = torch.randn(1, 1, 1, d, dtype=DT).expand(1, 1, N, d)
    y = torch.randn(1, 1, 1, d, dtype=DT).expand(1, 1, N, d)
    rq, rk = rotary(x, y, pe)
    torch.testing.assert_close(rq.norm(dim=-1), x.norm(dim=-1))
    # <rot(x, i), rot(y, j)> depends on i - j only (norms alone hold for any per-position orthogonal map; the
    # table order itself is test_rotary_matches_transcription's)
    dots = (rq[0, 0, :, None, :] * rk[0, 0, None, :, :]).sum(-1)  # [i, j]
    for delta in range(-(N - 1), N):
        diag = torch.diagonal(dots, delta)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag))
    assert not torch.allclose(torch.diagonal(dots, 0)[0], torch.diagonal(dots, 1)[0])  # (and it does depend)


@pytest.mark.parametrize("P,B", CASES)
def test_input_add_matches_transcription(P, B):
    g = torch.Generator().manual_seed(3)
    N, C = 5, 6
    x, pe = _rand(B, N, C, g=g), _rand(P, N, C, g=g)
    got = input_add(x, pe)
    ref = torch.stack([x[b] + pe[b % P] for b in range(B)])
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError):
        input_add(_rand(3, N, C, g=g), _rand(2, N, C, g=g))


# ------------------------------------------------------------------------------- attn_scalar: SDPA == explicit
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("P,B,hp,dp", [(1, 3, 3, 4), (2, 4, 1, 4), (2, 2, 3, 2)])
def test_attn_scalar_augmented_equals_explicit(causal, P, B, hp, dp):
    """dp != d_h is the ViT 'none' split (half-width P^q / P^k)."""
    g = torch.Generator().manual_seed(11)
    H, N, d = 3, 6, 4
    q, k, v = (_rand(B, H, N, d, g=g) for _ in range(3))
    pq, pk = _rand(P, hp, N, dp, g=g), _rand(P, hp, N, dp, g=g)
    grad_out = torch.randn(B, H, N, d, generator=g, dtype=DT)
    outs, grads = [], []
    for fn in (attn_scalar, attn_scalar_explicit):
        o = fn(q, k, v, pq, pk, scalar_scale=0.5, causal=causal)
        gr = torch.autograd.grad(o, (q, k, v, pq, pk), grad_out)
        outs.append(o)
        grads.append(gr)
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    if dp == d:
        torch.testing.assert_close(outs[0], _transcribe("attn_scalar", q, k, v, P, pq, pk, s=0.5, causal=causal))


def test_attn_scalar_float32_default_scale_is_model_head_dim():
    g = torch.Generator().manual_seed(12)
    B, H, N, d = 2, 2, 7, 8
    q, k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
    pq, pk = torch.randn(1, H, N, d, generator=g), torch.randn(1, H, N, d, generator=g)
    a = attn_scalar(q, k, v, pq, pk, causal=True)
    ref = torch.softmax(((q @ k.transpose(-1, -2)) + pq @ pk.transpose(-1, -2)) / math.sqrt(d)
                        + torch.full((N, N), float("-inf")).triu(1), -1) @ v
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- broadcast == materialised tiling
@pytest.mark.parametrize("method", ["attn_mul", "attn_add", "attn_scalar", "rotary"])
def test_window_broadcast_equals_tiling(method):
    g = torch.Generator().manual_seed(5)
    P, B, H, N, d = 2, 6, 2, 5, 4
    q, k, v = (_rand(B, H, N, d, g=g, req=False) for _ in range(3))
    if method == "rotary":
        pe = _rand(P, N, d, g=g)
        a = pe_attention(q, k, v, method, rope=rotary_tables(pe), causal=True)
        b = pe_attention(q, k, v, method, rope=rotary_tables(tile_windows(pe, B)), causal=True)
        params = (pe,)
    else:
        pq, pk = _rand(P, H, N, d, g=g), _rand(P, H, N, d, g=g)
        a = pe_attention(q, k, v, method, pq=pq, pk=pk, causal=True)
        b = pe_attention(q, k, v, method, pq=tile_windows(pq, B), pk=tile_windows(pk, B), causal=True)
        params = (pq, pk)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    go = torch.randn(a.shape, generator=g, dtype=DT)
    for ga, gb in zip(torch.autograd.grad(a, params, go), torch.autograd.grad(b, params, go)):
        torch.testing.assert_close(ga, gb)


def test_tile_windows_rule():
    pe = torch.arange(3)[:, None, None].expand(3, 2, 1)
    t = tile_windows(pe, 6)
    assert t[:, 0, 0].tolist() == [b % 3 for b in range(6)]
    with pytest.raises(ValueError):
        tile_windows(pe, 4)


def test_peqk_projection_per_window_equals_per_tiled_sample():
    """Projecting P windows once then broadcasting == the reference's projection of B tiled copies."""
    torch.manual_seed(0)
    P, B, N, O, H = 2, 6, 5, 8, 2
    peqk = PeQK(O, O, H, num_layers=2, mode="multi").double()
    pe = torch.randn(P, N, O, dtype=DT)
    for layer in range(2):
        pq, pk = peqk(peqk.prepare(pe), layer)
        tq, tk = peqk(peqk.prepare(tile_windows(pe, B)), layer)
        torch.testing.assert_close(tile_windows(pq, B), tq)
        torch.testing.assert_close(tile_windows(pk, B), tk)


# ------------------------------------------------------------------------------- PeQK layout and modes
def test_split_pe_qk_layout():
    P, N, H, dh = 2, 3, 4, 5
    pe2 = torch.randn(P, N, 2 * H * dh)
    pq, pk = split_pe_qk(pe2, H)
    assert pq.shape == pk.shape == (P, H, N, dh)
    for h in range(H):
        assert torch.equal(pq[:, h], pe2[..., h * dh:(h + 1) * dh])
        assert torch.equal(pk[:, h], pe2[..., H * dh + h * dh: H * dh + (h + 1) * dh])


def test_peqk_single_multi_none():
    torch.manual_seed(1)
    P, N, C, H = 2, 3, 8, 2
    pe = torch.randn(P, N, C)
    single = PeQK(C, C, H, num_layers=3, mode="single")
    shared = single.prepare(pe)
    torch.testing.assert_close(shared, pe @ single.proj.weight.T + single.proj.bias)
    q0, k0 = single(shared, 0)
    q2, k2 = single(shared, 2)
    assert torch.equal(q0, q2) and torch.equal(k0, k2) and q0.shape == (P, H, N, C // H)
    assert torch.count_nonzero(single.proj.bias) == 0 and 0.01 < single.proj.weight.std() < 0.03

    multi = PeQK(C, C, H, num_layers=3, mode="multi", init="trunc_normal")
    sh = multi.prepare(pe)
    assert torch.equal(sh, pe)
    for i in range(3):
        qi, ki = multi(sh, i)
        ref = split_pe_qk(multi.projs[i](pe), H)
        assert torch.equal(qi, ref[0]) and torch.equal(ki, ref[1])
    assert not torch.equal(multi(sh, 0)[0], multi(sh, 1)[0])

    # 'none', GPT-2 rule: O == C_m duplicates (P^q = P^k = pe split into heads)
    none = PeQK(C, C, H, mode="none")
    q, k = none(none.prepare(pe))
    assert torch.equal(q, k) and torch.equal(q, pe.reshape(P, N, H, C // H).permute(0, 2, 1, 3))
    # O != C_m (non-multi-head O = d_h): raw vector split in halves
    none1 = PeQK(C // H, C, H, mode="none", multi_head=False)
    pe_h = torch.randn(P, N, C // H)
    q, k = none1(none1.prepare(pe_h))
    assert q.shape == (P, 1, N, C // H // 2) and torch.equal(q[:, 0], pe_h[..., : C // H // 2])
    # ViT rule: always halves
    vit = PeQK(C, C, H, mode="none", none_style="vit")
    q, k = vit(vit.prepare(pe))
    assert q.shape == (P, H, N, C // (2 * H))
    assert torch.equal(k[:, 0], pe[..., C // 2: C // 2 + C // (2 * H)])
    # the half-width ViT 'none' PE only fits attn_scalar
    qq = torch.randn(2, H, N, C // H)
    with pytest.raises(ValueError, match="attn_scalar"):
        pe_attention(qq, qq, qq, "attn_mul", pq=q, pk=k)
    assert pe_attention(qq, qq, qq, "attn_scalar", pq=q, pk=k).shape == qq.shape


def test_pe_out_dim_table():
    assert pe_out_dim("input_add", 768, 12) == 768
    assert pe_out_dim("attn_scalar", 768, 12, multi_head=True) == 768
    assert pe_out_dim("attn_mul", 384, 6, multi_head=False) == 64
    assert pe_out_dim("rotary", 768, 12, multi_head=False) == 64
    assert pe_out_dim("nope", 768, 12) == -1
    with pytest.raises(ValueError):
        pe_out_dim("rotary", 768, 12, multi_head=True)
    with pytest.raises(ValueError):
        pe_out_dim("alibi", 768, 12)


def test_end_to_end_with_encoder_gradients_flow():
    """Encoder -> PeQK (single) -> attn_scalar; gradients reach the encoder."""
    from seqpe_kernels.reference.seqpe import SeqPE

    torch.manual_seed(2)
    B, H, N, dh = 4, 2, 6, 4
    enc = SeqPE(embed_dim=16, num_heads=2, max_digits=3, out_dim=H * dh, resid_pdrop=0.0)
    pos = torch.cat([torch.arange(N), 100 + torch.arange(N)])  # P = 2 windows
    pe = enc(pos).view(2, N, H * dh)
    peqk = PeQK(H * dh, H * dh, H, mode="single")
    pq, pk = peqk(peqk.prepare(pe))
    q, k, v = (torch.randn(B, H, N, dh) for _ in range(3))
    out = pe_attention(q, k, v, "attn_scalar", pq=pq, pk=pk, causal=True)
    out.square().sum().backward()
    assert enc.out_proj.weight.grad is not None and enc.out_proj.weight.grad.abs().sum() > 0


def test_attn_scalar_runs_on_the_flash_kernel():
    """attn_scalar must not need the math SDPA path (it materialises the [B, H, N, N] scores the augmented-head
    identity exists to avoid): restricted to the flash kernel it still runs and equals the explicit-bias form."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    B, H, N, d = 2, 4, 64, 32
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    pq, pk = torch.randn(1, H, N, 16), torch.randn(1, H, N, 16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = attn_scalar(q, k, v, pq, pk, scalar_scale=0.5, causal=True)
    want = attn_scalar_explicit(q, k, v, pq, pk, scalar_scale=0.5, causal=True)
    assert out.shape == (B, H, N, d) and (out - want).abs().max() <= 1e-5


@pytest.mark.parametrize("mask", ["none", "zero_float", "all_true_bool"])
@pytest.mark.parametrize("Nq,Nk", [(2, 5), (1, 4), (3, 3)])
def test_causal_with_cached_keys_is_bottom_right_aligned(mask, Nq, Nk):
    """Nq < Nk (decoding with cached keys): query i sits at key Nk - Nq + i, as GPT-2's mask slice and
    attn_scalar_explicit have it, with or without an extra attn_mask. SDPA's own is_causal aligns top-left when
    Nq != Nk: used unmasked, it let a decode step see only the first keys."""
    g = torch.Generator().manual_seed(seed_for_case(mask, Nq, Nk))
    B, H, d = 2, 2, 4
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, H, Nq, d), r(B, H, Nk, d), r(B, H, Nk, d)
    pq, pk = r(1, H, Nq, d), r(1, H, Nk, d)
    m = {"zero_float": torch.zeros(Nq, Nk, dtype=torch.float64),
         "all_true_bool": torch.ones(Nq, Nk, dtype=torch.bool), "none": None}[mask]
    got = attn_scalar(q, k, v, pq, pk, scalar_scale=0.5, causal=True, attn_mask=m)
    torch.testing.assert_close(got, attn_scalar_explicit(q, k, v, pq, pk, scalar_scale=0.5, causal=True))
    allowed = torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    w = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(pe_attention(q, k, v, "nope", causal=True, attn_mask=m), w.softmax(-1) @ v)
