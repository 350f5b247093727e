"""Loader of the C++/CUDA extension (csrc/): the ``seqpe_ext`` operators behind ``impl == IMPL_EXT``.

``load()`` returns ``torch.ops.seqpe_ext``. It uses, in this order:

1. a prebuilt ahead-of-time module ``seqpe_kernels._C`` (``SEQPE_KERNELS_BUILD_EXT=1 pip install
   --no-build-isolation .``), if one is installed;
2. a JIT build with ``torch.utils.cpp_extension.load`` (ninja; cached under ``TORCH_EXTENSIONS_DIR``, by
   default ``~/.cache/torch_extensions``): the C++ sources always, the CUDA sources too when torch is a
   CUDA build and a CUDA toolkit (``nvcc``, found through ``CUDA_HOME``) of the same major version exists.

The build runs once per process (thread-safe) and once per machine (the cache; the name encodes the torch
version, CUDA version and CPU flags, so a shared cache never hands a library to the wrong torch).
``status(device_type)`` never raises: it returns ``(ok, reason)``, cached, where the reason names a missing
compiler, a torch/CUDA mismatch (what the library was built for and what is running) or a build error (with
the path of the compiler log). ``SEQPE_KERNELS_NO_EXT=1`` disables the extension.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import struct
import subprocess
import threading
import time
import traceback
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

log = logging.getLogger(__name__)

_PKG = Path(__file__).resolve().parent
# a checkout (or an editable install): csrc/ beside the package; a wheel install: the copy inside it (setup.py)
CSRC = next((c for c in (_PKG.parent / "csrc", _PKG / "csrc") if (c / "ops_cpu.cpp").is_file()),
            _PKG.parent / "csrc")
CPU_SOURCES = ("ops_cpu.cpp", "encoder.cpp")
CUDA_SOURCES = ("ops_cuda.cu",)
PROBE_OP = "seqpe_ext::gelu_new_fwd"
# -fopenmp: at::parallel_for is an inline OpenMP region (libgomp is the one torch already loaded);
# -fno-trapping-math / -fno-math-errno (as PyTorch's own build): lets GCC if-convert and vectorise the
# clamped exp/tanh and the dropout selects; neither changes a computed value.
CXX_FLAGS = ("-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno")

_lock = threading.RLock()
_ops = None                      # torch.ops.seqpe_ext once loaded
_error: Optional[str] = None     # why the extension cannot be used (cached)
_info: Dict[str, object] = {}    # how it was obtained: source, path, cuda_reason
_status: Dict[str, Tuple[bool, str]] = {}


class ExtensionUnavailable(RuntimeError):
    """The C++/CUDA extension cannot be loaded or built here; the message says why."""


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """A yes/no environment variable: 1/true/yes/on or 0/false/no/off/unset (any case); anything else raises
    naming it (``SEQPE_KERNELS_NO_EXT=ture`` must not quietly build and run the extension)."""
    v = os.environ.get(name, "").strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name}={os.environ.get(name)!r}: use 1 / true / yes / on, or 0 / false / no / off")


def disabled() -> bool:
    return env_flag("SEQPE_KERNELS_NO_EXT")


def _running() -> str:
    return f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"


def _sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", s)


def _cpu_tag_and_flags():
    """Vector ISA of this build: AVX2+FMA where torch itself runs its AVX2 kernels (x86-64), else baseline."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    if platform.machine().lower() in ("x86_64", "amd64") and cap in ("AVX2", "AVX512"):
        return "avx2", ["-mavx2", "-mfma"]
    return "base", []


def _nvcc_version(cuda_home: str) -> Optional[str]:
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except Exception:
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_plan() -> Tuple[bool, str]:
    """(compile the CUDA sources?, why / why not)."""
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} is a CPU-only build (no CUDA): the CUDA sources are not compiled"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, (f"no CUDA toolkit found (nvcc; set CUDA_HOME) for {_running()}: "
                       "the CUDA sources are not compiled")
    libs = [os.path.join(CUDA_HOME, d) for d in ("lib64", "lib")]  # where torch's link line looks for -lcudart
    if not any(os.path.isdir(d) and any(f.startswith("libcudart") for f in os.listdir(d)) for d in libs):
        # torch guesses CUDA_HOME as the folder above the nvcc on PATH; where that nvcc is a wrapper script
        # (/usr/local/bin/nvcc) the guess (/usr/local) has no runtime library and the link fails late
        return False, (f"CUDA_HOME {CUDA_HOME} has no lib64/libcudart.so (guessed from the nvcc on PATH?): set "
                       "CUDA_HOME to the CUDA toolkit's root (e.g. /usr/local/cuda); the CUDA sources are not "
                       "compiled")
    v = _nvcc_version(CUDA_HOME)
    if v is None:
        return False, f"nvcc at {CUDA_HOME} does not report its version"
    if v.split(".")[0] != torch.version.cuda.split(".")[0]:
        return False, (f"torch/CUDA mismatch: nvcc {v} at {CUDA_HOME} cannot build for {_running()} "
                       "(the major versions must agree); the CUDA sources are not compiled")
    return True, f"nvcc {v} at {CUDA_HOME}"


def wheel_cuda_includes():
    """Header folders of the NVIDIA wheels a CUDA build of torch depends on (nvidia/cu13/include, ...):
    torch's CUDA headers include e.g. cusparse.h, which a bare toolkit install may not have."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    out = []
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in sorted(os.listdir(root)):
            inc = os.path.join(root, sub, "include")
            if os.path.isdir(inc):
                out.append(inc)
    return out


def _build_directory(name: str) -> str:
    """torch's JIT build folder for ``name`` (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/<py>_<cu|cpu>)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private, stable for years

        return _get_build_directory(name, verbose=False)
    except Exception:  # pragma: no cover
        root = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
        return os.path.join(root, name)


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """csrc/'s content hash (``_srchash``), once per process; "none" without csrc/."""
    from ._srchash import source_hash as _hash

    return _hash(CSRC) if CSRC.is_dir() else "none"


def build_name(with_cuda: bool) -> str:
    """The JIT build's folder name: torch / CUDA / ISA, and this checkout's csrc/ path (two checkouts sharing one
    TORCH_EXTENSIONS_DIR rebuilt each other on every start: build.ninja holds absolute source paths)."""
    tag, _ = _cpu_tag_and_flags()
    cu = f"_cu{_sanitize(torch.version.cuda)}" if with_cuda else ""
    where = hashlib.sha1(str(CSRC).encode()).hexdigest()[:6]
    return f"seqpe_ext_t{_sanitize(torch.__version__.split('+')[0])}{cu}_{tag}_p{where}{_sanitizers()[1]}"


def _version_token(v: str) -> str:
    """A version as it is stringified into the library (-D value; the preprocessor's # keeps it verbatim)."""
    return re.sub(r"[^A-Za-z0-9.+_]", "_", v)


def _version_defines():
    # the source hash as a flag too: a changed flag makes torch rewrite build.ninja and ninja rebuild, whatever
    # the sources' timestamps say
    return [f"-DSEQPE_TORCH_VERSION={_version_token(torch.__version__)}",
            f"-DSEQPE_CUDA_VERSION={_version_token(torch.version.cuda or 'none')}",
            f"-DSEQPE_SOURCE_HASH={source_hash()}"]


def _read_build_info(path: str) -> str:
    """'torch=...;cuda=...;src=...' from a built library without loading it (the marker string in ops_cpu.cpp)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return "unknown"
    m = re.search(rb"SEQPE_EXT_BUILD_INFO\{([^}]*)\}", data)
    return m.group(1).decode(errors="replace") if m else "unknown"


def _truncated(path: str) -> Optional[str]:
    """Why the shared library at ``path`` is shorter than its own ELF headers say (a link or copy cut short: a
    killed build, a full disk, an interrupted sync of a shared cache), or None. Loading such a file ends the
    process with SIGBUS when the loader touches the missing pages, so it is checked before. Only 64-bit
    little-endian ELF is checked (what torch runs on); anything else is left to the loader."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
            if head[:4] != b"\x7fELF"[:len(head)]:
                return None  # (not ELF: the loader's to judge)
            if len(head) < 64:
                return f"{size} bytes, less than an ELF header"
            if head[4] != 2 or head[5] != 1:  # not ELFCLASS64 / ELFDATA2LSB
                return None
            phoff, shoff = struct.unpack_from("<QQ", head, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 0x36)
            need = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
            if phoff + phentsize * phnum <= size:
                f.seek(phoff)
                table = f.read(phentsize * phnum)
                for i in range(phnum):
                    p_type, = struct.unpack_from("<I", table, i * phentsize)
                    p_offset, = struct.unpack_from("<Q", table, i * phentsize + 8)
                    p_filesz, = struct.unpack_from("<Q", table, i * phentsize + 32)
                    if p_type == 1:  # PT_LOAD: mapped from the file
                        need = max(need, p_offset + p_filesz)
    except OSError:
        return None  # (unreadable: the loader says why)
    return f"{size} bytes where its headers need {need}" if need > size else None


def _build_fields(built: str) -> Dict[str, str]:
    """{'torch': ..., 'cuda': ..., 'src': ...} of a build-information string ('torch=...;cuda=...;src=...')."""
    return dict(kv.split("=", 1) for kv in built.split(";") if "=" in kv)


def _build_mismatch(built: str) -> Optional[str]:
    """Why a library built for ``built`` ('torch=...;cuda=...') must not be loaded by the running torch."""
    fields = _build_fields(built)
    want_torch, want_cuda = _version_token(torch.__version__), _version_token(torch.version.cuda or "none")
    if fields.get("torch") not in (None, "unknown", want_torch):
        return "torch"
    if fields.get("cuda") not in (None, "none", want_cuda):
        return "CUDA"
    return None


def _load_aot() -> Optional[str]:
    """Import the prebuilt seqpe_kernels._C if it exists; returns its path (None if not installed).

    The build information is read from the file first: a module built for another torch or CUDA version is
    refused with both versions named (importing it would register the ops, after which nothing else can)."""
    try:
        spec = importlib.util.find_spec("seqpe_kernels._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None
    if _sanitizers()[0]:  # a sanitized run must test instrumented code: the JIT build with the sanitizers
        log.warning("seqpe_kernels: SEQPE_KERNELS_SANITIZE is set: the prebuilt %s is not used", spec.origin)
        return None
    cut = _truncated(spec.origin)
    if cut:
        raise ExtensionUnavailable(f"the prebuilt seqpe_kernels._C ({spec.origin}) is cut short ({cut}; an "
                                   "interrupted install or copy): reinstall the package, or delete the file to use "
                                   "the JIT build")
    built = _read_build_info(spec.origin)
    src = _build_fields(built).get("src")
    if CSRC.is_dir() and src != source_hash():  # (a checkout: its sources changed since the build, or unknown)
        log.warning("seqpe_kernels: the prebuilt %s was built from other sources (%s, these are %s): using the "
                    "JIT build of these instead; rebuild it with SEQPE_KERNELS_BUILD_EXT=1 pip install "
                    "--no-build-isolation -e .", spec.origin, src or "not recorded", source_hash())
        return None
    how = ("Rebuild it (SEQPE_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .) or delete it to use the "
           "JIT build")
    what = _build_mismatch(built)
    if what:
        raise ExtensionUnavailable(f"{what} mismatch: the prebuilt seqpe_kernels._C ({spec.origin}) was built for "
                                   f"{built.replace(';', ', ')} but {_running()} is running. {how}")
    try:
        importlib.import_module("seqpe_kernels._C")
    except ImportError as e:
        raise ExtensionUnavailable(
            f"the prebuilt seqpe_kernels._C ({spec.origin}) does not load: {e}. It was built for "
            f"{built.replace(';', ', ')}; running {_running()}. {how}")
    return spec.origin


@contextlib.contextmanager
def _build_lock(build_dir: str):
    """One build per folder at a time, by an OS file lock the kernel releases when its process dies. torch's own
    lock (a ``lock`` file it waits on forever) outlives a build killed by a signal (timeout, Slurm, a dropped ssh
    session, the OOM killer) and then hung every later first use, ``seqpe-kernels env`` included. Every build of
    this package takes this lock first, so a torch ``lock`` found while holding it is such a leftover: removed."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: torch's lock alone
        yield
        return
    with open(os.path.join(build_dir, "seqpe.lock"), "a+") as f:
        t0, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said and time.monotonic() - t0 > 5:
                    log.warning("seqpe_kernels: waiting for another process's build in %s", build_dir)
                    said = True
                time.sleep(0.2)
        try:
            stale = os.path.join(build_dir, "lock")
            if os.path.exists(stale):
                log.warning("seqpe_kernels: removing %s, left by a build that was killed", stale)
                os.remove(stale)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(name: str, with_cuda: bool) -> str:
    """One JIT build (C++ sources, plus CUDA ones if ``with_cuda``); returns the library path."""
    from torch.utils import cpp_extension

    _, arch_flags = _cpu_tag_and_flags()
    build_dir = _build_directory(name)
    os.makedirs(build_dir, exist_ok=True)
    sources = [str(CSRC / s) for s in CPU_SOURCES] + ([str(CSRC / s) for s in CUDA_SOURCES] if with_cuda else [])
    for s in sources:
        if not os.path.exists(s):
            raise ExtensionUnavailable(f"extension source {s} is missing (an installed package without csrc/?); "
                                       "install from a source checkout or a prebuilt seqpe_kernels._C")
    so = os.path.join(build_dir, f"{name}.so")
    if not os.path.exists(so):
        log.warning("seqpe_kernels: building the C++%s extension %s (first use on this machine, about a minute; "
                    "cached in %s)", "/CUDA" if with_cuda else "", name, build_dir)
    san = [] if with_cuda else _sanitizers()[0]  # sanitized builds are CPU-only (_jit_build)
    _require_sanitizer_runtime(san)
    cflags = [*CXX_FLAGS, *arch_flags, *san, *_version_defines()]
    cuda_flags = ["-O3", "--expt-relaxed-constexpr", *_version_defines()]
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch reads the target from the visible GPU; with none (a build machine, CI) its arch list is
        # empty and cpp_extension fails with an IndexError. Build for A100 / H100 plus PTX, as setup.py does.
        cuda_flags += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                       "-gencode=arch=compute_90,code=compute_90"]
    try:
        with _build_lock(build_dir):
            cut = os.path.exists(so) and _truncated(so)
            if cut:  # ninja would call it up to date and the loader would crash on it: relink
                log.warning("seqpe_kernels: the cached %s is cut short (%s; an interrupted build or copy): "
                            "rebuilding it", so, cut)
                os.remove(so)
            cpp_extension.load(name=name, sources=sources, extra_cflags=cflags, extra_ldflags=["-fopenmp", *san],
                               extra_cuda_cflags=cuda_flags, with_cuda=with_cuda, build_directory=build_dir,
                               extra_include_paths=wheel_cuda_includes() if with_cuda else None,
                               is_python_module=False, verbose=os.environ.get("SEQPE_KERNELS_VERBOSE_BUILD") == "1")
    except Exception as e:
        log_path = os.path.join(build_dir, "seqpe_build_error.log")
        try:
            with open(log_path, "w") as f:
                f.write(f"{_running()}\nsources: {sources}\ncflags: {cflags}\n\n")
                f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
        except OSError:
            log_path = "(could not write the log)"
        msg = str(e)
        first = next((ln for ln in msg.splitlines() if re.search(r"\b(fatal )?error:", ln)),
                     next((ln for ln in msg.splitlines() if re.search(r"not found|No such file|FAILED:", ln)),
                          msg.splitlines()[0] if msg else type(e).__name__))
        raise ExtensionUnavailable(f"building the C++{'/CUDA' if with_cuda else ''} extension {name} failed for "
                                   f"{_running()}: {first.strip()[:300]} (full compiler output: {log_path})") from e
    return so


_emu_ops = None


def _sanitizers():
    """(compiler flags, build-name suffix) for SEQPE_KERNELS_SANITIZE (e.g. "address,undefined"): the C++ CPU
    extension and the CUDA emulator built with gcc's sanitizers, so that an out-of-bounds read or write -- which in
    a CUDA kernel on a GPU reads garbage or faults with an illegal address far from its cause -- is reported at
    the faulting line on CPU. Such builds are CPU-only and need the sanitizer runtime preloaded (python itself is
    not instrumented): .ci/sanitize."""
    want = [s for s in re.split(r"[,\s]+", os.environ.get("SEQPE_KERNELS_SANITIZE", "").strip()) if s]
    bad = [s for s in want if s not in ("address", "undefined")]
    if bad:
        raise ValueError(f"SEQPE_KERNELS_SANITIZE: unknown sanitizer(s) {bad}; choose from address, undefined")
    if not want:
        return [], ""
    flags = [f"-fsanitize={','.join(want)}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-g"]
    if "undefined" in want:  # not part of gcc's -fsanitize=undefined: a float -> int conversion out of range
        flags.insert(1, "-fsanitize=float-cast-overflow")
    return flags, "_san_" + "_".join(sorted(want))


def _require_sanitizer_runtime(flags) -> None:
    """Loading an AddressSanitizer-built library into a python that did not preload the runtime ends the process
    (no exception to catch): refuse before that, saying how to run it."""
    if any("address" in f for f in flags) and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        raise ExtensionUnavailable(
            "SEQPE_KERNELS_SANITIZE=address needs the AddressSanitizer runtime preloaded, e.g. LD_PRELOAD=\"$(gcc "
            "-print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)\" (.ci/sanitize does this), or "
            "unset SEQPE_KERNELS_SANITIZE")


def emulator():
    """torch.ops.seqpe_emu: ops_cuda.cu's kernels and launchers compiled as C++ and run by a CPU emulator of CUDA
    threads, warps and barriers (csrc/emu/cuda_emu.h), on CPU tensors with the CUDA ops' signatures, and the C++
    encoder taking its CUDA paths over them (``encoder``). For tests on machines without a GPU; slow (one fiber
    per CUDA thread), so only for small shapes."""
    global _emu_ops
    with _lock:
        if _emu_ops is None:
            from torch.utils import cpp_extension

            san, _ = _sanitizers()
            _require_sanitizer_runtime(san)
            name = build_name(False).replace("seqpe_ext", "seqpe_emu", 1)
            build_dir = _build_directory(name)
            os.makedirs(build_dir, exist_ok=True)
            # -O1: a quicker build; the emulated kernels only ever run on small test shapes
            with _build_lock(build_dir):
                cpp_extension.load(name=name,
                                   sources=[str(CSRC / "emu" / s) for s in ("ops_cuda_emu.cpp", "encoder_emu.cpp")],
                                   extra_cflags=["-O1", "-Wno-unknown-pragmas", *san, *_version_defines()],
                                   extra_ldflags=san, build_directory=build_dir, is_python_module=False,
                                   verbose=os.environ.get("SEQPE_KERNELS_VERBOSE_BUILD") == "1")
            _emu_ops = torch.ops.seqpe_emu
    return _emu_ops


def _readonly_library(name: str) -> Optional[str]:
    """The library of JIT build ``name`` when its folder cannot be written (a cache shared read-only by a cluster's
    users, or baked into a container image): loaded as it is if built from these sources for this torch / CUDA,
    since nothing can be (re)built there. None when the folder is writable: build (or find up to date) as usual."""
    build_dir = _build_directory(name)
    probe = build_dir
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.access(probe, os.W_OK):
        return None
    so = os.path.join(build_dir, f"{name}.so")
    how = ("point TORCH_EXTENSIONS_DIR at a writable folder (the extension is built there on first use, about a "
           "minute), or rebuild the shared cache")
    if not os.path.exists(so):
        raise ExtensionUnavailable(f"the extension cache {probe} is read-only and holds no {name}.so: {how}")
    cut = _truncated(so)
    if cut:
        raise ExtensionUnavailable(f"the read-only extension cache holds {so}, cut short ({cut}; an interrupted "
                                   f"build or copy): {how}")
    built = _read_build_info(so)
    src, what = _build_fields(built).get("src"), _build_mismatch(built)
    why = (what and f"for another {what} ({built.replace(';', ', ')})") or \
        (src != source_hash() and f"from other sources ({src or 'not recorded'}, these are {source_hash()})")
    if why:
        raise ExtensionUnavailable(f"the read-only extension cache holds {so}, built {why}: {how}")
    torch.ops.load_library(so)
    return so


def _jit_build() -> str:
    from torch.utils import cpp_extension

    with_cuda, cuda_reason = cuda_plan()
    if with_cuda and _sanitizers()[0]:
        with_cuda, cuda_reason = False, "SEQPE_KERNELS_SANITIZE: a sanitized build is CPU-only"
    _info["cuda_reason"] = cuda_reason
    so = _readonly_library(build_name(with_cuda))  # (before the toolchain checks: such a cache needs none)
    if so is not None:
        return so
    cxx = os.environ.get("CXX", "c++")
    if os.environ.get("CXX") and shutil.which(cxx.split()[0]) is None:  # torch compiles with $CXX when it is set
        raise ExtensionUnavailable(f"no C++ compiler: CXX={cxx!r} is not an executable on PATH (torch builds "
                                   "extensions with $CXX): point it at a C++ compiler or unset it")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        raise ExtensionUnavailable(
            f"no C++ compiler found ({cxx!r} / 'g++' not on PATH): install g++ (e.g. apt-get install g++) "
            "or set CXX, or install a prebuilt seqpe_kernels._C")
    if not cpp_extension.is_ninja_available():
        raise ExtensionUnavailable("ninja is not installed (pip install ninja): torch's JIT extension build needs it")
    if with_cuda:
        try:
            return _compile(build_name(True), True)
        except ExtensionUnavailable as e:  # keep the CPU kernels usable: build them alone, say why CUDA is off
            _info["cuda_reason"] = f"the CUDA sources did not build: {e}"
            log.warning("seqpe_kernels: %s; building the C++ CPU part alone", _info["cuda_reason"])
    return _compile(build_name(False), False)


def load():
    """torch.ops.seqpe_ext, loading or building the extension on first use (raises ExtensionUnavailable)."""
    global _ops, _error
    if _ops is not None and not disabled():
        return _ops
    if disabled():
        raise ExtensionUnavailable("the C++/CUDA extension is disabled by SEQPE_KERNELS_NO_EXT=1")
    with _lock:
        if _ops is not None:
            return _ops
        if _error is not None:
            raise ExtensionUnavailable(_error)
        try:
            path = _load_aot()
            if path is not None:
                _info.update(source="prebuilt seqpe_kernels._C", path=path)
                _info.setdefault("cuda_reason", "the prebuilt seqpe_kernels._C has no CUDA kernels "
                                 f"(built for {_read_build_info(path)})")
            else:
                path = _jit_build()
                _info.update(source="JIT build", path=path)
            ops = torch.ops.seqpe_ext
            ops.gelu_new_fwd  # resolves the schema: fails if the library registered nothing
        except ExtensionUnavailable as e:
            _error = str(e)
            raise
        except Exception as e:  # anything unexpected: report, never crash the caller's backend choice
            _error = f"the C++ extension failed to load for {_running()}: {type(e).__name__}: {e}"
            raise ExtensionUnavailable(_error) from e
        _ops = ops
        return _ops


def has_cuda_kernels() -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(PROBE_OP, "CUDA"))
    except Exception:
        return False


def status(device_type: str = "cpu") -> Tuple[bool, str]:
    """(usable, reason) of the extension for tensors of ``device_type``; never raises; cached."""
    if disabled():
        return False, "the C++/CUDA extension is disabled by SEQPE_KERNELS_NO_EXT=1"
    hit = _status.get(device_type)
    if hit is not None:
        return hit
    with _lock:
        try:
            load()
        except Exception as e:
            res = (False, str(e))
        else:
            where = f"{_info.get('source')}: {_info.get('path')}"
            if device_type == "cpu":
                res = (True, f"C++ CPU extension ({where})")
            elif device_type == "cuda":
                if not has_cuda_kernels():
                    res = (False, f"the C++ extension has no CUDA kernels: {_info.get('cuda_reason', 'not built')}")
                elif not torch.cuda.is_available():
                    res = (False, f"the extension has CUDA kernels but no CUDA device is visible to {_running()}")
                else:
                    res = (True, f"CUDA extension ({where})")
            else:
                res = (False, f"the extension has CPU and CUDA kernels only (got {device_type})")
        _status[device_type] = res
        return res


def info() -> Dict[str, object]:
    """How the extension was obtained (after a load): source, path, CUDA build decision."""
    return dict(_info)
