"""Measurements on the unquantized model that the allocation planner needs.

- sensitivities: a_l of every quantizable linear. Gaussian noise N of relative energy `rel_noise`
  (||N||^2 = rel_noise * ||W||^2) is injected into one layer at a time, as W + N and W - N, and the
  mean change of the next-token loss on calibration windows is measured: a_l = dloss / rel_noise. The
  inputs of every block are cached once, so each probe runs only the blocks from the noisy layer's
  block onward.
- fisher_sensitivities: the same a_l from gradients instead of one noisy forward pair per layer: the
  curvature term of a probe, E[N^T H N] / 2, is sigma^2 tr(H_ll) / 2, and for the next-token loss the
  trace of each layer's (Gauss-Newton) Hessian is the expected squared gradient norm under labels drawn
  from the model's own predictions. A few backward passes give every layer at once.
- gptq_error_factors: how much pvq-gptq's error feedback shrinks each layer's error, from its Hessian.
- rehearse / rehearse_plan: the linear sum sum_l a_l err_l is what the knapsack minimises, but it
  underestimates the loss of a whole quantized model, more so at low rates (the layers' errors
  compound; docs/allocation.md has the measurements). The rehearsal injects Gaussian noise of each
  layer's planned effective relative error into every layer at once (antithetic pairs, a few draws)
  and measures the calibration loss: that is the reported prediction.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.adapters import (block_hessians, block_linear_names, block_linears, blocks, capture_block_inputs, carry,
                              layer_name, logits_after_blocks, run_carrying)
from ..picker import FAST_GROUP_DIMS, PVQ_GROUP_DIMS
from ..settings import QuantConfig
from ..solvers.gptq import error_factors
from ..transforms.rotate import layer_seeds, rotate_hessian


@torch.no_grad()
def _block_inputs(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    hidden, kwargs = capture_block_inputs(model, ids)
    inputs = [hidden]
    for j, block in enumerate(blocks(model)):
        inputs.append(run_carrying(block, inputs[-1], kwargs, j))
    return inputs, kwargs


@torch.no_grad()
def _loss_from(model, start: int, hidden: torch.Tensor, kwargs: list, ids: torch.Tensor) -> float:
    """Mean next-token NLL of `ids` when `hidden` enters block `start` (kwargs: every block's arguments, with
    what the blocks before `start` carry to later ones; left as they are)."""
    layers = blocks(model)
    h, kwargs = hidden, [dict(kw) for kw in kwargs]
    for j in range(start, len(layers)):
        h = run_carrying(layers[j], h, kwargs, j)
    logits = logits_after_blocks(model, h, ids).float()
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def _to_energy(z: torch.Tensor, energy: float) -> torch.Tensor:
    """z scaled in place to squared norm `energy` (noise of an exact relative size)."""
    return z.mul_(math.sqrt(energy / float(z.pow(2).sum())))


@torch.no_grad()
def sensitivities(model, ids: torch.Tensor, rel_noise: float = 0.01, seed: int = 0, progress: bool = True) -> dict:
    """{layer name: {"a": dloss / rel_noise, "dloss": ...}} for every quantizable linear, plus "_base_loss"."""
    if not rel_noise > 0:
        raise ValueError(f"rel_noise must be > 0, got {rel_noise!r}")
    inputs, kwargs = _block_inputs(model, ids)
    base = _loss_from(model, len(blocks(model)), inputs[-1], kwargs, ids)
    out = {"_base_loss": base, "_rel_noise": rel_noise, "_tokens": int(ids.numel()), "_probe": "noise"}
    layers = blocks(model)
    bar = tqdm(total=len(block_linear_names(model)), desc="sensitivity", disable=not progress, unit="linear")
    g = torch.Generator().manual_seed(seed)
    for i, block in enumerate(layers):
        for name, mod in block_linears(block).items():
            w = mod.weight
            keep = w.detach().clone()
            noise = _to_energy(torch.randn(w.shape, generator=g, dtype=torch.float32),
                               rel_noise * float(keep.float().pow(2).sum()))
            # antithetic pair W + N, W - N: the first-order term g.N cancels in the mean, leaving the
            # curvature term the linearity model is about (one-sided probes of a small N are dominated
            # by g.N and came out negative for 47 of the 210 SmolLM2 layers)
            w.add_(noise.to(w.dtype))
            up = _loss_from(model, i, inputs[i], kwargs, ids)
            w.copy_(keep)
            w.sub_(noise.to(w.dtype))
            down = _loss_from(model, i, inputs[i], kwargs, ids)
            w.copy_(keep)
            dloss = (up + down) / 2 - base
            out[layer_name(model, i, name)] = {"a": dloss / rel_noise, "dloss": dloss, "dloss_plus": up - base,
                                               "dloss_minus": down - base}
            bar.update(1)
    bar.close()
    return out


def fisher_sensitivities(model, ids: torch.Tensor, draws: int = 2, seed: int = 0, progress: bool = True) -> dict:
    """sensitivities()'s {layer name: {"a": ...}} from the Fisher information instead of noise probes.

    For the mean next-token loss over T positions, noise N with entries of variance s^2 in layer l raises
    the loss by s^2 tr(H_l) / 2 on average, and tr(H_l) (the Gauss-Newton part, the Hessian of a model
    near its optimum) is E ||grad_{W_l} sum_t -log p(y_t)||^2 / T with y_t drawn from the model's own
    distribution at t: the cross terms between positions vanish in expectation, so one backward pass per
    sample and draw estimates every layer's trace at once, and it is never negative. With relative noise
    energy r, s^2 = r ||W_l||^2 / numel, so a_l = ||W_l||^2 / numel * E||grad||^2 / (2 T). Labels are
    drawn by a generator seeded with `seed`; `draws` label draws per window are averaged."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws!r}")
    names = dict(block_linear_names(model))
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    for mod in names.values():
        mod.weight.requires_grad_(True)
    sq = {n: 0.0 for n in names}
    gen = torch.Generator().manual_seed(seed)
    base, positions = 0.0, ids.shape[0] * (ids.shape[1] - 1)
    bar = tqdm(total=draws * ids.shape[0], desc="sensitivity (fisher)", disable=not progress, unit="backward")
    try:
        with torch.enable_grad():
            for d in range(draws):
                for s in range(ids.shape[0]):
                    logits = model(ids[s:s + 1], use_cache=False).logits[0, :-1].float()
                    if d == 0:
                        base += float(F.cross_entropy(logits.detach(), ids[s, 1:], reduction="sum"))
                    labels = torch.multinomial(logits.detach().softmax(-1), 1, generator=gen)[:, 0]
                    grads = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"),
                                                [m.weight for m in names.values()], allow_unused=True)
                    for n, g in zip(names, grads):  # None: an expert no token of this window was routed to
                        sq[n] += 0.0 if g is None else float(g.float().pow(2).sum())
                    bar.update(1)
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
        bar.close()
    out = {"_base_loss": base / positions, "_tokens": int(ids.numel()), "_probe": f"fisher ({draws} label draws)"}
    for n, mod in names.items():
        w = mod.weight.detach().float()
        out[n] = {"a": float(w.pow(2).sum()) / w.numel() * sq[n] / draws / (2 * positions)}
    return out


def _noise(shape, energy: float, seed: int) -> torch.Tensor:
    """Gaussian noise with exactly the given squared norm (float32), from its own seeded generator."""
    return _to_energy(torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32), energy)


@torch.no_grad()
def rehearse(model, ids: torch.Tensor, rel: dict[str, float], draws: int = 3, seed: int = 0,
             progress: bool = True) -> dict:
    """Mean calibration-loss increase when every layer in `rel` carries Gaussian noise of relative
    energy rel[layer] (||N||^2 = rel * ||W||^2) at the same time.

    Each draw runs W + N and W - N (antithetic: the first-order terms cancel in the mean); draws
    use independent noise. The weights are restored exactly afterwards. Returns
    {"dloss": mean, "draws": [per draw (up + down) / 2 - base], "base_loss": ...}.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws!r}")
    mods = {n: model.get_submodule(n) for n in rel}
    for n, r in rel.items():
        if not r >= 0:
            raise ValueError(f"relative noise energy of {n} must be >= 0, got {r!r}")
    hidden, kwargs = capture_block_inputs(model, ids)
    base = _loss_from(model, 0, hidden, kwargs, ids)
    keep = {n: m.weight.detach().clone() for n, m in mods.items()}
    energy = {n: float(w.float().pow(2).sum()) for n, w in keep.items()}
    out = []
    bar = tqdm(total=2 * draws, desc="rehearse plan", disable=not progress, unit="forward")
    try:
        for d in range(draws):
            pair = []
            for sign in (1.0, -1.0):
                for i, (n, m) in enumerate(mods.items()):
                    z = _noise(keep[n].shape, rel[n] * energy[n], seed * 1_000_003 + d * 100_003 + i)
                    m.weight.copy_((keep[n].float() + sign * z).to(m.weight.dtype))
                pair.append(_loss_from(model, 0, hidden, kwargs, ids))
                bar.update(1)
            out.append(sum(pair) / 2 - base)
    finally:
        for n, m in mods.items():
            m.weight.copy_(keep[n])
        bar.close()
    return {"dloss": sum(out) / len(out), "draws": out, "base_loss": base}


def rehearse_plan(model, ids: torch.Tensor, report: dict, draws: int = 3, seed: int = 0, progress: bool = True) -> dict:
    """Add the rehearsed prediction of the chosen plan and of the uniform setting to a plan() report
    (in place; returned): the effective relative error of every layer as noise, all layers at once."""
    layers = report["layers"]
    chosen = rehearse(model, ids, {n: v["effective_err"] for n, v in layers.items()}, draws, seed, progress)
    report["joint_predicted_dloss"] = chosen["dloss"]
    report["joint_draws"] = chosen["draws"]
    if all(v.get("uniform_effective_err") is not None for v in layers.values()):
        uni = rehearse(model, ids, {n: v["uniform_effective_err"] for n, v in layers.items()}, draws, seed, progress)
        report["uniform_joint_predicted_dloss"] = uni["dloss"]
        report["uniform_predicted_dloss"] = uni["dloss"]
        report["uniform_predicted_ppl_factor"] = math.exp(uni["dloss"])
    report["predicted_dloss"] = chosen["dloss"]
    report["predicted_ppl_factor"] = math.exp(chosen["dloss"])
    report["prediction"] = f"joint noise rehearsal ({draws} antithetic draws)"
    return report


@torch.no_grad()
def gptq_error_factors(model, cfg: QuantConfig, calib_ids: torch.Tensor, progress: bool = True) -> dict:
    """{layer: {n: f}}: how much pvq-gptq's error feedback shrinks each layer's error for groups of n.

    f = solvers.gptq.error_factor of the layer's Hessian H = X^T X on the calibration tokens, in the
    layer's rotated basis (its stored seeds) with cfg.damp; the blocks run one at a time on the
    unquantized model, so memory stays at one block's activations. The relative error of a setting
    under pvq-gptq is then predicted as f times its data-free error on Gaussian weights.
    """
    hidden, kwargs = capture_block_inputs(model, calib_ids)
    out = {}
    layers = blocks(model)
    bar = tqdm(total=len(layers), desc="gptq error factors", disable=not progress, unit="block")
    for i, block in enumerate(layers):
        written: dict = {}
        hess, hidden = block_hessians(block, hidden, kwargs[i], keep=True, written=written)
        carry(kwargs, i, written, hidden.shape[0])
        for name, mod in block_linears(block).items():
            full = layer_name(model, i, name)
            dims = sorted(set([cfg.group_dim] if cfg.group_dim else [n for n in PVQ_GROUP_DIMS + FAST_GROUP_DIMS
                                                                     if mod.in_features % n == 0]))
            if name not in hess:  # no calibration token reaches it (an expert, a block skipped on text): pvq-gptq
                out[full] = {str(n): 1.0 for n in dims}  # rounds it without data, at the data-free error
                continue
            h = rotate_hessian(hess[name], layer_seeds(cfg.seed, full, cfg.rotates)[0])
            out[full] = {str(n): f for n, f in error_factors(h, dims, cfg.damp).items()}
        bar.update(1)
    bar.close()
    return out
