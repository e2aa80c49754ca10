"""The allocation plan: one codec setting per layer, the total at most the budget, the predicted loss smallest.

1. Error err(option) of every candidate setting: the relative MSE of the codec on an i.i.d. Gaussian
   matrix (picker.proxy_sqnr; rotated weights are that close to Gaussian), times the layer's gptq
   error factor for pvq-gptq (probes.gptq_error_factors).
2. The options of each layer are the settings `choose_spec` picks at a ladder of rates; every stored
   bit counted (codes, scales, seeds).
3. solvers.knapsack picks one per layer with the total at most bits * weights and the predicted loss
   increase sum_l a_l err_l smallest (HIGGS linearity).

The plan is a dict of per-layer settings (QuantConfig.overrides) plus a report: chosen setting, a_l,
predicted contribution, against the uniform setting at the same budget.
"""
from __future__ import annotations

import math
from dataclasses import replace

from tqdm.auto import tqdm

from ..codec import PVQSpec, bits_per_weight
from ..models.adapters import block_linear_names
from ..picker import choose_spec, proxy_sqnr
from ..settings import QuantConfig, spec_to_dict
from ..solvers.knapsack import multiple_choice_knapsack
from ..transforms.rotate import STORED_SEEDS
from .probes import sensitivities

RATES = tuple(x / 4 for x in range(6, 25))  # 1.5, 1.75, ..., 6.0 bits per weight


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
        out.append(_option(spec, rows, cols))
    return out


def _option(spec: PVQSpec, rows: int, cols: int) -> dict:
    """One option of a rows x cols layer: the setting, its stored bits, its proxy relative error."""
    return {"spec": spec, "bits": bits_per_weight(spec, rows, cols, STORED_SEEDS).total,
            "err": 10 ** (-proxy_sqnr(spec) / 10)}


def plan(model, cfg: QuantConfig, ids: torch.Tensor | None, rel_noise: float = 0.01, rates=RATES,
         progress: bool = True, sens: dict | None = None, factors: dict | None = None,
         floor: float | None = 1.0) -> tuple[dict, dict]:
    """(overrides {layer: spec dict}, report) for cfg.bits over all quantizable linears of `model`.

    sens: sensitivities measured before (they do not depend on the budget); measured from ids if None.
    factors: probes.gptq_error_factors() for pvq-gptq (each setting's error times the layer's factor for its n);
    None predicts data-free errors. floor: no layer gets fewer than cfg.bits - floor bits per weight
    (a guard against a sensitivity estimate that came out near zero by chance; None: no guard)."""
    if not cfg.is_pvq:
        raise ValueError("--allocate chooses PVQ settings: use --method pvq or pvq-gptq")
    if sens is None:
        sens = sensitivities(model, ids, rel_noise, cfg.seed, progress)
    missing = [n for n, _ in block_linear_names(model) if n not in sens]
    if missing:
        raise ValueError(f"sensitivities miss layers of this model (e.g. {missing[0]}): measured on another model?")
    names = [n for n in sens if not n.startswith("_")]
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    # every shape's settings at every rate: the picker's search, minutes for many shapes where nothing was cached
    table = {s: options(cfg, *s, rates) for s in tqdm(sorted(set(shapes.values())), desc="settings per rate",
                                                       disable=not progress, unit="shape")}
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
    uniform = {s: choose_spec(replace(cfg, overrides=None), *s) for s in table}
    # a layer no calibration token reaches (an expert nobody was routed to, a block the forward skips on text)
    # has a sensitivity of exactly 0, which says nothing of it: it keeps the uniform setting
    unmeasured = {n for n in names if sens[n]["a"] == 0.0}
    choices = {n: [_option(uniform[shapes[n]], *shapes[n])] if n in unmeasured else table[shapes[n]] for n in names}
    costs = [[a[n] * eff(n, o) for o in choices[n]] for n in names]
    bits = [[o["bits"] for o in choices[n]] for n in names]
    pick = multiple_choice_knapsack(costs, bits, budget)
    layers, overrides = {}, {}
    for n, j in zip(names, pick):
        o = choices[n][j]
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
        "allocated_bits": sum(choices[n][j]["bits"] for n, j in zip(names, pick)),
        "error_model": "pvq-gptq (data-free error x gptq error factor)" if factors is not None else "data-free",
        "floor_bits": None if floor is None else cfg.bits - floor,
        "probe": sens.get("_probe", "noise"), "rel_noise": sens.get("_rel_noise"), "calib_tokens": sens.get("_tokens"), "base_loss": sens["_base_loss"],
        "prediction": "linear (sum of a_l * err_l)",
        "predicted_dloss": pred, "predicted_ppl_factor": math.exp(pred),
        "uniform_predicted_dloss": upred, "uniform_predicted_ppl_factor": math.exp(upred),
        "linear_predicted_dloss": pred, "linear_predicted_ppl_factor": math.exp(pred),
        "uniform_linear_predicted_dloss": upred, "uniform_linear_predicted_ppl_factor": math.exp(upred),
        "layers": layers,
    }
    report["bits_per_weight"] = report["allocated_bits"] / weights
    return overrides, report
