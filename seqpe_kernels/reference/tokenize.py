"""Position -> digit sequence (SEQPE_SPEC §1), vectorised.

The authors build digit strings with Python loops per position; here it is a handful of tensor ops on
the positions' own device. Left padding with the digit 0, axes concatenated in order (row first).
"""
from __future__ import annotations

import torch

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64) + tuple(
    getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))
_UINT64 = getattr(torch, "uint64", None)


def max_digits_for(max_position: int, data_dim: int = 1, base: int = 10) -> int:
    """K as the reference derives it from ``pe_max_position`` (SEQPE_SPEC §1.2).

    1-D: digits of (max_position - 1); 2-D: digits of (floor(sqrt(max_position)) - 1). Like the reference,
    the count is in decimal for base 10; other bases count in that base.
    """
    if max_position < 1:
        raise ValueError(f"max_position must be >= 1, got {max_position}")
    if data_dim == 1:
        top = max_position - 1
    elif data_dim == 2:
        import math

        top = math.isqrt(max_position) - 1
    else:
        raise ValueError("max_digits_for follows the reference only for data_dim 1 or 2; pass max_digits explicitly")
    return num_digits(top, base)


def num_digits(value: int, base: int = 10) -> int:
    """Number of base-`base` digits of a non-negative integer (0 has one digit)."""
    if value < 0:
        raise ValueError(f"value must be non-negative, got {value}")
    n = 1
    while value >= base:
        value //= base
        n += 1
    return n


def check_positions(positions: torch.Tensor, max_digits: int, base: int = 10, data_dim: int | None = None,
                    check_range: bool = True) -> torch.Tensor:
    """Validate and normalise positions to int64 ``[M, d]``. Raises with the reason on bad input."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor of integers, got {type(positions).__name__}")
    if positions.layout != torch.strided:
        raise TypeError(f"positions must be a dense tensor, got layout {positions.layout} (call .to_dense())")
    if check_range and positions.device.type == "meta":
        raise TypeError("positions on the meta device have no values to check (check_range=False for shapes only)")
    if type(base) is not int or type(max_digits) is not int:  # (the encoder's own ints: no further look)
        for name, v in (("base", base), ("max_digits", max_digits)):
            if isinstance(v, bool) or not hasattr(v, "__index__"):
                raise TypeError(f"{name} must be an integer, got {v!r} ({type(v).__name__})")
    if positions.dtype not in _INT_DTYPES:
        raise TypeError(f"positions must have an integer dtype, got {positions.dtype} "
                        "(positions are indices: convert with .long() only if the values are whole numbers)")
    if base < 2:
        raise ValueError(f"base must be >= 2, got {base}")
    if max_digits < 1:
        raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    if base ** max_digits > 2 ** 62:
        raise ValueError(f"base**max_digits = {base}**{max_digits} does not fit in int64")
    if positions.dim() == 1:
        positions = positions.unsqueeze(1)
    elif positions.dim() != 2:
        raise ValueError(f"positions must have shape [M] or [M, d], got {tuple(positions.shape)}")
    if positions.shape[1] == 0:  # (else M rows of zero digits: the encoder would run on the CLS token alone)
        raise ValueError(f"positions of shape {tuple(positions.shape)} have no coordinates: expected [M] or [M, d] "
                         "with d >= 1")
    if data_dim is not None and positions.shape[1] != data_dim:
        raise ValueError(f"positions have {positions.shape[1]} coordinate(s) per row but the encoder has "
                         f"data_dim={data_dim}: expected shape [M] (1-D only) or [M, {data_dim}]")
    unsigned64 = False
    if positions.dtype != torch.int64:  # .long() of an int64 tensor is still a dispatcher call
        unsigned64 = positions.dtype == _UINT64  # (values >= 2**63 wrap negative: reported as out of range below)
        positions = positions.long()
    if check_range and (torch.compiler.is_compiling() or
                        (positions.is_cuda and torch.cuda.is_current_stream_capturing())):
        # no host sync inside a compiled graph or a CUDA-graph capture: the same check as an on-device assert
        torch._assert_async(((positions >= 0) & (positions < base ** max_digits)).all(),
                            f"positions must lie in [0, {base ** max_digits}) (max_digits={max_digits}, base={base})")
    elif check_range and positions.numel() > 0:
        # one device-to-host read for both bounds (two int() calls would be two syncs on a GPU); switch the
        # check off with check_range=False on hot paths
        lo, hi = torch.stack(torch.aminmax(positions)).tolist()
        if lo < 0 and unsigned64:
            raise ValueError(f"a uint64 position is >= 2**63, outside the encodable range 0..{base ** max_digits - 1}")
        if lo < 0:
            raise ValueError(f"positions must be non-negative, got minimum {lo}")
        if hi >= base ** max_digits:
            raise ValueError(f"position {hi} needs more than max_digits={max_digits} base-{base} digits "
                             f"(encodable range is 0..{base ** max_digits - 1} per axis)")
    return positions


def tokenize(positions: torch.Tensor, max_digits: int, base: int = 10, data_dim: int | None = None,
             check_range: bool = True):
    """Integer positions ``[M]`` or ``[M, d]`` -> ``(digits [M, d*K] int64, pad_mask [M, d*K] float32)``.

    ``digits`` is the zero-padded fixed-width base-`base` string of each coordinate, axes concatenated;
    ``pad_mask`` is 1 on real digits and 0 on the left padding (position 0 has one real digit).
    """
    pos = check_positions(positions, max_digits, base, data_dim, check_range)
    K = max_digits
    pows = base ** torch.arange(K - 1, -1, -1, device=pos.device, dtype=torch.int64)  # [K]
    digits = torch.div(pos.unsqueeze(-1), pows, rounding_mode="floor") % base  # [M, d, K]
    # number of real digits n = 1 + #{k >= 1 : p >= base^k}; real digits are the last n slots
    n_real = 1 + (pos.unsqueeze(-1) >= pows[:-1].flip(0)).sum(-1) if K > 1 else torch.ones_like(pos)
    slot = torch.arange(K, device=pos.device)
    pad_mask = (slot >= (K - n_real).unsqueeze(-1)).to(torch.float32)
    M, d = pos.shape
    return digits.reshape(M, d * K), pad_mask.reshape(M, d * K)


def prepare_seqpe_data(raw_pos_list, max_digits: int, device=None, pad_value: int = 0, is_left_padding: bool = True,
                       *, base: int = 10, check_range: bool = True):
    """Vectorised drop-in for the authors' ``PeUtils.prepare_seqpe_data`` (same arguments, same outputs).

    ``raw_pos_list``: integer positions -- a list of ints (1-D) or of tuples (n-D, row first), a numpy array, or a
    tensor ``[M]`` / ``[M, d]`` (kept on its device). Returns ``(digits int64 [M, d*K], pad_mask float32
    [M, d*K])`` on ``device`` (default: the positions' device; CPU for Python lists): each axis's decimal digits,
    padded to ``max_digits`` with ``pad_value`` (left padding by default, as every call site of the authors' code
    uses), axes concatenated; pad_mask is 1 on real digits. A few tensor ops instead of a Python string loop per
    position. Unlike the original (ragged lists, then an opaque error), a position with more than ``max_digits``
    digits or a negative one raises with the reason.

    Swap it in with one line: ``PeUtils.prepare_seqpe_data = staticmethod(seqpe_kernels.prepare_seqpe_data)``.
    """
    pos = _as_positions(raw_pos_list, device)
    digits, mask = tokenize(pos, max_digits, base, None, check_range)
    if is_left_padding and pad_value == 0:
        return digits, mask
    M = digits.shape[0]
    K = max_digits
    dig = digits.view(M, -1, K)
    n = mask.view(M, -1, K).sum(-1, keepdim=True).long()          # real digits per axis
    slot = torch.arange(K, device=digits.device)
    if is_left_padding:
        real = slot >= (K - n)
    else:  # real digits first, then the padding
        idx = (slot + (K - n)).clamp(max=K - 1)
        dig = torch.gather(dig, -1, idx)
        real = slot < n
    dig = torch.where(real, dig, torch.full_like(dig, pad_value))
    return dig.reshape(M, -1), real.to(torch.float32).reshape(M, -1)


def _signed_ints(raw: list):
    """``raw`` (a list of ints, or of int tuples) as an int tensor through numpy (~3.5x faster than torch.tensor on
    2-D tuples: the data side of a ViT step), or None where numpy gives anything but signed integers (floats,
    bools, ragged rows, ints past int64, no numpy): torch.tensor then decides the dtype or the error."""
    try:
        import numpy as np

        arr = np.asarray(raw)
    except (ImportError, TypeError, ValueError, OverflowError, RuntimeError):
        return None
    return torch.from_numpy(arr) if arr.dtype.kind == "i" else None


def _as_positions(raw, device) -> torch.Tensor:
    if not isinstance(raw, torch.Tensor):
        try:
            import numpy as np

            if isinstance(raw, np.ndarray):
                raw = torch.from_numpy(raw)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(raw, torch.Tensor):
        pos = raw
    else:
        raw = list(raw)
        pos = _signed_ints(raw) if raw else torch.empty(0, dtype=torch.int64)
        if pos is None:
            try:  # dtype inferred, not forced: int64 would truncate 1.5 to 1 (check_positions refuses floats)
                pos = torch.tensor(raw)
            except (TypeError, ValueError, RuntimeError, OverflowError) as e:
                raise TypeError(f"positions must be non-negative integers (a list of ints, or of tuples of ints "
                                f"for n-D), got {raw[:4]!r}{' ...' if len(raw) > 4 else ''}: {e}") from None
    if device is not None:
        pos = pos.to(device)
    return pos
