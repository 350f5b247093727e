"""seqpe-kernels: fused kernels for SeqPE (sequential position encoding).

Public API:
  tokenize(positions, max_digits, base=10)   -> (digits, pad_mask)
  SeqPE(...)                                   reference encoder (authors' state-dict layout)
  FusedSeqPE(..., backend="auto")              same module, fused forward/backward
  load_checkpoint(path, ...)                   the authors' image .pth / text model_1.safetensors
  save_checkpoint(module, path)                their layouts, with the full configuration recorded
  max_digits_for(max_position, data_dim=1)    K as the authors derive it from pe_max_position
  available_backends(device=None)              {backend: (usable, why)} on a device
  SeqPECache(module)                           never-stale PE cache for evaluation / inference
  dedup_forward / prefix_shared_forward        exact deduplication (dropout off)
  GraphedSeqPE(module)                         CUDA-graph replay of the encoder's forward + backward
  patch(pe_model) / unpatch(pe_model)          run an existing SeqPE encoder (the authors' SequentialPE) fused, in place
  prepare_seqpe_data(positions, max_digits)    vectorised drop-in for the authors' PeUtils.prepare_seqpe_data
"""
from .reference import SeqPE, tokenize, max_digits_for
from .fused import FusedSeqPE
from .backend import available_backends
from .checkpoint import load_checkpoint, save_checkpoint
from .savings import GraphedSeqPE, SeqPECache, dedup_forward, prefix_shared_forward
from .savings.graphs import GraphReplayError  # what GraphedSeqPE raises instead of replaying garbage
from .patch import patch, unpatch, prepare_seqpe_data  # binds seqpe_kernels.patch to the function (see patch.py)

__version__ = "0.1.0"
__all__ = ["SeqPE", "FusedSeqPE", "tokenize", "max_digits_for", "load_checkpoint", "save_checkpoint",
           "available_backends", "SeqPECache", "dedup_forward", "prefix_shared_forward", "GraphedSeqPE",
           "GraphReplayError", "patch", "unpatch", "prepare_seqpe_data", "__version__"]
