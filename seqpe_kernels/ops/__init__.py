"""Fused Triton ops, one file each, registered as PyTorch operators under the ``seqpe::`` namespace.

Importing this package needs triton; seqpe_kernels.backend decides whether it is used. ``<op>_call`` is what
the fused module calls: the op's body in eager mode, the registered operator under torch.compile (_common.py).
"""
from .attention import tiny_attention, tiny_attention_call, attention_keep_mask  # noqa: F401
from .digit_embed import digit_embed, digit_embed_call  # noqa: F401
from .gelu import gelu_new, gelu_new_call  # noqa: F401
from .layernorm import residual_layernorm, residual_layernorm_call, dropout_keep_mask  # noqa: F401
