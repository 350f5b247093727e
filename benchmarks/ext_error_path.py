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
# / unwinder actually mapped (a throw that crashes on one machine and not on another often comes down to these),
# and which library each unwinder entry point binds to: a second unwinder in the process (libunwind.so.8, LLVM's,
# one linked into python) taking over _Unwind_RaiseException ends C++ throws in SIGSEGV (bloomberg/memray#863)
MAPS = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
keys = ("libstdc++", "libgcc_s", "libunwind", "libc++", "libgomp", "libomp")
libs = sorted({ln.split()[-1] for ln in open("/proc/self/maps") if any(k in ln for k in keys)})
print(sys.version.split()[0], "|", " ".join(libs))
"""
UNWIND_SYMBOLS = ("__cxa_throw", "_Unwind_RaiseException", "_Unwind_Resume", "_Unwind_Find_FDE")


def bindings(so: str, cuda: bool = False) -> list:
    """Where the unwinder entry points bind, per library that uses them (the dynamic linker's own account:
    LD_DEBUG=bindings with every symbol bound at load time); ``cuda``: after CUDA is initialised too (the driver
    and the libraries it loads)."""
    env = dict(os.environ, LD_DEBUG="bindings", LD_BIND_NOW="1")
    code = "import sys, torch; torch.ops.load_library(sys.argv[1])" + ("; torch.zeros(1, device='cuda')" if cuda
                                                                        else "")
    r = subprocess.run([sys.executable, "-c", code, so], capture_output=True, text=True, timeout=120, env=env)
    out = set()
    for ln in r.stderr.splitlines():
        sym = next((s for s in UNWIND_SYMBOLS if f"`{s}'" in ln), None)
        if sym and "binding file" in ln:
            parts = ln.split("binding file", 1)[1].split(":")[0].split(" to ")
            if len(parts) == 2:
                src = os.path.basename(parts[0].split()[0])
                dst = parts[1].split()[0]
                out.add(f"{sym}: {src} -> {dst}")
    return sorted(out)


def describe(so: str) -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        ver = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except Exception as e:  # noqa: BLE001 - a diagnostic: say what failed and go on
        ver = f"({cxx} --version failed: {e})"
    r = subprocess.run([sys.executable, "-c", MAPS, so], capture_output=True, text=True, timeout=120)
    mapped = r.stdout.strip() or f"(could not read the mapped libraries: rc={r.returncode}: {r.stderr[-300:]})"
    elf = ""
    if shutil.which("readelf"):  # the library's unwind tables and CET properties (an unwinder may not know them)
        sec = subprocess.run(["readelf", "-SW", so], capture_output=True, text=True, timeout=60).stdout
        notes = subprocess.run(["readelf", "-nW", so], capture_output=True, text=True, timeout=60).stdout
        props = [ln.strip() for ln in notes.splitlines() if "feature" in ln.lower() or "x86" in ln.lower()]
        elf = (f"\nlibrary: .eh_frame_hdr {'yes' if '.eh_frame_hdr' in sec else 'NO'}, .eh_frame "
               f"{'yes' if '.eh_frame ' in sec else 'NO'}; properties: {'; '.join(props) or 'none'}")
    cpu = bindings(so)
    bound = ("\nunwinder bindings (LD_DEBUG):\n  " + "\n  ".join(cpu[:40])) if cpu else ""
    import torch

    if torch.cuda.is_available():  # only what CUDA's initialisation adds or changes
        extra = [b for b in bindings(so, cuda=True) if b not in cpu]
        bound += "\n  after CUDA init, also:\n  " + ("\n  ".join(extra[:40]) if extra else "(nothing)")
    return f"compiler: {ver}\npython | C++ runtime mapped after loading the library: {mapped}{elf}{bound}"


def libgcc_s() -> str:
    """The path of the system's libgcc_s.so.1 (for the mode that preloads it), or ''."""
    try:
        p = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libgcc_s.so.1"], capture_output=True,
                           text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001 - a diagnostic
        return ""
    return p if os.path.isabs(p) and os.path.exists(p) else ""


# "+gcc_s": the child runs with the compiler's libgcc_s.so.1 preloaded, so its unwinder is the one every throw
# binds to: a crash that goes away there is a foreign unwinder's
MODES = ["aten", "aten+ext", "aten+cuda", "aten+ext+cuda", "cpu", "cpu+triton", "cuda", "cuda+triton", "cpu+pkg",
         "cuda+pkg", "cpu+gcc_s", "cuda+gcc_s"]


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
    gcc_s = libgcc_s()
    for mode in modes:
        env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="0")
        if "gcc_s" in mode:
            if not gcc_s:
                print(f"{mode:14s} skipped: no libgcc_s.so.1 from the compiler to preload", flush=True)
                continue
            env["LD_PRELOAD"] = " ".join(filter(None, [gcc_s, os.environ.get("LD_PRELOAD", "")]))
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, mode, so], capture_output=True,
                           text=True, timeout=120, env=env)
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
