"""Does an error raised inside the C++/CUDA extension reach Python as a RuntimeError, or crash the process?

On the leased GPU machines (H100 2026-11-22, H200 2026-11-30) every TORCH_CHECK failure inside the JIT-built
extension ended the process with SIGSEGV (the CPU op's bad-digits path, the CUDA ops' shape checks), while the
same code raises cleanly on the dev machine. This runs the error path of one op in fresh processes that differ
in one thing each -- CPU or CUDA tensors, triton imported before the extension or not, the package imported or
only the library loaded -- and prints each outcome (rc -11 = SIGSEGV), so one short run says which one matters.

    python benchmarks/ext_error_path.py [--modes cpu cuda ...]   # builds / loads the extension first
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

CHILD = r"""
import sys, torch
mode = sys.argv[1]
if "triton" in mode:
    import triton  # noqa: F401
if "pkg" in mode:
    from seqpe_kernels import _ext
    _ext.load()
elif "ext" in mode or not mode.startswith("aten"):  # (the "aten" control alone: torch without the extension)
    torch.ops.load_library(sys.argv[2])
dev = "cuda" if "cuda" in mode else "cpu"
if dev == "cuda":
    torch.zeros(1, device=dev)  # CUDA initialised in every cuda mode, as in the tests
x = torch.zeros(3, 2, dtype=torch.long, device=dev)
try:
    if mode.startswith("aten"):
        x.view(7)  # a TORCH_CHECK inside ATen (shape '[7]' is invalid for input of size 6)
    else:
        torch.ops.seqpe_ext.table_rows(x, 5, 1, 10, False, False)  # 2 columns for L = 5: TORCH_CHECK fails
except RuntimeError as e:
    print("raised RuntimeError:", str(e).splitlines()[0][:120])
"""


# what the process that throws links against: the compiler that built the library, python, and the C++ runtime
# / unwinder actually mapped (a throw that crashes on one machine and not on another often comes down to these)
MAPS = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
libs = sorted({ln.split()[-1] for ln in open("/proc/self/maps") if any(k in ln for k in ("libstdc++", "libgcc_s"))})
print(sys.version.split()[0], "|", " ".join(libs))
"""


def describe(so: str) -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        ver = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except Exception as e:  # noqa: BLE001 - a diagnostic: say what failed and go on
        ver = f"({cxx} --version failed: {e})"
    r = subprocess.run([sys.executable, "-c", MAPS, so], capture_output=True, text=True, timeout=120)
    mapped = r.stdout.strip() or f"(could not read the mapped libraries: rc={r.returncode})"
    return f"compiler: {ver}\npython | C++ runtime mapped after loading the library: {mapped}"


MODES = ["aten", "aten+ext", "aten+cuda", "aten+ext+cuda", "cpu", "cpu+triton", "cuda", "cuda+triton", "cpu+pkg",
         "cuda+pkg"]


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    modes = ap.parse_args(argv).modes
    from seqpe_kernels import _ext

    _ext.load()
    so = _ext._info.get("path")
    print(f"extension: {so}")
    print(describe(so), flush=True)
    crashed = []
    for mode in modes:
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, mode, so], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="0"))
        out = (r.stdout.strip().splitlines() or [""])[-1]
        err = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        why = out or (err[-1][:160] if err else "(no output)")
        print(f"{mode:14s} rc={r.returncode:4d}  {why}", flush=True)
        if r.returncode < 0:  # where it crashed, from faulthandler
            print("    " + "\n    ".join(err[:6]))
            crashed.append(mode)
    gdb = shutil.which("cuda-gdb") or shutil.which("gdb")
    if crashed and gdb:  # the native stack of the first crash (cuda-gdb also debugs host-only programs)
        r = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 30", "--args", sys.executable, "-c", CHILD,
                            crashed[0], so], capture_output=True, text=True, timeout=150)
        frames = [ln for ln in r.stdout.splitlines() if ln.startswith("#") or "signal" in ln.lower()]
        print(f"native stack of the {crashed[0]} crash ({os.path.basename(gdb)}):")
        print("\n".join("  " + ln[:200] for ln in frames[:32]) or r.stdout[-2000:] + r.stderr[-1000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
