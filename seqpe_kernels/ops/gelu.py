"""gelu_new (GPT-2's tanh GELU) as one elementwise pass over the c_fc GEMM output.

The bias is added by the GEMM (addmm's cuBLAS epilogue), so this kernel is the activation only: it reads the
[R, 4D] pre-activation once and writes the activation once, where eager PyTorch runs about six kernels with
fp32 temporaries. Computed in fp32 (fp64 for fp64 inputs), stored in the input dtype: under autocast the
next GEMM casts to bf16 anyway, exactly where the reference rounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, cdiv, next_pow2, num_sms, tile_chunks
from .launch import direct

_C = 0.7978845608028654  # sqrt(2/pi)


@triton.jit
def _tanh(u):
    # tanh via exp (no libdevice under the interpreter); saturates correctly at +-inf
    # (clamped: tanh(+-20) is +-1 in fp32 and fp64, and exp never overflows)
    u = tl.minimum(tl.maximum(u, -20.0), 20.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@direct
@triton.jit
def _gelu_fwd(Z, U, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    z = tl.load(Z + offs, mask=m, other=0.0).to(ACC)
    t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
    tl.store(U + offs, (0.5 * z * (1.0 + t)).to(U.dtype.element_ty), mask=m)


@triton.jit
def _dgelu(du, z):
    """du * gelu_new'(z), in the inputs' (accumulation) dtype."""
    t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
    dt = (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    return du * (0.5 * (1.0 + t) + 0.5 * z * dt)


@direct
@triton.jit
def _gelu_bwd(DU, Z, DZ, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    z = tl.load(Z + offs, mask=m, other=0.0).to(ACC)
    du = tl.load(DU + offs, mask=m, other=0.0).to(ACC)
    tl.store(DZ + offs, _dgelu(du, z).to(DZ.dtype.element_ty), mask=m)


@direct
@triton.jit
def _gelu_bwd_db(DU, Z, DZ, PART, R, C, rows_per_prog, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                 ACC: tl.constexpr):
    # dz for rows [pid0 * rows_per_prog, +rows_per_prog) (a multiple of BLOCK_R) x one column block, and the
    # column sums of dz over those rows (the c_fc bias gradient's partials) in the same pass: a [BLOCK_R, BLOCK_C]
    # accumulator summed elementwise per tile (no cross-thread reduction in the loop), reduced over its rows once
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    row0 = pid * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, R)
    for r in range(0, rows_per_prog, BLOCK_R):
        rows = row0 + r + tl.arange(0, BLOCK_R)
        m = (rows < row_end)[:, None] & cm[None, :]
        offs = rows[:, None] * C + cols[None, :]
        z = tl.load(Z + offs, mask=m, other=0.0).to(ACC)
        du = tl.load(DU + offs, mask=m, other=0.0).to(ACC)
        dz = _dgelu(du, z)  # 0 where masked (du = 0)
        tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=m)
        acc += dz
    tl.store(PART + pid * C + cols, tl.sum(acc, 0), mask=cm)


_BLOCK = 1024
_DB_BLOCK_C = 128
_DB_BLOCK_R = 32


def gelu_forward(z: torch.Tensor) -> torch.Tensor:
    z = z.contiguous()
    u = torch.empty_like(z)
    n = z.numel()
    if n:
        _gelu_fwd[(cdiv(n, _BLOCK),)](z, u, n, BLOCK=_BLOCK, ACC=acc_dtype(z), num_warps=4)
    return u


def gelu_backward(du: torch.Tensor, z: torch.Tensor, bias_grad: bool = False):
    """dz = du * gelu_new'(z); with ``bias_grad`` also returns (dz, db): db = dz's column sums over the rows of
    the [R, C] pre-activation (the c_fc bias gradient), accumulated in fp32 (fp64) from the unrounded dz in the
    same pass instead of a second reduction over [R, C] in the GEMM dtype."""
    du = du.contiguous()
    dz = torch.empty_like(z)
    n = z.numel()
    if not bias_grad:
        if n:
            _gelu_bwd[(cdiv(n, _BLOCK),)](du, z, dz, n, BLOCK=_BLOCK, ACC=acc_dtype(z), num_warps=4)
        return dz
    if z.dim() != 2 or not z.is_contiguous():
        raise ValueError("gelu_backward: bias_grad needs a contiguous [R, C] pre-activation")
    R, C = z.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    if n == 0:
        return dz, z.new_zeros((C,), dtype=acc)
    BLOCK_C = min(_DB_BLOCK_C, max(16, next_pow2(C)))
    # a tile of 4096 elements per operand per iteration (8 KB in bf16 / fp16, 16 KB in fp32)
    BLOCK_R = min(_DB_BLOCK_R if z.element_size() <= 2 else _DB_BLOCK_R // 2, next_pow2(R))
    n_col = cdiv(C, BLOCK_C)
    # ~4 programs per SM in all (each with a [BLOCK_R, BLOCK_C] tile of each operand in flight), each walking
    # whole tiles of rows; the [n_prog, C] partials stay small (text-default: 21 x 3072 fp32)
    n_prog, rows_per_prog = tile_chunks(R, BLOCK_R, cdiv(4 * num_sms(z.device), n_col))
    part = z.new_empty((n_prog, C), dtype=acc)
    _gelu_bwd_db[(n_prog, n_col)](du, z, dz, part, R, C, rows_per_prog, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                                  ACC=acc_dtype(z), num_warps=8)
    return dz, part.sum(0)


# ----------------------------------------------------------------------------- PyTorch operators
from torch import Tensor  # noqa: E402

from ._common import IMPL_EXT, backward_op, eager_entry, ext_ops  # noqa: E402


@torch.library.custom_op("seqpe::gelu_new", mutates_args=())
def gelu_new(z: Tensor, impl: int) -> Tensor:
    if impl == IMPL_EXT:
        return ext_ops().gelu_new_fwd(z)
    return gelu_forward(z)


@gelu_new.register_fake
def _(z, impl):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.custom_op("seqpe::gelu_new_backward", mutates_args=())
def gelu_new_bwd(du: Tensor, z: Tensor, impl: int) -> Tensor:
    if impl == IMPL_EXT:
        return ext_ops().gelu_new_bwd(du, z)
    return gelu_backward(du, z.contiguous())


@gelu_new_bwd.register_fake
def _(du, z, impl):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _gelu_setup(ctx, inputs, output):
    ctx.impl = inputs[1]
    ctx.save_for_backward(inputs[0])


def _gelu_backward(ctx, du):
    (z,) = ctx.saved_tensors
    return backward_op(ctx, gelu_new_bwd, du, z, ctx.impl), None


gelu_new.register_autograd(_gelu_backward, setup_context=_gelu_setup)
gelu_new_call = eager_entry(gelu_new, _gelu_setup, _gelu_backward)
