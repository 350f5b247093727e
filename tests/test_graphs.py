"""GraphedSeqPE (CUDA-graph replay) equals the eager fused module: outputs and every parameter gradient,
over several replays with fresh positions, in training and no-grad modes; dropout stays random per replay."""
import pytest
import torch

import seqpe_kernels as sk

from conftest import HAS_CUDA
from test_fused import perturbed_pair, random_positions, rel, _seed


def test_rejects_cpu_and_float_positions():
    m = sk.SeqPE(32, 2, 3)
    g = sk.GraphedSeqPE(m)
    with pytest.raises(ValueError, match="CUDA tensor"):
        g(torch.arange(5))
    if HAS_CUDA:
        with pytest.raises(TypeError, match="integer"):
            g(torch.rand(5, device="cuda"))


CASES = [("triton", dict(embed_dim=192, num_heads=3, max_digits=5, out_dim=160)),
         ("cuda", dict(embed_dim=128, num_heads=2, max_digits=2, data_dim=2, attn_direction="bi", init="image")),
         ("triton", dict(embed_dim=128, num_heads=2, max_digits=4, mask_padding=True, num_layers=3))]


@pytest.mark.gpu
@pytest.mark.parametrize("backend,cfg", CASES, ids=lambda c: c if isinstance(c, str) else f"D{c['embed_dim']}")
def test_graphed_training_replays_match_eager(backend, cfg):
    s = _seed()
    ref, fus = perturbed_pair(backend=backend, **cfg)
    ref.train(), fus.train()
    g = sk.GraphedSeqPE(fus)
    M = 257
    kept = []
    for step in range(3):  # capture on step 0, replay on 1 and 2 with fresh positions
        pos = random_positions(M, cfg["max_digits"], cfg.get("data_dim", 1))
        gout = torch.randn(M, ref.out_proj.out_features, device="cuda")
        for p in list(ref.parameters()) + list(fus.parameters()):
            p.grad = None
        yr, yg = ref(pos), g(pos)
        assert rel(yg, yr) <= 1e-5, f"step {step}: output rel err {rel(yg, yr):.3e} (seed {s})"
        yr.backward(gout)
        yg.backward(gout)
        for (n, pr), (_, pf) in zip(ref.named_parameters(), fus.named_parameters()):
            assert pf.grad is not None, f"no gradient for {n}"
            assert rel(pf.grad, pr.grad) <= 1e-5, f"step {step} grad {n}: {rel(pf.grad, pr.grad):.3e} (seed {s})"
        kept.append((yg, yg.detach().clone(), [p.grad for p in fus.parameters()],
                     [p.grad.clone() for p in fus.parameters()]))
    assert g.num_graphs == 1
    # outputs and .grad tensors handed out earlier must not be overwritten by later replays
    for y, y_snap, live, snap in kept[:-1]:
        assert torch.equal(y, y_snap), "an output from an earlier step was overwritten by a replay"
        for a, b in zip(live, snap):
            assert torch.equal(a, b), "a parameter .grad from an earlier step was overwritten by a replay"


@pytest.mark.gpu
def test_graphed_nograd_and_modes():
    _seed()
    cfg = dict(embed_dim=192, num_heads=3, max_digits=5)
    ref, fus = perturbed_pair(**cfg)
    ref.eval(), fus.eval()
    g = sk.GraphedSeqPE(fus)
    for _ in range(2):
        pos = random_positions(301, 5, 1)
        with torch.inference_mode():
            assert rel(g(pos), ref(pos)) <= 1e-5
        with torch.no_grad():
            assert rel(g(pos), ref(pos)) <= 1e-5
    assert g.num_graphs == 2  # inference_mode and no_grad are the same key; eval-with-grad would be another
    pos = random_positions(300, 5, 1)  # a new shape: a new capture
    with torch.no_grad():
        assert rel(g(pos), ref(pos)) <= 1e-5
    assert g.num_graphs == 3


@pytest.mark.gpu
def test_graphed_dropout_is_fresh_each_replay_and_autocast():
    _seed()
    ref, fus = perturbed_pair(embed_dim=128, num_heads=2, max_digits=5, resid_pdrop=0.1)
    fus.train()
    g = sk.GraphedSeqPE(fus)
    pos = random_positions(128, 5, 1)
    a, b = g(pos), g(pos)
    assert not torch.equal(a, b), "dropout masks repeated across replays"
    ref.eval(), fus.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = g(pos)
        want = ref(pos)
    assert y.dtype == want.dtype
    assert rel(y.float(), want.float()) <= 2e-2
