"""Triton kernels that rebuild PVQ weights from their packed codes on the device (optional: `pvq[gpu]`).

A group's code is read straight from the bit stream (up to 9 bytes around its bit offset), split into
shape index and gain level (code = index * L + level), and its shape is rebuilt by the split
enumeration of codec/enumeration.py: every split level halves each segment with a binary search over
that level's row of offsets O(k, k1), then a / b = rest div / mod V(n2, k2); the leaves read their
coordinates from one table of every point of P(d, k') (d <= 4, padded to a power of two lanes so the
Triton tensors keep power-of-two shapes; a group of 12 is 4 leaves of 3 in 16 lanes). Tables are small
(a few MiB at most) and built once per (n, k, device).

Supported are the layouts whose splits are all even halvings down to leaves of at most 4 coordinates:
every setting the picker chooses (n in 4, 6, 8, 12, 16). `supports(spec)` says so; other settings decode
with torch.

Kernels (methods of `Operands`, each a `Launch` of a kernel of gpu_kernels.py):
- `decode(r0, r1, dtype)`: rows [r0, r1) of W' (a tile for a GEMM, or the whole matrix);
- `shapes()`: the integer points, for exact comparison with the torch decoder;
- `gemv(x)`: x W'^T for a few tokens, decoding inside the product (the matrix is never written);
- `matmul(x, dtype)`: x W'^T for any number of tokens, tiles of W' rebuilt in registers for `tl.dot`.
`Launch.compile(capability)` compiles a launch for a GPU this machine need not have (CI, resource counts).

Indices past V(n, k) are reported by `check_codes` (a clear error at load) and clamped inside the
kernels, so corrupt codes never read outside a table. TRITON_INTERPRET=1 runs all of this on CPU
tensors (how CI tests it without a GPU).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..codec import PackedPVQ, PVQSpec
from ..codec.enumeration import Leaf, Split, tree
from ..codec.pyramid import count

BLOCK_GROUPS = 128  # groups one program decodes at once
GEMV_ROWS = 16  # rows one program of the fused product owns
GEMV_GROUPS = 8  # groups per row it decodes per step
MAX_TOKENS = 8  # most rows of x the fused product takes
DECODE_ROWS = 1024  # rows decoded at once for a prompt's GEMM (a 1024 x 4096 float32 tile is 16 MiB)
GEMM_TOKENS = 64  # tokens one program of the fused tiled product owns
GEMM_ROWS = 64  # rows it owns
GEMM_WIDTH = 64  # lanes of each row it rebuilds per step (whole groups, padded lanes included)
# warps of one program of the fused tiled product: with Triton's default 4, its 16- and 8-bit-operand builds
# use all 255 registers a thread may have and spill to the stack on sm_80 and sm_90; with 8, 175-242 and no
# spills (compiled on a machine without a GPU: bench/gpu_compile.py, bench/results/gpu_compile.json)
GEMM_WARPS = 8
# How more than MAX_TOKENS tokens are multiplied: "tiles" decodes DECODE_ROWS rows at a time into the layer's
# dtype and multiplies them with torch; "fused" rebuilds tiles in registers inside the product (gemm_kernel),
# never writing the matrix but rebuilding each row once per GEMM_TOKENS tokens. Which is faster on a given GPU
# is what bench/gpu.py measures (both, per layer shape).
PROMPT = "tiles"
# the dtypes a tile is decoded into or multiplied in, and gemm_kernel's code for each
_DOT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available() -> bool:
    """Triton imports (a GPU, or TRITON_INTERPRET=1 for CPU tensors)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _structure(n: int, k: int) -> tuple[int, int] | None:
    """(split depth, leaf dimension) of tree(n, k) when every split halves evenly, else None."""
    node, depth = tree(n, k), 0
    while isinstance(node, Split):
        if node.first is not node.second:
            return None
        node, depth = node.first, depth + 1
    return (depth, node.d) if node.d <= 4 else None


def supports(spec) -> bool:
    return isinstance(spec, PVQSpec) and _structure(spec.n, spec.k) is not None and spec.code_bits <= 63


class Tables:
    """One (n, k)'s decode tables on one device: offsets and V(n2, .) of each split level, leaf points."""

    def __init__(self, n: int, k: int, device):
        st = _structure(n, k)
        if st is None:
            raise ValueError(f"PVQ(n={n}, k={k}) has no even split down to leaves of <= 4: no Triton decoder")
        self.depth, self.d = st
        self.lanes = 1 << (self.d - 1).bit_length()  # leaf lanes, a power of two
        node, offs, v2 = tree(n, k), [], []
        while isinstance(node, Split):
            offs.append(node.offs)
            v2.append(node.v2)
            node = node.first
        leaf: Leaf = node
        K = leaf.K
        self.K = K
        z = torch.zeros(1, dtype=torch.int64)
        self.offs = (torch.cat(offs) if offs else z).to(device)
        self.v2 = (torch.cat(v2) if v2 else z).to(device)
        lut = torch.zeros(leaf.lut.shape[0], self.lanes, dtype=torch.int8)
        lut[:, : self.d] = leaf.lut.to(torch.int8)
        self.lut = lut.reshape(-1).to(device)
        self.base = leaf.base.to(device)
        self.log_k = max(1, (K + 1).bit_length())  # binary-search steps over k1 in [0, k]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.offs, self.v2, self.lut, self.base))


@lru_cache(maxsize=64)
def _tables(n: int, k: int, device: str) -> Tables:
    return Tables(n, k, torch.device(device))


def tables(spec: PVQSpec, device) -> Tables:
    return _tables(spec.n, spec.k, str(torch.device(device)))


def _args(packed: PackedPVQ, tab: Tables) -> dict:
    s = packed.spec
    return dict(B=s.code_bits, NB=(s.code_bits + 7 + 7) // 8, L=s.gain_levels, K=tab.K, DEPTH=tab.depth,
                LANES=tab.lanes, D=tab.d, LOGK=tab.log_k, N=s.n)


def _check(packed) -> None:
    if not supports(packed.spec):
        raise ValueError(f"{packed.spec.name}: no Triton decoder for this setting (supports: {__name__})")


class Operands:
    """What the kernels read of one packed matrix on its device: codes, float32 levels and scales, tables."""

    def __init__(self, packed: PackedPVQ):
        _check(packed)
        dev = packed.codes.device
        self.packed = packed
        self.rows, self.cols = packed.shape
        self.codes = packed.codes.contiguous()
        self.levels = packed.gain_levels.to(dev, torch.float32).contiguous()
        self.scales = packed.row_scale.to(dev, torch.float32).contiguous()
        self.tab = tables(packed.spec, dev)
        self.kw = _args(packed, self.tab)
        self.gpr = self.cols // packed.spec.n
        self.V = count(packed.spec.n, packed.spec.k)

    def _common(self) -> dict:
        t = self.tab
        return dict(codes=self.codes, nbytes=self.codes.numel(), offs=t.offs, v2=t.v2, lut=t.lut, base=t.base,
                    levels=self.levels, scales=self.scales, V=self.V, per_row=int(self.scales.numel() > 1))

    def decode_launch(self, r0: int, r1: int, shapes: bool, dtype=torch.float32,
                      ids: torch.Tensor | None = None) -> Launch:
        """The decode kernel's launch for rows [r0, r1), or the rows `ids` lists (int64 on the codes' device,
        each in [0, rows): checked by the caller): integer points (shapes) or weights in `dtype`."""
        count = r1 - r0 if ids is None else ids.numel()
        G = count * self.gpr
        dev = self.codes.device
        out = torch.empty(count, self.cols, dtype=torch.int32 if shapes else dtype, device=dev)
        bad = torch.empty(max(G, 1), dtype=torch.int8, device=dev)
        row_ids = torch.zeros(1, dtype=torch.int64, device=dev) if ids is None else ids
        return Launch("decode_kernel", (max(1, math.ceil(G / BLOCK_GROUPS)),),
                      dict(self._common(), out=out, bad_out=bad, G=G, GPR=self.gpr, G0=r0 * self.gpr,
                           row_ids=row_ids),
                      dict(self.kw, SHAPES=shapes, BLOCK=BLOCK_GROUPS, GATHER=ids is not None))

    def _decode(self, r0: int, r1: int, shapes: bool, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        launch = self.decode_launch(r0, r1, shapes, dtype)
        launch.run()
        return launch.args["out"], launch.args["bad_out"][:launch.args["G"]]

    def decode(self, r0: int = 0, r1: int | None = None, dtype=torch.float32) -> torch.Tensor:
        """Rows [r0, r1) of W' [r1 - r0, cols] on the codes' device, computed in float32 and stored in `dtype`
        (a prompt's tile goes straight to the dtype it is multiplied in)."""
        if dtype not in _DOT:
            raise ValueError(f"decode: dtype must be float32, float16 or bfloat16, got {dtype}")
        return self._decode(r0, self.rows if r1 is None else r1, False, dtype)[0]

    def decode_rows(self, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """The rows `ids` lists (integers in [0, rows), any order) of W' [len(ids), cols] on the codes' device:
        an embedding's lookup, which leaves the rest of the table packed."""
        if dtype not in _DOT:
            raise ValueError(f"decode_rows: dtype must be float32, float16 or bfloat16, got {dtype}")
        ids = ids.to(device=self.codes.device, dtype=torch.int64).reshape(-1).contiguous()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.rows):
            raise IndexError(f"decode_rows: a row id is outside [0, {self.rows})")
        if not ids.numel():
            return torch.empty(0, self.cols, dtype=dtype, device=self.codes.device)
        launch = self.decode_launch(0, 0, False, dtype, ids)
        launch.run()
        return launch.args["out"]

    def shapes(self) -> torch.Tensor:
        """The integer points [rows, groups, n] (int32)."""
        return self._decode(0, self.rows, True)[0].reshape(self.rows, self.gpr, self.packed.spec.n)

    def bad_group(self) -> int:
        """The first group whose shape index is >= V(n, k), or -1."""
        bad = self._decode(0, self.rows, True)[1]
        hit = torch.nonzero(bad).reshape(-1)
        return int(hit[0]) if hit.numel() else -1

    def gemv_launch(self, x: torch.Tensor) -> Launch:
        """The fused product's launch for x [t, cols] (t <= MAX_TOKENS)."""
        t = x.shape[0]
        if not 1 <= t <= MAX_TOKENS or x.shape[1] != self.cols:
            raise ValueError(f"gemv takes 1..{MAX_TOKENS} rows of {self.cols} values, got {tuple(x.shape)}")
        xc = x.to(torch.float32).contiguous()
        out = torch.empty(t, self.rows, dtype=torch.float32, device=x.device)
        return Launch("gemv_kernel", (math.ceil(self.rows / GEMV_ROWS),),
                      dict(self._common(), x=xc, out=out, GPR=self.gpr, ROWS=self.rows, T=t),
                      dict(self.kw, BR=GEMV_ROWS, BG=GEMV_GROUPS, TP=1 << (t - 1).bit_length()))

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        """x [t, cols] float32 (t <= MAX_TOKENS) -> x W'^T [t, rows] float32, decoding inside the product."""
        launch = self.gemv_launch(x)
        launch.run()
        return launch.args["out"]

    def matmul_launch(self, x: torch.Tensor, dtype=torch.bfloat16) -> Launch:
        """The fused tiled product's launch for x [t, cols], t >= 1, operands rounded to `dtype`."""
        if x.dim() != 2 or x.shape[1] != self.cols:
            raise ValueError(f"matmul takes rows of {self.cols} values, got {tuple(x.shape)}")
        if dtype not in _DOT:
            raise ValueError(f"matmul: dtype must be float32, float16 or bfloat16, got {dtype}")
        t = x.shape[0]
        xc = x.to(torch.float32).contiguous()
        out = torch.empty(t, self.rows, dtype=torch.float32, device=x.device)
        width = (1 << self.tab.depth) * self.tab.lanes  # lanes of one group
        return Launch("gemm_kernel", (math.ceil(t / GEMM_TOKENS), math.ceil(self.rows / GEMM_ROWS)),
                      dict(self._common(), x=xc, out=out, GPR=self.gpr, ROWS=self.rows, T=t),
                      dict(self.kw, BM=GEMM_TOKENS, BR=GEMM_ROWS, BG=max(1, GEMM_WIDTH // width), DOT=_DOT[dtype]),
                      dict(num_warps=GEMM_WARPS))

    def matmul(self, x: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
        """x [t, cols] -> x W'^T [t, rows] float32 for any t, rebuilding tiles of W' inside the product (the fused
        tiled kernel), its operands rounded to `dtype` (float32: exact products), the sums float32. (Triton's
        interpreter multiplies bfloat16 wrongly, 3.9: CI checks float32 and float16, a GPU bfloat16.)"""
        if x.dim() == 2 and x.shape[0] == 0 and x.shape[1] == self.cols and dtype in _DOT:
            return torch.empty(0, self.rows, dtype=torch.float32, device=x.device)
        launch = self.matmul_launch(x, dtype)
        launch.run()
        return launch.args["out"]

    def launches(self) -> dict[str, Launch]:
        """Every launch the kernels make for this matrix, by name (inputs of zeros): the weights decoded into
        each dtype and the integer points, the fused product for each token count it pads to, the fused tiled
        product with each operand dtype. What tests/test_gpu_compile.py and bench/gpu_compile.py compile."""
        dev = self.codes.device
        out = {f"decode {str(d).split('.')[-1]}": self.decode_launch(0, self.rows, False, d) for d in _DOT}
        out["shapes"] = self.decode_launch(0, self.rows, True)
        for d in _DOT:  # an embedding's rows
            out[f"rows {str(d).split('.')[-1]}"] = self.decode_launch(0, 0, False, d,
                                                                      torch.zeros(2, dtype=torch.int64, device=dev))
        for t in sorted({1 << (t - 1).bit_length() for t in range(1, MAX_TOKENS + 1)}):
            out[f"gemv {t} tokens"] = self.gemv_launch(torch.zeros(t, self.cols, device=dev))
        for d in _DOT:
            out[f"matmul {str(d).split('.')[-1]}"] = self.matmul_launch(torch.zeros(GEMM_TOKENS, self.cols,
                                                                                    device=dev), d)
        return out


class Launch:
    """One kernel call: the kernel's name in gpu_kernels, its grid, its runtime arguments and its constants by
    name, and Triton's launch options (num_warps; its defaults where not given). `run()` launches it;
    `compile(capability)` only compiles it (see there)."""

    def __init__(self, kernel: str, grid: tuple, args: dict, consts: dict, options: dict | None = None):
        self.kernel, self.grid, self.args, self.consts = kernel, grid, args, consts
        self.options = options or {}

    def run(self) -> None:
        from . import gpu_kernels

        getattr(gpu_kernels, self.kernel)[self.grid](**self.args, **self.consts, **self.options)

    def compile(self, capability: int = 90):
        """The kernel compiled by Triton, down to the machine code, for an NVIDIA GPU of this compute capability
        (90: H100/H200, 80: A100), on a machine without one: what the GPU would run, with the arguments' types
        and these constants, so CI catches what only the compiler rejects (the interpreter runs any Python)
        and bench/gpu_compile.py can count each kernel's registers, spills and shared memory. Needs the
        kernels compiled rather than interpreted (TRITON_INTERPRET unset when gpu_kernels was first imported)."""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from . import gpu_kernels

        fn = getattr(gpu_kernels, self.kernel)
        if not isinstance(fn, triton.runtime.jit.JITFunction):
            raise RuntimeError("gpu kernels were imported under TRITON_INTERPRET=1: nothing to compile")
        sig, consts = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in self.consts:
                sig[name], consts[(i,)] = "constexpr", self.consts[name]
            else:
                sig[name] = _triton_type(self.args[name])
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", capability, 32), options=self.options)


_POINTEE = {torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.float32: "fp32",
            torch.float16: "fp16", torch.bfloat16: "bf16"}


def _triton_type(value) -> str:
    """Triton's name for a kernel argument's type: a tensor is a pointer to its dtype, an int 32 or 64 bits."""
    if isinstance(value, torch.Tensor):
        return "*" + _POINTEE[value.dtype]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"no Triton type for {value!r}")
    return "i32" if -2**31 <= value < 2**31 else "i64"
