"""Peak memory and time of quantizing one large linear (`api.quantize_linear`), per weight.

A streamed run holds one block at a time, so its peak is set by its largest single solve: a block's widest
linear, or with --head-bits the output head (Llama 3's is 128256 x 4096, nine times its largest block linear).
Each case runs in a fresh process: a bfloat16 weight of the given shape (random, std 0.02) and, for pvq-gptq,
a random positive definite Hessian, quantized at 4.25 bits the way a run quantizes it (a head rotated on its
input side only with a scale per row, a block linear on both sides). Reported: peak RSS above the process's
RSS before the call, in MiB and bytes per weight, seconds, and a hash of the stored codes.

Writes bench/results/solve_memory.json (entries keyed by label, case and shape; other labels are kept).
Run:  python bench/solve_memory.py [--label now] [--cases head:32768x4096,block:14336x4096]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import write_json  # noqa: E402
from scale import commit  # noqa: E402

CASES = "head:32768x4096,block:14336x4096"
METHODS = "pvq-gptq,pvq"


def one(kind: str, rows: int, cols: int, method: str) -> dict:
    """Quantize one [rows, cols] weight in this process and measure it."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from pvq.api import quantize_linear
    from pvq.memory import peak_rss_mib, reset_peak_rss, rss_mib, trim_heap
    from pvq.settings import QuantConfig
    from pvq.transforms.rotate import NO_SEED, layer_seeds

    torch.manual_seed(0)
    w = (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)
    cfg = QuantConfig(method=method, bits=4.25, head_bits=4.25)
    h = None
    if cfg.uses_data:
        x = torch.randn(2 * cols, cols)
        h = (x.T @ x / x.shape[0]).double()
        del x
    if kind == "head":
        cfg = cfg.for_end("head")
        seeds = (layer_seeds(cfg.seed, "lm_head", True)[0], NO_SEED)
    else:
        seeds = None
    trim_heap()
    base = rss_mib()
    reset_peak_rss()
    start = time.perf_counter()
    q, entry, err = quantize_linear("lm_head" if kind == "head" else "model.layers.0.mlp.down_proj", w, None, cfg,
                                    h, owned=True, seeds=seeds)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib() - base
    return {"kind": kind, "shape": [rows, cols], "method": method, "peak_above_start_mib": round(peak, 1),
            "bytes_per_weight": round(peak * 2**20 / (rows * cols), 2), "seconds": round(seconds, 1),
            "relative_error": err, "bits_per_weight": entry["bits_per_weight"],
            "codes_sha256": hashlib.sha256(q.codes.numpy().tobytes()).hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="now", help="name of this set of measurements (default: now)")
    ap.add_argument("--cases", default=CASES, help=f"comma-separated kind:ROWSxCOLS, kind head or block "
                                                    f"(default {CASES})")
    ap.add_argument("--methods", default=METHODS, help=f"comma-separated methods (default {METHODS})")
    ap.add_argument("--one", nargs=4, metavar=("KIND", "ROWS", "COLS", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, rows, cols, method = args.one
        print(json.dumps(one(kind, int(rows), int(cols), method)))
        return
    out = ROOT / "bench" / "results" / "solve_memory.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}"
    runs = results.setdefault("runs", {})
    for case in args.cases.split(","):
        kind, shape = case.split(":")
        rows, cols = (int(v) for v in shape.split("x"))
        for method in args.methods.split(","):
            done = subprocess.run([sys.executable, __file__, "--one", kind, str(rows), str(cols), method],
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            runs[f"{args.label}:{kind}:{rows}x{cols}:{method}"] = {**row, "commit": commit()}
            print(f"{args.label} {kind} {rows}x{cols} {method}: peak +{row['peak_above_start_mib']:.0f} MiB "
                  f"({row['bytes_per_weight']:.1f} B/weight), {row['seconds']:.1f} s", flush=True)
            write_json(out, results)


if __name__ == "__main__":
    main()
