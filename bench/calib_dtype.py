"""Calibration precision: time and perplexity of pvq-gptq 3.25 on the default model (SmolLM2-135M-Instruct)
with its calibration forwards in float32 and in bfloat16 (`--calib-dtype`).

Each quantization is its own `pvq quantize` process (calibration 128 x 512 tokens of the WikiText-2
validation text), followed by `pvq eval --ppl` (the quick protocol: 16 windows of 2048 tokens of the
test text). Writes bench/results/calib_dtype.json after every run: the CPU, whether it has bfloat16
hardware (what `--calib-dtype auto` follows), and per dtype the quantize step's seconds, the whole
command's wall seconds, peak RSS and perplexity.

Run:  python bench/calib_dtype.py                 (about 15 minutes on a 2-core CPU with AMX)
      python bench/calib_dtype.py --dtypes bfloat16
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
from common import write_json  # noqa: E402
from quality import run_json  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated --calib-dtype values")
    ap.add_argument("--bits", type=float, default=3.25)
    args = ap.parse_args()
    from pvq.settings import native_bf16

    out = ROOT / "bench" / "results" / "calib_dtype.json"
    results = {"model": "SmolLM2-135M-Instruct", "method": "pvq-gptq", "target_bits": args.bits, "cpu": cpu_name(),
               "native_bf16": native_bf16(), "protocol": {"ppl": "WikiText-2 test, 16 windows x 2048 tokens",
                                                          "calib": "wikitext2 validation, 128 x 512"}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            d = Path(tmp) / dtype
            q = run_json(["quantize", "--method", "pvq-gptq", "--bits", str(args.bits), "--calib-dtype", dtype,
                          "-o", str(d)])
            e = run_json(["eval", str(d), "--ppl"])
            results["runs"][dtype] = {"quantize_seconds": q["seconds"], "command_wall_seconds": q["wall_seconds"],
                                      "peak_rss_mib": q["peak_rss_mib"], "bits_per_weight": q["bits_per_weight"],
                                      "ppl": e["ppl"]}
            write_json(out, results)
            print(f"{dtype}: quantize {q['seconds']:.0f} s (command {q['wall_seconds']:.0f} s), "
                  f"ppl {e['ppl']:.3f}", flush=True)


if __name__ == "__main__":
    main()
