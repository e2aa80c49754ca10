"""Asymmetric calibration (--asymmetric S): perplexity, KL divergence and top-1 agreement of untuned pvq-gptq
at each rate with and without it, to decide its default.

Every row is `pvq quantize --method pvq-gptq --bits B [--scale row] --asymmetric S --finetune none` in its own
process (calibration: 128 x 512 tokens of the WikiText-2 validation text), then `pvq eval --ppl --kl` on the
quick protocol (16 windows of 2048 tokens of the test text). Rows are measured in pairs on the same machine
in the same run, since the calibration precision (`--calib-dtype auto`) and the float sums differ between
CPUs. Results go to bench/results/asymmetric.json after every row (a row measured again replaces its old one).

Run:  python bench/asymmetric.py                                  (3.25 and 4.25 bits, shares 0 and 0.25)
      python bench/asymmetric.py --rates 2.25 --shares 0.5 --scale row   (one more share at 2.25)
      python bench/asymmetric.py --rates 3.25 --shares 0.25 --samples 16,32   (the unquantized stream on fewer samples)
      python bench/asymmetric.py --rates 3.25 --nsamples 256                  (more calibration samples for both)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import row_line, write_json  # noqa: E402
from quality import run_json  # noqa: E402
from scale import commit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="3.25,4.25", help="comma-separated target bits per weight")
    ap.add_argument("--shares", default="0,0.25", help="comma-separated --asymmetric values")
    ap.add_argument("--samples", default="0",
                    help="comma-separated --asymmetric-samples values for the rows with a share above 0 (0: all)")
    ap.add_argument("--nsamples", default=None, help="calibration samples passed on (default: pvq's, 128)")
    ap.add_argument("--scale", default=None, help="PVQ scale granularity passed on (tensor, row)")
    ap.add_argument("--work", default="/tmp/pvq-asymmetric")
    args = ap.parse_args()
    path = ROOT / "bench" / "results" / "asymmetric.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["protocol"] = {"ppl": "WikiText-2 test, 16 windows x 2048 tokens", "calib": "wikitext2 validation, 128 x 512",
                           "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)"}
    rows = results.setdefault("rows", [])
    runs = [(bits, share, samples) for bits in args.rates.split(",") for share in args.shares.split(",")
            for samples in (args.samples.split(",") if float(share) else ["0"])]
    for bits, share, samples in runs:
        opts = ["--bits", bits, *(["--scale", args.scale] if args.scale else []),
                *(["--nsamples", args.nsamples] if args.nsamples else []), "--asymmetric", share,
                *(["--asymmetric-samples", samples] if int(samples) else []), "--finetune", "none"]
        d = Path(args.work) / f"{bits}-{share}-{samples}-{args.nsamples or 'default'}"
        q = run_json(["quantize", "--method", "pvq-gptq", *opts, "-o", str(d), "--force"])
        e = run_json(["eval", str(d), "--ppl", "--kl"])
        cfg = json.loads((d / "config.json").read_text())["quantization_config"]["config"]
        row = {"options": " ".join(opts), "bits": float(bits), "asymmetric": float(share),
               "paired_samples": (min(int(samples), cfg["nsamples"]) or cfg["nsamples"]) if float(share) else 0,
               "bits_per_weight": q["bits_per_weight"], "quantize_seconds": q["seconds"],
               "quantize_wall_seconds": q["wall_seconds"], "quantize_peak_rss_mib": q["peak_rss_mib"],
               "calib_dtype": cfg["calib_dtype"],
               "commit": commit(),
               **{k: e[k] for k in ("ppl", "ref_ppl", "kl", "top1_agree", "windows")}}
        rows[:] = [r for r in rows if r["options"] != row["options"]] + [row]
        write_json(path, results)
        print(row_line(row["options"], row), flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
