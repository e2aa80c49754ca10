"""Memory of quantizing a mixture of experts streamed from disk against loaded whole.

A random Qwen3-MoE checkpoint (hidden 1024, 32 experts of intermediate 768, 8 of them per token, 8 blocks,
vocab 32000; about 0.7 B parameters) is written in bfloat16 safetensors shards the way the hub stores such
models, one tensor per expert and gate, up and down apart, one tensor at a time. `pvq quantize` runs on it
streamed (each expert's linears read from its own tensors when its block comes) and with `--no-stream`
(transformers loads the whole model and stacks the experts), each in its own process; peak RSS, time and
whether both wrote the same bytes go to bench/results/moe_stream.json.

With `--gguf` the same random model is written as llama.cpp stores it instead (one GGUF file, Q8_0, each
layer's experts stacked in three 3-D tensors, written a tensor at a time), and read from there: streamed, an
expert's rows of the stacks at a time; whole, transformers dequantizes every tensor and merges gate and up.
Results go to bench/results/moe_stream_gguf.json.

    python bench/moe_stream.py                      # pvq (data-free) at 3.25 bits
    python bench/moe_stream.py --methods pvq,pvq-gptq
    python bench/moe_stream.py --gguf

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
from scale import _tensor, attention_shapes, commit, digests, model_shapes, quantize, write_checkpoint  # noqa: E402

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


_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate": "ffn_gate_inp"}


def _gguf_tensors(layers: int):
    """(GGUF name, shape, a function giving the float32 tensor) in writing order: the safetensors checkpoint's
    random tensors (scale._tensor) under llama.cpp's names, each layer's experts stacked per projection."""
    e = SHAPE["num_experts"]
    plain = [(n, s) for n, s in _tensor_shapes(layers) if ".experts." not in n]
    for name, shape in plain:
        if name in _GGUF_NAMES:
            yield _GGUF_NAMES[name], shape, lambda name=name, shape=shape: _tensor(name, shape).float()
            continue
        _, _, b, rest = name.split(".", 3)
        module, leaf = rest.rsplit(".", 1)
        yield f"blk.{b}.{_GGUF_NAMES[module]}.{leaf}", shape, lambda name=name, shape=shape: _tensor(name, shape).float()
        if module == "mlp.gate":  # the stacks after the router, as llama.cpp orders them
            for proj, stack in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
                names = [f"model.layers.{b}.mlp.experts.{x}.{proj}.weight" for x in range(e)]
                one = dict(_tensor_shapes(layers))[names[0]]
                yield (f"blk.{b}.{stack}.weight", (e, *one),
                       lambda names=names, one=one: torch.stack([_tensor(n, one).float() for n in names]))


def make_gguf(path: Path, layers: int) -> None:
    """The random model as one Q8_0 GGUF file (norms in float32) with a byte-level vocabulary padded to the
    model's size, written a tensor at a time (skipped when already complete)."""
    import gguf
    import numpy as np

    done = path.with_name(path.name + ".complete")
    if done.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(layers), w.add_context_length(SHAPE["max_position_embeddings"])
    w.add_embedding_length(SHAPE["hidden_size"]), w.add_feed_forward_length(SHAPE["intermediate_size"])
    w.add_head_count(SHAPE["num_attention_heads"]), w.add_head_count_kv(SHAPE["num_key_value_heads"])
    w.add_key_length(SHAPE["head_dim"]), w.add_rope_freq_base(1e6), w.add_layer_norm_rms_eps(SHAPE["rms_norm_eps"])
    w.add_expert_count(SHAPE["num_experts"]), w.add_expert_used_count(SHAPE["num_experts_per_tok"])
    w.add_expert_feed_forward_length(SHAPE["moe_intermediate_size"]), w.add_vocab_size(SHAPE["vocab_size"])
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's bytes that stand for themselves
    others = [b for b in range(256) if b not in printable]
    tokens = [chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)] + ["Ġt", "he"]
    tokens += [f"<|unused{i}|>" for i in range(SHAPE["vocab_size"] - len(tokens) - 1)] + ["<|endoftext|>"]
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3]), w.add_token_merges(["Ġ t", "h e"])
    w.add_eos_token_id(len(tokens) - 1), w.add_bos_token_id(len(tokens) - 1)
    tensors = list(_gguf_tensors(layers))
    for name, shape, _ in tensors:
        kind = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else gguf.GGMLQuantizationType.Q8_0
        byte_shape = gguf.quant_shape_to_byte_shape(shape, kind) if len(shape) > 1 else shape
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8 if len(shape) > 1 else np.float32),
                          int(np.prod(byte_shape)) * (1 if len(shape) > 1 else 4), raw_dtype=kind)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_ti_data_to_file()
    for name, shape, make in tensors:
        a = make().numpy()
        w.write_tensor_data(a if a.ndim == 1 else gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0))
    w.close()
    done.touch()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--methods", default="pvq")
    ap.add_argument("--bits", type=float, default=3.25)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pvq-moe"))
    ap.add_argument("--results", type=Path, default=RESULTS / "moe_stream.json")
    ap.add_argument("--gguf", action="store_true", help="the model as a Q8_0 GGUF file (results: moe_stream_gguf.json)")
    args = ap.parse_args()
    folder = args.workdir / f"qwen3moe-{args.layers}"
    make_checkpoint(folder, args.layers)
    if args.gguf:
        source = args.workdir / f"qwen3moe-{args.layers}.gguf"
        make_gguf(source, args.layers)
        if args.results == RESULTS / "moe_stream.json":
            args.results = RESULTS / "moe_stream_gguf.json"
    else:
        source = folder
    params = sum(torch.Size(s).numel() for _, s in _tensor_shapes(args.layers))
    results = {"command": "python bench/moe_stream.py " + " ".join(sys.argv[1:]), "commit": commit(),
               "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
               "shape": SHAPE, "layers": args.layers, "parameters": params,
               "source": source.name, "checkpoint_bytes": source.stat().st_size if args.gguf else
               sum(f.stat().st_size for f in folder.glob("*.safetensors")), "runs": {}}
    for method in args.methods.split(","):
        runs = {}
        for mode, extra in (("streamed", []), ("whole", ["--no-stream"])):
            out = args.workdir / f"out-{method}-{mode}"
            runs[mode] = quantize(source, out, method, args.bits, args.nsamples, args.seqlen, keep=True, extra=extra)
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
