"""The output head and the input embedding table quantized too (`--head-bits`, `--embed-bits`): file size and
perplexity of pvq-gptq on the default model (SmolLM2-135M-Instruct, whose tied 49152 x 576 embedding table is
more than half of a 3.25-bit file kept in float16).

Each row is its own `pvq quantize --method pvq-gptq --bits B [options]` process (calibration 128 x 512 tokens of
the WikiText-2 validation text), then `pvq eval DIR --ppl` (the quick protocol: 16 windows of 2048 tokens of the
test text) and, with --kl, `--kl` against the unquantized model. Writes bench/results/ends.json after every row:
per row the options, bits per weight of the blocks' linears, of the head and of the embedding table, the file's
bytes (everything stored: embeddings, head and norms included), perplexity, quantize seconds and peak RSS.

Run:  python bench/ends.py                        (about 7 minutes a row on a 2-core CPU)
      python bench/ends.py --rows dense,4.25/4.25 --kl
A row is `dense` (both kept in float16) or `H/E`: --head-bits H and --embed-bits E, `-` for one kept dense.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
from common import write_json  # noqa: E402
from quality import run_json  # noqa: E402

ROWS = "dense,4.25/4.25,-/4.25,4.25/-,3.25/3.25"


def options(row: str) -> list[str]:
    if row == "dense":
        return []
    head, emb = row.split("/")
    return [*(["--head-bits", head] if head != "-" else []), *(["--embed-bits", emb] if emb != "-" else [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=ROWS, help=f"comma-separated rows (default {ROWS})")
    ap.add_argument("--bits", type=float, default=3.25, help="--bits of the blocks' linears (default 3.25)")
    ap.add_argument("--kl", action="store_true", help="also measure KL divergence from the unquantized model")
    args = ap.parse_args()
    out = ROOT / "bench" / "results" / "ends.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"model": "SmolLM2-135M-Instruct", "method": "pvq-gptq", "target_bits": args.bits,
                    "protocol": {"ppl": "WikiText-2 test, 16 windows x 2048 tokens",
                                 "calib": "wikitext2 validation, 128 x 512"}})
    runs = results.setdefault("runs", {})
    with tempfile.TemporaryDirectory() as tmp:
        for row in args.rows.split(","):
            d = Path(tmp) / row.replace("/", "_")
            q = run_json(["quantize", "--method", "pvq-gptq", "--bits", str(args.bits), *options(row), "-o", str(d)])
            e = run_json(["eval", str(d), "--ppl", *(["--kl"] if args.kl else [])])
            ends = q.get("ends", {})
            runs[f"{args.bits}:{row}"] = {
                "options": options(row), "bits_per_weight": q["bits_per_weight"],
                "head_bits_per_weight": ends.get("head", {}).get("bits_per_weight"),
                "embed_bits_per_weight": ends.get("embedding", {}).get("bits_per_weight"),
                "file_bytes": q["file_bytes"], "ppl": e["ppl"], "kl": e.get("kl"),
                "quantize_seconds": q["seconds"], "peak_rss_mib": q["peak_rss_mib"]}
            write_json(out, results)
            print(f"{row}: file {q['file_bytes'] / 2**20:.1f} MiB, ppl {e['ppl']:.3f}, quantize {q['seconds']:.0f} s, "
                  f"{q['peak_rss_mib']:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
