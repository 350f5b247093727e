"""Reference (eager PyTorch) implementations: the parity target of every fused path."""
from .seqpe import SeqPE, Conv1D, attention_mask, gelu_new
from .tokenize import tokenize, max_digits_for, num_digits, check_positions, prepare_seqpe_data

__all__ = ["SeqPE", "Conv1D", "attention_mask", "gelu_new", "tokenize", "max_digits_for", "num_digits",
           "check_positions", "prepare_seqpe_data"]
