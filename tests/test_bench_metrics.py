"""`seqpe-kernels bench`'s numbers and verdicts (seqpe_kernels/bench): the WRONG gate's constants, the derived
metrics (speed-up, floor ratio, TFLOP/s, derived backward), CPU peak memory, the printed table's columns. Each test
fails on a mutant of the 2026-12-02 campaign that gave a wrong verdict or number (the CLI tests only checked eager's
1.0 and that the rest are positive). CPU, fast."""
import math

import pytest
import torch

from conftest import current_seed
from seqpe_kernels.bench import providers as P
from seqpe_kernels.bench import run as R
from seqpe_kernels.bench.configs import MODE_FLOP_FACTOR, BenchConfig
from seqpe_kernels.bench.report import format_table

CFG = BenchConfig(name="tiny", workload="uniform", M=16, embed_dim=32, num_heads=2, max_digits=3, out_dim=16)


def _row(provider, mode, ms=1.0, err=math.nan, status="ok", **kw):
    r = dict(config=CFG.name, M=CFG.M, provider=provider, mode=mode, status=status, median_ms=ms, p20_ms=ms,
             p80_ms=ms, rel_err=err, note="", ref_gflop=3.0 * MODE_FLOP_FACTOR[mode],
             floor_gflop=2.0 * MODE_FLOP_FACTOR[mode])
    r.update(kw)
    return r


def _flagged(eager_err, err):
    rows = [_row("eager", "nograd", err=eager_err), _row("eager", "full"),
            _row("cuda", "nograd", err=err), _row("cuda", "full")]
    R._flag_wrong(rows, CFG)
    return [r["status"] for r in rows if r["provider"] == "cuda"]


def test_wrong_gate_is_3x_eagers_error_plus_1e_4():
    """WRONG past 3 x eager's own error + 1e-4 (relative), on every mode of the point (mutants: factor 30, floor
    1e-3; on CPU eager's error is 0, so the factor was never exercised by the suite)."""
    assert _flagged(1e-2, 2.9e-2) == ["ok", "ok"]          # bf16-like eager error: within 3x
    assert _flagged(1e-2, 4e-2) == ["wrong", "wrong"]      # past 3x + 1e-4
    assert _flagged(0.0, 5e-5) == ["ok", "ok"]             # fp32 rounding
    assert _flagged(0.0, 5e-4) == ["wrong", "wrong"]       # 5x the floor: wrong numbers in fp32


def test_rel_err_counts_errors_of_both_signs():
    """rel_err is max |got - want| / max |want| (mutant: abs dropped, so an output uniformly below the reference
    read as exact and passed the WRONG gate)."""
    gen = torch.Generator().manual_seed(current_seed())
    want = torch.randn(8, 16, generator=gen)
    s = float(want.abs().max())
    assert abs(P.rel_err(want - 1e-2 * s, want) - 1e-2) < 1e-5
    assert abs(P.rel_err(want + 1e-2 * s, want) - 1e-2) < 1e-5


def test_speedup_floor_ratio_and_tflops_arithmetic():
    """speedup_vs_eager = eager ms / provider ms of the same mode; tflops = reference GFLOP / time; floor_ratio =
    (floor GFLOP / GEMM rate) / time (mutants: speed-up and floor ratio inverted, tflops from the floor FLOPs:
    the suite only checked eager's 1.0 and that the others are > 0)."""
    rows = [_row("eager", "full", ms=8.0), _row("eager", "nograd", ms=2.0),
            _row("cuda", "full", ms=2.0), _row("cuda", "nograd", ms=4.0)]
    rate = 1e12  # FLOP/s
    R._fill_metrics(rows, CFG, rate)
    by = {(r["provider"], r["mode"]): r for r in rows}
    f = by[("cuda", "full")]
    assert f["speedup_vs_eager"] == 4.0 and by[("cuda", "nograd")]["speedup_vs_eager"] == 0.5
    assert math.isclose(f["tflops"], 9.0e9 / 2e-3 / 1e12)                  # ref_gflop 9 in 2 ms
    assert math.isclose(f["floor_ratio"], (6.0e9 / rate) / 2e-3)           # floor 6 GFLOP at 1 TFLOP/s in 2 ms


def test_derived_backward_is_full_minus_forward():
    """A 'derived' backward row is full - forward (mutant: full + forward)."""
    rows = [_row("cuda-graph", "forward", ms=1.0), _row("cuda-graph", "full", ms=3.5),
            dict(_row("cuda-graph", "backward", ms=math.nan, status="derived"), p20_ms=math.nan, p80_ms=math.nan)]
    R._derive_backward(rows, CFG)
    assert rows[2]["median_ms"] == 2.5 and rows[2]["status"] == "derived"


def test_check_exact_refuses_an_algorithmic_provider_1e_4_off():
    """dedup / prefix / cache must match the reference to 1e-5 in fp32 before they are timed (mutant: 1e-3)."""
    torch.manual_seed(current_seed())
    from seqpe_kernels import SeqPE
    ref = SeqPE(16, 2, 3, out_dim=8, resid_pdrop=0.0)
    pos = torch.randint(0, 1000, (5,))
    prov = P.Provider("dedup", ref, lambda p: ref(p) * (1 + 1e-4), modes=("nograd",))
    why = P.check_exact(prov, ref, pos, None, torch.device("cpu"))
    assert why is not None and "differs from the reference" in why
    assert P.check_exact(P.Provider("dedup", ref, ref, modes=("nograd",)), ref, pos, None, torch.device("cpu")) is None


def test_cpu_peak_memory_is_the_calls_own():
    """The CPU peak-memory cell is the peak RSS of the call above the RSS before it (mutant: the process's absolute
    peak RSS, hundreds of MB of torch itself next to a 64 MB call)."""
    from seqpe_kernels.bench.timing import _peak_mem_mb

    def fn():
        x = torch.ones(16 * 2 ** 20)  # 64 MB, touched (above glibc's largest mmap threshold: fresh pages)
        return float(x[::4096].sum())

    mb, note = _peak_mem_mb(fn, lambda: None, torch.device("cpu"))
    if math.isnan(mb):  # no /proc/self/clear_refs or VmHWM (not Linux, or a restricted container)
        pytest.skip(note)
    assert 40.0 <= mb <= 200.0, (mb, note)


def test_full_step_flop_factor_is_forward_plus_backward():
    """A full step's GEMM FLOPs are forward + backward (1 + 2); tflops and floor ratios of full rows use it."""
    assert MODE_FLOP_FACTOR["backward"] == 2 * MODE_FLOP_FACTOR["forward"]
    assert MODE_FLOP_FACTOR["full"] == MODE_FLOP_FACTOR["forward"] + MODE_FLOP_FACTOR["backward"]


def test_printed_table_columns_are_under_their_headers():
    """median / p20 / p80 / mem / host / TFLOP/s / floor / vs eager / rel err land in their columns (mutant: p20
    and p80 swapped)."""
    r = dict(_row("cpu", "nograd", ms=2.0, err=3e-7), p20_ms=1.0, p80_ms=3.0, peak_mem_mb=12.5, host_ms=0.25,
             tflops=0.5, floor_ratio=0.125, speedup_vs_eager=1.5, T=4, tokens=64, dtype="fp32", gemm_tflops=1.0,
             device="cpu", torch_version="2", triton_version="", cuda_version="", git_commit="x")
    text = format_table([r])
    line = next(ln for ln in text.splitlines() if ln.startswith("cpu "))
    assert line.split() == ["cpu", "nograd", "2.000", "1.000", "3.000", "12.5", "0.250", "0.5000", "0.125",
                            "1.50x", "3.0e-07"], line
