"""The allocation report after quantizing: each layer's measured error beside the predicted one, and a plot."""
from __future__ import annotations

import torch


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
