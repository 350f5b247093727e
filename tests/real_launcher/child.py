"""Run with TRITON_INTERPRET=0 on a machine without a GPU (tests/test_launch.py starts it): the installed Triton's
real JITFunction.run, real sm_90 compile and real C launcher, linked against a stand-in libcuda.so.1 whose
cuLaunchKernelEx records the launch. Each launch goes once through JITFunction.run and once through
seqpe_kernels.ops.launch's direct path; what reaches the (stand-in) driver must be identical byte for byte.
argv: a scratch directory. Prints one JSON line."""
import ctypes
import json
import os
import sys
import types
import warnings
import zlib

warnings.simplefilter("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
scratch = sys.argv[1]
os.environ["TRITON_CACHE_DIR"] = os.path.join(scratch, "triton_cache")
os.environ["TRITON_LIBCUDA_PATH"] = scratch
assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia import driver as nvd  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import build_fake_libcuda  # noqa: E402

ndir = os.path.dirname(nvd.__file__)
srcs = [open(nvd.__file__).read()] + ([open(os.path.join(ndir, "driver.c")).read()]
                                      if os.path.exists(os.path.join(ndir, "driver.c")) else [])
so = build_fake_libcuda.build(scratch, os.path.join(ndir, "include"), srcs)
fake = ctypes.CDLL(so, mode=ctypes.RTLD_GLOBAL)  # later dlopen("libcuda.so.1") and DT_NEEDED resolve to it


class Record(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_ulonglong), ("function", ctypes.c_ulonglong), ("n_attrs", ctypes.c_uint),
                ("attr_id", ctypes.c_int * 8), ("attr_val", (ctypes.c_ubyte * 16) * 8), ("n_params", ctypes.c_int),
                ("params", (ctypes.c_ubyte * 8) * 256), ("n_launches", ctypes.c_ulonglong)]


assert fake.fake_record_size() == ctypes.sizeof(Record)
fake.fake_last_launch.restype = ctypes.POINTER(Record)


def last():
    r = fake.fake_last_launch().contents
    return dict(grid=list(r.grid), block=list(r.block), shared=r.shared, stream=r.stream, function=r.function,
                attrs=[(r.attr_id[i], bytes(r.attr_val[i]).hex()) for i in range(r.n_attrs)],
                params=[bytes(r.params[i]).hex() for i in range(max(r.n_params, 0))], n=r.n_launches)


SIZE = {"i1": 1, "i8": 1, "u1": 1, "u8": 1, "i16": 2, "u16": 2, "fp16": 2, "bf16": 2, "i32": 4, "u32": 4,
        "fp32": 4, "f32": 4, "i64": 8, "u64": 8, "fp64": 8}


def set_sizes(compiled):
    sig = [t for t in compiled.src.signature.values() if t != "constexpr"]
    assert all(isinstance(t, str) for t in sig), sig  # no tuples in this package's kernels
    s = [8 if t.startswith("*") else SIZE[t] for t in sig] + [8, 8]  # + global and profile scratch
    fake.fake_set_param_sizes(len(s), (ctypes.c_longlong * len(s))(*s))
    return sig


# ---- a stand-in driver (device 0 of an sm_90 GPU, a recognisable stream) around Triton's real launcher
STREAM, FUNCTION = 0x5EED00, 0xF00D00
real_utils = nvd.CudaUtils()
utils = types.SimpleNamespace(**{k: getattr(real_utils, k) for k in dir(real_utils) if not k.startswith("_")})
utils.get_device_properties = lambda dev: {"max_shared_mem": 232448, "multiprocessor_count": 132,
                                           "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1,
                                           "mem_clock_rate": 1, "mem_bus_width": 1}
utils.load_binary = lambda name, kernel, shared, dev: (0xABC, FUNCTION + zlib.crc32(kernel) % 0xFFFF, 32, 0, 1024)  # per cubin
driver.set_active(types.SimpleNamespace(
    get_current_target=lambda: GPUTarget("cuda", 90, 32), get_current_device=lambda: 0,
    get_current_stream=lambda dev: STREAM, launcher_cls=nvd.CudaLauncher, utils=utils,
    allocate_default_profile_scratch=lambda *a: None))
torch.cuda.current_device = lambda: 0
torch._C._cuda_getCurrentRawStream = lambda dev: STREAM

from seqpe_kernels.ops import launch  # noqa: E402

launch.reset()
on, why = launch.status()
assert on, why

spec = __import__("importlib.util").util.spec_from_file_location(
    "launch_overhead", os.path.join(HERE, "..", "..", "benchmarks", "launch_overhead.py"))
lo = __import__("importlib.util").util.module_from_spec(spec)
spec.loader.exec_module(lo)
fn, grid, args, kwargs = lo.ln_backward_call(R=64, n_prog=8)
x = args[0]
misaligned = (x.view(-1)[1:1 + 32 * 768].view(32, 768),) + args[1:]

out = {"triton": triton.__version__, "cases": []}
jf, dk = JITFunction(fn), launch.DirectKernel(JITFunction(fn))
jit_runs = []
dk.fn.run = (lambda run: lambda *a, **k: (jit_runs.append(1), run(*a, **k))[1])(dk.fn.run)  # counts them
for name, a in (("aligned", args), ("misaligned x", misaligned)):
    jf[grid](*a, **kwargs)  # compile (records ignored until the parameter sizes are known)
    ck = [c for c in jf.device_caches[0][0].values()][-1]
    sig = set_sizes(ck)
    pairs = []
    runs = []
    for _ in range(4):  # the first two of the direct kernel go through JITFunction.run, then direct
        jf[grid](*a, **kwargs)
        via_jit = last()
        n = len(jit_runs)
        dk[grid](*a, **kwargs)
        via_direct = last()
        pairs.append((via_jit, via_direct))
        runs.append(len(jit_runs) - n)
    out["cases"].append({"case": name, "signature": sig, "direct_engaged": len(dk.compiled), "jit_runs": runs,
                         "launches": [p[1]["n"] - p[0]["n"] for p in pairs],
                         "same": [p[0] == dict(p[1], n=p[0]["n"]) for p in pairs],
                         "example": pairs[-1]})
# a registered launch hook (proton's way) sees the same launch metadata either way
from triton import knobs  # noqa: E402

seen = []
hook = lambda meta: seen.append(sorted((k, str(v)) for k, v in meta.get().items()))  # noqa: E731
knobs.runtime.launch_enter_hook.add(hook)
try:
    jf[grid](*args, **kwargs)
    dk[grid](*args, **kwargs)
finally:
    knobs.runtime.launch_enter_hook.remove(hook)
out["hook_calls"] = seen

if "--bench" in sys.argv:  # host time per launch through the real launcher (the stand-in driver's calls are free)
    import importlib.util
    import time

    variants = [("JITFunction.run", jf, None), ("direct", dk, None)]
    orig = os.environ.get("LAUNCH_ORIG")
    if orig:  # another launch.py to compare with
        sp = importlib.util.spec_from_file_location("launch_orig", orig)
        lo_mod = importlib.util.module_from_spec(sp)
        sp.loader.exec_module(lo_mod)
        lo_mod._STATE.update(on=True, why="bench", knobs=knobs.runtime)
        dko = lo_mod.DirectKernel(JITFunction(fn))
        for _ in range(3):
            dko[grid](*args, **kwargs)
        variants.append(("direct (LAUNCH_ORIG)", dko, None))
    res = {}
    for _ in range(5):
        for name, k, _x in variants:
            t0 = time.perf_counter()
            for _ in range(20000):
                k[grid](*args, **kwargs)
            res.setdefault(name, []).append((time.perf_counter() - t0) / 20000 * 1e6)
    out["bench_us"] = {k: round(sorted(v)[2], 2) for k, v in res.items()}
print(json.dumps(out))
