"""One source of truth for workloads: a benchmark step is a training step's encoder input.

``seqpe-kernels bench`` draws its positions with the training stack's samplers (seqpe_kernels.training.samplers) and merges
them with ``merge_positions``, as ``seqpe-kernels train`` does; these tests fail if the benchmark grows its own
imitation again, or if the step sizes drift from SEQPE_SPEC §6.
"""
import numpy as np
import pytest
import torch

from seqpe_kernels.bench import CONFIGS, make_positions, training_step
from seqpe_kernels.bench.workloads import SHIFT_POOL, STEPS
from seqpe_kernels.training.contrastive import ContrastiveSampler
from seqpe_kernels.training.samplers import MainWindowSampler, TransferSampler, merge_positions

# SEQPE_SPEC §6, per GPU of a 4-GPU run: main ; pivots ; candidates ; transfer
SPEC_SIZES = {"text-default": (512, 16, 512, 512), "text-shifted": (16 * 512, 16, 512, 0),
              "vits-default": (196, 32, 2048, 2048), "vits-shifted": (32 * 196, 32, 2048, 0),
              "vitb-default": (196, 32, 2048, 2048), "vitb-shifted": (32 * 196, 32, 2048, 0)}


@pytest.mark.parametrize("name", sorted(SPEC_SIZES))
def test_bench_step_sizes_are_the_papers(name):
    cfg = CONFIGS[name]
    pos, layout = training_step(cfg, seed=3)
    assert layout.sizes == SPEC_SIZES[name]
    assert cfg.M == sum(SPEC_SIZES[name]) == pos.shape[0]


@pytest.mark.parametrize("name", ["text-default", "text-shifted", "vits-default", "vits-shifted"])
def test_bench_step_is_the_training_samplers_step(name):
    """The positions bench times at a config's own M are exactly the merged encoder input that the training
    samplers give for the same seeds (train.py seeds a stream with SeedSequence(seed).spawn(3))."""
    cfg = CONFIGS[name]
    seed = 11
    shape = STEPS["text" if name.startswith("text") else "vit"]
    shifted = name.endswith("shifted")
    d = cfg.data_dim
    mp = cfg.pos_bound ** d
    main_s, ct_s, tr_s = np.random.SeedSequence(seed).spawn(3)
    main = MainWindowSampler(shape.window, mp, data_dim=d, use_random_shift=shifted, shift_rate=1.0,
                             shift_pool_size=SHIFT_POOL, seed=main_s).next(shape.shifted_windows if shifted else 1)
    ct = ContrastiveSampler(mp, shape.candidates, shape.pivots, data_dim=d, pipeline=shape.pipeline,
                            seed=ct_s).next()
    tr = None if shifted else TransferSampler(shape.window, mp, shape.transfer_size, shape.transfer_batch,
                                              data_dim=d, pipeline=shape.pipeline, seed=tr_s).next().positions
    want, _ = merge_positions(main.positions, ct.pivots, ct.candidates, tr, num_windows=main.num_windows)
    got = make_positions(cfg, seed=seed)
    assert got.dtype == torch.int64 and torch.equal(got.reshape(want.shape), want)
    # the step has the samplers' structure: the pivot is never its own candidate, candidates of a pivot differ
    piv, cand = ct.pivots, ct.candidates.reshape(shape.pivots, shape.candidates, *ct.pivots.shape[1:])
    for b in range(shape.pivots):
        rows = {tuple(np.atleast_1d(c.numpy())) for c in cand[b]}
        assert tuple(np.atleast_1d(piv[b].numpy())) not in rows and len(rows) == shape.candidates


def test_resized_workload_keeps_the_mix():
    """Away from the natural M the components keep their shares (windows keep their consecutive prefixes)."""
    cfg = CONFIGS["text-default"].with_M(97)
    pos = make_positions(cfg, seed=0)
    assert pos.shape == (97,) and pos.dtype == torch.int64
    assert torch.equal(pos[:32], torch.arange(32))  # the main window's prefix (512/1552 of 97 rows)
    assert int(pos.max()) < cfg.pos_bound and int(pos.min()) >= 0
