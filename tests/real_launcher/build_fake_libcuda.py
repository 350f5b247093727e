"""Builds tests/real_launcher/fake_libcuda_core.c, plus a do-nothing CUDA_SUCCESS stub for every other cu* name
the given C sources mention, into DIR/libcuda.so.1 (soname libcuda.so.1)."""
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORE = {"cuLaunchKernelEx", "cuPointerGetAttribute", "cuCtxGetCurrent", "cuGetErrorString"}


def build(out_dir, include_dir, sources, cc="cc"):
    names = set()
    for s in sources:
        names |= set(re.findall(r"\b(cu[A-Z][A-Za-z0-9]*)\b", s))
    stubs = sorted({v for n in names - CORE for v in (n, n + "_v2", n + "_v3")} - CORE)
    stub_c = os.path.join(out_dir, "fake_libcuda_stubs.c")
    with open(stub_c, "w") as f:
        f.write("".join(f"int {n}(void) {{ return 0; }}\n" for n in stubs))
    so = os.path.join(out_dir, "libcuda.so.1")
    subprocess.check_call([cc, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", f"-I{include_dir}",
                           os.path.join(HERE, "fake_libcuda_core.c"), stub_c, "-o", so])
    return so


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2], [open(p).read() for p in sys.argv[3:]])
