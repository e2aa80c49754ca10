"""Layer-input second moments H = E[x x^T] for Hessian-aware quantization.

For a linear layer y = x W^T, the squared output error of a weight perturbation D over a set of
inputs X (one input per row) is ||X D^T||^2 = N * tr(D H D^T) with H = X^T X / N, so H is the
Hessian (up to a factor 2) of the layer-wise reconstruction loss that OBQ/GPTQ minimise
(Frantar & Alistarh, "Optimal Brain Compression", 2022; Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", arXiv 2210.17323).

The running sum is float64: it adds up millions of outer products of activations whose magnitudes
differ by orders (outlier channels), and float32 would lose the small ones to the large. Each chunk of
_ROWS_PER_CHUNK rows is multiplied in float32 (twice float64's speed on a CPU), which rounds an entry
by about 1e-7 of itself per chunk: far below the sampling noise of H itself (about 1/sqrt(rows), 4e-3
for 65k calibration tokens), which the solver's damping is sized for. (GPTQ's reference code keeps the
whole sum in float32.)
"""
from __future__ import annotations

import torch

from ..codec.gainshape import row_chunks

# Rows multiplied at once in float32 before their product joins the float64 sum: few enough that a chunk's
# own rounding stays small, enough that the matmuls run at full speed.
_ROWS_PER_CHUNK = 8192
_ADD_ROWS = 256


def _finite(t: torch.Tensor) -> bool:
    return not t.numel() or bool(torch.isfinite(t).all())


def _add_products(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bad: str) -> None:
    """total += a^T b for rows a, b [N, dim]: each chunk of rows multiplied in float32, the running sum float64.

    Raises ValueError(bad), leaving total as it was, where a or b holds NaN or inf, or values whose products
    overflow float32. Entry (j, j) of a chunk's product is sum_t a_tj b_tj, and a product with a NaN or an
    infinite factor is never finite, nor is a sum with such a term: so a column of a or b with a bad value in
    it gives a bad diagonal entry, and checking those dim sums (one pass over the chunk) before adding the chunk
    checks the whole chunk. (Testing every input value costs a pass over the activations and a mask of their size:
    4 % of a pvq-gptq run's time on SmolLM2, 7 % with --asymmetric.) A batch of several chunks is checked whole
    first, so that no chunk of it is added before a later one fails. The product is made a few of its rows at a time
    as they are added, never whole (a float32 [dim, dim]: 3 GiB for a 70B model's down projection); on the CPUs
    tried those rows are the whole product's to the bit (tests/test_solvers.py)."""
    rows = a.shape[0]
    if rows > _ROWS_PER_CHUNK and not (_finite(a) and (b is a or _finite(b))):
        raise ValueError(bad)
    for s in range(0, rows, _ROWS_PER_CHUNK):
        ac = a[s : s + _ROWS_PER_CHUNK].to(device=total.device, dtype=torch.float32)
        bc = ac if b is a else b[s : s + _ROWS_PER_CHUNK].to(device=total.device, dtype=torch.float32)
        diagonal = (ac[:, c:c + _ADD_ROWS] * bc[:, c:c + _ADD_ROWS] for c in range(0, ac.shape[1], _ADD_ROWS))
        if not all(_finite(part.sum(0)) for part in diagonal):
            raise ValueError(bad)
        for r in range(0, total.shape[0], _ADD_ROWS):  # widened a few rows at a time: no float64 copy of it all
            total[r:r + _ADD_ROWS] += ac[:, r:r + _ADD_ROWS].T @ bc


class HessianAccumulator:
    """Running H = sum_t x_t x_t^T over every input row x_t seen, and the number of rows.

    `add_batch(x)` takes activations x[..., dim] with any leading dimensions (batch, sequence);
    `hessian()` returns the mean H / count as float64 [dim, dim].
    """

    def __init__(self, dim: int):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{type(self).__name__} dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.count = 0
        self._sum: torch.Tensor | None = None  # float64 [dim, dim], allocated on the first batch's device

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate the outer products of every row of x[..., dim]."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"add_batch expects a floating-point tensor x[..., {self.dim}], got "
                             f"{getattr(x, 'dtype', type(x))}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"add_batch expects x[..., {self.dim}], got shape {tuple(x.shape)}")
        flat = x.detach().reshape(-1, self.dim)  # [N, dim]
        if self._sum is None:
            self._sum = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=flat.device)
        # a bad batch leaves the sum untouched
        _add_products(self._sum, flat, flat, "add_batch: x contains NaN or inf, or values too large to square in "
                      "float32 (a diverged activation would poison H)")
        self.count += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        """The mean second moment H / count: float64 [dim, dim]."""
        if self.count == 0 or self._sum is None:
            raise ValueError(f"{type(self).__name__}.hessian(): no input rows were added")
        return self._sum / self.count

    def merge(self, other: "HessianAccumulator") -> None:
        """Add another accumulator's rows (the sums of a later calibration shard) to this one, in place.
        Merged in a fixed order, shards give the same floats wherever each shard was summed."""
        if other.dim != self.dim:
            raise ValueError(f"{type(self).__name__}.merge: dimensions {self.dim} and {other.dim} differ")
        if other._sum is None:
            return
        if self._sum is None:
            self._sum = other._sum.clone()
        else:
            self._sum += other._sum
        self.count += other.count

    def take(self) -> torch.Tensor:
        """hessian(), computed in the running sum's own memory; the accumulator holds nothing afterwards."""
        if self.count == 0 or self._sum is None:
            raise ValueError(f"{type(self).__name__}.take(): no input rows were added")
        h, self._sum, self.count = self._sum.div_(self.count), None, 0  # the same floats as hessian()
        return h


class CrossAccumulator(HessianAccumulator):
    """Running C = sum_t x_t (r_t - x_t)^T over pairs of rows: x_t a layer's input in the quantized model, r_t
    the same token's input to that layer in the unquantized model. With H = E[x x^T], the mean C / count (take)
    is what moves GPTQ's target from the weight to the unquantized model's outputs (gptq.asymmetric_target)."""

    def add_batch(self, x: torch.Tensor, ref: torch.Tensor) -> None:
        """Accumulate the pairs of rows of x[..., dim] and ref[..., dim] (the same shape, row t with row t)."""
        if not (isinstance(x, torch.Tensor) and isinstance(ref, torch.Tensor)) or x.shape != ref.shape \
                or x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"CrossAccumulator.add_batch expects x and ref of one shape [..., {self.dim}], got "
                             f"{tuple(getattr(x, 'shape', ()))} and {tuple(getattr(ref, 'shape', ()))}")
        flat = x.detach().reshape(-1, self.dim).float()
        diff = ref.detach().reshape(-1, self.dim).float() - flat  # a bad x makes its difference bad too
        if self._sum is None:
            self._sum = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=flat.device)
        _add_products(self._sum, flat, diff, "CrossAccumulator.add_batch: x or ref contains NaN or inf, or values "
                      "whose products overflow float32")
        self.count += flat.shape[0]


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None = None) -> float:
    """The relative error of w_hat as the energy of isotropic noise that costs the layer as much.

    Without h: ||w - w_hat||^2 / ||w||^2. With h = E[x x^T]: tr(D H D^T) * cols / (||w||^2 tr(H)),
    D = w - w_hat. Gaussian noise N with ||N||^2 = r ||w||^2 has E tr(N H N^T) = r ||w||^2 tr(H) / cols,
    so this is the r at which such noise does the same output damage, the unit in which
    allocation.py measures sensitivities and predicts errors. Both in float64; 0 for a zero w.
    """
    if w.shape != w_hat.shape or w.dim() != 2:
        raise ValueError(f"relative_error expects two matrices of one shape, got {tuple(w.shape)} and {tuple(w_hat.shape)}")
    total = ErrorSum(w.shape[1], h)
    total.add(w, w_hat)
    return total.value()


class ErrorSum:
    """relative_error of a matrix given a block of rows at a time (a solve that never holds the whole w_hat).
    Blocks that start on the row_chunks boundaries of the whole matrix give exactly its relative_error."""

    def __init__(self, cols: int, h: torch.Tensor | None = None):
        self.cols, self.noise_of, self.trace, self.rows_at_once = cols, None, None, None
        if h is not None:
            if tuple(h.shape) != (cols, cols):
                raise ValueError(f"relative_error: h must be [{cols}, {cols}], got {tuple(h.shape)}")
            h = h.detach().double()
            self.measure_by(lambda d: float(((d @ h) * d).sum()), float(h.diagonal().sum()))
        self.energy = self.noise = 0.0

    def measure_by(self, noise_of, trace: float, weights_at_once: int | None = None) -> None:
        """Measure each block's error as noise_of(d) = tr(d H d^T) (float64 rows d of w - w_hat) with tr(H) = trace,
        given rows of about weights_at_once weights at a time (default: the codec's row chunks): how a solve that no
        longer holds H measures it (gptq's factor, whose products want more rows at once than a chunk)."""
        self.noise_of, self.trace = noise_of, trace
        self.rows_at_once = None if weights_at_once is None else max(1, weights_at_once // max(self.cols, 1))

    def add(self, w: torch.Tensor, w_hat: torch.Tensor) -> None:
        """Rows of w and of its quantized w_hat."""
        # a few rows at a time: float64 copies of a whole large matrix would dominate a run's peak memory
        rows, step = w.shape[0], self.rows_at_once
        pieces = row_chunks(*w.shape) if step is None else ((s, min(s + step, rows)) for s in range(0, rows, step))
        for s, e in pieces:
            part = w[s:e].detach().double()
            d = part - w_hat[s:e].detach().double()
            self.energy += float(part.pow(2).sum())
            self.noise += float(d.pow(2).sum()) if self.noise_of is None else self.noise_of(d)

    def value(self) -> float:
        if self.energy == 0:
            return 0.0
        if self.noise_of is None:
            return self.noise / self.energy
        return 0.0 if self.trace <= 0 else self.noise * self.cols / (self.energy * self.trace)
