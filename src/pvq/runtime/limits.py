"""What the native kernel decodes and how large its tables grow: pure arithmetic on (n, k), no ctypes.

The settings picker asks these questions (does every point of P(n, k) fit one small table?) without
loading the kernel; native.py builds the tables these bounds describe, and passes MAX_N, MAX_K, BUCKET_BITS
and PAD to the C build (as MAXN, MAXK, BUCKET_BITS, TABLE_PAD: native._defines), which has no copy of them.
"""
from __future__ import annotations

from functools import lru_cache

from ..codec.pyramid import count

MAX_N = 64  # the longest group the kernel decodes into its stack buffers
MAX_K = 127  # points are stored as int8
# Tables of points (at most TABLE_BYTES each) are shared by every plan of the process: one per width m,
# holding every point of P(m, k') for k' up to the largest any plan asked for (native.reserve sizes them for
# a whole model at once; a table of smaller K is a prefix of a larger one):
# - leaves (m <= 4): CWRS order (the codec's leaf order); a leaf with more pulses than its table holds is
#   decoded from the CWRS recurrence (rare: P(4, <= 29) fits, a quarter of a group holding 30+ pulses);
# - a sub-pyramid P(m, <= K) (m > 4, e.g. the halves P(6, <= 10) of the n=12 setting) whose every point fits
#   is decoded from one table in the split order instead of its own splits.
# So a model keeps one table per width whatever mix of (n, k) its layers use.
TABLE_BYTES = 2 << 20
BUCKET_BITS = 10  # the k1 search of a split starts from a table of 2^10 buckets of the index range
PAD = 16  # bytes after every table: the kernel reads a row of 6 with one 8-byte load
LUT_BYTES = 1 << 20  # a full table of P(n, k) is used up to this size (int8 points + float32 norms)


@lru_cache(maxsize=None)
def table_cap(m: int) -> int:
    """The largest K whose every point of P(m, <= K) fits TABLE_BYTES (-1: not even P(m, 0))."""
    total, K = 0, -1
    for kk in range(MAX_K + 1):
        total += count(m, kk) * m
        if total > TABLE_BYTES:
            break
        K = kk
    return K


def lut_bytes(n: int, k: int) -> int:
    """Bytes of a full table of P(n, k): int8 points and a float32 1 / ||y|| per point."""
    return count(n, k) * (n + 4)


def full_table_fits(n: int, k: int) -> bool:
    """Whether a matrix of P(n, k) codes decodes from one full table of its points rather than a plan."""
    return k <= MAX_K and lut_bytes(n, k) <= LUT_BYTES
