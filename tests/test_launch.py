"""Direct Triton launches (seqpe_kernels.ops.launch): the key is never coarser than Triton's specialisation, the
launcher calls a compiled kernel exactly as JITFunction.run does, and everything falls back where it must.

On CPU the kernels run under the interpreter (direct launches off), so the launcher's logic is tested against a
stand-in JITFunction whose "compiled kernels" are keyed by Triton's own specialisation function; on a GPU the
real kernels run both ways and must agree bit for bit.
"""
import sys
import types
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqpe_kernels.ops import launch

from conftest import HAS_CUDA


def _triton_specialize():
    """Triton's own per-argument specialisation (what JITFunction.run keys compiled kernels on)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError as e:  # an older Triton: its Python specialize_impl
        from triton.runtime import jit

        if not hasattr(jit, "create_specialize_impl"):
            pytest.skip(f"this Triton exposes no specialisation function to compare with ({e})")
        impl = jit.create_specialize_impl(lambda *a, **k: None)
        return lambda a: impl(a, False, True, True)
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    return lambda a: native_specialize_impl(backend, a, False, True, True)


_BUF = {dt: torch.zeros(64, dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.float64, torch.int64,
                                                   torch.int32, torch.uint8)}
_INTS = st.one_of(st.sampled_from([0, 1, 2, 15, 16, 17, 32, -1, -16, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 16, -2 ** 31,
                                   -2 ** 31 - 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]),
                  st.integers(-2 ** 40, 2 ** 40))
_ARGS = st.one_of(
    _INTS, st.floats(allow_nan=False), st.booleans(), st.none(),
    st.builds(lambda dt, off: _BUF[dt][off:], st.sampled_from(sorted(_BUF, key=str)), st.integers(0, 20)))


def _never_coarser(values):
    spec = _triton_specialize()
    groups = {}
    for v in values:
        groups.setdefault(launch.spec_key(v), set()).add(repr(spec(v)))
    bad = {k: v for k, v in groups.items() if len(v) > 1}
    assert not bad, f"keys that Triton specialises further: {bad}"


def test_key_is_never_coarser_than_tritons_specialisation():
    # every pair of a representative set: the integer boundaries, floats, bools, None, and tensors of each dtype
    # at every element offset (addresses aligned and not)
    ints = [0, 1, 2, 15, 16, 17, 32, 48, -1, -16, 2 ** 31 - 16, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 16, -2 ** 31,
            -2 ** 31 - 1, -2 ** 31 - 16, 2 ** 63 - 16, 2 ** 63 - 1, 2 ** 63, 2 ** 63 + 16, 2 ** 64 - 1]
    tensors = [buf[off:] for buf in _BUF.values() for off in range(17)]
    _never_coarser(ints + [0.0, 1.0, 1.5, -2.0, True, False, None] + tensors)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vals=st.lists(_ARGS, min_size=2, max_size=40))
def test_key_is_never_coarser_than_tritons_specialisation_random(vals):
    _never_coarser(vals)


# ----------------------------------------------------------------------------- the launcher, with a stand-in
class _Param:
    def __init__(self, name, default=None, has_default=False, is_constexpr=False):
        self.name, self.default, self.has_default, self.is_constexpr = name, default, has_default, is_constexpr


class _Compiled:
    def __init__(self, spec):
        self.spec, self.function, self.packed_metadata, self.calls = spec, object(), object(), []

    def launch_metadata(self, grid, stream, *args):
        return ("meta", grid, stream, args)

    def run(self, *a):
        self.calls.append(a)


class _FakeJIT:
    """JITFunction stand-in: compiled kernels keyed by Triton's specialisation of every argument (``coarse``:
    keyed on nothing, to play a Triton that specialises on something the key does not see)."""

    def __init__(self, coarse=False):
        self.params = [_Param("X"), _Param("n"), _Param("p"), _Param("BLOCK", is_constexpr=True),
                       _Param("FLAG", False, True, is_constexpr=True)]
        self.kernels, self.jit_calls, self.coarse = {}, [], coarse
        self.spec = _triton_specialize()

    def __getitem__(self, grid):
        def go(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            vals = list(args) + [kwargs.get(p.name, p.default) for p in self.params[len(args):]]
            key = (len(self.jit_calls),) if self.coarse else tuple(map(repr, map(self.spec, vals[:3]))) + (
                repr(vals[3]), vals[4], kwargs.get("num_warps"))
            return self.kernels.setdefault(key, _Compiled(key))
        return go

    def __repr__(self):
        return "FakeJIT"


@pytest.fixture
def direct_on(monkeypatch):
    """Direct launches switched on as on a GPU (device 0, stream 123) for the stand-in."""
    hooks = types.SimpleNamespace(launch_enter_hook="enter", launch_exit_hook="exit", debug=False)
    monkeypatch.setattr(launch, "_STATE", {})
    launch.switch_on(hooks, types.SimpleNamespace(instrumentation_mode=""), why="test")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 123, raising=False)
    return hooks


def test_second_launch_confirms_then_direct(direct_on):
    fn = _FakeJIT()
    k = launch.DirectKernel(fn)
    x = torch.zeros(8)
    for _ in range(4):
        k[(3,)](x, 5, 0.5, BLOCK=16, num_warps=1)
    assert len(fn.jit_calls) == 2  # the first two through JITFunction.run, the rest direct
    (compiled,) = fn.kernels.values()
    assert len(compiled.calls) == 2
    # exactly JITFunction.run's last call: grid padded to 3-D, stream, function, metadata, hooks, then every
    # argument in declaration order (the constexpr keyword in place, the default filled in)
    g0, g1, g2, stream, function, packed, meta, enter, exit_, *args = compiled.calls[0]
    assert (g0, g1, g2, stream) == (3, 1, 1, 123)
    assert function is compiled.function and packed is compiled.packed_metadata
    assert (enter, exit_) == ("enter", "exit")
    # tensors go in as their addresses (Triton's launcher would call data_ptr() and query the driver per launch);
    # the launch metadata (what launch hooks see) gets the arguments as given
    assert args == [x.data_ptr(), 5, 0.5, 16, False]
    assert meta[:3] == ("meta", (3,), 123) and meta[3][0] is x and list(meta[3][1:]) == args[1:]


def _confirmed():
    """A stand-in kernel launched three times with one key (confirmed: its later launches are direct)."""
    fn = _FakeJIT()
    k = launch.DirectKernel(fn)
    x = torch.zeros(8)
    for _ in range(3):
        k[(1,)](x, 5, 0.5, BLOCK=16)
    return fn, k, x


def test_a_new_specialisation_goes_through_jit_again(direct_on):
    fn, k, x = _confirmed()
    n = len(fn.jit_calls)
    k[(1,)](x[1:], 5, 0.5, BLOCK=16)   # misaligned pointer
    k[(1,)](x, 1, 0.5, BLOCK=16)       # an int equal to 1
    k[(1,)](x, 32, 0.5, BLOCK=16)      # an int divisible by 16
    k[(1,)](x, 5, 0.5, BLOCK=32)       # another constexpr
    k[(1,)](x, 5, 0.5, BLOCK=16, num_warps=8)  # another launch option
    k[(1,)](x.double(), 5, 0.5, BLOCK=16)      # another dtype
    assert len(fn.jit_calls) == n + 6


def test_a_coarser_key_turns_the_kernel_back_to_jit(direct_on):
    fn = _FakeJIT(coarse=True)  # every JITFunction.run returns a new compiled kernel: our key missed something
    k = launch.DirectKernel(fn)
    x = torch.zeros(8)
    k[(1,)](x, 5, 0.5, BLOCK=16)
    with pytest.warns(RuntimeWarning, match="two compiled kernels"):
        k[(1,)](x, 5, 0.5, BLOCK=16)
    for _ in range(3):
        k[(1,)](x, 5, 0.5, BLOCK=16)
    assert len(fn.jit_calls) == 5 and k.off
    assert all(not c.calls for c in fn.kernels.values())


def test_a_kernel_reading_module_globals_stays_on_jit(direct_on):
    fn = _FakeJIT()
    fn.used_global_vals = {("SCALE", 0): (2.0, {})}  # JITFunction.run raises if such a global changes
    k = launch.DirectKernel(fn)
    x = torch.zeros(8)
    for _ in range(4):
        k[(1,)](x, 5, 0.5, BLOCK=16)
    assert len(fn.jit_calls) == 4 and "globals" in k.off


def test_unhashable_or_missing_arguments_launch_through_jit(direct_on):
    fn = _FakeJIT()
    k = launch.DirectKernel(fn)
    x = torch.zeros(8)
    for _ in range(3):
        k[(1,)](x, 5, 0.5, BLOCK=[16])  # a list constexpr: no key
    assert len(fn.jit_calls) == 3
    k[(1,)](x, 5, 0.5)  # BLOCK missing: Triton's own error path
    assert len(fn.jit_calls) == 4


def test_direct_launches_are_counted(direct_on):
    from seqpe_kernels.launches import count_launches

    fn = _FakeJIT()
    k = launch.DirectKernel(fn)
    x = torch.zeros(8)
    for _ in range(2):
        k[(1,)](x, 5, 0.5, BLOCK=16)
    _, n = count_launches(lambda: [k[(1,)](x, 5, 0.5, BLOCK=16) for _ in range(3)])
    assert n == 3 and len(fn.jit_calls) == 2


# ----------------------------------------------------------------------------- against the real JITFunction.run
def _harness():
    """benchmarks/launch_overhead.py: a stand-in GPU under the real JITFunction.run (compiles into recorders)."""
    from conftest import benchmark_module

    return benchmark_module("launch_overhead")


def _compiled(jf):
    (k,) = jf.device_caches[0][0].values()
    return k


def test_importing_the_harness_leaves_triton_interpret_alone(monkeypatch):
    """Imported (not run as a script), launch_overhead.py must not switch the interpreter on: on a GPU that made
    every Triton module imported later in the test process an interpreted one (H200 run, 2026-11-30)."""
    import importlib.util
    import os

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "launch_overhead.py")
    spec = importlib.util.spec_from_file_location("launch_overhead_import_check", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert "TRITON_INTERPRET" not in os.environ


def test_direct_path_calls_the_compiled_kernel_as_jitfunction_run_does():
    """The installed Triton's own JITFunction.run (binder, specialisation, cache) on a stand-in GPU: after two
    confirming launches the direct path takes over, and passes the compiled kernel the same grid, stream,
    launch metadata, hooks and arguments as JITFunction.run's last line."""
    lo = _harness()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Triton's FP-fusion default notice
        with lo.gpu_standin() as jit:
            fn, grid, args, kwargs = lo.ln_backward_call()
            jf, dk = jit(fn), launch.DirectKernel(jit(fn))
            for _ in range(3):
                jf[grid](*args, **kwargs)
                dk[grid](*args, **kwargs)
            assert len(dk.compiled) == 1, "the direct path did not engage"
            via_jit, via_direct = _compiled(jf).calls, _compiled(dk.fn).calls
            assert len(via_jit) == len(via_direct) == 3

            def comparable(call):  # the stand-ins' function / metadata handles are per compiled kernel; the
                # direct path passes tensors as their addresses (the launcher's data_ptr() without the driver query),
                # and no hooks (None) where Triton passes empty hook chains (the launcher calls them to no effect)
                hooks = tuple(None if getattr(h, "calls", None) == [] else h for h in call[7:9])
                return call[:4] + (call[6] if any(hooks) else None,) + hooks + tuple(
                    a.data_ptr() if isinstance(a, torch.Tensor) else a for a in call[9:])

            assert all(comparable(a) == comparable(b) for a, b in zip(via_jit, via_direct))
            assert via_direct[2][4] is _compiled(dk.fn).function
            assert via_direct[2][5] is _compiled(dk.fn).packed_metadata
            # a registered launch hook (proton's way): the direct path passes Triton's chains and the metadata
            from triton import knobs

            seen = []
            knobs.runtime.launch_enter_hook.add(seen.append)
            try:
                dk[grid](*args, **kwargs)
            finally:
                knobs.runtime.launch_enter_hook.remove(seen.append)
            assert len(_compiled(dk.fn).calls) == 4, "not a direct launch"
            assert _compiled(dk.fn).calls[3][7] is knobs.runtime.launch_enter_hook
            # another specialisation (a misaligned tensor): through JITFunction.run, which compiles it apart
            x = args[0]
            args2 = (x.view(-1)[1:1 + x.numel() - 768].view(-1, 768),) + args[1:]
            for _ in range(3):
                dk[grid](*args2, **kwargs)
            assert len(dk.fn.device_caches[0][0]) == 2 and len(dk.compiled) == 2 and dk.off is None


def test_the_real_launcher_gets_the_same_bytes_both_ways(tmp_path):
    """The installed Triton's real JITFunction.run, sm_90 compile and C launcher (no GPU: a stand-in libcuda.so.1,
    built here, records what cuLaunchKernelEx would get): launches through JITFunction.run and through the direct
    path (tensors as addresses, no empty hook chains) hand the driver the same grid, block, shared memory, stream,
    function (one per cubin: the aligned and the misaligned specialisation differ) and kernel-parameter bytes; a
    registered launch hook sees the same metadata. A wrong argument layout fails here: Triton 3.6's launcher
    checks the argument count (PyArg_ParseTuple); 3.9's does not, but the parameter bytes then differ."""
    import json
    import os
    import shutil
    import subprocess
    import sysconfig

    if HAS_CUDA:
        pytest.skip("on a GPU the GPU test below launches the real kernels both ways")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: Triton cannot build its launcher")
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        pytest.skip("no Python headers: Triton cannot build its launcher")
    root = os.path.join(os.path.dirname(__file__), "..")
    child = os.path.join(os.path.dirname(__file__), "real_launcher", "child.py")
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, child, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    aligned, misaligned = out["cases"]
    for c in out["cases"]:
        assert all(c["same"]), c["example"]
        assert c["jit_runs"][2:] == [0, 0], c["jit_runs"]  # the last launches were direct ones
    assert aligned["example"][0]["function"] != misaligned["example"][0]["function"]
    assert len(out["hook_calls"]) == 2 and out["hook_calls"][0] == out["hook_calls"][1], out["hook_calls"]


def test_triton_knob_options_and_constexpr_types_are_in_the_key(direct_on):
    fn, k, x = _confirmed()
    n = len(fn.jit_calls)
    direct_on.debug = True  # JITFunction.run adds knobs.runtime.debug to the options
    k[(1,)](x, 5, 0.5, BLOCK=16)
    direct_on.debug = False
    launch._STATE["compilation"].instrumentation_mode = "on"  # proton sets it when profiling starts
    k[(1,)](x, 5, 0.5, BLOCK=16)
    launch._STATE["compilation"].instrumentation_mode = ""
    k[(1,)](x, 5, 0.5, BLOCK=16, FLAG=0)  # after FLAG=False (the default): Triton compiles 0 apart
    assert len(fn.jit_calls) == n + 3
    assert launch.arg_keys([1, True, 1.0], [True] * 3) == [(int, 1), (bool, True), (float, 1.0)]


def test_callable_grids_and_pre_run_hooks_go_through_jit(direct_on):
    fn = _FakeJIT()
    k = launch.DirectKernel(fn)
    x = torch.zeros(8)
    for _ in range(3):
        k[lambda meta: (1,)](x, 5, 0.5, BLOCK=16)
    assert len(fn.jit_calls) == 3 and not k.compiled
    fn.pre_run_hooks = [lambda *a, **kw: None]
    for _ in range(3):
        k[(1,)](x, 5, 0.5, BLOCK=16)
    assert len(fn.jit_calls) == 6 and "pre-run hooks" in k.off


# ----------------------------------------------------------------------------- when it is off
def test_off_under_the_interpreter_and_by_request(monkeypatch):
    monkeypatch.setattr(launch, "_STATE", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    on, why = launch.status()
    assert not on and "interpreter" in why
    monkeypatch.setattr(launch, "_STATE", {})
    monkeypatch.setenv(launch.MODE_ENV, "jit")
    assert launch.status() == (False, f"{launch.MODE_ENV}=jit")
    monkeypatch.setattr(launch, "_STATE", {})
    monkeypatch.setenv(launch.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="choose 'direct'"):
        launch.status()


def test_on_only_where_jitfunction_run_ends_in_the_mirrored_call(monkeypatch):
    from triton.runtime.jit import JITFunction

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(launch.MODE_ENV, raising=False)
    on, why = launch._decide()
    assert on, why  # the installed Triton (>= 3.3) launches this way

    def run(self, *args, grid, warmup, **kwargs):  # a Triton whose launcher convention changed
        kernel = self.cache[0]
        kernel.launch(grid, *args)

    monkeypatch.setattr(JITFunction, "run", run)
    on, why = launch._decide()
    assert not on and "convention changed" in why


def test_interpreted_kernels_launch_as_before():
    # on this CPU machine every DirectKernel launches through the interpreter; nothing is cached
    if HAS_CUDA:
        pytest.skip("CPU behaviour (the interpreter); the GPU test below covers CUDA")
    from seqpe_kernels.ops.gelu import _gelu_fwd, gelu_forward

    z = torch.randn(5, 7)
    u = gelu_forward(z)
    assert torch.allclose(u, torch.nn.functional.gelu(z, approximate="tanh"), atol=1e-6)
    assert isinstance(_gelu_fwd, launch.DirectKernel) and not _gelu_fwd.compiled and not _gelu_fwd.seen


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_direct_launches_match_jit_bit_for_bit(monkeypatch):
    """The Triton encoder's training step (dropout on, bf16 autocast and fp32) with every launch through
    JITFunction.run and with direct launches: the same outputs and gradients bit for bit, direct launches taken,
    and a misaligned input after aligned ones still correct."""
    import seqpe_kernels as sk
    from seqpe_kernels.launches import count_launches
    from seqpe_kernels.ops.layernorm import _res_ln_fwd, residual_layernorm_forward

    def step(mode, amp):
        monkeypatch.setenv(launch.MODE_ENV, mode)
        launch.reset()
        torch.manual_seed(0)
        ref = sk.SeqPE(64, 4, 5, num_layers=2, resid_pdrop=0.1, attn_pdrop=0.1).cuda()
        fus = sk.FusedSeqPE.from_reference(ref, backend="triton")
        pos = torch.randint(0, 10 ** 5, (37,), device="cuda")
        outs = []
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                y = fus(pos)
            y.float().square().sum().backward()
            outs += [y.detach().clone()] + [p.grad.clone() for p in fus.parameters()]
            fus.zero_grad(set_to_none=True)
        return outs

    from triton.runtime.interpreter import InterpretedFunction

    import seqpe_kernels.ops.table_grad  # noqa: F401  (imported lazily by the encoder: check it too)

    interpreted = [name for name, mod in sys.modules.items() if name.startswith("seqpe_kernels.ops.")
                   for v in vars(mod).values()
                   if isinstance(getattr(v, "fn", v), InterpretedFunction)]
    assert not interpreted, f"Triton kernels imported as interpreted on a GPU (TRITON_INTERPRET leaked): {interpreted}"
    try:
        for amp in (False, True):
            a, b = step("jit", amp), step("direct", amp)
            assert launch.status()[0], launch.status()[1]
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert _res_ln_fwd.compiled, "no direct launch was taken"
        x = torch.randn(65, 48, device="cuda")
        for t in (x[:64], x[:64], x[:64], x.view(-1)[1:1 + 64 * 48].view(64, 48)):  # aligned, then off by 4 bytes
            _, a_, _, _ = residual_layernorm_forward(t, None, torch.ones(48, device="cuda"),
                                                     torch.zeros(48, device="cuda"), 1e-5, 0.0, None, 0, 0)
            ref = torch.nn.functional.layer_norm(t, (48,), eps=1e-5)
            assert (a_ - ref).abs().max().item() <= 1e-5
        _, n = count_launches(lambda: step("direct", False))
        assert n > 0
    finally:
        launch.reset()


@given(a=st.integers(0, 2 ** 40), b=st.integers(1, 2 ** 20))
def test_host_integer_helpers_match_triton(a, b):
    """The launchers' cdiv / next_pow2 (plain Python: Triton's are ConstexprFunctions, ~3 us per host call) give
    Triton's values."""
    import triton

    from seqpe_kernels.ops._common import cdiv, next_pow2

    assert cdiv(a, b) == triton.cdiv(a, b)
    assert next_pow2(a) == triton.next_power_of_2(max(a, 1))


def test_interpreted_launches_from_several_threads():
    """The Triton backend under TRITON_INTERPRET=1 called from four threads at once: the interpreter's grid state
    is process-wide, so concurrent launches read each other's grids (wrong rows, NaN, InterpreterError, once a
    segfault: hence a subprocess). Launches now take one lock while interpreted."""
    import os
    import subprocess

    code = r"""
import sys, threading, warnings, torch
import seqpe_kernels as sk
warnings.simplefilter("ignore")
torch.set_num_threads(1)
sys.setswitchinterval(1e-6)
torch.manual_seed(0)
ref = sk.SeqPE(embed_dim=16, num_heads=2, max_digits=3, num_layers=2, resid_pdrop=0.0, attn_pdrop=0.0).eval()
enc = sk.FusedSeqPE.from_reference(ref, backend="triton").eval()
bad = []
def work(r, t, bar):
    g = torch.Generator().manual_seed(100 * r + t)
    pos = torch.randint(0, 1000, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g)
    bar.wait()
    try:
        with torch.no_grad():
            err = (enc(pos) - ref(pos)).abs().max().item()
        if not err < 1e-4:
            bad.append(err)
    except Exception as e:
        bad.append(repr(e)[:100])
for r in range(6):
    bar = threading.Barrier(4)
    ts = [threading.Thread(target=work, args=(r, t, bar)) for t in range(4)]
    [t.start() for t in ts]; [t.join() for t in ts]
print("ok" if not bad else f"{len(bad)} bad: {bad[:3]}")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout[-500:], r.stderr[-1500:])


# --- seqpe_kernels.launches.count_launches must not undercount (the launch-count guards bound from above only;
# mutation campaign 2026-12-02)
def _count(fn):
    from seqpe_kernels.launches import count_launches

    fn()  # warm-up, as count_launches asks
    return count_launches(fn)


def test_an_operator_that_allocates_its_output_is_counted():
    """native_layer_norm calls aten::empty for its outputs: it is still one kernel (mutant: an operator with any
    child event -- an allocation included -- was read as a composite and dropped: layer_norm counted 0)."""
    x = torch.randn(8, 8)
    assert _count(lambda: torch.nn.functional.layer_norm(x, (8,))) == (1, 0)


def test_a_copy_is_a_kernel():
    """aten::copy_ moves data (a kernel on a GPU): counted (mutant: treated as a view / allocation)."""
    x, y = torch.randn(64), torch.empty(64)
    assert _count(lambda: y.copy_(x)) == (1, 0)
