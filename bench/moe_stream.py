"""Memory of quantizing a mixture of experts streamed from disk against loaded whole.

A random Qwen3-MoE checkpoint (hidden 1024, 32 experts of intermediate 768, 8 of them per token, 8 blocks,
vocab 32000; about 0.7 B parameters) is written in bfloat16 safetensors shards the way the hub stores such
models, one tensor per expert and gate, up and down apart, one tensor at a time. `pvq quantize` runs on it
streamed (each expert's linears read from its own tensors when its block comes) and with `--no-stream`
(transformers loads the whole model and stacks the experts), each in its own process; peak RSS, time and
whether both wrote the same bytes go to bench/results/moe_stream.json.

    python bench/moe_stream.py                      # pvq (data-free) at 3.25 bits
    python bench/moe_stream.py --methods pvq,pvq-gptq

Random weights say nothing of quality: quality figures use SmolLM2 (bench/quality.py).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_json  # noqa: E402
from scale import attention_shapes, commit, digests, model_shapes, quantize, write_checkpoint  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPE = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32,
             num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=3072, vocab_size=32000,
             max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def _tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, i, e = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"], SHAPE["num_experts"]
    q, kv, d = SHAPE["num_attention_heads"] * SHAPE["head_dim"], SHAPE["num_key_value_heads"] * SHAPE["head_dim"], \
        SHAPE["head_dim"]

    def block(p):
        out = attention_shapes(p, h, q, kv, qk_norm=d) + [(p + "mlp.gate.weight", (e, h))]
        for x in range(e):
            out += [(p + f"mlp.experts.{x}.gate_proj.weight", (i, h)), (p + f"mlp.experts.{x}.up_proj.weight", (i, h)),
                    (p + f"mlp.experts.{x}.down_proj.weight", (h, i))]
        return out
    return model_shapes(layers, SHAPE["vocab_size"], h, block)


def make_checkpoint(folder: Path, layers: int) -> None:
    """The random checkpoint, written a shard at a time (skipped when already complete)."""
    from transformers import Qwen3MoeConfig

    write_checkpoint(folder, _tensor_shapes(layers), Qwen3MoeConfig(num_hidden_layers=layers, **SHAPE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--methods", default="pvq")
    ap.add_argument("--bits", type=float, default=3.25)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pvq-moe"))
    ap.add_argument("--results", type=Path, default=RESULTS / "moe_stream.json")
    args = ap.parse_args()
    folder = args.workdir / f"qwen3moe-{args.layers}"
    make_checkpoint(folder, args.layers)
    params = sum(torch.Size(s).numel() for _, s in _tensor_shapes(args.layers))
    results = {"command": "python bench/moe_stream.py " + " ".join(sys.argv[1:]), "commit": commit(),
               "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
               "shape": SHAPE, "layers": args.layers, "parameters": params,
               "checkpoint_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")), "runs": {}}
    for method in args.methods.split(","):
        runs = {}
        for mode, extra in (("streamed", []), ("whole", ["--no-stream"])):
            out = args.workdir / f"out-{method}-{mode}"
            runs[mode] = quantize(folder, out, method, args.bits, args.nsamples, args.seqlen, keep=True, extra=extra)
            runs[mode]["digests"] = digests(out)
            print(method, mode, {k: v for k, v in runs[mode].items() if k != "digests"}, flush=True)
        runs["same_bytes"] = runs["streamed"]["digests"] == runs["whole"]["digests"]
        for mode in ("streamed", "whole"):
            del runs[mode]["digests"]
            shutil.rmtree(args.workdir / f"out-{method}-{mode}", ignore_errors=True)
        results["runs"][method] = runs
        write_json(args.results, results)
    print(json.dumps({m: {k: (v["peak_rss_mib"] if isinstance(v, dict) else v) for k, v in r.items()}
                      for m, r in results["runs"].items()}))


if __name__ == "__main__":
    main()
