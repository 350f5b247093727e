"""Small helpers shared by the Triton ops: dtype plumbing and launch sizes."""
from __future__ import annotations

import struct

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


# Host-side integer helpers of the launchers. Triton >= 3.5 makes triton.cdiv / triton.next_power_of_2
# ConstexprFunctions, whose host calls cost ~3 us each (argument unwrapping); a training step made ~60 of them.
def dense(t):
    """``t`` with the dense row-major strides the kernels index with (parameters loaded with
    ``load_state_dict(assign=True)`` from views, or assigned views, have others); a no-op check when it has."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1) (triton.next_power_of_2's value)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def tile_chunks(n: int, block: int, want: int):
    """(chunks, rows per chunk) splitting n rows into at most ``want`` chunks of whole ``block``-row tiles (one
    program per chunk and column block; the chunks' partials are summed in order afterwards). n = 0: (1, 0)."""
    per = cdiv(cdiv(n, max(1, min(cdiv(n, block), want))), block) * block
    return (cdiv(n, per) if n else 1), per


_DROP_SCALES: dict = {}  # (p, fp64?) -> (hi, lo): a few distinct p per run, ~10 lookups per step


def drop_scales(p: float, dtype: torch.dtype):
    """The dropout scale 1 / (1 - p) as the (hi, lo) pair of fp32 kernel scalars whose sum the kernels use.
    Triton passes a Python float as fp32; for fp64 tensors that rounded scale alone is off by up to 6e-8
    relative (measured on an H200: fp64 dropout gradients 2.4e-8 from the fp64 reference); hi + lo, summed in
    fp64 inside the kernel, carries it to 2^-48 relative. Other dtypes get lo = 0: the fp32 scale as before."""
    key = (p, dtype == torch.float64)
    hit = _DROP_SCALES.get(key)
    if hit is None:
        s = 1.0 / (1.0 - p) if p < 1 else 0.0
        f32 = lambda v: struct.unpack("f", struct.pack("f", v))[0]  # noqa: E731  (what the kernel receives)
        hi = f32(s)
        hit = _DROP_SCALES[key] = (hi, f32(s - hi) if key[1] else 0.0)
    return hit


_SMS: dict = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device; 2 on CPU, the interpreter's stand-in)."""
    if device.type != "cuda":
        return 2
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SMS.get(idx)
    if n is None:
        n = _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def new_seeds(n: int, device) -> torch.Tensor:
    """Per-call Philox seeds drawn from torch's RNG (so torch.manual_seed reproduces a run, and
    torch.compile treats it as a random op instead of baking a constant)."""
    return torch.randint(0, 2 ** 31 - 1, (n,), device=device, dtype=torch.int64)


# which implementation a seqpe:: operator runs: the Triton kernels in this package, or the C++/CUDA
# extension (csrc/, loaded by seqpe_kernels._ext). One schema, one fake, one autograd formula for both.
IMPL_TRITON = 0
IMPL_EXT = 1


_EXT_OPS: list = []  # torch.ops.seqpe_ext once loaded: _ext.load() re-checks the environment on every call


def ext_ops():
    if _EXT_OPS:
        return _EXT_OPS[0]
    from .. import _ext

    ops = _ext.load()
    _EXT_OPS.append(ops)
    return ops


def eager_entry(op, setup_context, backward):
    """The callable the fused module uses for a ``seqpe::`` op.

    In eager mode it runs the op's Python body inside a plain ``torch.autograd.Function``: the torch.library
    dispatch around a custom op (schema defaults, redispatch, the generated autograd node, the dynamo-disable
    wrapper) cost more host time than the kernels themselves at small sizes (cProfile of a tiny training
    step on the 2-core dev CPU: ~3 ms of 7.9 ms), and on a GPU the step is host-bound. Under torch.compile /
    export the registered operator runs, so graphs see one opaque op with its fake and autograd formula. The
    same ``setup_context`` / ``backward`` serve both; backward formulas call their backward op through
    ``backward_op`` so the eager path skips the dispatcher there too."""
    body = getattr(op, "_init_fn", None)  # CustomOpDef keeps the undecorated function (torch >= 2.4)
    if body is None:  # pragma: no cover - a torch without it: always dispatch
        return op

    class _Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = body(*args)
            setup_context(ctx, args, out)
            ctx.eager = True
            return out

        @staticmethod
        @torch.autograd.function.once_differentiable  # like the custom op: no double backward
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return _Eager.apply(*args)

    call.__name__ = call.__qualname__ = getattr(op, "_name", "seqpe_op")
    return call


def backward_op(ctx, op, *args):
    """Run a backward ``seqpe::`` op: its Python body when the forward ran through ``eager_entry``."""
    if getattr(ctx, "eager", False):
        return op._init_fn(*args)
    return op(*args)
