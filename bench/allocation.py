"""Allocation benchmark: per-layer bit allocation (`--allocate`) against the uniform setting.

For each rate, quantizes SmolLM2-135M with `pvq quantize --method pvq-gptq --bits B --allocate`
(sensitivities measured once into --sensitivities and reused), evaluates the quick protocol, and
compares with uniform pvq-gptq at the same rate (from bench/results/quality.json, same protocol and
calibration) and with the perplexity the allocation predicted: unquantized ppl x exp(predicted loss
increase), where the prediction is the joint noise rehearsal (allocation.rehearse_plan) and the
linear sum sum_l a_l err_l is kept beside it. Writes bench/results/allocation.json after each
step; directories that already hold a quantized model are evaluated, not quantized again; a rate
whose entry already has a measured perplexity and the rehearsed prediction is skipped.

Run:  python bench/allocation.py --rates 3.25,2.25 --work out/alloc
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import write_json  # noqa: E402
from quality import run_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="3.25,2.25")
    ap.add_argument("--work", default=str(ROOT / "out" / "alloc"), help="folder for sensitivities and models")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--sensitivities", default=str(ROOT / "bench" / "results" / "sensitivities.json"),
                    help="sensitivities file: reused if it exists, else measured and written there")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    quality = json.loads((out / "quality.json").read_text())
    base = quality["unquantized"]["ppl"]
    uniform = {r["target_bits"]: r for r in quality["runs"] if r["method"] == "pvq-gptq" and "ppl" in r}
    path = out / "allocation.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    res.setdefault("runs", {})
    res["unquantized_ppl"] = base
    sens = Path(args.sensitivities)
    for rate in (float(r) for r in args.rates.split(",")):
        key = f"pvq-gptq {rate}"
        done = res["runs"].get(key, {})
        if "measured_ppl" in done and "linear_predicted_ppl" in done:
            continue
        if "measured_ppl" in done:  # measured before the rehearsal existed: keep it for the record
            res.setdefault("linear_prediction_runs", {})[key] = done
        d = work / f"pvq-gptq-{rate}-alloc"
        cmd = ["quantize", "--method", "pvq-gptq", "--bits", str(rate), "--allocate", "--sensitivities", str(sens),
               "-o", str(d), "--force"]
        run = {"command": "pvq " + " ".join(cmd)}
        if not (d / "allocation.json").is_file():
            q = run_json(cmd)
            run.update({"quantize_seconds": q["seconds"], "peak_rss_mib": q["peak_rss_mib"]})
        rep = json.loads((d / "allocation.json").read_text())
        e = run_json(["eval", str(d), "--ppl"])
        u = uniform.get(rate, {})
        layers = rep["layers"].values()
        run.update({
            "bits_per_weight": e["bits_per_weight"], "measured_ppl": e["ppl"],
            "prediction": rep["prediction"],
            "predicted_ppl": base * rep["predicted_ppl_factor"],
            "linear_predicted_ppl": base * rep["linear_predicted_ppl_factor"],
            "uniform_measured_ppl": u.get("ppl"), "uniform_predicted_ppl": base * rep["uniform_predicted_ppl_factor"],
            "uniform_linear_predicted_ppl": base * rep["uniform_linear_predicted_ppl_factor"],
            "joint_draws_dloss": rep.get("joint_draws"),
            # per layer: the error the quantizer left against the planned one, both as isotropic-noise energy
            "layer_error_ratio_measured_over_planned": {
                "median": sorted(v["measured_err"] / v["effective_err"] for v in layers)[len(layers) // 2],
                "min": min(v["measured_err"] / v["effective_err"] for v in layers),
                "max": max(v["measured_err"] / v["effective_err"] for v in layers)},
            "linear_dloss_planned": rep["linear_predicted_dloss"], "linear_dloss_with_measured_errors": rep["measured_linear_dloss"],
            "error_model": rep.get("error_model"), "floor_bits": rep.get("floor_bits"),
            "settings": sorted({v["setting"] for v in rep["layers"].values()}),
        })
        run["prediction_error"] = run["predicted_ppl"] / run["measured_ppl"] - 1
        run["linear_prediction_error"] = run["linear_predicted_ppl"] / run["measured_ppl"] - 1
        if u.get("ppl"):
            run["uniform_prediction_error"] = run["uniform_predicted_ppl"] / u["ppl"] - 1
        run["beats_uniform"] = u.get("ppl") is not None and e["ppl"] < u["ppl"]
        res["runs"][key] = run
        write_json(path, res)
        print(f"{key}: measured {e['ppl']:.3f} (uniform {u.get('ppl')}), predicted {run['predicted_ppl']:.3f} "
              f"({100 * run['prediction_error']:+.1f}%; linear {100 * run['linear_prediction_error']:+.1f}%)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
