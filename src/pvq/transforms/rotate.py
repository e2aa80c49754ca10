"""The two-sided rotation of one linear layer, and the seeds it is rebuilt from.

With seeded randomized Hadamards R_in, R_out (QuIP#-style incoherence processing on both sides) the
stored matrix is W' = R_out^T W R_in, and y = x W^T = ((x R_in) W'^T) R_out^T: the network output is
unchanged before quantization. Only the two seeds are stored; a side that is not rotated has NO_SEED.
"""
from __future__ import annotations

import zlib

import torch

from .hadamard import RandomHadamard

NO_SEED = -1  # marks a side that is not rotated
STORED_SEEDS = 2  # every quantized linear stores (seed_in, seed_out), NO_SEED where a side is not rotated


MAX_RUN_SEED = (1 << 32) - 1
_GOLDEN = 0x9E3779B1  # odd, so multiplying by it permutes the 32-bit seeds


def derive_seed(seed: int, tag: str) -> int:
    """A rotation seed from the run seed (0..MAX_RUN_SEED) and a tag naming what is rotated (a layer, a side).

    Torch's CPU generator reads only the low 32 bits of its seed, so the run seed must change those:
    it is spread by an odd multiplier (a bijection on 32 bits, so every run seed gives other rotations)
    and xor-ed with the tag's CRC. Seed 0 leaves the CRC alone, as files written before were seeded.
    """
    seed = int(seed)
    if not 0 <= seed <= MAX_RUN_SEED:
        raise ValueError(f"a run seed is an integer from 0 to {MAX_RUN_SEED}, got {seed}")
    return zlib.crc32(tag.encode()) ^ ((seed * _GOLDEN) & MAX_RUN_SEED)


def layer_seeds(seed: int, name: str, rotate: bool) -> tuple[int, int]:
    """Rotation seeds (input side, output side) of the layer called `name`."""
    if not rotate:
        return (NO_SEED, NO_SEED)
    return tuple(derive_seed(seed, f"{name}:{side}") for side in ("in", "out"))


def layer_rotations(rows: int, cols: int, seeds: tuple[int, int]) -> tuple[RandomHadamard | None, RandomHadamard | None]:
    """(R_in over the input dim, R_out over the output dim) for seeds (seed_in, seed_out)."""
    s_in, s_out = seeds
    return (RandomHadamard(cols, s_in) if s_in != NO_SEED else None,
            RandomHadamard(rows, s_out) if s_out != NO_SEED else None)


# vectors rotated at once: a whole 14336 x 4096 matrix in float64 with the transform's temporaries would
# add gigabytes to a run's peak memory; each vector is rotated on its own, so the values are the same. As
# small as the codec's chunks (codec/gainshape.py), for the same reason: large temporaries fragment the heap
CHUNK_WEIGHTS = 1 << 17


def _rotated(x: torch.Tensor, r: RandomHadamard | None, out: torch.Tensor) -> torch.Tensor:
    """out[i] = x[i] @ R (float64 math) for every row i of x, a few rows at a time."""
    step = max(1, CHUNK_WEIGHTS // max(x.shape[1], 1))
    for s in range(0, x.shape[0], step):
        part = x[s:s + step].double()
        out[s:s + step] = part if r is None else r.apply(part)
    return out


class RowRotated:
    """W R_in of a weight rotated on its input side only, its rows rotated each time they are read (float32, the
    values rotate_weight gives): a solve that reads a block of rows at a time never holds the whole rotated
    matrix, 4 bytes a weight of a large head or embedding table (the codec's and solvers' `is_matrix`)."""

    def __init__(self, w: torch.Tensor, r_in: RandomHadamard):
        self.w, self.r_in = w, r_in
        self.shape, self.device = w.shape, w.device

    def __getitem__(self, rows: slice) -> torch.Tensor:
        part = self.w[rows]
        return _rotated(part, self.r_in, torch.empty(part.shape, dtype=torch.float32, device=part.device))


def rotated_rows(w: torch.Tensor, seeds: tuple[int, int]):
    """rotate_weight's result where a side is rotated, read lazily where only the input side is (RowRotated)."""
    r_in, r_out = layer_rotations(*w.shape, seeds)
    return RowRotated(w, r_in) if r_in is not None and r_out is None else rotate_weight(w, seeds)


def rotate_weight(w: torch.Tensor, seeds: tuple[int, int]) -> torch.Tensor:
    """W' = R_out^T W R_in (float64 math, float32 result; w in any floating dtype)."""
    r_in, r_out = layer_rotations(*w.shape, seeds)
    if r_out is None:  # each row alone: straight into the float32 result
        return _rotated(w, r_in, torch.empty(w.shape, dtype=torch.float32, device=w.device))
    mid = _rotated(w, r_in, torch.empty(w.shape, dtype=torch.float64, device=w.device))
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    _rotated(mid.T, r_out, out.T)  # the columns of mid, written through the transposed view: no transposed copy
    return out


def rotate_hessian(h: torch.Tensor, seed_in: int, in_place: bool = False) -> torch.Tensor:
    """Hessian of the rotated inputs x R_in: R_in^T H R_in (H symmetric, float64). `in_place`: in the memory
    of h (a float64 tensor nothing else uses), so a large layer's Hessian costs no second copy.

    Both passes rotate a few vectors at a time in one buffer: the first rows (M = H R), the second the
    columns of M, each written over the column it came from (so the buffer holds the result transposed,
    and the transpose view of it is returned)."""
    if seed_in == NO_SEED:
        return h
    r = RandomHadamard(h.shape[0], seed_in)
    m = h if in_place and h.dtype == torch.float64 and h.is_contiguous() else torch.empty(h.shape, dtype=torch.float64,
                                                                                              device=h.device)
    m = _rotated(h, r, m)
    step = max(1, CHUNK_WEIGHTS // max(h.shape[0], 1))
    for s in range(0, h.shape[0], step):
        m[:, s:s + step] = r.apply(m[:, s:s + step].T.contiguous()).T
    return m.T
