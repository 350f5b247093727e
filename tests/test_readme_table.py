"""benchmarks/readme_table.py: the README's results tables and the issue-11 target verdicts from bench CSVs."""
import math

from conftest import benchmark_module
from seqpe_kernels.bench import CONFIGS, CSV_COLUMNS, read_csv, write_csv

RT = benchmark_module("readme_table")


def _row(config, provider, mode, ms, floor=0.5, err=math.nan, status="ok", eager_ms=None, note="", M=None):
    r = {c: "" for c in CSV_COLUMNS}
    r.update(config=config, provider=provider, mode=mode, status=status, M=M or CONFIGS[config].M, T=6, tokens=600, median_ms=ms,
             p20_ms=ms, p80_ms=ms, peak_mem_mb=123.0, host_ms=math.nan, tflops=1.0, floor_ratio=floor,
             speedup_vs_eager=(eager_ms / ms) if eager_ms else math.nan, rel_err=err, gemm_tflops=50.0,
             device="Test GPU", torch_version="2.x", triton_version="3.x", cuda_version="13", dtype="fp32",
             git_commit="abc123", date="2026-11-30", quick=False, note=note)
    return r


def test_tables_and_verdicts_from_a_csv(tmp_path, capsys):
    rows = [_row("text-default", "eager", "full", 8.0, eager_ms=8.0),
            _row("text-default", "compile", "full", 6.0, eager_ms=8.0),
            _row("text-default", "compile-cg", "full", 2.5, eager_ms=8.0),
            _row("text-default", "cuda-graph", "full", 1.6, eager_ms=8.0),     # 5x eager, 3.75x compile, 1.56x cg
            _row("text-default", "triton-graph", "full", 2.5, eager_ms=8.0),   # 3.2x eager: not met
            _row("text-default", "triton", "nograd", 1.0, err=3e-3, eager_ms=2.0),
            _row("text-default", "cpu", "full", math.nan, status="skipped", note="needs a CPU tensor"),
            _row("vits-default", "eager", "full", 18.0, floor=0.38, eager_ms=18.0),
            _row("vits-default", "cuda", "full", 7.0, floor=0.95, eager_ms=18.0),
            _row("vits-default", "cuda", "nograd", 2.0, err=4e-7, eager_ms=6.0),
            _row("vits-default", "triton", "full", 9.0, floor=0.70, eager_ms=18.0),
            _row("vits-default-tf32", "eager", "full", 9.0, floor=0.13, eager_ms=9.0),
            _row("vits-default-tf32", "triton-graph", "full", 3.2, floor=0.37, eager_ms=9.0)]
    path = tmp_path / "b.csv"
    write_csv(rows, str(path))
    back = read_csv(str(path))
    assert back[0]["M"] == 1552 and back[0]["median_ms"] == 8.0 and math.isnan(back[0]["rel_err"])
    out_md = tmp_path / "t.md"
    assert RT.main([str(path), "--out", str(out_md)]) == 0
    text = capsys.readouterr().out
    assert out_md.read_text().strip() == text.strip()
    assert "device Test GPU" in text and "git_commit abc123" in text
    assert "| cuda-graph | 1.600 (5.00×) | 0.50 | ‡ |" in text
    assert "| triton | – | – | – | 1.000 (2.00×) | 0.50 | 123 | 3.0e-03 |" in text
    assert "- cpu: skipped: needs a CPU tensor" in text and "| cpu |" not in text
    assert "| cuda-graph | 5.00× met | 3.75× met | 1.56× met |" in text
    assert "| triton-graph | 3.20× NOT met | 2.40× met | 1.00× NOT met |" in text
    assert "| cuda | 7.000 | 2.57× | 0.95 met | 4.0e-07 |" in text
    assert "| triton | 9.000 | 2.00× | 0.70 NOT met | – |" in text
    # the floor target is the fp32 step's: the TF32 opt-in is reported without a verdict
    assert "| vits-default-tf32 | ms | × eager | floor (no target) |" in text
    assert "| triton-graph | 3.200 | 2.81× | 0.37 | – |" in text


def test_missing_or_empty_csv_is_a_clear_error(tmp_path, capsys):
    assert RT.main([str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
    empty = tmp_path / "e.csv"
    write_csv([], str(empty))
    assert RT.main([str(empty)]) == 2
    assert "no rows" in capsys.readouterr().err


def test_rows_of_two_devices_or_two_runs_are_refused(tmp_path, capsys):
    """Two GPUs' CSVs were merged into one table (rows from one, the heading from the other)."""
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write_csv([_row("text-default", "eager", "full", 8.0, eager_ms=8.0)], str(a))
    other = _row("text-default", "triton", "full", 2.0, eager_ms=8.0)
    other["device"] = "Other GPU"
    write_csv([other], str(b))
    assert RT.main([str(a), str(b)]) == 2
    assert "2 devices" in capsys.readouterr().err
    write_csv([_row("text-default", "eager", "full", 7.0, eager_ms=7.0)], str(b))
    assert RT.main([str(a), str(b)]) == 2
    assert "appears twice" in capsys.readouterr().err


def test_verdicts_only_at_the_spec_step_size(tmp_path, capsys):
    """A run at another M (a quick CPU run, --M) got 'met' / 'NOT met' verdicts for targets stated at the spec's M."""
    path = tmp_path / "b.csv"
    write_csv([_row("vits-default", "eager", "full", 18.0, floor=0.38, eager_ms=18.0, M=84),
               _row("vits-default", "triton", "full", 7.0, floor=1.02, eager_ms=18.0, M=84)], str(path))
    assert RT.main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "met" not in text.split("**Targets")[1] and "not the spec's M=4324: no verdict" in text
    write_csv([_row("vits-default", "eager", "full", 18.0, floor=0.38, eager_ms=18.0, M=84),
               _row("vits-default", "cpu", "full", 7.0, floor=1.02, eager_ms=18.0, M=84)], str(path))
    assert RT.main([str(path)]) == 0
    assert "No fused CUDA provider" in capsys.readouterr().out


def test_malformed_inputs_are_clear_errors(tmp_path, capsys):
    ok = tmp_path / "ok.csv"
    write_csv([_row("text-default", "eager", "full", 8.0, eager_ms=8.0)], str(ok))
    cases = {"binary.csv": b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "cols.csv": b"a,b\n1,2\n",
             "num.csv": ok.read_bytes().replace(b",8,", b",eight,", 1)}
    lines = ok.read_text().splitlines()
    cases["trunc.csv"] = ("\n".join(lines[:1] + [lines[1][:40]]) + "\n").encode()
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert RT.main([str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("readme_table: ") and "Traceback" not in err, (name, err)
    assert RT.main([str(tmp_path)]) == 2  # a directory
    assert RT.main([str(ok), "--out", str(ok / "x.md")]) == 2  # --out under a file
    assert "readme_table: --out" in capsys.readouterr().err


# --- verdict edge cases (mutation campaign 2026-12-02)
def _targets(tmp_path, capsys, rows):
    path = tmp_path / "b.csv"
    write_csv(rows, str(path))
    assert RT.main([str(path)]) == 0
    return capsys.readouterr().out.split("**Targets")[1]


def test_a_wrong_provider_gets_no_target_verdict(tmp_path, capsys):
    """A provider bench marked WRONG (its numbers are off) is no result: no 'met' for it (mutant: _full accepted
    status 'wrong', so a wrong fast kernel 'met' the 4x target)."""
    t = _targets(tmp_path, capsys, [
        _row("text-default", "eager", "full", 8.0, eager_ms=8.0),
        _row("text-default", "cuda-graph", "full", 1.0, status="wrong"),  # bench writes no speed-up for it
        _row("text-default", "triton", "full", 4.0, eager_ms=8.0)])
    assert "| cuda-graph |" not in t and "| triton | 2.00× NOT met |" in t, t


def test_verdicts_need_every_row_at_the_spec_M(tmp_path, capsys):
    """A CSV with the spec M and another M (a sweep) gets no verdict (mutant: 'spec M among the Ms' was enough,
    and the verdict could read the other M's row)."""
    M = CONFIGS["text-default"].M
    t = _targets(tmp_path, capsys, [
        _row("text-default", "eager", "full", 1.0, eager_ms=1.0, M=64),
        _row("text-default", "triton", "full", 0.1, eager_ms=1.0, M=64),
        _row("text-default", "eager", "full", 8.0, eager_ms=8.0, M=M),
        _row("text-default", "triton", "full", 4.0, eager_ms=8.0, M=M)])
    assert "no verdict" in t and "met" not in t, t


def test_a_target_met_exactly_is_met(tmp_path, capsys):
    """'≥ 4×': exactly 4x eager is met (mutant: strictly greater)."""
    t = _targets(tmp_path, capsys, [_row("text-default", "eager", "full", 8.0, eager_ms=8.0),
                                    _row("text-default", "triton", "full", 2.0, eager_ms=8.0)])
    assert "| triton | 4.00× met |" in t, t
