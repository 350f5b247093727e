"""setup.py exists for the optional ahead-of-time C++/CUDA extension build (issue 4).

A plain `pip install .` builds nothing native: the Triton kernels are JIT-compiled at first use, and the
C++/CUDA extension (csrc/) is JIT-built by seqpe_kernels._ext on first use of the "cpu"/"cuda" backends.

`SEQPE_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .` compiles csrc/ once into the module
`seqpe_kernels._C` (which seqpe_kernels._ext then imports instead of building):
  * a CppExtension, or a CUDAExtension when torch is a CUDA build and a CUDA toolkit (nvcc) is found;
  * TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX" (A100, H100 and PTX for newer GPUs);
  * MAX_JOBS defaults to min(cores, GiB of memory / 2 (C++) or / 4 (CUDA)), NVCC_THREADS to 2;
  * SEQPE_KERNELS_CPU_ARCH adds an ISA flag to the C++ build (e.g. "-march=haswell"); the default is the
    portable baseline of the platform.
--no-build-isolation is needed because the build imports the installed torch (it must match the torch the
module will run with; seqpe_kernels._ext reports a mismatch with both versions).
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py


class build_py(_build_py):
    """A non-editable install (a wheel) carries csrc/ inside the package as seqpe_kernels/csrc, so that the C++
    extension can still be JIT-built there (seqpe_kernels._ext looks beside the package, then inside it). An
    editable install reads the checkout's csrc/ directly."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
        dst = os.path.join(self.build_lib, "seqpe_kernels", "csrc")
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True,
                            ignore=lambda d, names: [n for n in names if not os.path.isdir(os.path.join(d, n))
                                                     and not n.endswith((".cpp", ".cu", ".h", ".cuh"))])


ext_modules, cmdclass = [], {"build_py": build_py}
_flag = os.environ.get("SEQPE_KERNELS_BUILD_EXT", "").strip().lower()
if _flag not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
    raise SystemExit(f"SEQPE_KERNELS_BUILD_EXT={_flag!r}: use 1 / true / yes / on, or 0 / false / no / off")
if _flag in ("1", "true", "yes", "on"):
    import re

    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:  # build isolation hides the installed torch
        raise SystemExit(f"SEQPE_KERNELS_BUILD_EXT=1 needs torch importable at build time ({e}); install torch "
                         "first and build with `pip install --no-build-isolation .`")

    def _mem_gib() -> float:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
        except (ValueError, OSError, AttributeError):
            return 8.0

    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join("csrc")
    with_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and \
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) and os.environ.get("SEQPE_KERNELS_NO_CUDA", "0") != "1"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    per_job_gib = 4.0 if with_cuda else 2.0
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, int(_mem_gib() // per_job_gib)))))
    nvcc_threads = os.environ.get("NVCC_THREADS", "2")

    def _tag(s: str) -> str:  # as seqpe_kernels._ext._version_token
        return re.sub(r"[^A-Za-z0-9.+_]", "_", s)

    import importlib.util as _ilu

    _spec = _ilu.spec_from_file_location("_srchash", os.path.join(here, "seqpe_kernels", "_srchash.py"))
    _srchash = _ilu.module_from_spec(_spec)
    _spec.loader.exec_module(_srchash)
    defines = [f"-DSEQPE_TORCH_VERSION={_tag(torch.__version__)}",
               f"-DSEQPE_CUDA_VERSION={_tag(torch.version.cuda or 'none') if with_cuda else 'none'}",
               f"-DSEQPE_SOURCE_HASH={_srchash.source_hash(os.path.join(here, csrc))}"]  # (_load_aot compares)
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", *defines]
    if os.environ.get("SEQPE_KERNELS_CPU_ARCH"):
        cxx.append(os.environ["SEQPE_KERNELS_CPU_ARCH"])
    sources = [os.path.join(csrc, "module.cpp"), os.path.join(csrc, "ops_cpu.cpp"), os.path.join(csrc, "encoder.cpp")]
    if with_cuda:
        import importlib.util

        # headers of the NVIDIA wheels torch depends on (nvidia/cu13/include has cusparse.h & co., which a
        # bare toolkit install may lack)
        spec = importlib.util.find_spec("nvidia")
        wheel_inc = [os.path.join(r, d, "include") for r in (spec.submodule_search_locations or [] if spec else [])
                     for d in sorted(os.listdir(r)) if os.path.isdir(os.path.join(r, d, "include"))]
        ext = CUDAExtension(
            "seqpe_kernels._C", sources + [os.path.join(csrc, "ops_cuda.cu")],
            include_dirs=[os.path.join(here, csrc), *wheel_inc],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "--threads", nvcc_threads,
                                                     *defines]},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("seqpe_kernels._C", sources, include_dirs=[os.path.join(here, csrc)],
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    print(f"seqpe-kernels: building seqpe_kernels._C ({'C++/CUDA' if with_cuda else 'C++ only'}) for torch "
          f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}), MAX_JOBS={os.environ['MAX_JOBS']}"
          + (f", TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, NVCC_THREADS={nvcc_threads}"
             if with_cuda else ""))
    ext_modules = [ext]
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
