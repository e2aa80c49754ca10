"""Peak memory of quantizing a model whose output head and embedding table are the largest matrices (a
Llama 3 vocabulary of 128256 tokens), with `--head-bits` and `--embed-bits`, streamed from disk.

A random bfloat16 checkpoint (bench/scale.py's block shape: hidden 2560, intermediate 6912; 2 blocks, an
untied 128256 x 2560 head and embedding table, 0.80 B parameters) is quantized by `pvq quantize --method
pvq-gptq --bits 3.25` (or --method) in its own process, with both ends kept in float16 and with `--head-bits 4.25
--embed-bits 4.25`. Peak RSS (the CLI's), seconds and the commit go to bench/results/ends_scale.json under --label
(and the method, where not pvq-gptq).

Run:  python bench/ends_scale.py [--label now] [--method pvq] [--rows dense]   (pvq-gptq: about 3 minutes a row)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_json  # noqa: E402
from scale import RESULTS, SHAPE, _tensor_shapes, commit, quantize, write_checkpoint  # noqa: E402

VOCAB, LAYERS = 128256, 2
ROWS = {"dense ends": [], "ends 4.25": ["--head-bits", "4.25", "--embed-bits", "4.25"]}  # by name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="now", help="name of this set of measurements (default: now)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pvq-ends-scale"))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--method", default="pvq-gptq")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default: all of {', '.join(ROWS)})")
    args = ap.parse_args()
    from transformers import LlamaConfig

    shape = {**SHAPE, "vocab_size": VOCAB}
    shapes = [(n, (VOCAB, s[1]) if n in ("model.embed_tokens.weight", "lm_head.weight") else s)
              for n, s in _tensor_shapes(LAYERS)]
    folder = args.workdir / "model"
    write_checkpoint(folder, shapes, LlamaConfig(num_hidden_layers=LAYERS, **shape))
    out_json = RESULTS / "ends_scale.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    results.update({"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                    "model": {**shape, "num_hidden_layers": LAYERS,
                              "parameters_b": sum(torch_numel(s) for _, s in shapes) / 1e9},
                    "calibration": f"{args.nsamples} x {args.seqlen} tokens", "bits": 3.25})
    runs = results.setdefault("runs", {})
    for name in args.rows.split(","):
        extra = ROWS[name]
        run = quantize(folder, args.workdir / "out", args.method, 3.25, args.nsamples, args.seqlen, extra=extra)
        key = f"{args.label}: {name}" + ("" if args.method == "pvq-gptq" else f", {args.method}")
        runs[key] = {"method": args.method, "options": extra, "commit": commit(), **run}
        print(f"{args.label}: {name}: peak {run['peak_rss_mib']:.0f} MiB, {run['seconds']:.0f} s, "
              f"file {run['file_bytes'] / 2**20:.0f} MiB", flush=True)
        write_json(out_json, results)


def torch_numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
