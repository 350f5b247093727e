"""Test setup.

* Without a GPU, Triton kernels run under the interpreter, which must be switched on before triton is first
  imported.
* Random seeds: before every test (and before its fixtures) torch, ``random`` and numpy's global RNG are seeded
  with a fresh seed, recorded in the test's ``user_properties`` (junit XML) and appended to any failure report
  (its message and a "random seed" section), so every failure can be replayed with ``SEQPE_TEST_SEED=N``.
  ``current_seed()`` is that seed (test_fused._seed() reseeds with it).
* GPU tests (``@pytest.mark.gpu``) run with TF32 off and float32 matmul precision "highest": fp32 parity at
  1e-5 is meaningless against a 10-bit-mantissa GEMM.
* C++/CUDA extension: ``require_ext(device_type)`` skips only when the extension is switched off
  (SEQPE_KERNELS_NO_EXT=1) or this machine cannot build it for a documented reason that is not a build error
  (no C++ compiler; for CUDA: a CPU-only torch, no CUDA toolkit, a torch/nvcc major-version mismatch, no visible
  device); a compile or load error fails the test with the reason (which names the compiler log).
"""
import os
import random

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from seqpe_kernels.precision import fp32_matmul  # noqa: E402

HAS_CUDA = _has_cuda

# The test shapes are tiny: on a loaded 2-core CI machine, intra-op threading makes such ops many times
# slower (measured ~50-100x on tiny CPU ops), so the suite runs single-threaded unless told otherwise.
if not HAS_CUDA and "SEQPE_TEST_THREADS" not in os.environ:
    torch.set_num_threads(1)
elif "SEQPE_TEST_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["SEQPE_TEST_THREADS"]))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); runs in GPU CI / seqpe-kernels check")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    seed = os.environ.get(SEED_ENV)
    return (f"seqpe-kernels tests: CUDA={'yes' if HAS_CUDA else 'no'}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
            + (f"{SEED_ENV}={seed} (every test replays this seed)" if seed else "random seed per test (printed on failure)"))


# ----------------------------------------------------------------------------------------------- seeds
SEED_ENV = "SEQPE_TEST_SEED"
_CURRENT_SEED = [None]


def _draw_seed() -> int:
    env = os.environ.get(SEED_ENV)
    return int(env) if env else int.from_bytes(os.urandom(4), "little") % (2 ** 31)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def current_seed() -> int:
    """The seed the running test was seeded with (a fresh one outside a test)."""
    if _CURRENT_SEED[0] is None:
        _CURRENT_SEED[0] = _draw_seed()
    return _CURRENT_SEED[0]


def seed_for_case(*key) -> int:
    """A seed for one case of a parametrized test: the test's fresh seed (``current_seed``, replayable with
    SEQPE_TEST_SEED) mixed with the case's key, so that cases differ from each other and from run to run."""
    import zlib

    return (current_seed() ^ zlib.crc32(repr(key).encode())) % (2 ** 31)


def _seed_of(item):
    seeds = [v for k, v in getattr(item, "user_properties", ()) if k == "seed"]
    return seeds[-1] if seeds else None


_TF32_SAVED = "_seqpe_tf32_saved"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # a hook, not an autouse fixture: it runs before every fixture (so fixtures draw seeded numbers too), and
    # hypothesis' function-scoped-fixture health check does not see it
    s = _draw_seed()
    seed_everything(s)
    _CURRENT_SEED[0] = s
    item.user_properties.append(("seed", s))
    backend = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
    if backend in EXT_BACKENDS and item.get_closest_marker("backend_needs_ext"):
        require_ext(EXT_BACKENDS[backend])  # (fused_backends keeps a broken extension's cases: they fail here)
    if HAS_CUDA and "gpu" in item.keywords:
        exact = fp32_matmul(tf32=False)  # IEEE fp32 GEMMs, restored through the API the state was set with
        exact.__enter__()
        setattr(item, _TF32_SAVED, (exact, torch.backends.cudnn.allow_tf32))
        torch.backends.cudnn.allow_tf32 = False


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    _CURRENT_SEED[0] = None
    saved = getattr(item, _TF32_SAVED, None)
    if saved is not None:
        exact, torch.backends.cudnn.allow_tf32 = saved
        exact.__exit__(None, None, None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    s = _seed_of(item)
    if not rep.failed or s is None:
        return
    note = (f"random seed {s}: replay with {SEED_ENV}={s} python -m pytest '{item.nodeid}'")
    longrepr = rep.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and f"seed={s}" not in crash.message:
        crash.message = f"[seed={s}] {crash.message}"   # first: the short summary line shows its start only
    if hasattr(longrepr, "addsection"):
        longrepr.addsection("random seed", note)       # printed right under the traceback
    else:
        rep.sections.append(("random seed", note))


# ------------------------------------------------------------------------------------ big GPU allocations
_GPU_BYTES_LOCK = "seqpe-kernels-gpu-bytes.lock"


@pytest.fixture
def gpu_bytes():
    """For tests that allocate tens of GB (the offsets-beyond-2**31 tests): yields need(nbytes), which first takes
    a machine-wide lock (one such test at a time across the pytest-xdist workers: with -n 8, tests that start
    together would each see the memory free, pass the check and then run out of memory together; a test that is
    still compiling has allocated only part of its tensors), then skips the test unless ``nbytes`` of device
    memory is free (a GPU too small for it is not a failure of the kernels). Call it after anything that may
    wait (require_ext waits for the extension build), so the lock is not held meanwhile. The CUDA caching
    allocator is emptied before the check and after the test, before the lock is released."""
    import fcntl
    import gc
    import tempfile

    held = []

    def need(nbytes):
        if not held:
            f = open(os.path.join(tempfile.gettempdir(), _GPU_BYTES_LOCK), "a")
            fcntl.flock(f, fcntl.LOCK_EX)
            held.append(f)
        gc.collect()
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        if free < nbytes:
            pytest.skip(f"needs {nbytes / 2**30:.1f} GiB free on the GPU, {free / 2**30:.1f} GiB free")

    try:
        yield need
    finally:
        gc.collect()
        torch.cuda.empty_cache()
        for f in held:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


# ------------------------------------------------------------------------------------ C++/CUDA extension
# Reasons the loader gives (seqpe_kernels._ext) for which the extension cannot be built here without anything
# being broken: skipped, with the reason. Anything else (a compile error, a load error, a stale prebuilt module,
# a CUDA build that failed while torch is a CUDA build and nvcc matches, an unknown reason) fails.
EXT_SKIP_REASONS = (
    "disabled by SEQPE_KERNELS_NO_EXT=1",                # switched off on purpose
    "no C++ compiler found",                             # _jit_build: nothing to compile with
    "is a CPU-only build (no CUDA)",                     # cuda_plan: torch cannot run CUDA kernels
    "no CUDA toolkit found",                             # cuda_plan: no nvcc
    "torch/CUDA mismatch: nvcc",                         # cuda_plan: nvcc's major version != torch's CUDA
    "has no lib64/libcudart.so",                         # cuda_plan: CUDA_HOME guessed wrong (set it)
    "the prebuilt seqpe_kernels._C has no CUDA kernels",  # an AOT install built without CUDA, on purpose
    "but no CUDA device is visible",                     # CUDA kernels built, no GPU to run them
)
EXT_FAIL_REASONS = ("did not build", "failed", "does not load", "mismatch: the prebuilt", "error")


def ext_verdict(device_type: str = "cpu"):
    """("ok" | "skip" | "fail", reason) for tests that need the extension's kernels for ``device_type``."""
    from seqpe_kernels import _ext

    if _ext.disabled():
        return "skip", "the C++/CUDA extension is disabled by SEQPE_KERNELS_NO_EXT=1"
    ok, why = _ext.status(device_type)
    if ok:
        return "ok", why
    if any(f in why for f in EXT_FAIL_REASONS):
        return "fail", why
    if any(s in why for s in EXT_SKIP_REASONS):
        return "skip", why
    return "fail", f"(not a documented reason to skip) {why}"


def require_ext(device_type: str = "cpu") -> None:
    """Skip or fail (see the module doc) unless the extension's kernels for ``device_type`` are usable."""
    verdict, why = ext_verdict(device_type)
    if verdict == "skip":
        pytest.skip(f"C++/CUDA extension ({device_type}) cannot be built here: {why}")
    if verdict == "fail":
        pytest.fail(f"the C++/CUDA extension ({device_type}) must build and load on this machine but did not: {why}",
                    pytrace=False)


# the fused backends that run the C++/CUDA extension, and the device type whose kernels each needs
EXT_BACKENDS = {"cpu": "cpu", "cuda": "cuda"}


def fused_backends(device) -> list:
    """The fused backends a test parametrizes over on ``device``: the usable ones, and an extension backend that
    is unusable for a reason that must fail (a build or load error, ``ext_verdict``) too, so that its cases fail
    with the reason instead of dropping out of the run unseen (in a module marked ``backend_needs_ext``:
    ``pytest_runtest_setup``). One unusable for a documented reason (no compiler, a CPU-only torch for
    ``cuda``, the extension switched off) is left out."""
    from seqpe_kernels.backend import available_backends

    device = torch.device(device)
    return [b for b, (ok, _) in available_backends(device).items() if b != "torch" and
            (ok or (EXT_BACKENDS.get(b) == device.type and ext_verdict(device.type)[0] == "fail"))]


def benchmark_module(name: str):
    """A script of benchmarks/ imported as a module (the tests reuse their harnesses: launch_overhead's stand-in
    GPU, kernel_resources' sm_90 compile)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    env = dict(os.environ)
    try:
        spec.loader.exec_module(mod)
    finally:  # a script's import-time environment settings must not leak into the rest of the test process
        if dict(os.environ) != env:
            os.environ.clear()
            os.environ.update(env)
    return mod


def race(work, rounds: int, threads: int) -> None:
    """``work(round, thread, barrier)`` in ``threads`` threads per round, each waiting at the barrier before the
    part under test, with a tiny thread switch interval (many interleavings) restored afterwards."""
    import sys
    import threading

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for r in range(rounds):
            bar = threading.Barrier(threads)
            ts = [threading.Thread(target=work, args=(r, t, bar)) for t in range(threads)]
            [t.start() for t in ts]
            [t.join() for t in ts]
    finally:
        sys.setswitchinterval(old)
