"""Memory and time of quantizing models of growing depth, streamed from disk (issue "Any size").

Random checkpoints are generated with a fixed seed from one Llama block shape (hidden 2560,
intermediate 6912, 20 heads, 4 KV heads, vocab 32000) and a number of layers, in bfloat16, written in
safetensors shards one tensor at a time (the generator never holds more than one shard). Each is
quantized by `pvq quantize` in its own process; the process's peak RSS (as the CLI reports it), the
wall time and million weights per second go to bench/results/scale.json (rewritten after every run, so
an interrupted benchmark keeps what it measured) and scale.png.

    python bench/scale.py                                   # 4, 12, 36 layers; pvq and pvq-gptq
    python bench/scale.py --layers 4,12 --methods pvq      # a subset

Random weights say nothing of quality: quality figures use SmolLM2 (bench/quality.py).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save_figure, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPE = dict(hidden_size=2560, intermediate_size=6912, num_attention_heads=20, num_key_value_heads=4,
             vocab_size=32000, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5,
             tie_word_embeddings=False)


def _tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    out = [("model.embed_tokens.weight", (SHAPE["vocab_size"], h))]
    for b in range(layers):
        p = f"model.layers.{b}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (SHAPE["vocab_size"], h))]


def _tensor(name: str, shape) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def make_checkpoint(folder: Path, layers: int, shard_bytes: int = 1 << 30) -> None:
    """A random Llama checkpoint of `layers` blocks in bfloat16 shards (skipped when already complete)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from pvq.models.loading import tiny_tokenizer

    if (folder / "complete").is_file():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shapes = _tensor_shapes(layers)
    shards, current, size = [], [], 0
    for name, shape in shapes:  # group names into shards by size first, to know N
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, group in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _tensor(name, shape) for name, shape in group}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    LlamaConfig(num_hidden_layers=layers, **SHAPE).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # byte tokens: ids < 256 of the 32000
    (folder / "complete").write_text("")


def quantize(folder: Path, out: Path, method: str, bits: float, nsamples: int, seqlen: int) -> dict:
    cmd = [sys.executable, "-m", "pvq.cli", "quantize", str(folder), "--method", method, "--bits", str(bits),
           "-o", str(out), "--force", "--json", "--no-progress", "--nsamples", str(nsamples), "--seqlen", str(seqlen)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": wall, "quantize_seconds": res["seconds"], "peak_rss_mib": res["peak_rss_mib"],
            "linear_weights": res["linear_weights"], "bits_per_weight": res["bits_per_weight"],
            "file_bytes": res["file_bytes"], "mweights_per_s": res["linear_weights"] / 1e6 / res["seconds"],
            "streamed": res.get("streamed")}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for method in sorted({r["method"] for r in results["runs"]}):
        runs = sorted((r for r in results["runs"] if r["method"] == method), key=lambda r: r["layers"])
        a.plot([r["params_b"] for r in runs], [r["peak_rss_mib"] / 1024 for r in runs], "o-", label=method)
        b.plot([r["params_b"] for r in runs], [r["seconds"] / 60 for r in runs], "o-", label=method)
    a.set(xlabel="parameters (billions)", ylabel="peak RSS (GiB)", title="memory while quantizing", ylim=(0, None))
    b.set(xlabel="parameters (billions)", ylabel="minutes", title="time (2-core CPU)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,12,36")
    ap.add_argument("--methods", default="pvq,pvq-gptq")
    ap.add_argument("--bits", type=float, default=3.25)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pvq-scale"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()
    out_json = RESULTS / "scale.json"
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads()},
               "shape": SHAPE, "bits": args.bits, "calibration": f"{args.nsamples} x {args.seqlen} tokens",
               "command": "python bench/scale.py " + " ".join(sys.argv[1:]), "runs": []}
    for layers in (int(x) for x in args.layers.split(",")):
        folder = args.workdir / f"llama-{layers}"
        t0 = time.time()
        make_checkpoint(folder, layers)
        params = sum(int(torch.Size(s).numel()) for _, s in _tensor_shapes(layers))
        print(f"{layers} layers: {params / 1e9:.2f} B parameters, checkpoint {time.time() - t0:.0f} s", flush=True)
        for method in args.methods.split(","):
            run = quantize(folder, args.workdir / "out", method, args.bits, args.nsamples, args.seqlen)
            run.update({"layers": layers, "method": method, "params_b": params / 1e9,
                        "checkpoint_gib": 2 * params / 2**30})
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            write_json(out_json, results)
            plot(results, RESULTS / "scale.png")
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
