"""The native decode kernels (kernel.c and kernel/): compiled on first use, called through ctypes.

`kernel()` compiles kernel.c (one translation unit that includes every family of kernels in kernel/; kernel/pvq.h
lists them) with the system C compiler (`cc -O3 -march=native -fopenmp`, plus any flags in `$PVQ_CFLAGS`, e.g.
`-mno-avx512f` to build for an older CPU) into a cache folder (`$PVQ_CACHE`, default `~/.cache/pvq`), keyed by
a hash of every source file and the flags, and loads it. No compiler (or a failed build, or a library whose
ABI differs from this module's) gives None and a one-line reason in `kernel_error()`; callers then decode with
torch (exact, slower).

The interface is written once on each side: the C header declares the structs and entry points, and this
module holds their ctypes mirror (`Matrix`, `Rotation`, `Linear`, `ENTRIES`), checked at load against the
library's `pvq_abi_version()` and `pvq_struct_size()`. The numbers both sides share (the plan's node layout
`LEAF` / `SPLIT`, the limits of runtime/limits.py, the matrix kinds, the struct ids) are defined here and reach
the C build as -D flags (`_defines`). `plan(n, k)` serialises the split enumeration of codec/enumeration.py
(its public `tree`) for the kernel; its tables of points are shared by every plan.
"""
from __future__ import annotations

import ctypes
import enum
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..codec import enumeration
from ..codec.pyramid import count
from ..codec.search import accelerate
from .limits import BUCKET_BITS, MAX_K, MAX_N, PAD, full_table_fits, table_cap

UNITY = Path(__file__).with_name("kernel.c")  # the one file compiled: it includes every file of kernel/
SOURCES = [UNITY, *sorted(UNITY.with_suffix("").glob("*.[ch]"))]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu99"]
_error: str | None = None

# The plan's node layouts, word by word (Plan documents the fields): plan() writes the nodes with them and the
# kernel reads them by name (word i of a leaf is LEAF_<NAME> = i in C).
LEAF = ("kind", "d", "K", "Kt", "base", "lut", "u", "ustride", "mask")
SPLIT = ("kind", "n", "n1", "K", "first", "second", "offs_at", "v2_at", "rcp_at", "bucket_at")
NODE_LEAF, NODE_SPLIT = 0, 1  # the word `kind` of a node


class MatrixKind(enum.IntEnum):
    """Matrix.kind: how the kernel decodes a packed matrix."""

    PLAN = 0  # PVQ by a Plan
    LUT = 1  # PVQ from a full table of P(n, k) (full_table)
    UNIFORM = 2  # the uniform grid


_P, _I32, _I64, _U64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64


def _fields(ctype, names: str) -> list:
    return [(name, ctype) for name in names.split()]


class Matrix(ctypes.Structure):
    """kernel/pvq.h pvq_matrix_t: one packed matrix, as Decoder builds it (the pointers point into tensors the
    builder keeps alive)."""

    _fields_ = (_fields(_I64, "kind rows cols") + _fields(_P, "codes") + _fields(_I64, "nbytes width L n k per_row")
                + _fields(_P, "levels scales plan lut lut_rinv uscale uoffset") + _fields(_I64, "group_size"))


class Rotation(ctypes.Structure):
    """kernel/pvq.h pvq_rotation_t: a randomized Hadamard (decode.rotation_args); m = 0: none."""

    _fields_ = _fields(_I64, "m p") + _fields(_P, "signs small")


class Linear(ctypes.Structure):
    """kernel/pvq.h pvq_linear_t: one quantized linear layer for pvq_linear (decode.FusedLinear)."""

    _fields_ = [("w", Matrix), ("r_in", Rotation), ("r_out", Rotation), ("bias", _P)]


ABI_VERSION = 2  # kernel/pvq.h PVQ_ABI_VERSION: both change with any struct or entry point
STRUCTS = {"matrix": Matrix, "rotation": Rotation, "linear": Linear}  # pvq_struct_size(i) is the i-th one's size
_M, _R, _L = (ctypes.POINTER(s) for s in (Matrix, Rotation, Linear))
ENTRIES = {  # name: (restype, argtypes), as kernel/pvq.h declares them
    "pvq_abi_version": (_I64, []),
    "pvq_struct_size": (_I64, [_I64]),
    "pvq_check_codes": (_I64, [_M, _U64]),
    "pvq_decode": (None, [_M, _I64, _I64, _P]),
    "pvq_gemv": (None, [_M, _P, _I64, _I64, _P, _I64]),
    "pvq_linear": (None, [_L, _P, _P, _I64, _P]),
    "rot_apply": (None, [_R, _P, _P, _I64, _I32, _P]),
    "act_pvq_shapes": (None, [_P, _P, _P, _I64, _I64, _I64]),
    "pvq_search": (None, [_P, _P, _I64, _I64, _I64, _I64]),
    "dense16_gemv": (None, [_P, _I32, _I64, _I64, _P, _I64, _I64, _P, _I64]),
    "pvq_set_threads": (None, [_I32]),
}


def _defines() -> list[str]:
    """The numbers the C build shares with Python, as -D flags: defined once, here and in runtime/limits.py."""
    assert LEAF.index("kind") == SPLIT.index("kind")
    names = {"MAXN": MAX_N, "MAXK": MAX_K, "BUCKET_BITS": BUCKET_BITS, "TABLE_PAD": PAD,
             "NODE_KIND": LEAF.index("kind"), "NODE_LEAF": NODE_LEAF, "NODE_SPLIT": NODE_SPLIT,
             **{f"LEAF_{f.upper()}": i for i, f in enumerate(LEAF)},
             **{f"SPLIT_{f.upper()}": i for i, f in enumerate(SPLIT)},
             **{f"MATRIX_{kind.name}": int(kind) for kind in MatrixKind},
             **{f"STRUCT_{name.upper()}": i for i, name in enumerate(STRUCTS)}}
    return [f"-D{name}={value}" for name, value in names.items()]


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
    flags = [*FLAGS, *_defines(), *os.environ.get("PVQ_CFLAGS", "").split()]
    key = hashlib.sha256()
    for path in SOURCES:
        text = path.read_bytes()
        key.update(f"{path.name}:{len(text)}:".encode() + text)
    key.update(" ".join([cc, *flags, platform.machine(), platform.node()]).encode())
    lib = cache_dir() / f"pvqkernel-{key.hexdigest()[:16]}.so"
    if not lib.is_file():
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                out = Path(tmp) / lib.name
                p = subprocess.run([cc, *flags, str(UNITY), "-o", str(out), "-lm"], capture_output=True, text=True)
                if p.returncode != 0:
                    _error = f"{cc} failed on {UNITY.name}: {(p.stderr.strip().splitlines() or ['?'])[-1]}"
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
    _error = _bind(dll)
    if _error is not None:
        _error = f"refused {lib}: {_error}"
        return None
    return dll


def _bind(dll: ctypes.CDLL) -> str | None:
    """Give every entry point its ctypes signature (ENTRIES) and check that the library's ABI version and
    struct sizes are this module's: None when they are, else the difference in words."""
    missing = [name for name in ENTRIES if not hasattr(dll, name)]
    if "pvq_abi_version" in missing:
        return "it has no pvq_abi_version"
    for name, (restype, argtypes) in ENTRIES.items():
        if name not in missing:
            f = getattr(dll, name)
            f.restype, f.argtypes = restype, argtypes
    version = dll.pvq_abi_version()
    if version != ABI_VERSION:
        return f"its ABI version is {version}, this pvq's {ABI_VERSION}"
    if missing:
        return f"it lacks {', '.join(missing)}"
    for i, (name, struct) in enumerate(STRUCTS.items()):
        size = dll.pvq_struct_size(i)
        if size != ctypes.sizeof(struct):
            return f"its struct {name} is {size} bytes, native.{struct.__name__} {ctypes.sizeof(struct)}"
    return None


@dataclass(frozen=True, eq=False)
class Plan:
    """The serialised enumeration of P(n, k) for the kernel: `words` (int64 nodes, the top one at word 0) and
    the shared tables its leaves point into by address (kept alive here). The one description of the layout
    (the kernel reads the words by the names of LEAF and SPLIT):

    leaf (LEAF, kind = NODE_LEAF): P(d, k) for k <= K. Point j of P(d, k) is row base[k] + j of the int8 table
        lut [rows, d] for k <= Kt, the most pulses the shared table of width d holds (table(): at most
        TABLE_BYTES, limits.table_cap); beyond, it is decoded from the CWRS table u [(d + 1) x ustride] (the
        codec's leaf order). u = 0 for a sub-pyramid tabulated in the split order (Kt = K). base[k] = mask[k]
        = 0 for k > Kt (row 0, all zeros: the fixed layouts flag those groups and decode them apart), mask[k]
        = -1 (all ones) below. base, lut, u, mask are addresses.
    split (SPLIT, kind = NODE_SPLIT): P(n, k) for k <= K as halves of n1 and n2 = n - n1 coordinates, the
        nodes at words `first` and `second` (one node when n1 = n2):
        index = O(k, k1) + a * V(n2, k - k1) + b, O(k, .) = words[offs_at + k * (K + 1) + .],
        V(n2, j) = words[v2_at + j], and words[rcp_at + j] = floor(2^64 / V(n2, j)) (2^64 - 1 for V = 1, read
        unsigned) turns the division into a multiply; bucket_at: shifts [K + 1], then for each k
        2^BUCKET_BITS starting values of the k1 search as bytes, eight to a word (bucket index >> shift[k]:
        the largest k1 with O(k, k1) <= the bucket's first index)."""

    words: torch.Tensor
    tables: tuple

    def nbytes(self) -> int:
        return self.words.numel() * 8


_TABLES: dict[int, tuple] = {}
_LOCK = threading.Lock()


def table(m: int, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(points int8 [rows * m + PAD], base int64 [MAX_K + 1], mask int64 [MAX_K + 1], CWRS table int64
    [(m + 1) * (MAX_K + 2)] or None, Kt): the shared table of width m, holding P(m, k') for k' <= Kt with
    Kt >= min(K, table_cap(m)) (grown when a plan needs more). CWRS order for m <= 4 (leaves), the split
    enumeration's order above (its index order for any K >= k'). base[k] = mask[k] = 0 beyond Kt."""
    K = min(K, table_cap(m))
    with _LOCK:
        t = _TABLES.get(m)
        if t is None or t[4] < K:
            t = _TABLES[m] = _build_table(m, K)
        return t


def _build_table(m: int, K: int) -> tuple:
    from ..codec.pyramid import u_table

    node = enumeration.tree(m, K)
    u = None
    if m <= 4:
        assert isinstance(node, enumeration.Leaf)
        pts, base = node.lut.to(torch.int8).reshape(-1), node.base.tolist()
        u = u_table(m, MAX_K).reshape(-1).contiguous()
    else:
        sizes = [count(m, kk) for kk in range(K + 1)]
        rows = [enumeration.decode_node(node, torch.arange(v, dtype=torch.int64), kk) for kk, v in enumerate(sizes)]
        pts = torch.cat(rows).to(torch.int8).reshape(-1)
        base = [sum(sizes[:kk]) for kk in range(K + 1)]
    pad = MAX_K + 1 - len(base)
    return (torch.cat([pts, torch.zeros(PAD, dtype=torch.int8)]),
            torch.tensor(base + [0] * pad, dtype=torch.int64),
            torch.tensor([-1] * len(base) + [0] * pad, dtype=torch.int64), u, K)


def _tabulated(node, top: bool) -> tuple[int, int] | None:
    """(width m, pulses K) of the table a plan node is read from, or None for a split node decoded by its
    splits: every leaf (CWRS order); a sub-pyramid whose every point fits (split order; never the top, whose
    group index is the code itself, and never a width <= 4, whose table is the CWRS-ordered leaf table)."""
    if isinstance(node, enumeration.Leaf):
        return node.d, node.K
    if not top and node.n > 4 and node.K <= table_cap(node.n):
        return node.n, node.K
    return None


def _tables_of(node, out: dict[int, int], top: bool = True) -> None:
    """width -> largest K of the tables plan() will point at for this node."""
    tab = _tabulated(node, top)
    if tab is not None:
        m, K = tab
        out[m] = max(out.get(m, -1), min(K, table_cap(m)))
    else:
        _tables_of(node.first, out, False)
        _tables_of(node.second, out, False)


def reserve(settings) -> None:
    """Build the shared tables once at the size every (n, k) in `settings` needs (call before the plans of a
    model: built in layer order, a small table and then a larger one would both stay resident)."""
    need: dict[int, int] = {}
    for n, k in set(settings):
        if n <= MAX_N and k <= MAX_K and not full_table_fits(n, k):
            _tables_of(enumeration.tree(n, k), need)
    for m, K in need.items():
        table(m, K)


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
def plan(n: int, k: int) -> Plan | None:
    """The kernel's plan for P(n, k), or None where the kernel cannot decode it (k > MAX_K or n > MAX_N):
    callers then use the torch decoder."""
    if n > MAX_N or k > MAX_K:
        return None
    words: list[int] = []
    tables: list[torch.Tensor] = []
    where: dict[int, int] = {}

    def node_at(layout: tuple[str, ...], **fields: int) -> int:
        """Append a node's words (fields named by its layout, the unnamed ones 0 to be filled in): its word."""
        assert fields.keys() <= set(layout)
        at = len(words)
        words.extend(fields.get(name, 0) for name in layout)
        return at

    def leaf(node, d: int, K: int, Kt: int, lut: torch.Tensor, base: torch.Tensor, mask: torch.Tensor,
             u: torch.Tensor | None) -> int:
        at = where[id(node)] = node_at(LEAF, kind=NODE_LEAF, d=d, K=K, Kt=Kt, base=base.data_ptr(), lut=lut.data_ptr(),
                                       u=0 if u is None else u.data_ptr(), ustride=MAX_K + 2, mask=mask.data_ptr())
        tables.extend(t for t in (base, lut, u, mask) if t is not None)
        return at

    def emit(node) -> int:
        if id(node) in where:
            return where[id(node)]
        tab = _tabulated(node, top=not where)
        if tab is not None:  # a split-order table always holds its K; a leaf past its table decodes by CWRS
            m, K = tab
            lut, base, mask, u, Kt = table(m, K)
            return leaf(node, m, K, min(K, Kt), lut, base, mask, u)
        at = where[id(node)] = node_at(SPLIT, kind=NODE_SPLIT, n=node.n, n1=node.n1, K=node.K)

        def put(name: str, value: int) -> None:
            words[at + SPLIT.index(name)] = value

        put("first", emit(node.first))
        put("second", emit(node.second))
        put("offs_at", len(words))
        words.extend(node.offs.tolist())
        put("v2_at", len(words))
        v2 = node.v2.tolist()
        words.extend(v2)
        put("rcp_at", len(words))
        # floor(2^64 / v) as the int64 with the same bits (the kernel reads it unsigned)
        rcp = [(1 << 64) - 1 if v == 1 else (1 << 64) // v for v in v2]
        words.extend(r - (1 << 64) if r >= 1 << 63 else r for r in rcp)
        # bucket tables for the k1 search: shifts [K + 1], then (K + 1) x 2^BUCKET_BITS starting k1
        K = node.K
        flat = node.offs.tolist()
        offs = [flat[kk * (K + 1): kk * (K + 1) + kk + 1] for kk in range(K + 1)]
        shifts, starts = _buckets(offs, [count(node.n, kk) for kk in range(K + 1)])
        put("bucket_at", len(words))
        words.extend(shifts)
        # the starting k1 (<= MAX_K) of every bucket as one byte, eight to a word (little-endian)
        starts += [0] * (-len(starts) % 8)
        words.extend(int.from_bytes(bytes(starts[j: j + 8]), "little", signed=True) for j in range(0, len(starts), 8))
        return at

    top = emit(enumeration.tree(n, k))
    assert top == 0
    unique = {id(t): t for t in tables}
    return Plan(torch.tensor(words, dtype=torch.int64), tuple(unique.values()))


@lru_cache(maxsize=16)
def full_table(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(every point of P(n, k) in index order as int8 [V, n], 1 / ||y|| as float32 [V]), or None when
    it exceeds LUT_BYTES or a coordinate needs more than int8."""
    if not full_table_fits(n, k):
        return None
    y = enumeration.decode(torch.arange(count(n, k), dtype=torch.int64), n, k)
    rinv = (1.0 / y.double().pow(2).sum(1).sqrt()).float()
    return y.to(torch.int8).contiguous(), rinv.contiguous()


def set_threads(threads: int) -> None:
    """OpenMP threads of the kernel's parallel loops (torch.set_num_threads does not reach them)."""
    lib = kernel()
    if lib is not None:
        lib.pvq_set_threads(int(threads))


def act_pvq_shapes(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The kernel's PVQ search of every row of x [tokens, n] (n <= MAX_N): (unit shapes [tokens, n], gains
    [tokens]) as codec.activation.pvq_shapes gives them; None where the kernel cannot (no kernel, n too large)."""
    lib = kernel()
    if lib is None or x.shape[-1] > MAX_N:
        return None
    x = x.float().contiguous()
    u = torch.empty_like(x)
    g = torch.empty(x.shape[0], dtype=torch.float32)
    lib.act_pvq_shapes(x.data_ptr(), u.data_ptr(), g.data_ptr(), x.shape[0], x.shape[1], int(k))
    return u, g


def weight_search(x: torch.Tensor, k: int, rounds: int) -> torch.Tensor | None:
    """The kernel's codec.search of float32 groups x [groups, n] (n <= MAX_N, CPU): int64 points [groups, n],
    the same ones the torch code finds; None where the kernel cannot."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or not 1 <= x.shape[1] <= MAX_N:
        return None
    lib = kernel()
    if lib is None:
        return None
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.int64)
    lib.pvq_search(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], int(k), int(rounds))
    return out


accelerate(weight_search)  # codec.search runs on the kernel from now on (the same points, faster)


DENSE16_KINDS = {torch.float16: 0, torch.bfloat16: 1}


def dense16_gemv(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
    """h W^T in float32 for a contiguous 16-bit W [rows, cols] and float32 h [t, cols] (CPU): every weight
    widened in registers, the matrix never copied. None where the kernel cannot (caller widens blocks)."""
    lib = kernel()
    if (lib is None or w.dtype not in DENSE16_KINDS or w.device.type != "cpu" or h.device.type != "cpu"
            or not w.is_contiguous()):
        return None
    rows, cols = w.shape
    h = h.float().contiguous()
    t = h.shape[0]
    out = torch.empty(t, rows, dtype=torch.float32)
    lib.dense16_gemv(w.data_ptr(), DENSE16_KINDS[w.dtype], rows, cols, h.data_ptr(), cols, t, out.data_ptr(), rows)
    return out
