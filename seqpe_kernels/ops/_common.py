"""Small helpers shared by the Triton ops: dtype plumbing and launch sizes."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# dtype codes carried through custom-op schemas (schemas cannot carry torch.dtype portably)
DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64}
CODES = {v: k for k, v in DTYPES.items()}


def dtype_code(dt: torch.dtype) -> int:
    if dt not in CODES:
        raise TypeError(f"unsupported dtype {dt}; seqpe_kernels runs float32, float16, bfloat16 and float64")
    return CODES[dt]


def acc_dtype(*tensors):
    """Accumulate in fp64 only for fp64 inputs (gradcheck); fp32 otherwise."""
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def new_seeds(n: int, device) -> torch.Tensor:
    """Per-call Philox seeds drawn from torch's RNG (so torch.manual_seed reproduces a run, and
    torch.compile treats it as a random op instead of baking a constant)."""
    return torch.randint(0, 2 ** 31 - 1, (n,), device=device, dtype=torch.int64)


# which implementation a seqpe:: operator runs: the Triton kernels in this package, or the C++/CUDA
# extension (csrc/, loaded by seqpe_kernels._ext). One schema, one fake, one autograd formula for both.
IMPL_TRITON = 0
IMPL_EXT = 1


def ext_ops():
    from .. import _ext

    return _ext.load()
