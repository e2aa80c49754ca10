"""Dense bit packing of fixed-width codes: G codes of B bits take exactly ceil(G*B / 8) bytes.

Codes are laid out least-significant bit first, one after another with no padding between them
(the stream is a little-endian bit string), so no bit is spent on alignment except the final
partial byte. Mixed-radix codes (`mixed_radix_width`) let a group's shape index and its gain
index share one B-bit code whose radix V * L sits just under 2**B, so nothing is wasted on
rounding log2 V up to a whole bit either.
"""
from __future__ import annotations

import math

import numpy as np
import torch

MAX_WIDTH = 63  # codes are non-negative int64


def packed_nbytes(count: int, width: int) -> int:
    """Bytes used by `count` codes of `width` bits."""
    return (count * width + 7) // 8


def _check_width(width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"code width must be an integer in [1, {MAX_WIDTH}] bits, got {width!r}")


# integer dtypes codes may come in, by the widths they hold: a b-bit grid's levels need not take 8 bytes each
CODE_DTYPES = ((8, torch.uint8), (15, torch.int16), (31, torch.int32), (MAX_WIDTH, torch.int64))


def code_dtype(width: int) -> torch.dtype:
    """The smallest integer dtype holding codes of `width` bits."""
    _check_width(width)
    return next(d for w, d in CODE_DTYPES if width <= w)


def pack(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integer codes[G] (each < 2**width; any of CODE_DTYPES) into a uint8 tensor of
    ceil(G*width/8) bytes."""
    _check_width(width)
    if not isinstance(codes, torch.Tensor) or codes.dtype not in {d for _, d in CODE_DTYPES}:
        raise ValueError(f"pack expects an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >> width):
        raise ValueError(f"pack: codes must lie in [0, 2^{width})")
    src = flat.numpy()
    out = np.empty(packed_nbytes(src.shape[0], width), dtype=np.uint8)
    step = 1 << 18  # codes per slice: bounds the 64-byte-per-code bit matrix
    for s in range(0, src.shape[0], step):
        le = src[s : s + step].astype("<u8")  # a slice at a time: narrow codes are widened only here
        # a multiple of 8 codes per slice starts every slice on a byte of the stream, so each is packed alone
        bits = np.unpackbits(le.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        part = np.packbits(bits[:, :width].reshape(-1), bitorder="little")
        out[s * width // 8 : s * width // 8 + part.shape[0]] = part
    return torch.from_numpy(out)


def unpack(stream: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """Inverse of `pack`: `count` int64 codes of `width` bits from a uint8 stream."""
    return unpack_range(stream, count, 0, count, width)


def unpack_range(stream: torch.Tensor, total: int, start: int, count: int, width: int) -> torch.Tensor:
    """Codes [start, start + count) of a stream of `total` codes of `width` bits (int64)."""
    _check_width(width)
    if not isinstance(stream, torch.Tensor) or stream.dtype != torch.uint8:
        raise ValueError(f"unpack expects a uint8 tensor, got {getattr(stream, 'dtype', type(stream))}")
    need = packed_nbytes(total, width)
    if stream.numel() != need:
        raise ValueError(f"unpack: stream has {stream.numel()} bytes, {total} codes of {width} bits need {need}")
    if not 0 <= start <= start + count <= total:
        raise ValueError(f"unpack: codes [{start}, {start + count}) are not within the stream's {total}")
    raw = stream.numpy()
    first = start - start % 8  # a multiple of 8 codes starts on a byte of the stream
    out = np.empty(start + count - first, dtype=np.int64)  # the codes are < 2**63: written straight
    step = 1 << 18  # multiple of 8: every slice starts on a byte boundary
    for s in range(0, out.shape[0], step):
        c = min(step, out.shape[0] - s)
        b0 = (first + s) * width // 8
        bits = np.unpackbits(raw[b0 : b0 + packed_nbytes(c, width)], count=c * width, bitorder="little")
        full = np.zeros((c, 64), dtype=np.uint8)
        full[:, :width] = bits.reshape(c, width)
        out[s : s + c] = np.packbits(full, axis=1, bitorder="little").view("<u8").reshape(-1)
    return torch.from_numpy(out[start - first:])


def mixed_radix_width(radix: int) -> int:
    """Bits of one code whose values lie in [0, radix): ceil(log2 radix) (at least 1)."""
    if radix < 1:
        raise ValueError(f"radix must be >= 1, got {radix}")
    return max(1, (radix - 1).bit_length())


def waste_bits(radix: int) -> float:
    """Bits per code lost to rounding log2(radix) up to a whole number of bits."""
    return mixed_radix_width(radix) - math.log2(radix)
