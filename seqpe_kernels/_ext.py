"""Loader of the C++/CUDA extension (csrc/): placeholder until the extension lands."""


def status(device_type: str = "cpu"):
    return False, "the C++/CUDA extension is not built yet in this version of seqpe-kernels"


def load():
    raise RuntimeError(status()[1])
