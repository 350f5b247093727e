"""The ``seqpe-kernels`` command line: env, check, bench (CPU; small sizes)."""
import csv

import pytest
import torch

from seqpe_kernels import cli
from seqpe_kernels.bench import CSV_COLUMNS, BenchConfig, make_positions, run_bench, CONFIGS, quick_M
from seqpe_kernels.backend import BACKENDS

REQUIRED = ("config", "provider", "mode", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "tflops", "floor_ratio",
            "speedup_vs_eager", "device", "torch_version", "triton_version", "cuda_version", "dtype", "git_commit",
            "date")

TINY = BenchConfig(name="tiny", workload="text-default", M=24, embed_dim=32, num_heads=2, max_digits=3,
                   out_dim=16, max_position=1000)


def _read_csv(path):
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


def test_env_lists_versions_and_backends(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    for word in ("python", "torch", "triton", "numpy", "CUDA"):
        assert word in out
    for b in BACKENDS:
        assert f"  {b} " in out
    assert "usable" in out


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_subcommand_table_is_extensible(capsys):
    calls = []
    table = dict(cli.SUBCOMMANDS)
    try:
        cli.SUBCOMMANDS["hello"] = ("say hello", lambda p: p.add_argument("--n", type=int, default=1),
                                    lambda a: calls.append(a.n) or 0)
        assert cli.main(["hello", "--n", "3"]) == 0
        assert calls == [3]
    finally:
        cli.SUBCOMMANDS.clear()
        cli.SUBCOMMANDS.update(table)


def test_check_passes_on_cpu(capsys):
    rc = cli.main(["check", "--device", "cpu", "--seed", "1234"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "reference-fp64" in out and "check PASSED" in out
    # every unusable backend is named with its reason
    assert "not checked" in out or all(f"\n{b} " in out for b in BACKENDS)


def test_check_reports_a_failure(monkeypatch, capsys):
    """A wrong fused result must fail the check (exit code 1), not pass silently."""
    from seqpe_kernels import check

    real = check._fused_from

    def broken(ref, backend):
        m = real(ref, backend)
        with torch.no_grad():
            m.out_proj.bias.add_(1e-2)
        return m

    monkeypatch.setattr(check, "_fused_from", broken)
    rc = cli.main(["check", "--device", "cpu", "--backend", "torch", "--seed", "5"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL" in out and "check FAILED" in out


def test_bench_api_tiny_config_writes_csv_and_png(tmp_path):
    csv_path, png_path = tmp_path / "b.csv", tmp_path / "b.png"
    rows = run_bench([TINY], providers=["eager", "triton", "cuda", "cpu", "dedup", "prefix", "cache"],
                     quick=True, csv_path=str(csv_path), png_path=str(png_path), progress=False, M=16,
                     print_table=True)
    fields, data = _read_csv(csv_path)
    assert set(REQUIRED) <= set(fields)
    assert tuple(fields) == CSV_COLUMNS
    assert png_path.exists() and png_path.stat().st_size > 0
    ok = [r for r in data if r["status"] == "ok"]
    assert {r["mode"] for r in ok if r["provider"] == "eager"} == {"forward", "full", "nograd"}  # quick modes
    for r in ok:
        assert float(r["median_ms"]) > 0
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert r["config"] == "tiny" and r["M"] == "16" and r["dtype"] == "fp32"
        assert float(r["tflops"]) > 0 and float(r["floor_ratio"]) > 0
    eager = [r for r in ok if r["provider"] == "eager"]
    assert all(abs(float(r["speedup_vs_eager"]) - 1.0) < 1e-9 for r in eager)
    # dedup/prefix/cache appear only in nograd mode; unusable fused backends are recorded as skipped
    assert all(r["mode"] == "nograd" for r in data if r["provider"] in ("dedup", "prefix", "cache"))
    assert all(r["note"] for r in data if r["status"] == "skipped")
    assert any(r["provider"] == "triton" and r["status"] == "skipped" for r in data) or torch.cuda.is_available()


def test_bench_cli_quick_with_M_override(tmp_path, capsys):
    csv_path, png_path = tmp_path / "q.csv", tmp_path / "q.png"
    rc = cli.main(["bench", "--quick", "--config", "text-default", "--provider", "eager", "--M", "8",
                   "--csv", str(csv_path), "--png", str(png_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "QUICK mode" in out
    fields, data = _read_csv(csv_path)
    assert set(REQUIRED) <= set(fields)
    assert {r["mode"] for r in data} == {"forward", "full", "nograd"}
    assert all(r["status"] == "ok" and r["M"] == "8" for r in data)
    assert png_path.exists()


def test_bench_cli_rejects_unknown_config(capsys):
    assert cli.main(["bench", "--config", "nope", "--csv", "none", "--png", "none"]) == 2


def test_bench_records_compile_failure(monkeypatch, tmp_path):
    """A provider that fails is recorded with its reason and the run goes on."""
    def bad_compile(mod, *a, **k):
        def run(*args, **kwargs):
            raise RuntimeError("no compiler on this machine")
        return run

    monkeypatch.setattr(torch, "compile", bad_compile)
    rows = run_bench([TINY], providers=["eager", "compile"], modes=["forward", "backward", "nograd"], M=8,
                     csv_path=None, png_path=None, progress=False, print_table=False,
                     policy=None, quick=True)
    comp = [r for r in rows if r["provider"] == "compile"]
    assert {r["mode"] for r in comp} == {"forward", "backward", "nograd"}
    assert all(r["status"] == "failed" and "no compiler" in r["note"] for r in comp)
    assert all(r["status"] == "ok" for r in rows if r["provider"] == "eager")


def test_backward_mode_runs_with_retained_graph():
    rows = run_bench([TINY], providers=["eager"], modes=["forward", "backward", "full"], M=8, csv_path=None,
                     png_path=None, progress=False, print_table=False, quick=True)
    bwd = [r for r in rows if r["mode"] == "backward"]
    assert len(bwd) == 1 and bwd[0]["status"] == "ok" and bwd[0]["median_ms"] > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_named_config_positions(name):
    cfg = CONFIGS[name]
    pos = make_positions(cfg, seed=0)
    assert pos.shape[0] == cfg.M and pos.dtype == torch.int64
    if cfg.data_dim == 1:
        assert pos.dim() == 1
    else:
        assert pos.shape == (cfg.M, cfg.data_dim)
    assert int(pos.min()) >= 0 and int(pos.max()) < cfg.pos_bound
    assert torch.equal(pos, make_positions(cfg, seed=0))  # seeded
    if name == "text-default":
        assert torch.equal(pos[:512], torch.arange(512))  # the default main window comes first
    if name == "vits-default":
        grid = torch.stack(torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij"), -1).reshape(-1, 2)
        assert torch.equal(pos[:196], grid)
    small = make_positions(cfg.with_M(quick_M(cfg)), seed=0)
    assert small.shape[0] == quick_M(cfg)


def test_sweep_over_M(tmp_path):
    rows = run_bench([TINY], providers=["eager"], modes=["nograd"], sweep=True, sweep_ms=[4, 8],
                     csv_path=None, png_path=str(tmp_path / "s.png"), progress=False, print_table=False, quick=True)
    assert sorted(r["M"] for r in rows) == [4, 8]
    assert (tmp_path / "s.png").exists()


def test_check_command_as_a_user_runs_it():
    """`seqpe-kernels check` in a fresh process without the Triton interpreter (how a user on a CPU machine
    runs it): every usable backend, dropout replay included, must pass and exit 0."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "seqpe_kernels.cli", "check"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "check PASSED" in r.stdout and " FAIL" not in r.stdout
