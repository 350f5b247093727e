"""Every Triton kernel the fused paths launch compiles for the GPU (sm_90 cubin), checked on a machine without one.

The interpreter (how the CPU tests run the kernels) accepts programs the compiler rejects (type unification
across branches, constexpr misuse, unsupported ops), and GPU-only branches (``tl.dot`` attention tiles) never
run there. Here: the launches of real training steps (1-D and 2-D positions, fp32 and bf16 autocast, dropout,
padding masks, prefix sharing, the cache gather) are recorded under the interpreter, then compiled in a
subprocess with Triton's real compiler for an sm_90 target (a stand-in driver names the target; no launch),
each distinct specialisation once: tensors by dtype and 16-byte alignment, ints and constexprs by value. Each
kernel must also read no module-level globals (the direct launch path of ops/launch.py skips the per-launch
check of them that JITFunction.run makes).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import seqpe_kernels as sk
from seqpe_kernels.ops import launch

from conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels compile and run in every other test")


def _desc(a):
    import triton.language as tl

    if isinstance(a, torch.Tensor):
        return {"t": "ptr", "dtype": str(a.dtype).replace("torch.", ""), "off": a.data_ptr() % 16}
    if isinstance(a, tl.dtype):
        return {"t": "tl", "v": a.name}
    if a is None or isinstance(a, (bool, int, float)):
        return {"t": "val", "v": a}
    raise TypeError(f"unexpected kernel argument {type(a)}")


def _record(steps):
    """Distinct launches {(kernel module, name, grid rank, argument descriptors)} while running ``steps``."""
    seen = {}
    orig = launch.DirectKernel.launch

    def rec(self, grid, args, kwargs):
        fn = self.fn.fn  # the kernel's Python function (the interpreter wraps it)
        d = {"module": fn.__module__, "name": fn.__name__, "grid": [1] * len(grid),
             "args": [_desc(a) for a in args], "kwargs": {k: _desc(v) for k, v in kwargs.items()}}
        seen.setdefault(json.dumps(d, sort_keys=True), d)
        return orig(self, grid, args, kwargs)

    launch.DirectKernel.launch = rec
    try:
        steps()
    finally:
        launch.DirectKernel.launch = orig
    return list(seen.values())


def _training_steps():
    torch.manual_seed(0)
    for cfg, amp in ((dict(data_dim=1, mask_padding=False), False), (dict(data_dim=2, mask_padding=True), True),
                     (dict(data_dim=1, attn_direction="bi"), True)):
        ref = sk.SeqPE(32, 2, 3, num_layers=2, resid_pdrop=0.1, attn_pdrop=0.1, **cfg)
        fus = sk.FusedSeqPE.from_reference(ref, backend="triton")
        pos = torch.randint(0, 10 ** 3, (5, cfg["data_dim"])).squeeze(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = fus(pos)
        y.float().sum().backward()
    # prefix sharing (the fused ancestor attention) and the cache gather, forward and backward
    ref = sk.SeqPE(32, 2, 3, num_layers=2, resid_pdrop=0.0)
    fus = sk.FusedSeqPE.from_reference(ref, backend="triton", dedup="prefix")
    fus(torch.arange(0, 40)).sum().backward()
    from seqpe_kernels.ops.gather import gather_rows

    gather_rows(torch.randn(50, 32), torch.randint(0, 50, (70,)))


_CHILD = textwrap.dedent(r"""
    import importlib, json, sys, types, warnings
    warnings.simplefilter("ignore")
    import torch, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    driver.set_active(types.SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", 90, 32),
                                            get_current_device=lambda: 0, get_current_stream=lambda d: 0))

    class Ptr:  # a tensor argument: only its dtype and address alignment reach the compiler
        def __init__(self, dtype, off):
            self.dtype, self.off = getattr(torch, dtype), off
        def data_ptr(self):
            return 1 << 20 | self.off

    def val(d):
        return Ptr(d["dtype"], d["off"]) if d["t"] == "ptr" else tl.dtype(d["v"]) if d["t"] == "tl" else d["v"]

    failures = []
    launches = json.load(open(sys.argv[1]))
    for d in launches:
        k = getattr(importlib.import_module(d["module"]), d["name"])
        k = getattr(k, "fn", k)  # the JITFunction inside ops.launch.DirectKernel
        try:
            c = k.warmup(*map(val, d["args"]), grid=tuple(d["grid"]), **{n: val(v) for n, v in d["kwargs"].items()})
            assert c.asm.get("cubin"), "no cubin"
            # ops.launch's direct path skips JITFunction.run's per-launch check of module globals a kernel reads
            assert not k.used_global_vals, f"reads module globals {sorted(n for n, _ in k.used_global_vals)}"
        except Exception as e:
            failures.append(f"{d['name']} {d['kwargs']}: {type(e).__name__}: {str(e)[-600:]}")
    print(f"compiled {len(launches) - len(failures)} of {len(launches)} launch specialisations for sm_90")
    print("\n".join(failures))
    sys.exit(1 if failures else 0)
""")


def test_every_launched_kernel_compiles_for_sm90(tmp_path):
    launches = _record(_training_steps)
    names = {d["name"] for d in launches}
    # every kernel the encoder, prefix sharing and the cache launch was seen (a renamed kernel must be added here)
    assert {"_embed_fwd", "_embed_bwd", "_res_ln_fwd", "_res_ln_bwd", "_attn_fwd", "_attn_bwd", "_gelu_fwd",
            "_gelu_bwd_db", "_pfx_fwd", "_pfx_bwd", "_gather_kernel", "_table_grad"} <= names, names
    # the tl.dot attention branch runs on GPUs only (tiles >= 16): add it for one recorded attention launch
    for d in [d for d in launches if d["name"] in ("_attn_fwd", "_attn_bwd")][:2]:
        e = json.loads(json.dumps(d))
        e["kwargs"].update(USE_DOT={"t": "val", "v": True}, TP={"t": "val", "v": 16}, TQP={"t": "val", "v": 16},
                           DHP={"t": "val", "v": 16}, DH={"t": "val", "v": 16})
        launches.append(e)
    f = tmp_path / "launches.json"
    f.write_text(json.dumps(launches))
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(f)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"compiled {len(launches)} of {len(launches)}" in r.stdout, r.stdout
