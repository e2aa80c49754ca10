"""Per-layer bit allocation to a total budget (HIGGS linearity + an exact knapsack).

1. Sensitivity a_l of every quantizable linear: Gaussian noise N of relative energy `rel_noise`
   (||N||^2 = rel_noise * ||W||^2) is injected into one layer at a time, as W + N and W - N, and the
   mean change of the next-token loss on calibration windows is measured: a_l = dloss / rel_noise. The inputs of every
   block are cached once, so each probe runs only the blocks from the noisy layer's block onward.
2. Error err(option) of every candidate setting: the relative MSE of the codec on an i.i.d.
   Gaussian matrix (config._proxy_sqnr). After the two-sided Hadamard rotation a layer's weights
   are that close to Gaussian (codec benchmark: 17.45 dB on SmolLM2 vs 17.49 dB on Gaussian at 3.25
   bits), so one table serves every layer.
3. The options of each layer are the settings `choose_spec` picks at a ladder of rates; every
   stored bit counted (codes, scales, seeds). solvers.allocation.allocate picks one per layer
   with the total at most bits * weights and the predicted loss increase sum_l a_l err_l smallest.

The plan is a dict of per-layer settings (QuantConfig.overrides) plus a report: chosen setting,
a_l, predicted contribution, against the uniform setting at the same budget.

4. Prediction (`rehearse`): the linear sum is what the knapsack minimises, but it underestimates the
   loss of a whole quantized model, more so at low rates: the layers' errors compound (SmolLM2,
   pvq-gptq: the linear sum predicts 0.569 of the 0.731 loss increase measured at 2.25 bits,
   0.141 of 0.156 at 3.25). The rehearsal injects Gaussian noise of each layer's planned
   effective relative error into every layer at once (antithetic pairs, a few draws) and measures
   the calibration loss: 0.751 and 0.156 for those two models. It is the reported prediction; the
   linear sum stays in the report.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .codec import PVQSpec, bits_per_weight
from .config import FAST_GROUP_DIMS, PVQ_GROUP_DIMS, QuantConfig, _proxy_sqnr, choose_spec, spec_to_dict
from .models.adapters import LINEARS, blocks, capture_block_inputs, run_block

RATES = tuple(x / 4 for x in range(6, 25))  # 1.5, 1.75, ..., 6.0 bits per weight


@torch.no_grad()
def _block_inputs(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    hidden, kwargs = capture_block_inputs(model, ids)
    inputs = [hidden]
    for block in blocks(model):
        inputs.append(run_block(block, inputs[-1], kwargs))
    return inputs, kwargs


@torch.no_grad()
def _loss_from(model, start: int, hidden: torch.Tensor, kwargs: dict, ids: torch.Tensor) -> float:
    """Mean next-token NLL of `ids` when `hidden` enters block `start`."""
    layers = blocks(model)
    h = hidden
    for j in range(start, len(layers)):
        h = run_block(layers[j], h, kwargs)
    logits = model.lm_head(model.model.norm(h)).float()
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
    out = {"_base_loss": base, "_rel_noise": rel_noise, "_tokens": int(ids.numel())}
    layers = blocks(model)
    bar = tqdm(total=len(layers) * len(LINEARS), desc="sensitivity", disable=not progress, unit="linear")
    g = torch.Generator().manual_seed(seed)
    for i, block in enumerate(layers):
        for name in LINEARS:
            w = block.get_submodule(name).weight
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
            out[f"model.layers.{i}.{name}"] = {"a": dloss / rel_noise, "dloss": dloss, "dloss_plus": up - base,
                                               "dloss_minus": down - base}
            bar.update(1)
    bar.close()
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


def add_measured(report: dict, errors: dict[str, float]) -> dict:
    """Per layer, the relative error the quantizer actually left (`api.quantize`'s layer errors, the
    same isotropic-equivalent measure as effective_err) and its contribution a_l * err, next to the
    predicted ones (in place; returned)."""
    total = 0.0
    for n, v in report["layers"].items():
        if n not in errors:
            raise ValueError(f"no measured error for layer {n}")
        v["measured_err"] = errors[n]
        v["measured_contribution"] = max(v["a"], 0.0) * errors[n]
        total += v["measured_contribution"]
    report["measured_linear_dloss"] = total
    return report


@torch.no_grad()
def error_factors(model, cfg: QuantConfig, calib_ids: torch.Tensor, progress: bool = True) -> dict:
    """{layer: {n: f}}: how much pvq-gptq's error feedback shrinks each layer's error for groups of n.

    f = solvers.gptq.error_factor of the layer's Hessian H = X^T X on the calibration tokens, in the
    layer's rotated basis (its stored seeds) with cfg.damp; the blocks run one at a time on the
    unquantized model, so memory stays at one block's activations. The relative error of a setting
    under pvq-gptq is then predicted as f times its data-free error on Gaussian weights.
    """
    from .api import layer_seeds
    from .models.adapters import block_hessians, block_linears
    from .nn import rotate_hessian
    from .solvers.gptq import error_factors as factors_of

    hidden, kwargs = capture_block_inputs(model, calib_ids)
    out = {}
    layers = blocks(model)
    bar = tqdm(total=len(layers), desc="gptq error factors", disable=not progress, unit="block")
    for i, block in enumerate(layers):
        hess, hidden = block_hessians(block, hidden, kwargs, keep=True)
        for name, mod in block_linears(block).items():
            full = f"model.layers.{i}.{name}"
            seeds = layer_seeds(cfg.seed, full, cfg.rotates)
            h = rotate_hessian(hess[name], seeds[0])
            dims = [cfg.group_dim] if cfg.group_dim else [n for n in PVQ_GROUP_DIMS + FAST_GROUP_DIMS
                                                          if mod.in_features % n == 0]
            out[full] = {str(n): f for n, f in factors_of(h, sorted(set(dims)), cfg.damp).items()}
        bar.update(1)
    bar.close()
    return out


def options(cfg: QuantConfig, rows: int, cols: int, rates=RATES) -> list[dict]:
    """Distinct settings choose_spec picks at each rate, with their stored bits and proxy relative error."""
    seen, out = set(), []
    for r in rates:
        try:
            spec = choose_spec(replace(cfg, bits=r, overrides=None), rows, cols)
        except ValueError:
            continue
        if spec in seen or not isinstance(spec, PVQSpec):
            continue
        seen.add(spec)
        stored = bits_per_weight(spec, rows, cols, 2 if cfg.rotates else 0).total
        out.append({"spec": spec, "bits": stored, "err": 10 ** (-_proxy_sqnr(spec) / 10)})
    return out


def plan(model, cfg: QuantConfig, ids: torch.Tensor | None, rel_noise: float = 0.01, rates=RATES,
         progress: bool = True, sens: dict | None = None, factors: dict | None = None,
         floor: float | None = 1.0) -> tuple[dict, dict]:
    """(overrides {layer: spec dict}, report) for cfg.bits over all quantizable linears of `model`.

    sens: sensitivities measured before (they do not depend on the budget); measured from ids if None.
    factors: error_factors() for pvq-gptq (each setting's error times the layer's factor for its n);
    None predicts data-free errors. floor: no layer gets fewer than cfg.bits - floor bits per weight
    (a guard against a sensitivity estimate that came out near zero by chance; None: no guard)."""
    from .solvers.allocation import allocate

    if not cfg.is_pvq:
        raise ValueError("--allocate chooses PVQ settings: use --method pvq or pvq-gptq")
    if sens is None:
        sens = sensitivities(model, ids, rel_noise, cfg.seed, progress)
    missing = [n for n in dict(model.named_modules()) if n.startswith("model.layers.") and n.rpartition(".")[2] in
               {x.rpartition(".")[2] for x in LINEARS} and n not in sens]
    if missing:
        raise ValueError(f"sensitivities miss layers of this model (e.g. {missing[0]}): measured on another model?")
    names = [n for n in sens if not n.startswith("_")]
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    table = {s: options(cfg, *s, rates) for s in set(shapes.values())}
    if floor is not None:  # keep the settings at or above the floor (and always the cheapest one above it)
        for s_, opts in table.items():
            keep = [o for o in opts if o["bits"] / math.prod(s_) >= cfg.bits - floor - 1e-9]
            table[s_] = keep or opts[-1:]
    if factors is not None:
        missing = [n for n in names if n not in factors]
        if missing:
            raise ValueError(f"gptq error factors miss layer {missing[0]}")

    def eff(n, o):
        return o["err"] * (factors[n][str(o["spec"].n)] if factors is not None else 1.0)

    weights = sum(r * c for r, c in shapes.values())
    budget = int(math.floor(cfg.bits * weights))
    a = {n: max(sens[n]["a"], 0.0) for n in names}  # a noisy negative estimate means "insensitive"
    costs = [[a[n] * eff(n, o) for o in table[shapes[n]]] for n in names]
    bits = [[o["bits"] for o in table[shapes[n]]] for n in names]
    pick = allocate(costs, bits, budget)
    uniform = {s: choose_spec(replace(cfg, overrides=None), *s) for s in table}
    layers, overrides = {}, {}
    for n, j in zip(names, pick):
        o = table[shapes[n]][j]
        u = next(x for x in table[shapes[n]] if x["spec"] == uniform[shapes[n]]) if any(
            x["spec"] == uniform[shapes[n]] for x in table[shapes[n]]) else None
        overrides[n] = spec_to_dict(o["spec"])
        layers[n] = {"a": sens[n]["a"], "setting": o["spec"].name, "bits_per_weight": o["bits"] / math.prod(shapes[n]),
                     "err": o["err"], "effective_err": eff(n, o), "predicted": a[n] * eff(n, o),
                     "uniform_effective_err": None if u is None else eff(n, u),
                     "uniform_predicted": None if u is None else a[n] * eff(n, u)}
    pred = sum(v["predicted"] for v in layers.values())
    upred = sum(v["uniform_predicted"] or 0.0 for v in layers.values())
    report = {
        "target_bits": cfg.bits, "budget_bits": budget, "weights": weights,
        "allocated_bits": sum(table[shapes[n]][j]["bits"] for n, j in zip(names, pick)),
        "error_model": "pvq-gptq (data-free error x gptq error factor)" if factors is not None else "data-free",
        "floor_bits": None if floor is None else cfg.bits - floor,
        "rel_noise": sens.get("_rel_noise", rel_noise), "calib_tokens": sens.get("_tokens"), "base_loss": sens["_base_loss"],
        "prediction": "linear (sum of a_l * err_l)",
        "predicted_dloss": pred, "predicted_ppl_factor": math.exp(pred),
        "uniform_predicted_dloss": upred, "uniform_predicted_ppl_factor": math.exp(upred),
        "linear_predicted_dloss": pred, "linear_predicted_ppl_factor": math.exp(pred),
        "uniform_linear_predicted_dloss": upred, "uniform_linear_predicted_ppl_factor": math.exp(upred),
        "layers": layers,
    }
    report["bits_per_weight"] = report["allocated_bits"] / weights
    return overrides, report


def plot(report: dict, path) -> None:
    """Bar chart: bits per weight chosen for every layer, and its predicted (and, once quantized,
    measured) loss contribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["layers"])
    bpw = [report["layers"][n]["bits_per_weight"] for n in names]
    pred = [report["layers"][n]["predicted"] for n in names]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, len(names) * 0.06), 6), sharex=True)
    ax1.bar(range(len(names)), bpw, color="C0")
    ax1.axhline(report["target_bits"], color="k", ls="--", lw=1, label=f"budget {report['target_bits']} bpw")
    ax1.set_ylabel("bits per weight")
    ax1.legend()
    x = torch.arange(len(names)).tolist()
    if all("measured_contribution" in report["layers"][n] for n in names):
        meas = [report["layers"][n]["measured_contribution"] for n in names]
        ax2.bar([i - 0.2 for i in x], pred, width=0.4, color="C1", label="predicted a_l * err_l")
        ax2.bar([i + 0.2 for i in x], meas, width=0.4, color="C2", label="measured a_l * err_l (after quantizing)")
        ax2.legend()
    else:
        ax2.bar(x, pred, color="C1")
    ax2.set_ylabel("loss increase (linear model)")
    ax2.set_xlabel("layer (blocks in order; q k v o gate up down)")
    fig.suptitle(f"allocation at {report['bits_per_weight']:.4f} bpw: predicted ppl x{report['predicted_ppl_factor']:.3f} "
                 f"(uniform x{report['uniform_predicted_ppl_factor']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
