"""The native decode kernels (kernel.c): compiled on first use, called through ctypes.

`kernel()` compiles kernel.c with the system C compiler (`cc -O3 -march=native -fopenmp`, plus any
flags in `$PVQ_CFLAGS`, e.g. `-mno-avx512f` to build for an older CPU) into a cache folder
(`$PVQ_CACHE`, default `~/.cache/pvq`), keyed by a hash of the source and flags, and loads it.
No compiler (or a failed build) gives None and a one-line reason in `kernel_error()`;
callers then decode with torch (exact, slower). `plan(n, k)` serialises the split enumeration of
codec/enumeration.py for the kernel.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from ..codec import enumeration
from ..codec.pyramid import count

SOURCE = Path(__file__).with_name("kernel.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu99"]
_error: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("PVQ_CACHE") or Path.home() / ".cache" / "pvq")


def kernel_error() -> str | None:
    """Why the native kernel is unavailable (None when it loaded or was not tried yet)."""
    return _error


@lru_cache(maxsize=1)
def kernel() -> ctypes.CDLL | None:
    global _error
    if os.environ.get("PVQ_NO_NATIVE"):
        _error = "disabled by PVQ_NO_NATIVE"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _error = "no C compiler (cc/gcc) on PATH"
        return None
    src = SOURCE.read_bytes()
    flags = [*FLAGS, *os.environ.get("PVQ_CFLAGS", "").split()]
    key = hashlib.sha256(src + " ".join([cc, *flags, platform.machine(), platform.node()]).encode()).hexdigest()[:16]
    lib = cache_dir() / f"pvqkernel-{key}.so"
    if not lib.is_file():
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                out = Path(tmp) / lib.name
                p = subprocess.run([cc, *flags, str(SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True)
                if p.returncode != 0:
                    _error = f"{cc} failed on {SOURCE.name}: {(p.stderr.strip().splitlines() or ['?'])[-1]}"
                    return None
                os.replace(out, lib)  # atomic: a half-written library is never loaded
        except OSError as exc:
            _error = f"cannot build the kernel in {lib.parent}: {exc}"
            return None
    try:
        dll = ctypes.CDLL(str(lib))
    except OSError as exc:
        _error = f"cannot load {lib}: {exc}"
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    dll.pvq_decode.argtypes = [p, p, i64, p, i64, i32, i64, i64, i64, p, p, i32, i64, i64, i64, p]
    dll.pvq_gemv.argtypes = [p, p, i64, p, i64, i32, i64, i64, i64, p, p, i32, i64, i64, p, i64, i64, p, i64]
    dll.uni_decode.argtypes = [p, i64, i32, p, p, i64, i64, i64, i64, p]
    dll.uni_gemv.argtypes = [p, i64, i32, p, p, i64, i64, i64, p, i64, i64, p, i64]
    dll.rot_apply.argtypes = [p, p, i64, i64, i64, p, p, i32, p]
    dll.lut_gemv.argtypes = [p, i64, i32, i64, p, p, i64, p, p, i32, i64, i64, p, i64, i64, p, i64]
    dll.lut_decode.argtypes = [p, i64, i32, i64, p, p, i64, p, p, i32, i64, i64, i64, p]
    dll.act_pvq_shapes.argtypes = [p, p, p, i64, i64, i64]
    dll.dense16_gemv.argtypes = [p, i32, i64, i64, p, i64, i64, p, i64]
    dll.pvq_check_codes.argtypes = [p, i64, i32, i64, ctypes.c_uint64, i64]
    dll.pvq_check_codes.restype = i64
    for f in (dll.pvq_decode, dll.pvq_gemv, dll.uni_decode, dll.uni_gemv, dll.rot_apply, dll.lut_gemv, dll.lut_decode,
              dll.act_pvq_shapes, dll.dense16_gemv):
        f.restype = None
    _error = None
    return dll


MAX_N = 64  # kernel.c MAXN: the longest group the kernel decodes into its stack buffer
# A sub-pyramid whose every point (all k' <= K) fits in this many bytes of int8 is decoded from one
# table read instead of its own splits (e.g. P(6, <= 10) of the n=12 setting: 0.77 MiB).
TABLE_NODE_BYTES = 1 << 20
BUCKET_BITS = 10  # the k1 search of a split starts from a table of 2^10 buckets of the index range


def _tabulate(node, K: int) -> tuple[torch.Tensor, list[int]] | None:
    """Every point of P(node.n, k') for k' = 0..K in the split enumeration's own index order, as
    int8 [rows, n], and the first row of each k'; None when that exceeds TABLE_NODE_BYTES."""
    sizes = [count(node.n, kk) for kk in range(K + 1)]
    if sum(sizes) * node.n > TABLE_NODE_BYTES:
        return None
    rows = [enumeration._decode(node, torch.arange(v, dtype=torch.int64), kk) for kk, v in enumerate(sizes)]
    base = [0]
    for v in sizes[:-1]:
        base.append(base[-1] + v)
    return torch.cat(rows).to(torch.int8), base


def _buckets(offs: list[list[int]], total: list[int]) -> tuple[list[int], list[int]]:
    """For each k: the shift that maps an index of [0, total[k]) to one of at most 2^BUCKET_BITS buckets,
    and for each bucket the k1 of its first index (the largest k1 with O(k, k1) <= bucket start)."""
    shifts, starts = [], []
    nb = 1 << BUCKET_BITS
    for kk, row in enumerate(offs):
        sh = max(0, (max(total[kk] - 1, 1)).bit_length() - BUCKET_BITS)
        shifts.append(sh)
        k1 = 0
        for b in range(nb):
            lo = b << sh
            while k1 < kk and row[k1 + 1] <= lo:
                k1 += 1
            starts.append(k1)
    return shifts, starts


@lru_cache(maxsize=32)
def plan(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(plan int64, leaf points int8) for P(n, k), or None where the kernel cannot decode it
    (a leaf needs more than int8, k >= 128, or n > MAX_N): callers then use the torch decoder."""
    if n > MAX_N or k >= 128:
        return None
    words: list[int] = []
    luts: list[torch.Tensor] = []
    lut_len = 0
    where: dict[int, int] = {}

    def leaf(node, d: int, K: int, lut: torch.Tensor, base: list[int]) -> int:
        nonlocal lut_len
        at = len(words)
        words.extend([0, d, K, 0, lut_len])
        words[at + 3] = len(words)
        words.extend(base)
        luts.append(lut.reshape(-1))
        lut_len += lut.numel()
        where[id(node)] = at
        return at

    def emit(node) -> int:
        if id(node) in where:
            return where[id(node)]
        if isinstance(node, enumeration._Leaf):
            if node.lut.dtype != torch.int8:
                raise OverflowError
            return leaf(node, node.d, node.base.numel() - 1, node.lut, node.base.tolist())
        if where:  # a sub-pyramid (never the top: its group index is the code itself) may be one table
            tab = _tabulate(node, node.K)
            if tab is not None:
                return leaf(node, node.n, node.K, *tab)
        at = len(words)
        words.extend([1, node.n, node.n1, node.K, 0, 0, 0, 0, 0, 0])
        where[id(node)] = at
        first = emit(node.first)
        second = emit(node.second)
        words[at + 4], words[at + 5] = first, second
        words[at + 6] = len(words)
        words.extend(node.offs.tolist())
        words[at + 7] = len(words)
        v2 = node.v2.tolist()
        words.extend(v2)
        words[at + 8] = len(words)
        # floor(2^64 / v) as the int64 with the same bits (the kernel reads it unsigned)
        rcp = [(1 << 64) - 1 if v == 1 else (1 << 64) // v for v in v2]
        words.extend(r - (1 << 64) if r >= 1 << 63 else r for r in rcp)
        # bucket tables for the k1 search: shifts [K + 1], then (K + 1) x 2^BUCKET_BITS starting k1
        K = node.K
        flat = node.offs.tolist()
        offs = [flat[kk * (K + 1): kk * (K + 1) + kk + 1] for kk in range(K + 1)]
        shifts, starts = _buckets(offs, [count(node.n, kk) for kk in range(K + 1)])
        words[at + 9] = len(words)
        words.extend(shifts)
        # the starting k1 (< 128) of every bucket as one byte, eight to a word (little-endian)
        starts += [0] * (-len(starts) % 8)
        words.extend(int.from_bytes(bytes(starts[j: j + 8]), "little", signed=True) for j in range(0, len(starts), 8))
        return at

    try:
        top = emit(enumeration._node(n, k))
    except OverflowError:
        return None
    assert top == 0
    # 16 bytes of padding: the kernel reads a leaf row of 6 with one 8-byte load
    return torch.tensor(words, dtype=torch.int64), torch.cat([*luts, torch.zeros(16, dtype=torch.int8)]).contiguous()


LUT_BYTES = 1 << 20  # a full table of P(n, k) is used up to this size (int8 points + float32 norms)


def lut_bytes(n: int, k: int) -> int:
    from ..codec.pyramid import count

    return count(n, k) * (n + 4)


@lru_cache(maxsize=16)
def full_table(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(every point of P(n, k) in index order as int8 [V, n], 1 / ||y|| as float32 [V]), or None when
    it exceeds LUT_BYTES or a coordinate needs more than int8."""
    if k >= 128 or lut_bytes(n, k) > LUT_BYTES:
        return None
    from ..codec import enumeration
    from ..codec.pyramid import count

    y = enumeration.decode(torch.arange(count(n, k), dtype=torch.int64), n, k)
    rinv = (1.0 / y.double().pow(2).sum(1).sqrt()).float()
    return y.to(torch.int8).contiguous(), rinv.contiguous()
