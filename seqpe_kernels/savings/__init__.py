"""Exact savings around the fused encoder: work it need not repeat, and host cost it need not pay.

  cache.py   SeqPECache: a position-embedding cache that cannot go stale (evaluation / inference)
  dedup.py   dedup_forward (identical positions once) and prefix_shared_forward (shared decimal prefixes of
             causal encoders once); exact with dropout off
  graphs.py  GraphedSeqPE: the encoder's forward and backward replayed as CUDA graphs (same results, no
             per-kernel launch cost)
"""
from .cache import SeqPECache  # noqa: F401
from .dedup import dedup_forward, prefix_shared_forward  # noqa: F401
from .graphs import GraphedSeqPE  # noqa: F401
