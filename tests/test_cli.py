"""The ``seqpe-kernels`` command line: env, check, bench (CPU; small sizes)."""
import csv
import dataclasses

import pytest
import torch

from seqpe_kernels import cli
from seqpe_kernels.bench import CSV_COLUMNS, BenchConfig, make_positions, run_bench, CONFIGS, quick_M
from seqpe_kernels.backend import BACKENDS
from conftest import current_seed

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


def test_env_says_what_auto_runs(capsys, monkeypatch):
    """env listed the backends and the raw SEQPE_KERNELS_BACKEND value but not what backend='auto' would run."""
    from seqpe_kernels.backend import auto_order, available_backends

    assert cli.main(["env", "--device", "cpu"]) == 0
    usable = [b for b in auto_order(torch.device("cpu")) if available_backends("cpu")[b][0]]
    assert f"backend='auto' runs: {usable[0]}" in capsys.readouterr().out
    monkeypatch.setenv("SEQPE_KERNELS_BACKEND", "Bogus")
    assert cli.main(["env", "--device", "cpu"]) == 0
    assert "backend='auto' runs: nothing: SEQPE_KERNELS_BACKEND='Bogus'" in capsys.readouterr().out


def test_check_passes_on_cpu(capsys):
    rc = cli.main(["check", "--device", "cpu", "--seed", "1234"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "reference-fp64" in out and "check PASSED" in out
    # every unusable backend is named with its reason
    assert "not checked" in out or all(f"\n{b} " in out for b in BACKENDS)


def test_check_runs_in_ieee_fp32_whatever_the_script_set(monkeypatch):
    """run_check's fp32 parity is defined in IEEE fp32 GEMMs; a global TF32 switch must not leak into it, and
    the script's switch is back afterwards."""
    from seqpe_kernels import check as check_mod
    from seqpe_kernels.precision import fp32_matmul, tf32_enabled
    seen = []
    monkeypatch.setattr(check_mod, "_run_check", lambda *a, **k: seen.append(tf32_enabled()) or True)
    with fp32_matmul(tf32=True):
        assert check_mod.run_check(device="cpu", verbose=False) is True
        assert tf32_enabled()
    assert seen == [False]


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


def test_check_fails_a_backend_that_applies_no_dropout(monkeypatch, capsys):
    """A plan that silently drops no dropout records no masks: that was reported as skipped ("its dropout is
    torch's own") and check passed."""
    from seqpe_kernels.backend import available_backends
    from seqpe_kernels.fused import FusedSeqPE

    fused = [b for b in ("cpu", "triton") if available_backends(torch.device("cpu"))[b][0]]
    if not fused:
        pytest.skip("no fused backend is usable on this CPU (the C++ extension and the Triton interpreter are off)")
    real = FusedSeqPE._plan
    monkeypatch.setattr(FusedSeqPE, "_plan", lambda self, *a: dataclasses.replace(real(self, *a), p_res=0.0,
                                                                                    p_att=0.0))
    rc = cli.main(["check", "--device", "cpu", "--backend", fused[0], "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 1 and "its kernels apply no dropout" in out, out


@pytest.mark.parametrize("when", ["many_rows", "threads"])
def test_check_covers_many_rows_and_threads(when, monkeypatch, capsys):
    """Defects that show only past ~16 rows or with more than one CPU thread passed check: every case had M <= 11
    and check forced one thread with no flag to change it."""
    from seqpe_kernels import check

    real = check._fused_from

    def broken(ref, backend):
        m = real(ref, backend)
        fwd = m.forward

        def f(pos, *a, **k):
            y = fwd(pos, *a, **k)
            off = pos.shape[0] > 100 if when == "many_rows" else torch.get_num_threads() > 1
            return y * 1.01 if off else y
        m.forward = f
        return m

    monkeypatch.setattr(check, "_fused_from", broken)
    argv = ["check", "--device", "cpu", "--backend", "torch", "--seed", "4"]
    assert cli.main(argv + (["--threads", "2"] if when == "threads" else [])) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and ("1d-causal-many-rows" in out or when == "threads")


@pytest.mark.parametrize("rate,ok", [(0.1, True), (0.0, False), (0.05, False), (0.3, False)])
def test_check_mask_rates_catch_a_draw_that_drops_too_little(rate, ok):
    """Replaying the kernels' own masks cannot catch a draw that drops the wrong fraction: the rates are checked."""
    from seqpe_kernels import SeqPE, check

    m = SeqPE(32, 2, 3, num_layers=2, resid_pdrop=0.1, attn_pdrop=0.1)
    g = torch.Generator().manual_seed(0)
    M, T, D, H = 64, 4, 32, 2
    masks = {}
    for i in range(2):
        masks[f"attn{i}"] = (torch.rand(M, H, T, T, generator=g) >= rate).float()
        for site in ("resid_attn", "resid_mlp"):
            masks[f"{site}{i}"] = (torch.rand(M, T, D, generator=g) >= rate).float()
    msg = check._mask_rates(m, masks)
    assert (msg == "") == ok, msg


def test_check_table_shows_what_the_two_error_judgement_read_as_noise_and_why_a_quantity_fails():
    """check's table: a quantity past its max-abs bound that judge_two_error read as one element's rounding noise
    gets a 'passing:' line with its ratios and the row passes; a failing one names the reason."""
    from seqpe_kernels.check import CheckRow, ErrStats, _row, format_check_table, judge_two_error

    gen = torch.Generator().manual_seed(current_seed())
    ref = torch.randn(4, 64, generator=gen, dtype=torch.float64)
    unit = torch.finfo(torch.bfloat16).eps * ref.abs().max(1, keepdim=True).values
    noise = (torch.rand(4, 64, generator=gen, dtype=torch.float64) * 2 - 1) * 0.3 * unit
    t = ref + noise
    t[1, 5] = ref[1, 5] + 1.2 * unit[1, 0]  # torch's worst element in the run
    f = ref + noise.flip(1)
    f[0, 7] = ref[0, 7] + 2.0 * unit[0, 0]  # one element 2 eps off: past 2x its own quantity's torch error
    stats = {"out": ErrStats.of(t[2], t[2], ref[2])}  # (a row prints its quantities when it has an output)
    stats.update({f"grad:w{i}": ErrStats.of(f[i], t[i], ref[i]) for i in range(4)})

    class Case:
        name = "text"

    qs = judge_two_error(stats, torch.bfloat16)
    row = _row("triton", Case, "bf16", qs, [])
    table = format_check_table([row], torch.device("cpu"), 1, {}, 0.1)
    assert row.status == "pass" and "passing: grad:w0" in table and "rounding noise" in table, table
    f[0, 7] += 20.0 * unit[0, 0]
    stats["grad:w0"] = ErrStats.of(f[0], t[0], ref[0])
    row = _row("triton", Case, "bf16", judge_two_error(stats, torch.bfloat16), [])
    table = format_check_table([row], torch.device("cpu"), 1, {}, 0.1)
    assert row.status == "FAIL" and "failing: grad:w0" in table and "torch's worst in any quantity" in table, table


def test_check_two_error_rule_fails_when_eager_overflows():
    """err(fused) <= 2 err(eager low precision): an eager run that overflowed gave an infinite bound, which any
    finite fused error met."""
    from seqpe_kernels import check

    ref = torch.ones(4, 3)
    y = ref + 1000.0
    y_lp = ref.clone()
    y_lp[0, 0] = float("inf")
    qs, _ = check._compare_two_error(y, {}, y_lp, {}, ref, {}, torch.bfloat16)
    assert not qs[0].ok and "inf" in repr(qs[0].bound)
    qs, _ = check._compare_two_error(ref + 1e-3, {}, ref + 1e-3, {}, ref, {}, torch.bfloat16)
    assert qs[0].ok


@pytest.mark.parametrize("how", ["scaled", "nan"])
def test_bench_marks_a_provider_with_wrong_outputs_and_gives_it_no_speedup(how, monkeypatch, tmp_path, capsys):
    """A fused provider computing wrong numbers (10% off, NaN) was timed and shown with its speed-up (NaN errors
    printed as '-', i.e. not measured) and bench exited 0."""
    from seqpe_kernels.backend import available_backends
    from seqpe_kernels.bench import providers as P

    if not available_backends(torch.device("cpu"))["cpu"][0]:
        pytest.skip("the C++ CPU extension is not usable here (its provider is the one broken below)")
    real = P.fused_from_reference

    def broken(ref, backend):
        f = real(ref, backend)
        fwd = f.forward
        f.forward = lambda *a, **k: fwd(*a, **k) * (1.1 if how == "scaled" else float("nan"))
        return f

    monkeypatch.setattr(P, "fused_from_reference", broken)
    rows = run_bench([TINY], providers=["eager", "cpu"], quick=True, csv_path=str(tmp_path / "b.csv"),
                     png_path=None, progress=False, M=16, print_table=True)
    cpu = [r for r in rows if r["provider"] == "cpu"]
    assert cpu and all(r["status"] == "wrong" for r in cpu), cpu
    assert all(r["speedup_vs_eager"] != r["speedup_vs_eager"] for r in cpu)  # NaN: no speed-up
    assert ("not finite" if how == "nan" else "differs from the reference") in cpu[0]["note"]
    assert "WRONG" in capsys.readouterr().out
    _, data = _read_csv(tmp_path / "b.csv")
    nograd = next(r for r in data if r["provider"] == "cpu" and r["mode"] == "nograd")
    assert nograd["status"] == "wrong" and nograd["speedup_vs_eager"] == ""
    if how == "nan":
        assert nograd["rel_err"] == "inf"
    import seqpe_kernels.bench as B

    monkeypatch.setattr(B, "run_bench", lambda *a, **k: rows)  # the CLI's exit code for such a run: 1
    assert cli.main(["bench", "--csv", "none", "--png", "none"]) == 1
    assert "cpu (wrong)" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["--csv", "same.png", "--png", "same.png"], "same file"),
    (["--csv", "none", "--png", "plot.out"], "cannot write '.out'"),
    (["--png", "none"], "default --csv path"),  # ./out is a file below
] + ([] if torch.cuda.is_available() else [(["--config", "vits-default-tf32", "--csv", "none", "--png", "none"],
                                            "TF32 is a CUDA GEMM mode")]))
def test_bench_refuses_outputs_that_would_fail_after_the_run(argv, msg, tmp_path, monkeypatch, capsys):
    """These failed only after the timing (a traceback, a PNG written over the CSV, 'could not draw')."""
    import seqpe_kernels.bench as B

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").write_text("a file where the default output folder would go")
    monkeypatch.setattr(B, "run_bench", lambda *a, **k: pytest.fail("bench ran before refusing its arguments"))
    assert cli.main(["bench"] + argv) == 2
    assert msg in capsys.readouterr().err


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
    # every no-grad row carries its output's error against the IEEE-fp32 eval reference; other modes none
    for r in ok:
        if r["mode"] != "nograd":
            assert r["rel_err"] == "", r
        elif r["provider"] == "eager":
            assert float(r["rel_err"]) == 0.0, r  # the reference itself, same precision
        else:
            assert 0.0 <= float(r["rel_err"]) <= 1e-5, r


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
    # (the test's seed, so SEQPE_TEST_SEED replays a failure; check's own default is a fresh one)
    r = subprocess.run([sys.executable, "-m", "seqpe_kernels.cli", "check", "--seed", str(current_seed())], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "check PASSED" in r.stdout and " FAIL" not in r.stdout


# ------------------------------------------------------------------------------------------- nothing silently wrong
# (issue 12): a check that compared nothing fails, env tells the truth about CUDA, every CLI mistake is one line on
# stderr and exit code 2, never a traceback. All of these are refused before any real work (fast).
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from seqpe_kernels import check as check_mod  # noqa: E402
from seqpe_kernels.backend import BackendUnavailable, available_backends, triton_status  # noqa: E402

NO_CUDA = not torch.cuda.is_available()
BAD_CUDA = "cuda" if NO_CUDA else "cuda:99"  # a CUDA device that does not exist on this machine


def _err_line(capsys, command):
    """The one stderr line of a refused command (argparse adds its usage lines before it)."""
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "Traceback" not in cap.out
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert lines, cap.out
    assert lines[-1].startswith(f"seqpe-kernels {command}"), cap.err
    assert not any(ln.startswith("seqpe-kernels") for ln in lines[:-1]), cap.err  # one message, not several
    return lines[-1]


@pytest.mark.parametrize("backend", ["foo", "cuda"])
def test_check_refuses_unknown_or_unusable_backend(backend, capsys):
    """Item 5: `check --backend foo` / `--backend cuda` on a CPU device printed PASSED and exited 0."""
    assert cli.main(["check", "--device", "cpu", "--backend", backend, "--seed", "1"]) == 2
    msg = _err_line(capsys, "check")
    assert backend in msg
    if backend == "cuda":
        assert "cannot run on cpu" in msg and "CUDA" in msg


def test_check_refuses_triton_without_interpreter(monkeypatch, capsys):
    """Item 5: `check --backend triton` on a CPU machine without TRITON_INTERPRET=1 ran zero comparisons, exit 0."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli.main(["check", "--device", "cpu", "--backend", "triton", "--seed", "1"]) == 2
    msg = _err_line(capsys, "check")
    assert "triton" in msg and "TRITON_INTERPRET=1" in msg


def test_check_fails_when_no_comparison_ran(monkeypatch, capsys):
    """Item 5: a usable backend whose every case is skipped (here: the module cannot be built) used to PASS."""
    def unavailable(ref, backend):
        raise BackendUnavailable("pretend this backend refuses every configuration")

    monkeypatch.setattr(check_mod, "_fused_from", unavailable)
    rc = cli.main(["check", "--device", "cpu", "--backend", "torch", "--seed", "2"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "check FAILED (no backend comparison ran)" in out
    assert "backends compared against the reference: torch (0 comparisons, 5 skipped)" in out
    # the library call says the same thing (False), and refuses unknown backends before any work
    assert check_mod.run_check(device="cpu", backends=["torch"], seed=2, verbose=False) is False
    with pytest.raises(check_mod.CheckRequestError, match="unknown backend 'foo'"):
        check_mod.run_check(device="cpu", backends=["foo"], verbose=False)


def test_check_table_names_the_backends_that_ran(capsys):
    rc = cli.main(["check", "--device", "cpu", "--backend", "torch", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "backends compared against the reference: torch (4 comparisons, 1 skipped)" in out
    assert "check PASSED" in out


def test_backend_status_tells_the_truth_about_cuda():
    """Item 6 (library side): no backend is usable on a CUDA device that does not exist here, with the reason."""
    table = available_backends(BAD_CUDA)
    assert set(table) == set(BACKENDS)
    for name, (ok, why) in table.items():
        assert not ok, (name, why)
        assert ("CUDA is not available" in why) if NO_CUDA else ("no CUDA device cuda:99" in why)
    assert not triton_status(torch.device(BAD_CUDA))[0]
    import seqpe_kernels as sk
    from seqpe_kernels import backend as B

    fus = sk.FusedSeqPE(32, 2, 3, backend="triton")
    with pytest.raises(BackendUnavailable, match="cannot run here"):
        B.resolve(fus, "triton", torch.device(BAD_CUDA))
    with pytest.raises(BackendUnavailable, match="no backend can run"):
        sk.FusedSeqPE(32, 2, 3).resolved_backend(BAD_CUDA)


@pytest.mark.skipif(not NO_CUDA, reason="about a CPU-only machine")
def test_env_cuda_on_cpu_only_machine_says_unusable(capsys):
    """Item 6: `env --device cuda` on a CPU-only torch said Triton was usable."""
    assert cli.main(["env", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    table = out.split("backends for device cuda:")[1].splitlines()[1:]
    rows = {ln.split()[0]: ln for ln in table if ln.strip() and "backend='auto' runs" not in ln}
    assert set(rows) == set(BACKENDS)
    assert "backend='auto' runs: nothing usable" in out or torch.cuda.is_available()
    for b, ln in rows.items():
        assert ln.split()[1] == "unusable" and "CUDA is not available" in ln, ln


def test_env_unknown_device_is_one_line(capsys):
    """Item 7: `env --device foo` was a RuntimeError traceback."""
    assert cli.main(["env", "--device", "foo"]) == 2
    assert "expected cpu, cuda or cuda:N, got 'foo'" in _err_line(capsys, "env")


def test_train_on_missing_cuda_is_one_line(capsys):
    """Item 7: `train --device cuda` on a CPU-only torch was 'AssertionError: Torch not compiled with CUDA enabled'."""
    assert cli.main(["train", "--device", BAD_CUDA, "--steps", "1", "--no-eval", "--plot", ""]) == 2
    msg = _err_line(capsys, "train")
    assert "--device" in msg and ("CUDA is not available" in msg if NO_CUDA else "no CUDA device" in msg)


def _run_cli(*argv):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it
    return subprocess.run([sys.executable, "-m", "seqpe_kernels.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("argv", [["env", "--device", "foo"],
                                  ["train", "--device", BAD_CUDA],
                                  ["check", "--backend", "cuda", "--device", "cpu"],
                                  ["bench", "--device", BAD_CUDA, "--csv", "none", "--png", "none"]])
def test_mistakes_in_a_real_process_have_no_traceback(argv):
    """Items 5 and 7 as a user sees them: exit code 2, one message line on stderr, no traceback."""
    r = _run_cli(*argv)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith(f"seqpe-kernels {argv[0]}"), r.stderr
    assert "check PASSED" not in r.stdout


# every flag's bad values, as a user types them: refused with exit code 2 and one line, before any work
BAD_ARGS = [
    # env
    ["env", "--device", "mps"], ["env", "--device", "cuda:x"], ["env", "--device", ""],
    # bench
    ["bench", "--device", "foo"], ["bench", "--device", BAD_CUDA], ["bench", "--config", "nope"],
    ["bench", "--config", "all", "text-default"], ["bench", "--provider", "nope"], ["bench", "--mode", "nope"],
    ["bench", "--M", "0"], ["bench", "--M", "-3"], ["bench", "--M", "x"], ["bench", "--threads", "0"],
    ["bench", "--seed", "-1"], ["bench", "--seed", "abc"], ["bench", "--sweep-m", "4"],
    ["bench", "--sweep", "--M", "4"], ["bench", "--sweep", "--sweep-m", "0"],
    ["bench", "--csv", "{tmp}/a_file/x.csv"], ["bench", "--png", "{tmp}"],
    # check
    ["check", "--device", "foo"], ["check", "--device", BAD_CUDA], ["check", "--backend", "auto"],
    ["check", "--dtype", "fp64"], ["check", "--dtype", "bf16", "--device", "cpu"],
    ["check", "--seed", "-5"], ["check", "--seed", str(2 ** 40)],
    # train
    ["train", "--device", "foo"], ["train", "--task", "nope"], ["train", "--backend", "nope"],
    ["train", "--steps", "0"], ["train", "--steps", "-3"], ["train", "--seed", "-1"], ["train", "--seed", "1.5"],
    ["train", "--batch-size", "0"], ["train", "--lr", "0"], ["train", "--lr", "nan"], ["train", "--pe-lr", "-1"],
    ["train", "--dropout", "1"], ["train", "--dropout", "-0.1"], ["train", "--contrastive-weight", "-1"],
    ["train", "--transfer-weight", "inf"], ["train", "--model-dim", "0"], ["train", "--model-layers", "0"],
    ["train", "--model-heads", "3"], ["train", "--pe-dim", "-8"], ["train", "--pe-heads", "0"],
    ["train", "--pe-layers", "0"], ["train", "--pe-temperature", "0"], ["train", "--pe-method", "nope"],
    ["train", "--pe-qk", "nope"], ["train", "--block-size", "0"], ["train", "--img-size", "0"],
    ["train", "--patch-size", "0"], ["train", "--max-position", "0"], ["train", "--contrastive-size", "0"],
    ["train", "--contrastive-batch", "0"], ["train", "--transfer-size", "0"], ["train", "--transfer-batch", "0"],
    ["train", "--transfer-beta", "2"], ["train", "--shift-rate", "1.5"], ["train", "--shift-pool", "x"],
    ["train", "--pe-main-batch-size", "0"], ["train", "--pe-warmup-steps", "-1"],
    ["train", "--position-streams", "0"], ["train", "--weight-decay", "-1"], ["train", "--clip", "-1"],
    ["train", "--eval-scales", "1", "0"], ["train", "--eval-tokens", "0"], ["train", "--eval-samples", "0"],
    ["train", "--data", "{tmp}/missing.txt"], ["train", "--data", "{tmp}"], ["train", "--json", "{tmp}"],
    ["train", "--save", "{tmp}"], ["train", "--save", "/proc/seqpe-run.pth"], ["train", "--resume", "{tmp}/none.pth"],
    ["train", "--plot", "{tmp}/a_file/p.png"],
    ["train", "--task", "vit", "--img-size", "16", "--patch-size", "5"],
]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=[" ".join(a) for a in BAD_ARGS])
def test_every_mistake_is_one_line_and_exit_2(argv, tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("a refused command must not start any work")

    import seqpe_kernels.bench
    import seqpe_kernels.training.train
    monkeypatch.setattr(seqpe_kernels.bench, "run_bench", no_work)
    monkeypatch.setattr(check_mod, "default_cases", no_work)  # called once the request is accepted
    monkeypatch.setattr(seqpe_kernels.training.train, "train", no_work)
    (tmp_path / "a_file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    _err_line(capsys, argv[0])


def test_help_exits_0_and_internal_errors_are_not_usage_errors(monkeypatch, capsys):
    assert cli.main(["check", "--help"]) == 0
    capsys.readouterr()

    def bug(**kw):
        raise RuntimeError("an internal bug")

    # a genuine bug keeps its traceback (not turned into exit code 2)
    monkeypatch.setattr(check_mod, "run_check", bug)
    with pytest.raises(RuntimeError, match="an internal bug"):
        cli.main(["check", "--device", "cpu", "--backend", "torch"])


def test_tf32_config_is_cuda_only_and_never_under_autocast():
    assert "vits-default-tf32" in CONFIGS and CONFIGS["vits-default-tf32"].tf32
    with pytest.raises(ValueError, match="TF32 is a CUDA GEMM mode"):
        run_bench(["vits-default-tf32"], providers=["eager"], device="cpu", csv_path=None, png_path=None,
                  progress=False, print_table=False, quick=True)
    with pytest.raises(ValueError, match="tf32 applies to fp32 GEMMs"):
        BenchConfig(name="x", workload="uniform", M=8, embed_dim=16, num_heads=2, max_digits=2,
                    cuda_autocast="bf16", tf32=True)


def test_fp32_rows_never_inherit_a_global_tf32_switch(monkeypatch):
    """A script that enabled TF32 globally must not get TF32 GEMMs in rows labelled fp32 (the bench sets the
    config's precision per point and restores the script's afterwards)."""
    from seqpe_kernels.bench import run as run_mod
    from seqpe_kernels.precision import fp32_matmul, tf32_enabled
    seen = []
    real = run_mod.measure

    def spy(*a, **k):
        seen.append(tf32_enabled())
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "measure", spy)
    with fp32_matmul(tf32=True):
        rows = run_bench([TINY], providers=["eager"], modes=["nograd"], M=8, csv_path=None, png_path=None,
                         progress=False, print_table=False, quick=True)
        assert tf32_enabled()  # the script's own setting is back
    assert seen == [False] and rows[0]["dtype"] == "fp32" and rows[0]["rel_err"] == 0.0


@pytest.mark.gpu
def test_tf32_rows_on_cuda_carry_their_error():
    """The TF32 opt-in row: label, and an output error against IEEE fp32 that is nonzero (TF32 really ran) and
    within TF32's ~1e-3."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (TF32 is a CUDA GEMM mode)")
    cfg = CONFIGS["vits-default-tf32"].with_M(256)
    rows = run_bench([cfg, CONFIGS["vits-default"].with_M(256)], providers=["eager", "triton"],
                     modes=["nograd"], device="cuda", csv_path=None, png_path=None, progress=False,
                     print_table=False, quick=True)
    by = {(r["config"], r["provider"]): r for r in rows}
    t, f = by[("vits-default-tf32", "eager")], by[("vits-default", "eager")]
    assert t["dtype"] == "fp32-tf32" and f["dtype"] == "fp32"
    assert f["rel_err"] == 0.0
    assert 0.0 < t["rel_err"] < 1e-2, t
    tri = by[("vits-default-tf32", "triton")]
    assert tri["status"] == "ok" and 0.0 < tri["rel_err"] < 1e-2, tri


def test_bench_csv_keeps_the_rows_measured_before_a_crash(monkeypatch, tmp_path):
    """The CSV is written after every row: a run killed by a time limit (the leased GPU's calls) or a CUDA fault
    keeps what it measured. Here the third row's measurement kills the run."""
    from seqpe_kernels.bench import run as bench_run

    real, calls = bench_run.measure, []

    def measure(prov, mode, *a, **k):
        calls.append((prov.name, mode))
        if len(calls) == 3:
            raise SystemExit("killed")
        return real(prov, mode, *a, **k)

    monkeypatch.setattr(bench_run, "measure", measure)
    csv_path = tmp_path / "partial.csv"
    with pytest.raises(SystemExit):
        run_bench([TINY], providers=["eager"], modes=["forward", "full", "nograd"], M=8, csv_path=str(csv_path),
                  png_path=None, progress=False, print_table=False, quick=True)
    fields, data = _read_csv(csv_path)
    assert tuple(fields) == CSV_COLUMNS
    assert [(r["provider"], r["mode"], r["status"]) for r in data] == [("eager", "forward", "ok"),
                                                                     ("eager", "full", "ok")]
    assert all(float(r["median_ms"]) > 0 for r in data)


def test_graph_providers_peak_memory_is_not_reported_as_a_per_call_figure(monkeypatch):
    """A CUDA-graph replay allocates nothing per call (its activations sit in the graph's pool, allocated at
    capture): its peak-memory cell is blank with the reason, never a misleading ~0 MB next to eager's figure."""
    from seqpe_kernels.bench import providers as P

    monkeypatch.setattr(P, "mode_callables", lambda *a: (lambda: None, lambda: None, [], lambda: None))
    monkeypatch.setattr(P, "_time_call", lambda *a: (1.0, 0.9, 1.1))
    monkeypatch.setattr(P, "_host_time", lambda *a: 0.5)
    monkeypatch.setattr(P, "_peak_mem_mb", lambda *a: (123.0, ""))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    cuda = torch.device("cuda")
    for name in ("triton-graph", "cuda-graph", "compile-cg", "triton", "eager"):
        res = P.measure(P.Provider(name, None, None), "full", None, TINY, cuda, None)
        if name.endswith("graph") or name == "compile-cg":
            assert res["peak_mem_mb"] != res["peak_mem_mb"] and "private pool" in res["note"], res
        else:
            assert res["peak_mem_mb"] == 123.0 and res["note"] == ""


def test_check_table_names_the_single_draw_tail_of_a_low_precision_failure():
    """A bf16 / fp16 row failing the two-error rule on one quantity gets the re-run hint (the known single-draw
    tail: an H200 test at 1.01x its bound on one element); an fp32 failure or a many-quantity one does not."""
    from seqpe_kernels.check import CheckRow, Quantity, format_check_table

    one = [Quantity("out", 1.0, 2.0, 1.0), Quantity("grad:w", 1.26, 1.24, 78.0)]
    many = [Quantity("out", 3.0, 2.0, 1.0), Quantity("grad:w", 1.26, 1.24, 78.0)]

    def table(dtype, qs):
        return format_check_table([CheckRow("triton", "text", dtype, "FAIL", qs)], torch.device("cpu"), 1, {}, 0.1)

    assert "re-run with other seeds" in table("bf16", one)
    assert "re-run with other seeds" not in table("fp32", one)
    assert "re-run with other seeds" not in table("bf16", many)


# --- flag plumbing: every flag reaches its run_bench / run_check argument (a dropped --seed printed a seed that
# did not replay; mutation campaign 2026-12-02)
def test_bench_flags_reach_run_bench(monkeypatch, tmp_path):
    """Every bench flag lands in its run_bench argument (mutants: --seed, --mode, --sweep-m dropped)."""
    import seqpe_kernels.bench as B

    seen = {}

    def fake(configs, **kw):
        seen.update(kw, configs=configs)
        return [dict(provider="eager", status="ok", mode="nograd", note="")]

    monkeypatch.setattr(B, "run_bench", fake)
    argv = ["bench", "--config", "text-default", "--provider", "eager", "--mode", "nograd", "forward",
            "--sweep", "--sweep-m", "4", "8", "--seed", "7", "--threads", "3", "--csv", "none", "--png", "none",
            "--no-progress", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert seen["configs"] == ["text-default"] and seen["providers"] == ["eager"]
    assert seen["modes"] == ["nograd", "forward"] and seen["sweep"] is True and seen["sweep_ms"] == [4, 8]
    assert seen["seed"] == 7 and seen["threads"] == 3 and seen["csv_path"] is None and seen["png_path"] is None
    assert seen["progress"] is False and seen["device"] == "cpu" and seen["M"] is None
    seen.clear()
    assert cli.main(["bench", "--quick", "--M", "9", "--csv", "none", "--png", "none"]) == 0
    assert seen["quick"] is True and seen["M"] == 9 and seen["sweep"] is False


def test_check_flags_reach_run_check(monkeypatch):
    """--seed / --threads / --backend / --dtype / --device reach run_check (mutants: --seed and --threads dropped:
    the printed seed would not replay, and --threads would not test the parallel loops)."""
    from seqpe_kernels import check as check_mod

    seen = {}
    monkeypatch.setattr(check_mod, "run_check", lambda **kw: seen.update(kw) or True)
    assert cli.main(["check", "--device", "cpu", "--backend", "torch", "--dtype", "fp32", "--seed", "11",
                     "--threads", "2"]) == 0
    assert seen == dict(device="cpu", dtypes=["fp32"], backends=["torch"], seed=11, threads=2)
    monkeypatch.setattr(check_mod, "run_check", lambda **kw: False)
    assert cli.main(["check", "--device", "cpu"]) == 1
