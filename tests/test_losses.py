"""SEQPE_SPEC §5.2, §5.4, §5.5: contrastive loss, transfer loss, weight scheduler."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from seqpe_kernels.reference.losses import (PeWeightScheduler, contrastive_loss, gram_log_softmax, kl_div_mean,
                                            transfer_loss)



# ------------------------------------------------------------------------------------------ contrastive
def test_contrastive_hand_computed():
    pivots = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cands = torch.tensor([[1.0, 0.0], [0.0, 1.0],   # pivot 0: logits [1, 0]
                          [0.0, 2.0], [1.0, 1.0]])  # pivot 1: logits [2, 1]
    labels = torch.tensor([0, 1])
    expect = 0.5 * (math.log(1 + math.exp(-1)) + math.log(1 + math.e))
    assert contrastive_loss(pivots, cands, labels).item() == pytest.approx(expect, rel=1e-6)
    expect2 = 0.5 * (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2)))
    assert contrastive_loss(pivots, cands, labels, scale=2.0).item() == pytest.approx(expect2, rel=1e-6)


def test_contrastive_multi_head_equals_hand_loop():
    g = torch.Generator().manual_seed(0)
    B, C, O, H = 3, 5, 12, 4
    z = torch.randn(B, O, generator=g, dtype=torch.float64)
    w = torch.randn(B * C, O, generator=g, dtype=torch.float64)
    labels = torch.tensor([4, 0, 2])
    d = O // H
    total, rows = 0.0, 0
    for b in range(B):
        for h in range(H):
            logits = [0.7 * float(z[b, h * d:(h + 1) * d] @ w[b * C + c, h * d:(h + 1) * d]) for c in range(C)]
            m = max(logits)
            lse = m + math.log(sum(math.exp(x - m) for x in logits))
            total += lse - logits[int(labels[b])]
            rows += 1
    got = contrastive_loss(z, w, labels, scale=0.7, num_heads=H)
    assert got.item() == pytest.approx(total / rows, rel=1e-12)
    # one head == the single-head form
    assert torch.allclose(contrastive_loss(z, w, labels, num_heads=1),
                          F.cross_entropy(torch.stack([w[b * C:(b + 1) * C] @ z[b] for b in range(B)]), labels))


def test_contrastive_shape_errors():
    with pytest.raises(ValueError):
        contrastive_loss(torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        contrastive_loss(torch.zeros(2, 4), torch.zeros(4, 4), torch.zeros(2, dtype=torch.long), num_heads=3)


# ------------------------------------------------------------------------------------------ transfer
def _log_softmax_rows(m):
    out = []
    for row in m:
        lse = math.log(sum(math.exp(x) for x in row))
        out.append([x - lse for x in row])
    return out


def test_transfer_kl_hand_computed():
    main = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    idx = torch.tensor([2, 0])  # A = [[0,1],[1,0]] -> Gram = I
    trans = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # Gram [[2,0],[0,0]]
    lp = _log_softmax_rows([[1, 0], [0, 1]])
    lq = _log_softmax_rows([[2, 0], [0, 0]])
    n = 4
    kl_pq = sum(math.exp(lp[i][j]) * (lp[i][j] - lq[i][j]) for i in range(2) for j in range(2)) / n
    kl_qp = sum(math.exp(lq[i][j]) * (lq[i][j] - lp[i][j]) for i in range(2) for j in range(2)) / n
    got = transfer_loss(main, idx, trans, num_heads=1, batch_size=1)
    assert got.item() == pytest.approx(kl_pq + kl_qp, rel=1e-6)
    # beta < 1 adds (1-beta) * the same symmetric KL (values only differ in where gradients go)
    got8 = transfer_loss(main, idx, trans, num_heads=1, beta=0.8, batch_size=1)
    assert got8.item() == pytest.approx(kl_pq + kl_qp, rel=1e-6)
    # scale multiplies the Gram logits
    lp2 = _log_softmax_rows([[2, 0], [0, 2]])
    lq2 = _log_softmax_rows([[4, 0], [0, 0]])
    kl2 = sum(math.exp(a) * (a - b) + math.exp(b) * (b - a) for ra, rb in zip(lp2, lq2) for a, b in zip(ra, rb)) / n
    assert transfer_loss(main, idx.view(1, 2), trans, 1, scale=2.0).item() == pytest.approx(kl2, rel=1e-6)


def _reference_style_transfer(main, idx, trans, bt, nh, beta, scale=1.0):
    """The authors' formulation with F.kl_div and its default reduction (test oracle)."""
    tn = idx.numel() // bt
    a = main[idx].reshape(bt, tn, nh, -1).permute(0, 2, 1, 3)
    b = trans.reshape(bt, tn, nh, -1).permute(0, 2, 1, 3)
    lp = F.log_softmax(a @ a.transpose(-1, -2) * scale, dim=-1)
    lq = F.log_softmax(b @ b.transpose(-1, -2) * scale, dim=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = beta * (F.kl_div(lq, lp.detach(), log_target=True) + F.kl_div(lp.detach(), lq, log_target=True))
        if beta < 1:
            loss = loss + (1 - beta) * (F.kl_div(lq.detach(), lp, log_target=True)
                                        + F.kl_div(lp, lq.detach(), log_target=True))
    return loss


@pytest.mark.parametrize("beta", [1.0, 0.8])
def test_transfer_matches_kl_div_default_mean_and_no_warning(beta):
    g = torch.Generator().manual_seed(1)
    N, O, bt, tn, nh = 10, 12, 3, 4, 3
    main = torch.randn(N, O, generator=g)
    trans = torch.randn(bt * tn, O, generator=g)
    idx = torch.stack([torch.randperm(N, generator=g)[:tn] for _ in range(bt)]).reshape(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = transfer_loss(main, idx, trans, nh, beta=beta, batch_size=bt)
    ref = _reference_style_transfer(main, idx, trans, bt, nh, beta)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    # [P, N, O] main input: window 0 is used
    got3 = transfer_loss(torch.stack([main, main + 1]), idx.view(bt, tn), trans, nh, beta=beta)
    torch.testing.assert_close(got3, got, rtol=0, atol=0)


def test_kl_div_mean_identical_to_torch():
    g = torch.Generator().manual_seed(2)
    x = F.log_softmax(torch.randn(2, 3, 5, 5, generator=g), -1)
    t = F.log_softmax(torch.randn(2, 3, 5, 5, generator=g), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.kl_div(x, t, log_target=True)
    assert torch.equal(kl_div_mean(x, t), ref)


@pytest.mark.parametrize("metric", ["kl_div", "mse"])
def test_transfer_beta_one_main_gets_exactly_zero_grad(metric):
    """One encoder output split into main and transfer rows, as in training (§5.7)."""
    g = torch.Generator().manual_seed(3)
    N, O, bt, tn, nh = 8, 8, 2, 3, 2
    y = torch.randn(N + bt * tn, O, generator=g, requires_grad=True)
    idx = torch.tensor([0, 5, 2, 7, 1, 3])
    loss = transfer_loss(y[:N], idx, y[N:], nh, beta=1.0, metric=metric, batch_size=bt)
    loss.backward()
    assert torch.count_nonzero(y.grad[:N]) == 0
    assert torch.count_nonzero(y.grad[N:]) > 0


@pytest.mark.parametrize("metric", ["kl_div", "mse"])
def test_transfer_beta_splits_gradients(metric):
    """beta x the loss with the main PEs as the (detached) teacher trains only the transfer PEs; (1 - beta) x the
    mirror image trains only the main PEs: for each metric (a detach on the wrong side of the mse form left the
    main PEs untrained and the loss still fell)."""
    N, O, bt, tn, nh = 8, 8, 2, 3, 2
    main0 = torch.randn(N, O, dtype=torch.float64)
    trans0 = torch.randn(bt * tn, O, dtype=torch.float64)
    idx = torch.randperm(N)[:bt * tn]

    def grads(beta):
        m, t = main0.clone().requires_grad_(), trans0.clone().requires_grad_()
        transfer_loss(m, idx, t, nh, beta=beta, metric=metric, batch_size=bt).backward()
        return (m.grad if m.grad is not None else torch.zeros_like(m)), t.grad

    gm1, gt1 = grads(1.0)
    gm8, gt8 = grads(0.8)
    assert torch.count_nonzero(gm1) == 0
    torch.testing.assert_close(gt8, 0.8 * gt1)  # beta-term gradient goes only into the transfer PEs
    # the (1-beta) term is the mirror image: its gradient reaches only the main PEs
    m = main0.clone().requires_grad_()
    lp = F.log_softmax((lambda a: a @ a.transpose(-1, -2))(m[idx].reshape(bt, tn, nh, -1).permute(0, 2, 1, 3)), -1)
    b = trans0.reshape(bt, tn, nh, -1).permute(0, 2, 1, 3)
    lq = F.log_softmax(b @ b.transpose(-1, -2), -1)
    mirror = (lp.exp() * (lp - lq)).mean() + (lq.exp() * (lq - lp)).mean() if metric == "kl_div" else F.mse_loss(lq, lp)
    (0.2 * mirror).backward()
    assert torch.count_nonzero(m.grad) > 0
    torch.testing.assert_close(gm8, m.grad)


def test_gram_log_softmax_normalises_the_last_axis():
    """Each row of the [B, n_h, T, T] result is a log-distribution over keys. The Gram matrix is symmetric, so
    transfer_loss cannot tell a softmax over the other axis (the transpose); the exported function's rows can."""
    B, T, H, w = 2, 5, 3, 2
    pe = torch.randn(B * T, H * w, dtype=torch.float64)
    out = gram_log_softmax(pe, batch_size=B, num_heads=H, scale=0.7)
    assert out.shape == (B, H, T, T)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(B, H, T, dtype=torch.float64))
    a = pe.reshape(B, T, H, w).permute(0, 2, 1, 3)
    torch.testing.assert_close(out, F.log_softmax(0.7 * a @ a.transpose(-1, -2), dim=-1))


def test_transfer_mse_value():
    g = torch.Generator().manual_seed(5)
    N, O, bt, tn, nh = 6, 4, 2, 3, 2
    main = torch.randn(N, O, generator=g)
    trans = torch.randn(bt * tn, O, generator=g)
    idx = torch.tensor([0, 1, 2, 5, 4, 3])
    a = main[idx].reshape(bt, tn, nh, -1).permute(0, 2, 1, 3)
    b = trans.reshape(bt, tn, nh, -1).permute(0, 2, 1, 3)
    lp = F.log_softmax(a @ a.transpose(-1, -2), -1)
    lq = F.log_softmax(b @ b.transpose(-1, -2), -1)
    mse = ((lq - lp) ** 2).mean()
    for beta in (1.0, 0.8, 0.3):
        got = transfer_loss(main, idx, trans, nh, beta=beta, metric="mse", batch_size=bt)
        torch.testing.assert_close(got, beta * mse + (1 - beta) * mse)


def test_transfer_errors():
    main, trans = torch.zeros(4, 4), torch.zeros(4, 4)
    with pytest.raises(ValueError, match="batch_size"):
        transfer_loss(main, torch.arange(4), trans, 1)
    with pytest.raises(ValueError, match="metric"):
        transfer_loss(main, torch.arange(4), trans, 1, metric="l1", batch_size=2)
    with pytest.raises(ValueError):
        transfer_loss(main, torch.arange(4), trans, 3, batch_size=2)


# ------------------------------------------------------------------------------------------ scheduler
def test_weight_scheduler_warmup():
    s = PeWeightScheduler(0.1, 0.2, warmup_steps=4)
    got = [s.step() for _ in range(6)]
    ratios = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    for (ct, tr), r in zip(got, ratios):
        assert ct == pytest.approx(0.1 * r) and tr == pytest.approx(0.2 * r)
    for w in (0, 1):  # the scripts use 0: ratio 1 from the first step
        s = PeWeightScheduler(0.1, 0.1, warmup_steps=w)
        assert s.step() == (0.1, 0.1)
    s = PeWeightScheduler(1.0, 1.0, warmup_steps=10)
    s.step(), s.step()
    s2 = PeWeightScheduler(0.0, 0.0)
    s2.load_state_dict(s.state_dict())
    assert s2.step() == s.step() == (0.3, 0.3)


def test_transfer_loss_refuses_an_empty_batch():
    """0 transfer positions: the means over an empty Gram would be NaN (the authors' criterion fails to reshape)."""
    main = torch.randn(8, 6)
    for idx, kw in ((torch.zeros(0, dtype=torch.long), dict(batch_size=1)),
                    (torch.zeros(4, 0, dtype=torch.long), {})):
        for metric in ("kl_div", "mse"):
            with pytest.raises(ValueError, match="at least one position"):
                transfer_loss(main, idx, torch.randn(0, 6), num_heads=1, metric=metric, **kw)
