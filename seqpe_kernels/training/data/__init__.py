"""Embedded, download-free training data for ``seqpe-kernels train`` (see README.md in this folder)."""
from .corpus import CHRONICLE_PATH, generate_chronicle, load_chronicle

__all__ = ["CHRONICLE_PATH", "generate_chronicle", "load_chronicle"]
