"""Tuning what a quantized block stores beside its codes, so that it answers like the unquantized block.

Once a block's linears are quantized, the values still continuous and stored anyway are tuned: each PVQ
linear's fp16 scales (one per row, or one for the matrix), each quantized linear's bias, and the block's
norm weights. The loss is the mean squared difference between the quantized block's outputs and the
unquantized block's outputs on the same calibration inputs (those the quantized blocks before it give),
relative to the outputs' mean square. The codes never change and the tuned values are stored in their
own fields, so bits per weight do not change. (The idea is "norm tweaking", Li et al. 2023, and the
block reconstruction of OmniQuant, Shao et al. 2023, restricted to what pvq stores anyway.)

The gradients are exact: a PVQ linear computes y = ((x R_in) (diag(s) D)^T) R_out^T + b, D its decoded
matrix at unit scale, which is linear in s and b. Every tuned value enters as value0 * (1 + delta) (a bias
as b0 + delta), so one learning rate suits values of any size. Adam, mini-batches of whole samples drawn
by a generator seeded from the run's seed and the block index; the tuned values are rounded to the dtype
they are stored in, and kept only where they lower the loss over all the tuning samples (otherwise the
block is left as quantized), so tuning never makes a block worse on its own data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .codec import PackedPVQ, PVQSpec
from .models.adapters import block_linears, run_block, set_module
from .modules.linear import QuantLinear, Rotations

BATCH = 2  # samples a step


class _TunedLinear(nn.Module):
    """A QuantLinear whose scales and bias are tuned: its codes decoded once at unit scale, in the original
    input basis (D R_in^T), the output rotation applied as the layer does."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.q = q
        rot = Rotations(q.out_features, q.in_features, q.seed_pair)
        self.r_out = rot.r_out
        packed = q.packed
        self.pvq = isinstance(packed, PackedPVQ)
        if self.pvq:
            unit = PackedPVQ(packed.spec, packed.shape, packed.codes, torch.ones_like(packed.row_scale),
                             packed.gain_levels).dequantize(torch.float32)
            self.s0 = packed.row_scale.float()
            self.ds = nn.Parameter(torch.zeros_like(self.s0))
        else:  # a uniform grid: its per-group scales and offsets stay; only the bias is tuned
            unit = q.rotated_weight().float()
            self.s0 = self.ds = None
        self.u = unit if rot.r_in is None else rot.r_in.apply_inverse(unit)
        self.b0 = None if q.bias is None else q.bias.detach().float().clone()
        self.db = None if q.bias is None else nn.Parameter(torch.zeros_like(self.b0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = F.linear(x.float(), self.u)
        if self.pvq:
            t = t * (self.s0 * (1 + self.ds))
        if self.r_out is not None:
            t = self.r_out.apply_inverse(t)
        if self.b0 is not None:
            t = t + (self.b0 + self.db)
        return t.to(x.dtype)

    def store(self) -> None:
        """Write the tuned values into the QuantLinear's stored fields."""
        with torch.no_grad():
            if self.pvq:
                self.q.scales.copy_((self.s0 * (1 + self.ds)).reshape(self.q.scales.shape).half())
            if self.b0 is not None:
                self.q.bias.data.copy_(self.b0 + self.db)
        self.q.drop_decoded()


class _TunedNorms:
    """The block's 1-D parameters outside its linears (norm weights and biases), as p0 * (1 + delta)
    tensors set on their modules before every forward; `stored`: the dtype they are saved in."""

    def __init__(self, block: nn.Module, linears: dict, stored: torch.dtype):
        inside = {id(p) for lin in linears.values() for p in lin.parameters()}
        self.items = []  # (module, attribute, original parameter, delta)
        for mod in block.modules():
            for attr, p in list(mod._parameters.items()):
                if p is not None and p.dim() == 1 and id(p) not in inside and p.is_floating_point():
                    self.items.append((mod, attr, p, nn.Parameter(torch.zeros_like(p, dtype=torch.float32))))
        self.stored = stored

    def deltas(self) -> list[nn.Parameter]:
        return [d for *_, d in self.items]

    def set(self) -> None:
        for mod, attr, p, d in self.items:
            mod._parameters.pop(attr, None)
            setattr(mod, attr, p.detach().float() * (1 + d))

    def restore(self, keep: bool) -> None:
        """Put the parameters back, with the tuned values rounded to their stored dtype where `keep`."""
        for mod, attr, p, d in self.items:
            if hasattr(mod, attr) and attr not in mod._parameters:
                delattr(mod, attr)
            if keep:
                with torch.no_grad():
                    p.data.copy_((p.detach().float() * (1 + d.detach())).to(self.stored).to(p.dtype))
            mod._parameters[attr] = p


def _round_delta(delta: torch.Tensor, v0: torch.Tensor, dtype: torch.dtype) -> None:
    """Set delta so v0 * (1 + delta) is exactly its value rounded to `dtype` (where v0 is 0 the value is 0
    whatever delta is, so delta is left as it is)."""
    rounded = (v0 * (1 + delta)).to(dtype).float()
    delta.copy_(torch.where(v0 != 0, rounded / torch.where(v0 != 0, v0, 1) - 1, delta))


def _loss(block, hidden, target, kwargs, rows) -> torch.Tensor:
    out = block(hidden[rows], **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    ref = target[rows]
    return (out.float() - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-30)


def _total(block, hidden, target, kwargs) -> float:
    with torch.no_grad():
        return sum(float(_loss(block, hidden, target, kwargs, slice(s, s + BATCH))) * min(BATCH, hidden.shape[0] - s)
                   for s in range(0, hidden.shape[0], BATCH)) / hidden.shape[0]


def tune_block(block: nn.Module, made: dict, hidden: torch.Tensor, target: torch.Tensor, kwargs: dict, *,
               steps: int, lr: float, seed: int, stored: torch.dtype = torch.float16,
               desc: str = "tune", progress: bool = True) -> dict:
    """Tune block's stored continuous values (see the module docstring) so its outputs with the quantized
    linears `made` (name -> QuantLinear, not yet installed) match `target` (the unquantized block's outputs
    on `hidden`, [samples, seqlen, hidden]). The tuned scales and biases are written into `made`, the norms
    into the block. Returns {"loss_before", "loss_after", "kept"} (relative mean squared errors)."""
    linears = block_linears(block)
    originals = {name: linears[name] for name in made}
    tuned = {name: _TunedLinear(q) for name, q in made.items()}
    norms = _TunedNorms(block, linears, stored)
    for name, t in tuned.items():
        set_module(block, name, t)
    params = [p for t in tuned.values() for p in (t.ds, t.db) if p is not None] + norms.deltas()
    gen = torch.Generator().manual_seed(seed)
    n = hidden.shape[0]
    try:
        norms.set()
        before = _total(block, hidden, target, kwargs)
        opt = torch.optim.Adam(params, lr=lr)
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, unit="step")
        with torch.enable_grad():
            for _ in bar:
                rows = torch.randperm(n, generator=gen)[:BATCH]
                opt.zero_grad(set_to_none=True)
                norms.set()
                loss = _loss(block, hidden, target, kwargs, rows)
                loss.backward()
                loss = loss.detach()
                opt.step()
                bar.set_postfix(loss=f"{loss.item():.3g}")
        bar.close()
        with torch.no_grad():  # what would be stored: scales in fp16, norms in their stored dtype
            for t in tuned.values():
                if t.pvq:
                    _round_delta(t.ds, t.s0, torch.float16)
            for _, _, p, d in norms.items:
                _round_delta(d, p.detach().float(), stored)
        diverged = any(not bool(torch.isfinite(p).all()) for p in params)
        norms.set()
        after = float("inf") if diverged else _total(block, hidden, target, kwargs)
    finally:
        for name, lin in originals.items():
            set_module(block, name, lin)
    keep = after < before
    norms.restore(keep)
    if keep:
        for t in tuned.values():
            t.store()
    return {"loss_before": before, "loss_after": after if keep else before, "kept": keep}


def block_targets(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The unquantized block's outputs on `hidden`, in float32: what tune_block matches."""
    with torch.no_grad():
        return run_block(block, hidden, kwargs).float()
