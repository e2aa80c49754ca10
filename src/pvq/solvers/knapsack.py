"""Choose one setting per layer so the total stored bits meet a budget and the predicted loss is smallest.

The linearity result of HIGGS (Malinovskii et al., "Pushing the Limits of Large Language Model
Quantization via the Linearity Theorem", 2024) makes the loss increase close to a weighted sum of
per-layer relative errors, sum_l a_l * err_l(option_l). With that objective the choice is a
multiple-choice knapsack: layers are the classes, each option has a weight (its stored bits) and a
cost (a_l * err_l). `multiple_choice_knapsack` solves it exactly by dynamic programming over the budget measured in
units of `budget / resolution` bits, each option's bits rounded *up* to whole units: the result
never exceeds the budget, and it is optimal among allocations whose rounded bits fit (the rounding
loses at most one unit per layer of slack).
"""
from __future__ import annotations

import math

import numpy as np


def multiple_choice_knapsack(costs: list[list[float]], bits: list[list[int]], budget: int, resolution: int = 4096) -> list[int]:
    """Index of the chosen option of every layer: minimise sum(costs) with sum(bits) <= budget.

    costs[l][j], bits[l][j]: predicted cost and stored bits of option j of layer l. Raises
    ValueError when even the cheapest options exceed the budget."""
    if len(costs) != len(bits) or any(len(c) != len(b) or not c for c, b in zip(costs, bits)):
        raise ValueError("knapsack: every layer needs the same number (>= 1) of costs and bit counts")
    floor_bits = sum(min(b) for b in bits)
    if floor_bits > budget:
        raise ValueError(f"knapsack: the smallest setting of every layer already takes {floor_bits} bits, "
                         f"more than the budget of {budget}")
    unit = budget / resolution
    cap = resolution
    inf = math.inf
    dp = np.full(cap + 1, inf)  # dp[c]: least cost of the layers so far using at most c units
    dp[:] = 0.0
    choices = []
    for c_l, b_l in zip(costs, bits):
        w = [min(cap + 1, math.ceil(b / unit - 1e-9)) for b in b_l]
        new = np.full(cap + 1, inf)
        pick = np.full(cap + 1, -1, dtype=np.int32)
        for j, (cost, wj) in enumerate(zip(c_l, w)):
            if wj > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[wj:] = dp[: cap + 1 - wj] + cost
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        dp = new
        choices.append(pick)
    if not math.isfinite(dp[cap]):
        raise ValueError(f"knapsack: no allocation fits {budget} bits at resolution {resolution}; raise the resolution")
    out = []
    c = cap
    for l in range(len(costs) - 1, -1, -1):
        j = int(choices[l][c])
        out.append(j)
        c -= min(cap + 1, math.ceil(bits[l][j] / unit - 1e-9))
    return out[::-1]
