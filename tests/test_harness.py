"""The test harness itself (tests/conftest.py): per-test random seeds that every failure report names and that
SEQPE_TEST_SEED replays, and the rule for when tests that need the C++/CUDA extension skip instead of failing."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import conftest
from conftest import SEED_ENV, current_seed, ext_verdict, require_ext

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ seeds
def test_each_test_is_seeded_and_records_its_seed(request):
    s = current_seed()
    assert ("seed", s) in request.node.user_properties
    torch.manual_seed(s)
    a = torch.randn(4)
    from test_fused import _seed  # the helper the parity tests use: reseeds with the recorded seed

    assert _seed() == s
    assert torch.equal(torch.randn(4), a)


def _run_inner(tmp_path, env_extra):
    env = {k: v for k, v in os.environ.items() if k != SEED_ENV}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           str(tmp_path / "test_inner.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_failure_report_names_the_seed_and_it_replays(tmp_path):
    """A failing test that draws unseeded torch numbers: its report carries the seed (in the short summary line
    and a section under the traceback), and SEQPE_TEST_SEED=<that seed> reproduces the same numbers."""
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(
        "import torch\n\n"
        "def test_fails():\n"
        "    x = torch.randn(3)\n"
        "    print('DRAWN', x.tolist())\n"
        "    assert x.sum() > 1e9, 'deliberately broken'\n")
    first = _run_inner(tmp_path, {})
    out = first.stdout
    assert first.returncode == 1, out + first.stderr
    m = re.search(r"\[seed=(\d+)\]", out)
    assert m, f"no seed in the short summary:\n{out}"
    s = int(m.group(1))
    assert f"{SEED_ENV}={s} python -m pytest" in out, out  # the replay line under the traceback
    drawn = re.search(r"DRAWN (\[.*\])", out).group(1)
    again = _run_inner(tmp_path, {SEED_ENV: str(s)})
    assert f"[seed={s}]" in again.stdout and f"DRAWN {drawn}" in again.stdout, again.stdout


# -------------------------------------------------------------------------------- extension skip/fail rule
def _fake_status(monkeypatch, cpu, cuda=None):
    from seqpe_kernels import _ext

    table = {"cpu": cpu, "cuda": cuda if cuda is not None else cpu}
    monkeypatch.delenv("SEQPE_KERNELS_NO_EXT", raising=False)
    monkeypatch.setattr(_ext, "status", lambda device_type="cpu": table[device_type])


BUILD_ERROR = (False, "building the C++ extension seqpe_ext_t2_13_0_avx2 failed for torch 2.13.0 (CUDA none): "
                      "ops_cpu.cpp:12:1: error: expected ';' (full compiler output: /tmp/x/seqpe_build_error.log)")


def test_ext_build_error_fails_not_skips(monkeypatch):
    _fake_status(monkeypatch, BUILD_ERROR)
    assert ext_verdict("cpu")[0] == "fail"
    with pytest.raises(pytest.fail.Exception, match="seqpe_build_error.log"):
        require_ext("cpu")


@pytest.mark.parametrize("why", [
    "the C++ extension failed to load for torch 2.13.0 (CUDA none): OSError: undefined symbol _ZN3c10",
    "torch mismatch: the prebuilt seqpe_kernels._C (/x/_C.so) was built for torch=2.11.0, cuda=13.0 but ...",
    "the prebuilt seqpe_kernels._C (/x/_C.so) does not load: ImportError: ...",
    "ninja is not installed (pip install ninja): torch's JIT extension build needs it",  # a declared dependency
    "something nobody documented",
])
def test_ext_load_errors_and_unknown_reasons_fail(monkeypatch, why):
    _fake_status(monkeypatch, (False, why))
    with pytest.raises(pytest.fail.Exception):
        require_ext("cpu")


def test_ext_documented_reasons_skip(monkeypatch):
    _fake_status(monkeypatch, (False, "no C++ compiler found ('c++' / 'g++' not on PATH): install g++"))
    with pytest.raises(pytest.skip.Exception, match="no C\\+\\+ compiler"):
        require_ext("cpu")
    monkeypatch.setenv("SEQPE_KERNELS_NO_EXT", "1")
    with pytest.raises(pytest.skip.Exception, match="SEQPE_KERNELS_NO_EXT=1"):
        require_ext("cpu")


@pytest.mark.parametrize("cuda_reason,verdict", [
    ("torch 2.13.0+cpu is a CPU-only build (no CUDA): the CUDA sources are not compiled", "skip"),
    ("no CUDA toolkit found (nvcc; set CUDA_HOME) for torch 2.11.0 (CUDA 13.0): the CUDA sources are not compiled",
     "skip"),
    ("torch/CUDA mismatch: nvcc 12.4 at /usr/local/cuda cannot build for torch 2.11.0 (CUDA 13.0) (the major "
     "versions must agree); the CUDA sources are not compiled", "skip"),
    # a CUDA torch with a matching nvcc whose CUDA build failed: the CPU part loaded, the CUDA tests must fail
    ("the CUDA sources did not build: building the C++/CUDA extension seqpe_ext_t2_11_0_cu13_0_avx2 failed for "
     "torch 2.11.0 (CUDA 13.0): ops_cuda.cu:40: error: identifier undefined (full compiler output: /t/log)", "fail"),
    ("nvcc at /usr/local/cuda does not report its version", "fail"),
])
def test_ext_cuda_rule(monkeypatch, cuda_reason, verdict):
    _fake_status(monkeypatch, (True, "C++ CPU extension"),
                 (False, f"the C++ extension has no CUDA kernels: {cuda_reason}"))
    assert ext_verdict("cpu")[0] == "ok"
    assert ext_verdict("cuda")[0] == verdict
    exc = pytest.skip.Exception if verdict == "skip" else pytest.fail.Exception
    with pytest.raises(exc):
        require_ext("cuda")


def test_ext_no_visible_gpu_skips(monkeypatch):
    _fake_status(monkeypatch, (True, "C++ CPU extension"),
                 (False, "the extension has CUDA kernels but no CUDA device is visible to torch 2.11.0 (CUDA 13.0)"))
    with pytest.raises(pytest.skip.Exception):
        require_ext("cuda")


def test_ext_real_loader_reasons_match_the_rule():
    """The documented skip reasons are the loader's own wording (a reworded message must not turn a skip into a
    failure, or worse, the reverse, unnoticed)."""
    src = (HERE.parent / "seqpe_kernels" / "_ext.py").read_text()
    for pattern in conftest.EXT_SKIP_REASONS:
        assert pattern in src, f"{pattern!r} is no longer a message of seqpe_kernels/_ext.py"
