"""GPTQ with vector steps: Hessian-aware rounding of a weight matrix, `dim` columns at a time.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv 2210.17323; after Optimal Brain Quantization, Frantar &
Alistarh 2022) minimises the layer output error tr((W - Q) H (W - Q)^T), H = E[x x^T], by
quantizing columns in a fixed order and moving each column's error onto the columns not yet
quantized, optimally for H. With the upper Cholesky factor U of H^-1 (H^-1 = U^T U) the update
for column j is  W_R -= (w_j - q_j) / U_jj * U_jR.

A vector quantizer (PVQ) fixes a group G of d consecutive columns at once. Restricted to the
columns F = [j, cols) still free, (H_F^-1) = U_F^T U_F (U_F the trailing block of U), so
(H_F^-1)_GG = U_GG^T U_GG and (H_F^-1)_GR = U_GG^T U_GR. The optimal compensation of an error
E = W_G - Q_G is then the block-LDL step (as in LDLQ, Chee et al., "QuIP", 2023)

    W_R -= E (H_F^-1)_GG^-1 (H_F^-1)_GR = E inv(U_GG) U_GR,

and the loss it leaves is  e A_G e^T  per row e of E, with A_G = inv(U_GG^T U_GG): the metric the
stepper may use to choose gains. For d = 1 this is GPTQ's update exactly.

As in GPTQ, updates are lazy: inside a block of columns only the block is updated after each
group; the later columns receive the whole block's error in one matmul, which is the same sum
done in fewer, larger operations. With H = I, U is diagonal, nothing is ever updated, and the
result is plain round-to-nearest (the codec's own quantize), bit for bit.
"""
from __future__ import annotations

import math

import torch

from ..codec.gainshape import chunk_rows, is_matrix, row_chunks
from .hessian import ErrorSum
from .steppers import Packed, Stepper

# Damping retries: each multiplies the damping by 10 (0.01 -> 100 x mean diag at most), enough to
# make any positive semi-definite H numerically positive definite.
_RETRIES = 4
_TARGET_ROWS = 1024  # rows of a weight moved to its asymmetric target at once
# weights of a matrix solved at once: float32 copies of 16 M weights (64 MiB) instead of the whole matrix's
# (with the shapes searched whole, about 28 bytes a weight at the peak: 14 GB for a Llama 3 head). A row's
# products did not depend on the rows beside it on the CPUs tried (tests/test_solvers.py checks it), so the
# codes are those of one solve of the whole matrix (bench/results/solve_memory.json: the same sha256); a GPU's
# matrix products may be chosen by the number of rows (not measured)
SOLVE_WEIGHTS = 1 << 24
# weights of solved rows whose error is measured at once through the factor (a triangular solve with it): 32 MiB
# float64 pieces; a few rows at a time would read the whole [cols, cols] factor for each few (a 4096 x 14336 down
# projection: 158 s in pieces of 9 rows, 18 s in pieces of 292)
_NOISE_WEIGHTS = 1 << 22


def damping(h: torch.Tensor, live: torch.Tensor, damp: float) -> float:
    """GPTQ's lambda: damp x the mean diagonal of h over the live inputs (1 x damp when none is live), so the
    diagonal a dead input is given does not set its scale."""
    return damp * (float(h.diagonal()[live].mean()) if bool(live.any()) else 1.0)


def column_major(h: torch.Tensor) -> torch.Tensor:
    """h's values as a column-major matrix in h's own memory (LAPACK's layout, so the factorisation below needs
    no copy of it): h itself where it is column-major, else h's buffer transposed in place (square blocks
    swapped) and viewed transposed. h: a square float64 matrix, contiguous or column-major."""
    if h.mT.is_contiguous():
        return h
    if not h.is_contiguous():
        raise ValueError("column_major: h must be contiguous or column-major")
    n = h.shape[0]
    step = min(n, 1024)  # blocks of 8 MiB swapped at a time
    for a in range(0, n, step):
        ra = slice(a, a + step)
        h[ra, ra] = h[ra, ra].T.clone()
        for b in range(a + step, n, step):
            rb = slice(b, b + step)
            below = h[rb, ra].clone()
            h[rb, ra] = h[ra, rb].T
            h[ra, rb] = below.T
    return h.mT


def _lower_backup(h: torch.Tensor):
    """A function that writes h's lower triangle (the part LAPACK's lower Cholesky reads), as it is now, back
    into h: it keeps those values a few rows at a time, half of h's memory instead of a whole copy."""
    pieces = row_chunks(*h.shape)  # rows a..e, columns up to e
    # one allocation: hundreds of small ones freed together would leave the heap in pieces
    flat = torch.empty(sum((e - a) * e for a, e in pieces), dtype=h.dtype, device=h.device)
    kept, o = [], 0
    for a, e in pieces:
        kept.append((a, flat[o:o + (e - a) * e].view(e - a, e).copy_(h[a:e, :e])))
        o += (e - a) * e

    def restore(into: torch.Tensor) -> None:
        for a, rows in kept:
            into[a:a + rows.shape[0], :rows.shape[1]] = rows
    return restore


def factor_in_place(h: torch.Tensor, lam: float, restore=None) -> tuple[torch.Tensor, float]:
    """(U, lam used): upper U with (h + lam I)^-1 = U^T U, float64 [cols, cols], computed in h's own memory.

    h (float64, symmetric, contiguous or column-major) is consumed: it holds U afterwards (returned as a
    column-major view of it), so a large layer's solve holds one [cols, cols] float64, not the Hessian, a
    factor and a float32 copy of it. If a factorisation fails (H singular or indefinite in floating point),
    h is rewritten by `restore(h)` (default: from a copy of its lower triangle kept first) and factored again
    with 10x the damping, up to a few times, then ValueError is raised.
    """
    a = column_major(h)
    restore = _lower_backup(a) if restore is None else restore
    mean_diag = float(a.diagonal().mean())
    info = torch.empty((), dtype=torch.int32, device=a.device)
    tried = []
    for attempt in range(_RETRIES + 1):
        if attempt:
            restore(a)
        tried.append(lam)
        a.diagonal().add_(lam)
        torch.linalg.cholesky_ex(a, out=(a, info))  # column-major: the three steps run in a's memory
        if int(info) == 0:
            # H^-1 from its Cholesky factor (cheaper and more accurate than a general inverse)
            torch.cholesky_inverse(a, out=a)
            torch.linalg.cholesky_ex(a, upper=True, out=(a, info))
            # a few columns checked at once: no [cols, cols] mask
            if int(info) == 0 and all(bool(torch.isfinite(a[:, s:e]).all()) for s, e in row_chunks(*a.shape)):
                return a, lam
        # zero damping cannot grow by 10x: restart from a tiny fraction of the diagonal instead
        lam = 10 * lam if lam > 0 else 1e-6 * max(mean_diag, 1e-30)
    raise ValueError(
        f"gptq: the Hessian is not positive definite even with damping {', '.join(f'{t:.3g}' for t in tried)} "
        f"(mean diagonal {mean_diag:.3g}); check the calibration inputs"
    )


def inverse_cholesky(h: torch.Tensor, lam: float) -> torch.Tensor:
    """Upper U with (h + lam I)^-1 = U^T U, float64 [cols, cols]; h is left as it was (see factor_in_place,
    which this runs on a float64 copy of h, rewritten from h itself before a retry)."""
    work = torch.empty_strided(h.shape, (1, h.shape[0]), dtype=torch.float64, device=h.device)
    work.copy_(h)
    return factor_in_place(work, lam, restore=lambda a: a.copy_(h))[0]


def asymmetric_target(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, damp: float = 0.01,
                      share: float = 1.0) -> torch.Tensor:
    """The weight GPTQ should quantize so the layer's outputs approach the unquantized model's (asymmetric
    calibration, GPTQv2/GPTAQ, Li et al. 2025): float32 w + share * w c^T (h + lam I)^-1, lam GPTQ's damping.

    h = E[x x^T] of the layer's inputs x in the quantized model, c = E[x (r - x)^T] with r the unquantized model's
    input for the same token (hessian.CrossAccumulator). Over the calibration tokens, with Q any matrix,
    E||Q x - W r||^2 + lam ||Q - W||^2 = tr((Q - W') (h + lam I) (Q - W')^T) + const for W' the target at share 1:
    GPTQ on W' with h then aims at the unquantized model's outputs from the inputs the quantized model gives,
    instead of at W's outputs from them; lam keeps W' near W along directions the inputs barely visit. share
    scales the step from W to W' (GPTAQ takes a quarter): the target's correction is fitted on the same tokens
    whose outputs it then matches. w [rows, cols]; h, c [cols, cols]; w's float32 copy where share is 0."""
    rows, cols = w.shape
    if tuple(h.shape) != (cols, cols) or tuple(c.shape) != (cols, cols):
        raise ValueError(f"asymmetric_target: h and c must be [{cols}, {cols}], got {tuple(h.shape)} and {tuple(c.shape)}")
    if not (math.isfinite(share) and share >= 0):
        raise ValueError(f"asymmetric_target: share must be a number >= 0, got {share!r}")
    out = w.detach().to(torch.float32, copy=True)
    if share == 0:
        return out
    hd = h.detach().to(torch.float64)  # inverse_cholesky factors a copy: h is left as it was
    lam = damping(hd, hd.diagonal() > 0, damp)
    u = inverse_cholesky(hd, lam)  # (h + lam I)^-1 = U^T U
    del hd
    ct = c.detach().to(device=u.device, dtype=torch.float64).T
    for s in range(0, rows, _TARGET_ROWS):  # a few rows at a time: no float64 copy of a large w
        part = w[s:s + _TARGET_ROWS].detach().double()
        out[s:s + _TARGET_ROWS] += (share * ((part @ ct) @ u.T) @ u).float()
    return out


def group_metrics(u: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every group of d columns: inv(U_GG) and A_G = inv(U_GG^T U_GG), float64 [groups, d, d]."""
    groups = u.shape[0] // d
    # the diagonal d x d blocks of U, gathered (a reshape of a column-major U would copy all of it)
    blocks = torch.stack([u[g * d:(g + 1) * d, g * d:(g + 1) * d] for g in range(groups)])
    eye = torch.eye(d, dtype=u.dtype, device=u.device).expand(groups, d, d)
    u_inv = torch.linalg.solve_triangular(blocks, eye, upper=True)  # inv(U_GG), upper
    # inv(U^T U) = U^-1 U^-T
    return u_inv, u_inv @ u_inv.mT


def error_factors(h: torch.Tensor, dims, damp: float = 0.01) -> dict[int, float]:
    """How much GPTQ's error feedback shrinks the output error, in GPTQ's own proxy metric, for
    groups of each d in dims: {d: factor}.

    For i.i.d. rounding noise of variance s^2 per weight, rounding every group independently costs
    s^2 tr(H) per row in tr(E H E^T); quantizing groups of d columns in turn and pushing each group's
    error onto the later columns (block LDL, as gptq() does) costs s^2 sum_G tr(A_G), A_G =
    inv(U_GG^T U_GG) (QuIP's LDLQ analysis, for groups). The factor is sum_G tr(A_G) / tr(H + lam I)
    with gptq()'s damping and dead-input handling: by how much the error of a data-free setting
    overstates the same setting under pvq-gptq (allocation.py).
    """
    h = h.detach().to(torch.float64, copy=True)
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    lam = damping(h, ~dead, damp)
    total = float(h.diagonal().sum()) + lam * h.shape[0]
    u, _ = factor_in_place(h, lam)  # in the copy's memory
    out = {}
    for d in dims:
        if h.shape[0] % d:
            raise ValueError(f"error_factors: {h.shape[0]} columns are not a multiple of d={d}")
        _, metric = group_metrics(u, d)
        out[d] = float(metric.diagonal(dim1=1, dim2=2).sum()) / total
    return out


def _block_width(block_size: int, stepper: Stepper, static: bool) -> int:
    """block_size rounded up to a whole number of steps (d) and of the stepper's fitted groups.

    A stepper that fits parameters on a group of columns when it reaches the group's first column
    must see all of them fully updated then; lazily updated columns beyond the current block are
    not, so blocks are aligned to such groups.
    """
    unit = stepper.dim
    g = getattr(stepper, "group_size", None)
    if g and not static:
        unit = unit * g // math.gcd(unit, g)
    return -(-block_size // unit) * unit


class _Initial:
    """w as a solve starts from it (dead inputs zeroed), its rows made when they are read (codec.is_matrix)."""

    def __init__(self, w, initial):
        self.w, self.initial = w, initial
        self.shape, self.device = w.shape, w.device

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.initial(self.w[rows])


def rows_per_solve(rows: int, cols: int) -> int:
    """Rows of a weight solved at once (see SOLVE_WEIGHTS): a whole number of the codec's row chunks, so a
    row block's error sums over the same chunks as the whole matrix's (hessian.ErrorSum)."""
    chunk = chunk_rows(cols)
    return max(1, SOLVE_WEIGHTS // max(cols * chunk, 1)) * chunk


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    stepper: Stepper,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    consume_h: bool = False,
    keep_hat: bool = True,
    on_rows=None,
    error: ErrorSum | None = None,
) -> tuple[torch.Tensor | None, Packed]:
    """Quantize w [rows, cols] for the input second moment h [cols, cols] with `stepper`.

    Returns (w_hat float32 [rows, cols], packed) where w_hat is exactly packed.dequantize().
    Each stepper.step gets the group's metric A_G = inv(U_GG^T U_GG) as float64 [d, d].
    block_size is rounded up to a multiple of stepper.dim (and of a non-static stepper.group_size).
    act_order (uniform grid only): quantize columns in descending diag(H) order, GPTQ's
    "act-order" heuristic, with every group's grid fixed up front from the initial w ("static
    groups"), so groups stay contiguous in the stored format and no permutation is stored.
    consume_h: factor in h's own memory instead of a copy (a float64 h, contiguous or column-major, that
    nothing else reads afterwards: it holds the factor on return), so a large layer's solve holds one
    [cols, cols] float64 in all (factor_in_place).

    Rows never interact (each row's error moves along its own row), so a large w is solved a block of rows
    at a time (rows_per_solve) in float32 copies of those rows only: what a solve holds for the whole matrix
    is the stepper's codes and, with keep_hat, w_hat. keep_hat=False returns (None, packed);
    on_rows(rows, w_hat_rows) is called with each solved block of rows (a slice, float32 [len, cols]).
    error: an ErrorSum (made without h) that gets every solved block of rows, measured in h through the solve's
    own factor (h itself may be gone by then: consume_h).
    """
    if not is_matrix(w):  # a tensor, or a matrix read a block of rows at a time (a weight rotated as it is read)
        raise ValueError(f"gptq expects a 2-D floating-point weight matrix, got {getattr(w, 'shape', type(w))}")
    rows, cols = w.shape
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != (cols, cols) or not h.is_floating_point():
        raise ValueError(f"gptq expects a floating-point Hessian of shape [{cols}, {cols}], got "
                         f"{tuple(getattr(h, 'shape', ()))}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp!r}")
    d = stepper.dim
    if cols % d:
        raise ValueError(f"gptq: {cols} columns are not a multiple of the stepper's dim {d}")
    if act_order and not getattr(stepper, "supports_act_order", False):
        raise ValueError("act_order is only supported for the uniform grid")

    H = h.detach().to(device=w.device, dtype=torch.float64, copy=not consume_h)  # [cols, cols]
    if not (H.is_contiguous() or H.mT.is_contiguous()):
        H = H.contiguous()
    finite = all(bool(torch.isfinite(w[s:e]).all()) for s, e in row_chunks(rows, cols))
    if not finite or not bool(torch.isfinite(H).all()):
        raise ValueError("gptq: w or h contains NaN or inf")

    # Dead inputs (never active in calibration): their weights cannot affect the output, so GPTQ
    # zeroes them and gives H a unit diagonal there, which decouples them from the rest.
    dead = H.diagonal() == 0  # [cols] bool
    live = ~dead
    any_dead = bool(dead.any())
    trace = float(H.diagonal().sum())  # tr(H), the error's unit, before the dead inputs' diagonal is made 1
    H.diagonal()[dead] = 1.0  # diagonal() is a view: this writes H[i, i]
    # Damping lambda = damp * mean(diag H) keeps H^-1 well conditioned (GPTQ's percdamp); the mean
    # is over live inputs, so the arbitrary 1 put in for dead ones does not set its scale.
    lam = damping(H, live, damp)

    def initial(part: torch.Tensor) -> torch.Tensor:
        """float32 copy of rows of w as the solve starts from them: dead inputs zeroed."""
        out = part.detach().to(torch.float32, copy=True)
        if any_dead:
            out[:, dead] = 0.0
        return out

    start = _Initial(w, initial) if any_dead else w  # what begin sees, read a block of rows at a time too
    if act_order:
        stepper.begin(start, static_groups=True)  # grids from the unpermuted W, as GPTQ's static groups
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        _permute_in_place(H, perm)
        cols_stored = perm.tolist()  # column j of the working order is stored at cols_stored[j]
    else:
        stepper.begin(start)
        perm = cols_stored = None

    U, lam = factor_in_place(H, lam)  # in H's memory; float64, sliced to float32 as the updates need it
    del H
    u_inv, metric = group_metrics(U, d)  # [groups, d, d] float64
    u_inv = u_inv.to(torch.float32)  # the updates run in float32, like W
    if error is not None:
        error.measure_by(_FactorNoise(U, lam, dead, perm), trace, _NOISE_WEIGHTS)

    w_hat = torch.empty(rows, cols, dtype=torch.float32, device=w.device) if keep_hat else None
    width = _block_width(block_size, stepper, act_order)
    step = rows_per_solve(rows, cols)
    for r0 in range(0, rows or 1, step):  # a matrix of no rows still steps every group (of no rows)
        part = slice(r0, min(r0 + step, rows))
        W = initial(w[part])  # [rows of the block, cols], updated in place
        if perm is not None:
            W = W[:, perm].contiguous()
        Q = torch.empty_like(W)  # quantized values, working order
        for b0 in range(0, cols, width):
            b1 = min(b0 + width, cols)
            ub = _float32_rows(U, b0, b1)  # U[b0:b1, b0:] in float32, column-major as U
            err = torch.empty(W.shape[0], b1 - b0, dtype=torch.float32, device=W.device)  # E inv(U_GG) per group
            for j in range(b0, b1, d):
                gi = j // d
                block = W[:, j : j + d]
                col = j if cols_stored is None else cols_stored[j]
                q = stepper.step(W, col, block, metric[gi], rows=part)
                Q[:, j : j + d] = q
                e = (block - q) @ u_inv[gi]  # [rows, d]
                err[:, j - b0 : j - b0 + d] = e
                if j + d < b1:
                    # W_R -= E inv(U_GG) U_GR, within the block only (the rest waits for the block's end)
                    W[:, j + d : b1] -= e @ ub[j - b0 : j - b0 + d, j + d - b0 : b1 - b0]
            if b1 < cols:
                W[:, b1:] -= err @ ub[:, b1 - b0:]
            del ub
        del W, err
        if perm is not None:  # back to the stored order
            stored = torch.empty_like(Q)
            stored[:, perm] = Q
            Q = stored
        if w_hat is not None:
            w_hat[part] = Q
        if on_rows is not None:
            on_rows(part, Q)
        if error is not None:
            error.add(w[part], Q)
        del Q

    return w_hat, stepper.finish()


def _float32_rows(u: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    """u[b0:b1, b0:] as float32, column-major like u (the layout the updates' products always had)."""
    return u.mT[b0:, b0:b1].to(torch.float32, memory_format=torch.contiguous_format).mT


def _permute_in_place(h: torch.Tensor, perm: torch.Tensor) -> None:
    """h[perm][:, perm] written into h's own memory: one permuted copy at a time instead of two."""
    rows = h[perm]
    for s in range(0, h.shape[0], 1024):
        h[s:s + 1024] = rows[s:s + 1024][:, perm]


class _FactorNoise:
    """tr(D H D^T) for rows D of w - w_hat, from the solve's factor U of (H' + lam I)^-1 (H' = H with the dead inputs'
    diagonal 1): D (H' + lam I) D^T = ||D U^-1||^2 (in the working order of U's columns), less lam ||D||^2 and the
    dead inputs' ||D_dead||^2, where H is zero. All in float64, so what is taken off leaves the error H itself gives
    to far below its own precision (tests/test_solvers.py: within 1e-9 of it with a widely spread spectrum)."""

    def __init__(self, u: torch.Tensor, lam: float, dead: torch.Tensor, perm: torch.Tensor | None):
        self.u, self.lam, self.dead, self.perm = u, lam, dead, perm
        self.any_dead = bool(dead.any())

    def __call__(self, d: torch.Tensor) -> float:
        work = d if self.perm is None else d[:, self.perm]
        x = torch.linalg.solve_triangular(self.u, work, upper=True, left=False)  # x U = D
        noise = float(x.pow(2).sum()) - self.lam * float(d.pow(2).sum())
        if self.any_dead:
            noise -= float(d[:, self.dead].pow(2).sum())
        return noise
