"""pytest-benchmark suite over the same providers / configs / modes as ``seqpe-kernels bench``.

    python -m pytest benchmarks/ --benchmark-only                  # every provider usable here
    SEQPE_BENCH_PROVIDERS=eager,triton python -m pytest benchmarks/ --benchmark-only
    python -m pytest benchmarks/ --benchmark-only --benchmark-save=<name>   # keep a run to --benchmark-compare

On CPU the sizes are small (``SEQPE_BENCH_CPU_M`` sequences per config, default 8 for text, 32 for ViT) and
torch runs one thread (``SEQPE_BENCH_THREADS``), so the suite takes a couple of minutes, most of it
torch.compile; on CUDA the SEQPE_SPEC §6 sizes are used. The numbers of record come from
``seqpe-kernels bench`` (CSV + plot under benchmarks/results/, see benchmarks/README.md); this suite is for
quick A/B comparisons with pytest-benchmark's own tooling.
"""
from __future__ import annotations

import os

import pytest
import torch

from seqpe_kernels.bench import (ALGO_PROVIDERS, CONFIGS, DEFAULT_PROVIDERS, MODES, build_provider, check_exact,
                                 make_positions, mode_callables, ref_fwd_flops, MODE_FLOP_FACTOR)
from seqpe_kernels.precision import fp32_matmul
from seqpe_kernels.reference import SeqPE

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CPU = DEVICE.type == "cpu"


def _env_list(name, default):
    v = os.environ.get(name, "")
    return [x.strip() for x in v.split(",") if x.strip()] or list(default)


SEL_PROVIDERS = _env_list("SEQPE_BENCH_PROVIDERS", DEFAULT_PROVIDERS)
SEL_CONFIGS = _env_list("SEQPE_BENCH_CONFIGS", ["text-default", "vits-default"] if ON_CPU else CONFIGS)
SEL_MODES = _env_list("SEQPE_BENCH_MODES", MODES)


def _config(name):
    cfg = CONFIGS[name]
    if ON_CPU:
        m = os.environ.get("SEQPE_BENCH_CPU_M")
        cfg = cfg.with_M(int(m) if m else (8 if cfg.data_dim == 1 else 32))
    return cfg


@pytest.fixture(scope="session", autouse=True)
def _threads():
    old = torch.get_num_threads()
    if ON_CPU:
        torch.set_num_threads(int(os.environ.get("SEQPE_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(old)


_STATE = {}


def _setup(name):
    """Reference module and positions per config, built once."""
    if name not in _STATE:
        try:
            import torch._dynamo
            torch._dynamo.reset()  # no compiled graphs of the previous config
        except Exception:  # pragma: no cover
            pass
        cfg = _config(name)
        torch.manual_seed(0)
        ref = SeqPE(**cfg.module_kwargs()).to(DEVICE)
        ref.check_range = False
        _STATE.clear()  # one config alive at a time (memory, compiled graphs)
        _STATE[name] = (cfg, ref, make_positions(cfg, seed=0, device=DEVICE), {})
    return _STATE[name]


def _provider(name, pname):
    cfg, ref, pos, provs = _setup(name)
    if pname not in provs:
        prov = build_provider(pname, cfg, ref, DEVICE)
        if not prov.skip_reason and pname in ALGO_PROVIDERS:
            bad = check_exact(prov, ref, pos, cfg.autocast_dtype(DEVICE), DEVICE)
            assert bad is None, f"{pname} is not exact: {bad}"
        provs[pname] = prov
    return cfg, ref, pos, provs[pname]


@pytest.mark.parametrize("mode", SEL_MODES)
@pytest.mark.parametrize("provider", SEL_PROVIDERS)
@pytest.mark.parametrize("config", SEL_CONFIGS)
def test_encoder(benchmark, config, provider, mode):
    cfg, ref, pos, prov = _provider(config, provider)
    if prov.skip_reason:
        pytest.skip(f"{provider}: {prov.skip_reason}")
    if mode not in prov.modes:
        pytest.skip(f"{provider} is exact only in nograd mode")
    fn, pre, params, cleanup = mode_callables(prov, mode, pos, cfg.autocast_dtype(DEVICE), DEVICE)

    def call():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    # the config's fp32 GEMM precision (TF32 only for a TF32 config), as `seqpe-kernels bench` sets it
    with fp32_matmul(tf32=cfg.tf32):
        try:
            pre()
            call()  # compile / autotune outside the timing
            rounds = 5 if ON_CPU else 50
            benchmark.group = f"{config} M={cfg.M} {mode}"
            benchmark.extra_info.update(M=cfg.M, tokens=cfg.tokens, dtype=cfg.dtype_label(DEVICE),
                                        device=str(DEVICE),
                                        gflop=ref_fwd_flops(cfg) * MODE_FLOP_FACTOR[mode] / 1e9)
            benchmark.pedantic(call, setup=pre, rounds=rounds, warmup_rounds=1, iterations=1)
        finally:
            cleanup()
