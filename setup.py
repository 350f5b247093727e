"""setup.py exists for the optional ahead-of-time C++/CUDA extension build (issue 4).

A plain `pip install .` builds nothing native: the Triton kernels are JIT-compiled at first use.
`SEQPE_KERNELS_BUILD_EXT=1 pip install .` will compile csrc/ once that backend lands.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("SEQPE_KERNELS_BUILD_EXT", "0") == "1":
    raise SystemExit("SEQPE_KERNELS_BUILD_EXT=1: the C++/CUDA extension is not part of this release yet "
                     "(csrc/ is empty); install without it to use the Triton and PyTorch backends")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
