"""Tuning what a quantized model stores beside its codes, so that it answers like the unquantized model.

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
by a generator seeded from the run's seed and the block index, the rate lowered to 0 along half a cosine
(`--finetune-schedule`); the tuned values are rounded to the dtype they are stored in, and kept only where
they lower the loss over all the tuning samples (otherwise the block is left as quantized), so tuning never
makes a block worse on its own data.

The whole model (tune_model, `--finetune model`) is tuned the same way, every block's values and the
final norm at once, against the unquantized model's next-token distributions on the tuning samples: the
loss is the KL divergence KL(P_ref || P) per token. The reference distributions are computed once, from
the unquantized blocks' outputs carried beside the quantized stream (reference_stream), and kept as their
TOPK most likely tokens plus one bucket for all the others (`Teacher`): KL between the two distributions
coarsened that way, which is exact on the tokens that carry almost all the mass and bounds the full KL
from below, in memory of tokens x TOPK rather than tokens x vocabulary. (End-to-end tuning of quantization
parameters: PEQA and EfficientQAT's E2E-QP, Kim et al. 2023 and Chen et al. 2024; distillation on the
teacher's logits as in PV-tuning, Malinovskii et al. 2024.) A model's worth of scales fits the samples it
steps on far better than other text (on SmolLM2 the KL on them fell by half, on the test text by a tenth),
so the whole model's last tuning samples take no steps: they decide whether the tuned values are kept. The
tuning may draw more samples than the calibration holds (on SmolLM2 three times as many gave the same test
perplexity).
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .codec import PackedPVQ, PVQSpec
from .models.adapters import block_linears, blocks, call_block, logits_after_blocks, run_block, run_carrying, set_module
from .modules.linear import QuantLinear, Rotations

BATCH = 2  # samples a step
TOPK = 64  # the reference's most likely tokens kept per position (the rest: one bucket)
HELD_OUT = 32  # tuning samples at most that judge the whole model's tuning instead of taking steps


class _TunedLinear(nn.Module):
    """A QuantLinear whose scales and bias are tuned: its codes decoded once at unit scale, in the original
    input basis (D R_in^T), the output rotation applied as the layer does. `dtype`: that of the matrix
    products the tuning's forwards run in (bfloat16 under the calibration's autocast)."""

    def __init__(self, q: QuantLinear, dtype: torch.dtype = torch.float32):
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
            q.drop_decoded()  # the copy here is the one tuning uses; the layer's own would stay behind
            self.s0 = self.ds = None
        # held in the dtype autocast would cast it to on every forward (the same rounding, once, in half the memory)
        self.u = (unit if rot.r_in is None else rot.r_in.apply_inverse(unit)).to(dtype)
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
    tensors set on their modules before every forward; `stored`: the dtype they are saved in. A parameter
    two modules share has one delta."""

    def __init__(self, block: nn.Module, linears: dict, stored: torch.dtype):
        inside = {id(p) for lin in linears.values() for p in lin.parameters()}
        self.items = []  # (module, attribute, original parameter, delta)
        delta = {}  # id(parameter) -> its delta
        for mod in block.modules():
            for attr, p in list(mod._parameters.items()):
                if p is not None and p.dim() == 1 and id(p) not in inside and p.is_floating_point():
                    d = delta.setdefault(id(p), nn.Parameter(torch.zeros_like(p, dtype=torch.float32)))
                    self.items.append((mod, attr, p, d))
        self.stored = stored

    def pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(parameter, delta), each parameter once."""
        return list({id(p): (p, d) for *_, p, d in self.items}.values())

    def deltas(self) -> list[nn.Parameter]:
        return [d for _, d in self.pairs()]

    def set(self) -> None:
        for mod, attr, p, d in self.items:
            mod._parameters.pop(attr, None)
            setattr(mod, attr, p.detach().float() * (1 + d))

    def restore(self, keep: bool) -> None:
        """Put the parameters back, with the tuned values rounded to their stored dtype where `keep`."""
        for mod, attr, p, d in self.items:
            if hasattr(mod, attr) and attr not in mod._parameters:
                delattr(mod, attr)
            mod._parameters[attr] = p
        if keep:
            with torch.no_grad():
                for p, d in self.pairs():
                    p.data.copy_((p.detach().float() * (1 + d.detach())).to(self.stored).to(p.dtype))


def _round_delta(delta: torch.Tensor, v0: torch.Tensor, dtype: torch.dtype) -> None:
    """Set delta so v0 * (1 + delta) is exactly its value rounded to `dtype` (where v0 is 0 the value is 0
    whatever delta is, so delta is left as it is)."""
    rounded = (v0 * (1 + delta)).to(dtype).float()
    delta.copy_(torch.where(v0 != 0, rounded / torch.where(v0 != 0, v0, 1) - 1, delta))


def _loss(block, hidden, target, kwargs, rows) -> torch.Tensor:
    x = hidden[rows]
    out = call_block(block, x, kwargs, rows)
    ref = target[rows]
    return (out.float() - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-30)


def _total(block, hidden, target, kwargs) -> float:
    with torch.no_grad():
        return sum(float(_loss(block, hidden, target, kwargs, slice(s, s + BATCH))) * min(BATCH, hidden.shape[0] - s)
                   for s in range(0, hidden.shape[0], BATCH)) / hidden.shape[0]


def _rate(schedule: str, steps: int):
    """The learning rate's factor at each step: "cosine" from 1 down along half a cosine (the last step's
    factor is small, not 0, so every step moves), "constant" 1."""
    if schedule == "constant":
        return lambda t: 1.0
    if schedule == "cosine":
        return lambda t: 0.5 * (1 + math.cos(math.pi * t / steps))
    raise ValueError(f"unknown schedule {schedule!r}: cosine or constant")


def _tune(root: nn.Module, quant: dict, norms: _TunedNorms, loss, total, *, steps: int, lr: float, seed: int,
          n: int, desc: str, progress: bool, recompute=None, precision=nullcontext,
          schedule: str = "cosine") -> tuple[float, float, bool]:
    """The loop tune_block and tune_model share: the modules of `root` named in `quant` (name -> the
    QuantLinear it is or will be) are swapped for _TunedLinear while Adam lowers `loss(rows)` on
    mini-batches of the n samples, its rate following `schedule` (see _rate); the tuned values are rounded
    to their stored dtypes and kept (written into the QuantLinears and norms) only if `total()`, the loss
    over all samples, drops. Returns (before, after, kept). `precision()`: the context the forwards run in
    (the calibration's: bfloat16 autocast or nothing).
    Whatever happens inside, `root` leaves with the modules and parameters it came with."""
    originals = {name: root.get_submodule(name) for name in quant}
    where = next(root.parameters()).device.type
    with precision():
        low = torch.get_autocast_dtype(where) if torch.is_autocast_enabled(where) else torch.float32
    tuned = {name: _TunedLinear(q, low) for name, q in quant.items()}
    for name, t in tuned.items():
        set_module(root, name, t)
    params = [p for t in tuned.values() for p in (t.ds, t.db) if p is not None] + norms.deltas()
    own = {id(p) for p in params}
    frozen = [p for p in root.parameters() if p.requires_grad and id(p) not in own]  # only deltas need gradients
    for p in frozen:
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    keep = False
    try:
        norms.set()
        with precision():
            before = total()
        opt = torch.optim.Adam(params, lr=lr)
        rate = _rate(schedule, steps)
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, unit="step")
        with torch.enable_grad(), (recompute(root) if recompute else nullcontext()):
            for step in bar:
                for group in opt.param_groups:
                    group["lr"] = lr * rate(step)
                rows = torch.randperm(n, generator=gen)[:BATCH]
                opt.zero_grad(set_to_none=True)
                norms.set()
                with precision():
                    value = loss(rows)
                value.backward()
                opt.step()
                bar.set_postfix(loss=f"{value.item():.4g}")
        bar.close()
        with torch.no_grad():  # what would be stored: scales in fp16, norms in their stored dtype
            for t in tuned.values():
                if t.pvq:
                    _round_delta(t.ds, t.s0, torch.float16)
            for p, d in norms.pairs():
                _round_delta(d, p.detach().float(), norms.stored)
        diverged = any(not bool(torch.isfinite(p).all()) for p in params)
        norms.set()
        with precision():
            after = float("inf") if diverged else total()
        keep = after < before
    finally:
        for name, lin in originals.items():
            set_module(root, name, lin)
        norms.restore(keep)
        for p in frozen:
            p.requires_grad_(True)
    if keep:
        for t in tuned.values():
            t.store()
    return before, (after if keep else before), keep


def tune_block(block: nn.Module, made: dict, hidden: torch.Tensor, target: torch.Tensor, kwargs: dict, *,
               steps: int, lr: float, seed: int, stored: torch.dtype = torch.float16, schedule: str = "cosine",
               desc: str = "tune", progress: bool = True, precision=nullcontext) -> dict:
    """Tune block's stored continuous values (see the module docstring) so its outputs with the quantized
    linears `made` (name -> QuantLinear, not yet installed) match `target` (the unquantized block's outputs
    on `hidden`, [samples, seqlen, hidden]). The tuned scales and biases are written into `made`, the norms
    into the block. Returns {"loss_before", "loss_after", "kept"} (relative mean squared errors)."""
    norms = _TunedNorms(block, block_linears(block), stored)
    before, after, keep = _tune(block, made, norms, lambda rows: _loss(block, hidden, target, kwargs, rows),
                                lambda: _total(block, hidden, target, kwargs), steps=steps, lr=lr, seed=seed,
                                n=hidden.shape[0], desc=desc, progress=progress, precision=precision,
                                schedule=schedule)
    return {"loss_before": before, "loss_after": after, "kept": keep}


def block_targets(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The unquantized block's outputs on `hidden`, in float32: what tune_block matches."""
    with torch.no_grad():
        return run_block(block, hidden, kwargs).float()


class Teacher:
    """The unquantized model's next-token distributions on the tuning samples, as each position's TOPK most
    likely tokens (`index` int64 [N, L, K], their log-probabilities `logp` float32 [N, L, K]) and the log of
    the mass of all others (`rest` [N, L])."""

    def __init__(self, index: torch.Tensor, logp: torch.Tensor, rest: torch.Tensor):
        self.index, self.logp, self.rest = index, logp, rest

    @classmethod
    def of(cls, model, hidden: torch.Tensor, input_ids: torch.Tensor, k: int = TOPK, progress: bool = False) -> "Teacher":
        """From `hidden`, the unquantized last block's outputs [N, L, D] for `input_ids` [N, L]: the model's
        head runs on one sample at a time (a sample's full logits are L x vocabulary floats)."""
        index, logp, rest = [], [], []
        for s in tqdm(range(input_ids.shape[0]), desc="reference logits", disable=not progress, leave=False):
            lp = logits_after_blocks(model, hidden[s:s + 1], input_ids[s:s + 1]).float().log_softmax(-1)
            top = lp.topk(min(k, lp.shape[-1] - 1), dim=-1)  # the bucket of the others never empty
            index.append(top.indices)
            logp.append(top.values)
            rest.append(_log_rest(top.values))
        return cls(torch.cat(index), torch.cat(logp), torch.cat(rest))

    def kl(self, logits: torch.Tensor, rows) -> torch.Tensor:
        """Mean over positions of KL(reference || model) between the coarsened distributions, for the model's
        `logits` [n, L, V] on samples `rows`."""
        return _CoarseKL.apply(logits.float(), self.index[rows], self.logp[rows], self.rest[rows])


class _CoarseKL(torch.autograd.Function):
    """Teacher.kl with its gradient written out: the logits are vocabulary-wide (on SmolLM2 [2, 512, 49152]
    floats a step), and autograd through log_softmax, a scatter and a logsumexp walked such tensors about
    fifteen times, half of a tuning step. Here the forward walks them four times and the backward once.

    With q = softmax(z), a position's loss is sum_k p_k (log p_k - log q_k) + r (log r - log q_rest), where
    q_rest = the model's mass outside the reference's kept tokens, summed directly (not 1 - sum q_k, which
    loses the small rests to cancellation). Its gradient in z_j is c q_j - p_j on a kept token and
    q_j (c - r / q_rest) on any other, with c = sum_k p_k + r (1 up to rounding)."""

    @staticmethod
    def forward(ctx, z, index, logp, rest):
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        q = torch.sub(z, lse).exp_()
        q_top = q.gather(-1, index)
        rest_mass = q.scatter_(-1, index, 0.0).sum(-1).clamp_min(1e-30)
        p, r = logp.exp(), rest.exp()
        lq_top = z.gather(-1, index) - lse  # not log(q_top): exact where q_top underflows
        kl = (p * (logp - lq_top)).sum(-1) + r * (rest - rest_mass.log())
        c = p.sum(-1) + r
        ctx.save_for_backward(q, index, c.unsqueeze(-1) * q_top - p, c - r / rest_mass)
        return kl.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, index, top, others = ctx.saved_tensors
        scale = grad / others.numel()
        g = q.mul_((others * scale).unsqueeze(-1))  # q is this function's own tensor, used once
        return g.scatter_(-1, index, top * scale), None, None, None


def _log_rest(top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(top))), the log of the mass outside the kept tokens, at least -100 (exp gives 0)."""
    mass = torch.logsumexp(top, dim=-1).clamp_max(0)
    return torch.log(-torch.expm1(mass)).clamp_min(-100.0)


def reference_stream(block: nn.Module, hidden: torch.Tensor, kwargs: list[dict], index: int) -> torch.Tensor:
    """The unquantized block's outputs on the unquantized stream: what the reference model's next block sees
    (kwargs: that stream's arguments of every block, which get what the block writes for later ones)."""
    with torch.no_grad():
        return run_carrying(block, hidden, kwargs, index).float()


def tuned_names(model) -> list[str]:
    """The names of the stored tensors tune_model may change (PVQ scales, quantized linears' biases, the 1-D
    float parameters of the blocks and after them): the tensors a resumed run takes from its tuned file."""
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    names = [f"{n}.{k}" for n, m in quant.items() for k in ("scales", "bias")
             if getattr(m, k, None) is not None and (k == "bias" or isinstance(m.packed, PackedPVQ))]
    inside = {id(p) for m in quant.values() for p in m.parameters()}
    embed = {id(p) for p in model.get_input_embeddings().parameters()}
    names += [n for n, p in model.named_parameters() if p.dim() == 1 and p.is_floating_point()
              and id(p) not in inside | embed]
    return sorted(names)


class _Recompute:
    """Inside, each block keeps only its inputs for the backward pass and runs again there (activation
    checkpointing): the whole model's activations at once would be the peak of tuning it."""

    def __init__(self, model):
        self.layers = blocks(model)

    def __enter__(self):
        for block in self.layers:
            forward = block.forward
            block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
        return self

    def __exit__(self, *exc):
        for block in self.layers:
            del block.forward


def held_out(n: int) -> int:
    """How many of n tuning samples (the last ones) tune_model keeps out of the steps to judge the tuning by:
    an eighth, at least 1 and at most HELD_OUT; none of 1 (that one sample then judges itself)."""
    return 0 if n < 2 else max(1, min(HELD_OUT, n // 8))


def _total_kl(model, ids: torch.Tensor, teacher: Teacher, first: int) -> float:
    """Mean KL over samples first.. of ids."""
    with torch.no_grad():
        return sum(float(teacher.kl(model(ids[s:s + BATCH], use_cache=False).logits, slice(s, s + BATCH)))
                   * min(BATCH, ids.shape[0] - s) for s in range(first, ids.shape[0], BATCH)) / (ids.shape[0] - first)


def tune_model(model, input_ids: torch.Tensor, teacher: Teacher, *, steps: int, lr: float, seed: int,
               stored: torch.dtype = torch.float16, schedule: str = "cosine", progress: bool = True,
               precision=nullcontext) -> dict:
    """Tune every block's stored continuous values and the 1-D parameters after the blocks (the final norm)
    so the model's next-token distributions on `input_ids` [N, L] match `teacher`'s (see the module
    docstring). The steps draw from the first N - held_out(N) samples; the model's QuantLinear modules and
    parameters receive the tuned values, rounded to their stored dtypes, if they lower the mean KL over the
    held-out rest (tuning that only fits its own samples is not kept). Returns {"kl_before", "kl_after",
    "kept", "steps", "samples", "held_out"} (the KL on the held-out samples)."""
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    norms = _TunedNorms(model, {**quant, "embed": model.get_input_embeddings()}, stored)

    def loss(rows):
        return teacher.kl(model(input_ids[rows], use_cache=False).logits, rows)

    n = input_ids.shape[0]
    held = held_out(n)
    judge = n - max(held, 1)  # the first sample judged (a lone sample judges itself)
    before, after, keep = _tune(model, quant, norms, loss, lambda: _total_kl(model, input_ids, teacher, judge),
                                steps=steps, lr=lr, seed=seed, n=n - held, desc="tune model",
                                progress=progress, recompute=_Recompute, precision=precision, schedule=schedule)
    return {"kl_before": before, "kl_after": after, "kept": keep, "steps": steps, "samples": n - held,
            "held_out": held}
