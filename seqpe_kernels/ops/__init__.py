"""Fused Triton ops, one file each, registered as PyTorch operators under the ``seqpe::`` namespace.

Importing this package needs triton; seqpe_kernels.backend decides whether it is used.
"""
from .attention import tiny_attention, attention_keep_mask  # noqa: F401
from .digit_embed import digit_embed  # noqa: F401
from .gelu import gelu_new  # noqa: F401
from .layernorm import residual_layernorm, dropout_keep_mask  # noqa: F401
