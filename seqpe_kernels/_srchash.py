"""The content hash of csrc/ (no torch import: setup.py loads this file by path).

A built library carries it (``-DSEQPE_SOURCE_HASH``, read back from its build-information marker), so a library
from other sources is never loaded as if it were current: ninja's timestamps miss sources copied with older
times (``tar``, ``rsync -a``, ``cp -p``), and a prebuilt ``seqpe_kernels._C`` is not rebuilt by ``git pull``."""
from __future__ import annotations

import hashlib
from pathlib import Path

SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def source_hash(csrc) -> str:
    """12 hex digits of sha1 over the relative paths and contents of every C++/CUDA source under ``csrc``."""
    root = Path(csrc)
    h = hashlib.sha1()
    for f in sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]
