"""Nearest-codeword search on the pyramid P(n, k): the direction of largest cosine with x.

Starts from the Opus/CELT greedy (libopus celt/vq.c op_pvq_search, as described in
docs/pvq.md: projection for k > n/2, then one pulse at a time), then runs a local search that
moves single pulses between coordinates while the cosine strictly rises. Against brute force over
all of P(n, k) the greedy alone finds the optimum for 91-98% of Gaussian groups at small (n, k);
with the pulse moves 99.6-100% (tests/test_codec.py measures both).
"""
from __future__ import annotations

import torch

from .pyramid import _CHUNK, _check_nk

# --------------------------------------------------------------------------------------------
# A native implementation of search() for float32 groups, (x [g, n], k, rounds) -> int64 points or None
# (runtime/native.py offers one when it is imported; this package imports nothing above itself). It must find
# exactly the points the torch code below finds, so that whether it is used changes speed, never a file.
_native = None
# Groups up to which input on another device (a GPU) is searched by the native code on a CPU copy: GPTQ
# searches one column group of every row per step (a few thousand groups), where the greedy's ~k dependent
# pulses and the moves after them are hundreds of tiny GPU launches and syncs, microseconds of CPU work.
FEW_GROUPS = 1 << 16


def accelerate(fn) -> None:
    """Let search() hand float32 groups to `fn(x [g, n], k, rounds)`, which returns their points (int64 [g, n],
    the torch code's own) or None where it cannot; None restores the torch code alone."""
    global _native
    _native = fn


def _check_search_input(x: torch.Tensor, k: int) -> int:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"search expects a floating-point tensor x[..., n], got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"search expects x of shape [..., n] with n >= 1, got {tuple(x.shape)}")
    n = x.shape[-1]
    _check_nk(n, k)
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("search: x contains NaN or inf")
    return n


def _row_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension of t [g, n], left to right: a fixed order, so a native kernel that adds
    the same way gets the same float (torch's own reductions split the row in an order of their choosing)."""
    s = t[:, 0].clone()
    for j in range(1, t.shape[1]):
        s += t[:, j]
    return s


def _top(score: torch.Tensor, top: int) -> torch.Tensor:
    """Indices of the `top` largest entries of each row, largest first, equal values by lowest index (a stable
    sort: topk leaves the order of ties to its implementation)."""
    return torch.sort(score, dim=1, descending=True, stable=True).indices[:, :top]


def _project(a: torch.Tensor, k: int) -> torch.Tensor:
    """Opus' starting point for k > n/2: y_j = floor((k + 0.8) |x_j| / sum|x|) (never more than k pulses)."""
    g, n = a.shape
    s = _row_sum(a)[:, None]
    if k <= n // 2:
        y = torch.zeros(g, n, dtype=a.dtype, device=a.device)
    else:
        y = torch.floor(a * ((k + 0.8) / s.clamp_min(torch.finfo(a.dtype).tiny)))
    # an all-zero group: put every pulse on the first coordinate (any point is as good)
    zero = s[:, 0] <= 0
    if bool(zero.any()):
        y[zero] = 0
        y[zero, 0] = k
    return y


def _greedy_fill(a: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add the missing pulses one at a time where they raise the cosine most (Opus op_pvq_search).
    Returns (y, <|x|, y>, <y, y>), the two sums kept up to date pulse by pulse."""
    xy = _row_sum(a * y)[:, None]
    yy = _row_sum(y * y)[:, None]
    left = k - _row_sum(y)[:, None]
    for _ in range(int(left.max()) if left.numel() else 0):
        # (xy + a_j)^2 / (yy + 2 y_j + 1): the squared cosine after one more pulse at j, up to |x|^2
        score = (xy + a) ** 2 / (yy + 2 * y + 1)
        j = score.argmax(dim=1, keepdim=True)  # the first of equal scores
        go = left > 0  # groups with no pulse left stay as they are
        yj = y.gather(1, j)
        xy = torch.where(go, xy + a.gather(1, j), xy)
        yy = torch.where(go, yy + (2 * yj + 1), yy)
        y.scatter_(1, j, torch.where(go, yj + 1, yj))
        left -= go.to(left.dtype)
    return y, xy[:, 0], yy[:, 0]


def _pulse_moves(a: torch.Tensor, y: torch.Tensor, xy: torch.Tensor, yy: torch.Tensor, max_rounds: int,
                 top: int = 4) -> torch.Tensor:
    """Local search past the greedy: move single pulses i -> j while the cosine strictly rises.

    Scoring all n(n-1) moves costs O(n^2) per group; the best move almost always takes a pulse from
    one of the `top` coordinates whose removal alone hurts least and gives it to one of the `top`
    coordinates whose addition alone helps most, so only those top x top pairs are scored exactly
    (removals in the outer, additions in the inner order; the first of equal moves wins). xy = <|x|, y>
    and yy = <y, y> [g] are carried from move to move, never summed again. Groups that stop improving
    leave the active set, so later rounds are cheap.
    """
    g, n = a.shape
    top = min(top, n)
    active = torch.arange(g, device=a.device)
    tiny = torch.finfo(a.dtype).eps
    for _ in range(max_rounds):
        if active.numel() == 0:
            break
        aa, ya = a[active], y[active]
        xa, ys = xy[active][:, None], yy[active][:, None]
        add = (xa + aa) ** 2 / (ys + 2 * ya + 1)
        rem = ((xa - aa).clamp_min(0) ** 2 / (ys - 2 * ya + 1).clamp_min(1)).masked_fill(ya <= 0, -1.0)
        jj = _top(add, top)  # [g, top] where to add
        ii = _top(rem, top)  # [g, top] where to remove
        ai, aj = aa.gather(1, ii)[:, :, None], aa.gather(1, jj)[:, None, :]
        yi, yj = ya.gather(1, ii)[:, :, None], ya.gather(1, jj)[:, None, :]
        # move one pulse i -> j: xy - a_i + a_j, yy - (2 y_i - 1) + (2 y_j + 1)
        new_xy = (xa[:, :, None] - ai + aj).reshape(-1, top * top)
        new_yy = (ys[:, :, None] + 2 * (yj - yi) + 2).reshape(-1, top * top)
        cand = new_xy.clamp_min(0) ** 2 / new_yy
        bad = ((ii[:, :, None] == jj[:, None, :]) | (yi <= 0)).reshape(-1, top * top)
        cand = cand.masked_fill(bad, -1.0)
        best, flat = cand.max(dim=1)  # the first of equal maxima
        better = best > (xa[:, 0] ** 2 / ys[:, 0]) * (1 + 8 * tiny)
        if not bool(better.any()):
            break
        sel = better.nonzero()[:, 0]
        rows = active[sel]
        f = flat[sel]
        fi = ii[sel, f // top]
        fj = jj[sel, f % top]
        y[rows, fi] -= 1
        y[rows, fj] += 1
        xy[rows] = new_xy[sel, f]
        yy[rows] = new_yy[sel, f]
        active = rows
    return y


def search(x: torch.Tensor, k: int, *, refine: int | None = None) -> torch.Tensor:
    """Nearest point of P(n, k) to each group x[..., n] in direction (largest cosine).

    Opus' greedy (projection for k > n/2, then one pulse at a time), followed by a local search
    that moves single pulses between coordinates while the cosine strictly increases
    (`refine` rounds at most; default 2n; 0 gives the plain Opus greedy). Returns int64 y[..., n]
    with sum |y| = k and sign(y_j) = sign(x_j) wherever y_j != 0.
    """
    n = _check_search_input(x, k)
    rounds = 2 * n if refine is None else int(refine)
    shape = x.shape
    flat = x.reshape(-1, n)
    out = torch.empty(flat.shape, dtype=torch.int64, device=flat.device)
    if k == 0:
        return out.zero_().reshape(shape)
    work_dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    if _native is not None and work_dtype == torch.float32 and (flat.device.type == "cpu"
                                                                or flat.shape[0] <= FEW_GROUPS):
        y = _native(flat.to("cpu", work_dtype), k, rounds)
        if y is not None:
            return y.to(flat.device).reshape(shape)
    chunk = max(1, (_CHUNK * 16) // max(n, 1) if rounds == 0 else (_CHUNK * 4) // max(n, 1))
    for s in range(0, flat.shape[0], chunk):
        xc = flat[s : s + chunk].to(work_dtype)
        a = xc.abs()
        y, xy, yy = _greedy_fill(a, _project(a, k), k)
        if rounds > 0 and n > 1:
            y = _pulse_moves(a, y, xy, yy, rounds)
        yi = y.to(torch.int64)
        out[s : s + chunk] = torch.where(xc < 0, -yi, yi)
    return out.reshape(shape)


