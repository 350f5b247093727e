"""FusedSeqPE placeholder (being written)."""
from .reference import SeqPE


class FusedSeqPE(SeqPE):
    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
