"""Sensitivity probes compared: Fisher (squared gradients under sampled labels, every layer in one backward
pass) against the noise probes (one antithetic noise pair per layer) that bench/results/sensitivities.json
holds, on the same 8 x 256 WikiText-2 validation windows of SmolLM2-135M (seed 1, as `pvq quantize
--allocate` draws them).

Writes bench/results/probes.json: per layer the noise-probe a_l and two Fisher estimates (label seeds 0
and 1), their rank correlation, the spread of log(fisher / noise) and of log(fisher seed 0 / seed 1) (how
much of the disagreement is the probes' own noise), and the seconds each Fisher estimate took.

Run:  python bench/probes.py [--draws 2]      (about 3 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import write_json  # noqa: E402
from scale import commit  # noqa: E402


def ranks(x: list[float]) -> list[int]:
    order = sorted(range(len(x)), key=x.__getitem__)
    out = [0] * len(x)
    for r, i in enumerate(order):
        out[i] = r
    return out


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=2, help="label draws per window (pvq quantize's default: 2)")
    args = ap.parse_args()
    from pvq.allocation.probes import fisher_sensitivities
    from pvq.data import calibration_batches, resolve_text
    from pvq.models.loading import load_model

    model, tok = load_model(None)
    ids = calibration_batches(tok, resolve_text("wikitext2", "calib"), 8, 256, 1)
    noise = json.loads((ROOT / "bench" / "results" / "sensitivities.json").read_text())
    names = [n for n in noise if not n.startswith("_")]
    fisher, seconds = [], []
    for seed in (0, 1):
        t = time.time()
        fisher.append(fisher_sensitivities(model, ids, draws=args.draws, seed=seed, progress=False))
        seconds.append(time.time() - t)
    a = [noise[n]["a"] for n in names]
    f0, f1 = ([f[n]["a"] for n in names] for f in fisher)
    pos = [i for i, v in enumerate(a) if v > 0]
    log_fn = [math.log(f0[i] / a[i]) for i in pos]
    log_ff = [math.log(x / y) for x, y in zip(f0, f1)]
    out = {
        "what": "per-layer sensitivities a_l of SmolLM2-135M: noise probes (sensitivities.json) against Fisher",
        "command": f"python bench/probes.py --draws {args.draws}", "commit": commit(), "draws": args.draws,
        "tokens": int(ids.numel()), "fisher_seconds": seconds,
        "noise_seconds": "3562 (bench/results/allocation.json: 1 thread while 2 other jobs shared the 2 cores)",
        "spearman_fisher_noise": spearman(f0, a), "spearman_fisher_fisher": spearman(f0, f1),
        "median_log_ratio_fisher_noise": statistics.median(log_fn), "std_log_ratio_fisher_noise": statistics.pstdev(log_fn),
        "std_log_ratio_fisher_seeds": statistics.pstdev(log_ff), "noise_nonpositive": len(a) - len(pos),
        "sum_noise": sum(a), "sum_fisher": [sum(f0), sum(f1)],
        "layers": {n: {"noise": x, "fisher": [y, z]} for n, x, y, z in zip(names, a, f0, f1)},
    }
    write_json(ROOT / "bench" / "results" / "probes.json", out)
    print({k: v for k, v in out.items() if k != "layers"})


if __name__ == "__main__":
    main()
