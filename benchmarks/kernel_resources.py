"""Registers, local memory (spills), shared memory and occupancy of every Triton kernel a training step launches,
compiled for an sm_90 GPU (H100 / H200) on a machine without one.

Why: a kernel that spills registers to local memory, or runs one block per SM, is slow on the GPU and correct
everywhere, so no parity test notices; the device time to profile it is scarce. Triton's real compiler and the
``cuobjdump`` it ships answer the question here: the launches of one training step at a bench configuration's
real shapes are recorded (the Triton backend under the interpreter, kernels not run: only their arguments
matter), each distinct specialisation is compiled for sm_90 in a subprocess (a stand-in driver names the
target), and ``cuobjdump -res-usage`` reads its cubin.

    python benchmarks/kernel_resources.py [--config text-default vits-default] [--out FILE]

Occupancy is the sm_90 limit from registers, warps, shared memory and blocks per SM (65536 registers allocated
per warp in units of 256, 64 warps, 32 blocks, 228 KiB shared memory with 1 KiB reserved per block); "waves" is
the grid over (blocks per SM x 132 SMs). Grids are the CPU run's, with the SM count set to 132 where a launch
sizes its grid by it. ``tests/test_triton_compile.py`` uses the same machinery and fails on any spill.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the backend runs on CPU tensors

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
from typing import Callable, Dict, List  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SMS = 132  # H100 SXM and H200


def _desc(a):
    import triton.language as tl

    if isinstance(a, torch.Tensor):
        return {"t": "ptr", "dtype": str(a.dtype).replace("torch.", ""), "off": a.data_ptr() % 16}
    if isinstance(a, tl.dtype):
        return {"t": "tl", "v": a.name}
    if a is None or isinstance(a, (bool, int, float)):
        return {"t": "val", "v": a}
    raise TypeError(f"unexpected kernel argument {type(a)}")


def record(steps: Callable[[], None], run: bool = True) -> List[dict]:
    """The distinct launches ({kernel module, name, grid, argument descriptors}) made while ``steps`` runs.
    ``run=False`` records without launching (for real shapes, where the interpreter would take minutes): float
    outputs stay uninitialised, the table rows are zeroed (valid indices); distinct = same kernel, argument
    descriptors and grid rank; the first grid is kept."""
    from seqpe_kernels.ops import launch

    seen: Dict[str, dict] = {}
    orig = launch.DirectKernel.launch

    def rec(self, grid, args, kwargs):
        fn = self.fn.fn  # the kernel's Python function (the interpreter wraps it)
        d = {"module": fn.__module__, "name": fn.__name__, "grid": [1] * len(grid),
             "args": [_desc(a) for a in args], "kwargs": {k: _desc(v) for k, v in kwargs.items()}}
        seen.setdefault(json.dumps(d, sort_keys=True), dict(d, real_grid=[int(g) for g in grid]))
        if run:
            return orig(self, grid, args, kwargs)
        # the one integer output, the digit embedding's table rows, is read as indices later: make it valid.
        # Only by name: other integer arguments are inputs (positions, seeds, a cached power table) to leave alone.
        rows = dict(zip(self.names, args)).get("ROWS", kwargs.get("ROWS"))
        if isinstance(rows, torch.Tensor) and not rows.is_floating_point():
            rows.zero_()
        return None

    launch.DirectKernel.launch = rec
    try:
        steps()
    finally:
        launch.DirectKernel.launch = orig
    return list(seen.values())


def config_step(name: str, M=None) -> Callable[[], None]:
    """One training step (forward + backward, dropout on, the config's autocast dtype) of the Triton backend at
    bench configuration ``name``'s shapes, on CPU; ``M`` resizes the step (constexprs do not depend on it)."""
    from seqpe_kernels import FusedSeqPE, SeqPE
    from seqpe_kernels.bench import get_config, make_positions

    cfg = get_config(name)
    if M is not None:
        cfg = dataclasses.replace(cfg, M=M)
    ac = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.cuda_autocast or "")

    def step():
        torch.manual_seed(0)
        ref = SeqPE(**cfg.module_kwargs()).train()
        ref.check_range = False
        fus = FusedSeqPE.from_reference(ref, backend="triton")
        pos = make_positions(cfg, seed=0)
        with torch.autocast("cpu", dtype=ac or torch.bfloat16, enabled=ac is not None):
            y = fus(pos)
        y.float().sum().backward()

    return step


def gpu_sm_count(n: int = SMS):
    """Context: launches that size their grid by the SM count see ``n`` (each op module imported the helper)."""
    import contextlib
    import importlib

    @contextlib.contextmanager
    def ctx():
        mods = [importlib.import_module(f"seqpe_kernels.ops.{m}") for m in
                ("_common", "layernorm", "gelu", "digit_embed", "table_grad", "attention", "prefix_attention",
                 "gather")]
        saved = [(m, m.num_sms) for m in mods if hasattr(m, "num_sms")]
        try:
            for m, _ in saved:
                m.num_sms = lambda device: n
            yield
        finally:
            for m, f in saved:
                m.num_sms = f
    return ctx()


# Runs with TRITON_INTERPRET=0: compiles each recorded launch for sm_90 and reads its cubin's resource usage.
CHILD = textwrap.dedent(r"""
    import importlib, json, os, re, subprocess, sys, tempfile, types, warnings
    warnings.simplefilter("ignore")
    import torch, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    driver.set_active(types.SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", 90, 32),
                                            get_current_device=lambda: 0, get_current_stream=lambda d: 0))
    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    class Ptr:  # a tensor argument: only its dtype and address alignment reach the compiler
        def __init__(self, dtype, off):
            self.dtype, self.off = getattr(torch, dtype), off
        def data_ptr(self):
            return 1 << 20 | self.off

    def val(d):
        return Ptr(d["dtype"], d["off"]) if d["t"] == "ptr" else tl.dtype(d["v"]) if d["t"] == "tl" else d["v"]

    def usage(cubin):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
        if m is None:
            raise RuntimeError("cuobjdump -res-usage: " + out[-300:])
        return dict(zip(("regs", "stack", "static_smem", "local"), map(int, m.groups())))

    failures, results = [], []
    launches = json.load(open(sys.argv[1]))
    for d in launches:
        k = getattr(importlib.import_module(d["module"]), d["name"])
        k = k if hasattr(k, "warmup") else k.fn  # a JITFunction, or the one inside ops.launch.DirectKernel
        try:
            c = k.warmup(*map(val, d["args"]), grid=tuple(d["grid"]), **{n: val(v) for n, v in d["kwargs"].items()})
            assert c.asm.get("cubin"), "no cubin"
            # ops.launch's direct path skips JITFunction.run's per-launch check of module globals a kernel reads
            assert not k.used_global_vals, f"reads module globals {sorted(n for n, _ in k.used_global_vals)}"
            r = usage(c.asm["cubin"])
            r.update(num_warps=c.metadata.num_warps, smem=c.metadata.shared + r["static_smem"])
            results.append(r)
        except Exception as e:
            results.append(None)
            failures.append(f"{d['name']} {d['kwargs']}: {type(e).__name__}: {str(e)[-600:]}")
    json.dump(results, open(sys.argv[2], "w"))
    print(f"compiled {len(launches) - len(failures)} of {len(launches)} launch specialisations for sm_90")
    print("\n".join(failures))
    sys.exit(1 if failures else 0)
""")


def compile_sm90(launches: List[dict], timeout: float = 900) -> tuple:
    """Compiles each launch for sm_90 in a subprocess. Returns (returncode, its output, per-launch resource
    dicts {regs, stack, local, smem, num_warps} or None for a launch that failed)."""
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "launches.json"), os.path.join(d, "usage.json")
        with open(src, "w") as f:
            json.dump(launches, f)
        env = dict(os.environ, TRITON_INTERPRET="0")
        r = subprocess.run([sys.executable, "-c", CHILD, src, dst], env=env, capture_output=True, text=True,
                           timeout=timeout)
        usage = json.load(open(dst)) if os.path.exists(dst) else [None] * len(launches)
    return r.returncode, r.stdout + r.stderr, usage


def occupancy(u: dict) -> tuple:
    """(blocks per SM, fraction of the 64 warp slots) on sm_90 for a kernel's resource usage."""
    warps = u["num_warps"]
    per_warp = -(-max(u["regs"], 1) * 32 // 256) * 256
    by_regs = (65536 // per_warp) // warps
    by_warps = 64 // warps
    by_smem = (228 * 1024) // (u["smem"] + 1024)
    blocks = min(32, by_regs, by_warps, by_smem)
    return blocks, blocks * warps / 64


_SHOWN = ("BLOCK", "BLOCK_D", "BLOCK_C", "BLOCK_R", "BD", "TP", "TQP", "DHP", "DC", "DROPOUT", "HAS_LN", "DYB",
          "CAUSAL", "HAS_MASK", "FROM_POS", "Q_ROWS", "KV_ROWS", "WRITE_ROWS")


def table(launches: List[dict], usage: List[dict]) -> str:
    rows = []
    for d, u in zip(launches, usage):
        dts = sorted({a["dtype"] for a in d["args"] if a["t"] == "ptr"} - {"int64", "int32", "bool"})
        cx = " ".join(f"{k}={v['v']}" for k, v in d["kwargs"].items() if k in _SHOWN)
        grid = "x".join(map(str, d["real_grid"]))
        if u is None:
            rows.append(f"| {d['name']} | {'/'.join(dts)} | {cx} | {grid} | compile failed | | | | | | |")
            continue
        blocks, occ = occupancy(u)
        n = 1
        for g in d["real_grid"]:
            n *= g
        waves = n / (blocks * SMS)
        rows.append(f"| {d['name']} | {'/'.join(dts)} | {cx} | {grid} | {u['num_warps']} | {u['regs']} | "
                    f"{u['local']} / {u['stack']} | {u['smem']} | {blocks} | {occ:.0%} | {waves:.2f} |")
    head = ("| kernel | dtypes | constexprs | grid | warps | regs | local / stack B | smem B | blocks/SM | occupancy | "
            "waves |\n|---|---|---|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="+", default=["text-default", "vits-default"])
    ap.add_argument("--out", default=None, help="also write the report here (markdown)")
    args = ap.parse_args()
    import triton

    lines = [f"# Triton kernels of one training step, compiled for sm_90 (triton {triton.__version__}, "
             f"torch {torch.__version__})", "",
             "`python benchmarks/kernel_resources.py " + " ".join(sys.argv[1:]) + "`", ""]
    spills = 0
    for name in args.config:
        with gpu_sm_count():
            launches = record(config_step(name), run=False)
        rc, out, usage = compile_sm90(launches)
        spills += sum(1 for u in usage if u is None or u["local"] or u["stack"])
        lines += [f"## {name}", "", table(launches, usage), ""]
        if rc:
            lines += ["```", out.strip()[-3000:], "```", ""]
    lines.append(f"kernels with local memory (spills) or a failed compile: {spills}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.exit(1 if spills else 0)


if __name__ == "__main__":
    main()
