"""Tuning after quantizing (--finetune): perplexity, KL divergence and top-1 agreement of pvq-gptq with and
without tuning, at 2.25 and 3.25 bits, on SmolLM2-135M-Instruct.

Every row is `pvq quantize --method pvq-gptq --bits B [--allocate] --finetune F` in its own process
(calibration: 128 x 512 tokens of the WikiText-2 validation text, the tuning uses the first
--finetune-tokens of them; the test text never), then `pvq eval --ppl --kl` on the quick protocol (16
windows of 2048 tokens of the test text) and, at 3.25 bits, ARC-Easy 0-shot on all 2376 test questions
(`pvq eval --arc-easy --decode once`).
The untuned rows (`--finetune none`) are measured the same way, on the same machine, so the calibration
precision (`--calib-dtype auto`) is the same in both.
Results go to bench/results/finetune.json after every row; the tuned curve is added to
bench/results/pareto.png.

Run:  python bench/finetune.py                                  (every row; about 2 hours on 2 cores)
      python bench/finetune.py --rows 3.25 --finetune-steps 200   (one row, tuning settings passed on)
      python bench/finetune.py --rows 3.25,2.25 --finetune none --no-arc   (the untuned rows to compare)
      python bench/finetune.py --rows 3.25 --finetune model --no-arc      (the whole model tuned at once)
      python bench/finetune.py --rows 3.25 --finetune model --scale row --no-arc  (a scale per row to tune)
      python bench/finetune.py --rows 2.25-allocate --finetune model --scale row \
          --sensitivities bench/results/sensitivities.json --no-arc   (allocated, sensitivities measured before)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import row_line, write_json  # noqa: E402
from quality import plot, run_json  # noqa: E402
from scale import commit  # noqa: E402

ROWS = {"3.25": ["--bits", "3.25"], "2.25": ["--bits", "2.25"], "3.25-allocate": ["--bits", "3.25", "--allocate"],
        "2.25-allocate": ["--bits", "2.25", "--allocate"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    ap.add_argument("--finetune", default="blocks")
    ap.add_argument("--finetune-steps", default=None)
    ap.add_argument("--finetune-tokens", default=None)
    ap.add_argument("--finetune-model-steps", default=None)
    ap.add_argument("--lr", default=None)
    ap.add_argument("--finetune-schedule", default=None, help="cosine or constant (pvq's default: cosine)")
    ap.add_argument("--scale", default=None, help="PVQ scale granularity passed on (tensor, row)")
    ap.add_argument("--damp", default=None, help="GPTQ Hessian damping passed on (pvq's default: 0.01)")
    ap.add_argument("--asymmetric", default=None, help="GPTQ's target toward the unquantized outputs, passed on (pvq's default: 0)")
    ap.add_argument("--sensitivities", default=None,
                    help="allocated rows: reuse this sensitivities file (pvq quantize --sensitivities) instead of measuring")
    ap.add_argument("--allocate-factor-samples", default=None,
                    help="allocated rows: calibration windows for pvq-gptq's error factors, passed on (pvq's default: all)")
    ap.add_argument("--allocate-draws", default=None,
                    help="allocated rows: rehearsal draws passed on (0 skips the plan's loss prediction; pvq's default: 3)")
    ap.add_argument("--no-arc", action="store_true", help="skip ARC-Easy (the 3.25 row runs it otherwise)")
    ap.add_argument("--work", default="/tmp/pvq-finetune")
    args = ap.parse_args()
    out = ROOT / "bench" / "results"
    path = out / "finetune.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["protocol"] = {"ppl": "WikiText-2 test, 16 windows x 2048 tokens", "calib": "wikitext2 validation, 128 x 512",
                           "arc_easy": "test, 0-shot, all 2376", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)"}
    rows = results.setdefault("rows", [])
    tune = ["--finetune", args.finetune]
    for opt in ("finetune_steps", "finetune_tokens", "finetune_model_steps", "lr", "finetune_schedule", "scale", "damp", "asymmetric"):
        if getattr(args, opt) is not None:
            tune += ["--" + opt.replace("_", "-"), str(getattr(args, opt))]
    for name in args.rows.split(","):
        d = Path(args.work) / name
        sens = ["--sensitivities", args.sensitivities] if args.sensitivities and "--allocate" in ROWS[name] else []
        alloc = [x for opt in ("allocate_factor_samples", "allocate_draws") if getattr(args, opt) is not None
                 and "--allocate" in ROWS[name] for x in ("--" + opt.replace("_", "-"), str(getattr(args, opt)))]
        q = run_json(["quantize", "--method", "pvq-gptq", *ROWS[name], *alloc, *tune, *sens, "-o", str(d), "--force"])
        e = run_json(["eval", str(d), "--ppl", "--kl"])
        if not args.no_arc and name.startswith("3.25"):
            # each layer decoded once (float32): the same model as on the fly, the products summed in another
            # order, in minutes instead of the quarter hour that decoding inside every forward takes for 2376 questions
            a = run_json(["eval", str(d), "--arc-easy", "--decode", "once"])
            e.update({**{k: v for k, v in a.items() if k.startswith("arc_easy")}, "arc_decode": "once",
                      "arc_wall_seconds": a["wall_seconds"]})
        # rows tuned before schedules existed ran at a constant rate; a row that names none ran pvq's default
        schedule = args.finetune_schedule or ("cosine" if args.finetune != "none" else None)
        row = {"row": name, "options": " ".join([*ROWS[name], *alloc, *tune]), "schedule": schedule, "sensitivities": args.sensitivities if sens else None,
               "bits_per_weight": q["bits_per_weight"],
               "file_bytes": q["file_bytes"], "quantize_seconds": q["seconds"], "quantize_wall_seconds": q["wall_seconds"],
               "quantize_peak_rss_mib": q["peak_rss_mib"], "blocks": q.get("finetune"), "model_tuning": q.get("finetune_model"), "commit": commit(), **e}
        # a row measured again replaces its old one; another sensitivities source is another row
        key = (row["options"], schedule, bool(row["sensitivities"]))
        rows[:] = [r for r in rows if (r["options"], r.get("schedule"), bool(r.get("sensitivities"))) != key] + [row]
        write_json(path, results)
        print(row_line(row["options"], row), flush=True)
    quality = json.loads((out / "quality.json").read_text())
    best = {}
    for r in rows:  # per target, the tuned row with the lowest perplexity
        key = r["options"].split()[1] + (" allocate" if "--allocate" in r["options"] else "")
        tuned = "--finetune none" not in r["options"]
        if tuned and "--allocate" not in r["options"] and (key not in best or r["ppl"] < best[key]["ppl"]):
            best[key] = r
    results["curve"] = sorted((r["bits_per_weight"], r["ppl"]) for r in best.values())
    write_json(path, results)
    plot(quality, out / "pareto.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
