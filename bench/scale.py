"""Memory and time of quantizing models of growing depth, streamed from disk (issue "Any size").

Random checkpoints are generated with a fixed seed from one Llama block shape (hidden 2560,
intermediate 6912, 20 heads, 4 KV heads, vocab 32000) and a number of layers, in bfloat16, written in
safetensors shards one tensor at a time (the generator never holds more than one shard). Each is
quantized by `pvq quantize` in its own process; the process's peak RSS (as the CLI reports it), the
wall time and million weights per second go to bench/results/scale.json (rewritten after every run, so
an interrupted benchmark keeps what it measured) and scale.png.

    python bench/scale.py                                   # 4, 12, 36 layers; pvq and pvq-gptq
    python bench/scale.py --layers 4,12 --methods pvq      # a subset

The 12-layer pvq-gptq run is also run again killed (SIGKILL) at 3 random moments and rerun each time;
`resume` in the JSON says whether every output file has the sha256 of the uninterrupted run's.

Random weights say nothing of quality: quality figures use SmolLM2 (bench/quality.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
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


def model_shapes(layers: int, vocab: int, h: int, block) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a Llama-layout checkpoint's tensors in writing order: embeddings, `block(prefix)` for
    each of `layers` blocks, final norm and head."""
    out = [("model.embed_tokens.weight", (vocab, h))]
    for b in range(layers):
        out += block(f"model.layers.{b}.")
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def attention_shapes(p: str, h: int, q: int, kv: int, qk_norm: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """A block's two norms and attention projections (q of width q, k and v of kv), with q/k norms of width
    qk_norm where given (Qwen3)."""
    out = [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
           (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
           (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q))]
    if qk_norm is not None:
        out += [(p + "self_attn.q_norm.weight", (qk_norm,)), (p + "self_attn.k_norm.weight", (qk_norm,))]
    return out


def _tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    return model_shapes(layers, SHAPE["vocab_size"], h, lambda p: attention_shapes(p, h, h, kv) + [
        (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i))])


def _tensor(name: str, shape) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def make_checkpoint(folder: Path, layers: int, shard_bytes: int = 1 << 30) -> None:
    """A random Llama checkpoint of `layers` blocks in bfloat16 shards (skipped when already complete)."""
    from transformers import LlamaConfig

    write_checkpoint(folder, _tensor_shapes(layers), LlamaConfig(num_hidden_layers=layers, **SHAPE), shard_bytes)


def write_checkpoint(folder: Path, shapes: list[tuple[str, tuple[int, ...]]], config, shard_bytes: int = 1 << 30) -> None:
    """Random bfloat16 tensors of these names and shapes (`_tensor`) in safetensors shards with an index, a shard
    at a time, then `config` and the byte tokenizer (ids < 256 of the vocabulary); skipped when already complete."""
    from safetensors.torch import save_file

    from pvq.models.loading import tiny_tokenizer

    if (folder / "complete").is_file():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
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
    config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "complete").write_text("")


def _command(folder: Path, out: Path, method: str, bits: float, nsamples: int, seqlen: int) -> list[str]:
    return [sys.executable, "-m", "pvq.cli", "quantize", str(folder), "--method", method, "--bits", str(bits),
            "-o", str(out), "--json", "--no-progress", "--nsamples", str(nsamples), "--seqlen", str(seqlen)]


def quantize(folder: Path, out: Path, method: str, bits: float, nsamples: int, seqlen: int, keep: bool = False,
             extra: list[str] = ()) -> dict:
    cmd = _command(folder, out, method, bits, nsamples, seqlen) + ["--force", *extra]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return {"seconds": wall, "quantize_seconds": res["seconds"], "peak_rss_mib": res["peak_rss_mib"],
            "linear_weights": res["linear_weights"], "bits_per_weight": res["bits_per_weight"],
            "file_bytes": res["file_bytes"], "mweights_per_s": res["linear_weights"] / 1e6 / res["seconds"],
            "streamed": res.get("streamed")}


def digests(out: Path) -> dict:
    """sha256 of every file of an output directory."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir()) if f.is_file()}


def killed_and_resumed(folder: Path, out: Path, method: str, bits: float, nsamples: int, seqlen: int,
                       reference: dict, full_seconds: float, kills: int, seed: int) -> dict:
    """Run the same command `kills` times, each killed (SIGKILL) after a random delay, then once to the end;
    compare every output file with the uninterrupted run's (`reference`: name -> sha256)."""
    rng = random.Random(seed)
    shutil.rmtree(out, ignore_errors=True)
    cmd = _command(folder, out, method, bits, nsamples, seqlen)
    attempts = []
    for _ in range(kills):
        delay = rng.uniform(0.1, 0.3) * full_seconds  # each try gets a tenth to a third of a whole run's time
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=delay)
            killed = False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed = True
        done = _blocks_done(out)
        attempts.append({"delay_s": round(delay, 1), "killed": killed, "blocks_done_after": done})
        print(f"  killed after {delay:.0f} s: {done} blocks done" if killed else "  finished before the kill", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1:]}")
    got = digests(out)
    shutil.rmtree(out, ignore_errors=True)
    return {"kills": attempts, "last_run_seconds": time.time() - t0, "files": len(got),
            "same_sha256_as_uninterrupted": got == reference,
            "resumed_message": next((ln for ln in r.stderr.splitlines() if ln.startswith("resuming")), None)}


def _blocks_done(out: Path) -> int:
    """Blocks an unfinished run of `out` has recorded (its manifest), 0 when there is none."""
    for d in out.parent.glob(f"{out.name}.tmp-*"):
        try:
            return len(json.loads((d / "manifest.json").read_text())["blocks"])
        except (OSError, ValueError, KeyError):
            return 0
    return 0


# Llama block shapes a projection is made for: (hidden, intermediate, KV width, vocabulary)
PROJECTED = {"this benchmark's shape": (2560, 6912, 640, 32000), "Llama-3-8B": (4096, 14336, 1024, 128256),
             "Llama-3-70B": (8192, 28672, 1024, 128256)}


def projected_peak_bytes(hidden: int, inter: int, kv: int, vocab: int, method: str, tokens: int,
                         base: float) -> float:
    """A count of the large buffers alive at the peak of a streamed run, plus `base` (the process itself:
    torch, transformers, the tokenizer; fitted from a measured run). Data-free: one block's float32 weights
    and its largest linear's rotation (float32 in, float64 between the two sides, float32 out: 16 bytes a
    weight), or at the end the embedding and head tables, one as stored (16-bit) beside its float16 copy and the
    other rounded already (6 bytes a weight of one table). pvq-gptq adds the calibration
    activations (inputs and outputs, float32) and takes the larger of the block's Hessians (float64, one per
    distinct input: 3 of hidden^2, 1 of intermediate^2) and the solve of the down projection (its Hessian,
    factored in its own memory, and the half of it kept for a retry: 12 bytes x intermediate^2)."""
    block = 4 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    largest = hidden * inter
    end = 6 * vocab * hidden
    if method != "pvq-gptq":
        return base + max(block + 16 * largest, end)
    acts = 2 * 4 * tokens * hidden
    hessians = block + 8 * (3 * hidden * hidden + inter * inter)
    solve = 4 * largest + (8 + 4) * inter * inter + 16 * largest
    return base + acts + max(hessians, solve, end)


def projection(results: dict, nsamples: int, seqlen: int) -> dict:
    """Peak memory of other block shapes from projected_peak_bytes, its base fitted to the deepest measured
    run of each method, and the deviation of the projection at the measured depths."""
    out = {"assumptions": "streamed safetensors, calibration of nsamples x seqlen tokens in memory (--offload "
                          "moves the activations to files), float32 compute; "
                          + " ".join(projected_peak_bytes.__doc__.split(". ", 1)[1].split()),
           "calibration_tokens": nsamples * seqlen, "methods": {}}
    for method in sorted({r["method"] for r in results["runs"]}):
        runs = sorted((r for r in results["runs"] if r["method"] == method), key=lambda r: r["layers"])
        shape = PROJECTED["this benchmark's shape"]
        model = projected_peak_bytes(*shape, method, nsamples * seqlen, 0.0)
        base = runs[-1]["peak_rss_mib"] * 2**20 - model
        out["methods"][method] = {
            "base_gib": base / 2**30,
            "deviation_at_measured": {r["layers"]: (model + base) / (r["peak_rss_mib"] * 2**20) - 1 for r in runs},
            "peak_gib": {name: projected_peak_bytes(*dims, method, nsamples * seqlen, base) / 2**30
                         for name, dims in PROJECTED.items()},
            # pvq quantize's default calibration, 128 x 512 tokens
            "peak_gib_default_calibration": {name: projected_peak_bytes(*dims, method, 128 * 512, base) / 2**30
                                             for name, dims in PROJECTED.items()}}
    return out


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


def commit() -> str:
    """The pvq commit a row was measured with ("+changes" when the work tree differs from it)."""
    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no", "src") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,12,36")
    ap.add_argument("--methods", default="pvq,pvq-gptq")
    ap.add_argument("--bits", type=float, default=3.25)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pvq-scale"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--resume-layers", type=int, default=12, help="the model whose run is also killed and resumed")
    ap.add_argument("--resume-method", default="pvq-gptq")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--results", type=Path, default=RESULTS / "scale.json", help="the JSON written (a PNG beside it)")
    ap.add_argument("--reproject", action="store_true",
                    help="only recompute the memory projection of the runs already in --results")
    args = ap.parse_args()
    out_json = args.results
    if args.reproject:
        results = json.loads(out_json.read_text())
        n, L = (int(x) for x in results["calibration"].split(" tokens")[0].split(" x "))
        results["projection"] = projection(results, n, L)
        write_json(out_json, results)
        return
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads()},
               "shape": SHAPE, "bits": args.bits, "calibration": f"{args.nsamples} x {args.seqlen} tokens",
               "command": "python bench/scale.py " + " ".join(sys.argv[1:]), "runs": []}
    redo = {(int(n), m) for n in args.layers.split(",") for m in args.methods.split(",")}
    if out_json.is_file():  # the rows of other models or methods stay, each with the commit that measured it
        old = json.loads(out_json.read_text())
        if old.get("calibration") == results["calibration"] and old.get("bits") == args.bits:
            results["runs"] = [r for r in old["runs"] if (r["layers"], r["method"]) not in redo]
            if "resume" in old and (args.resume_layers, args.resume_method) not in redo:  # not killed again
                results["resume"] = old["resume"]
    for layers in (int(x) for x in args.layers.split(",")):
        folder = args.workdir / f"llama-{layers}"
        t0 = time.time()
        make_checkpoint(folder, layers)
        params = sum(int(torch.Size(s).numel()) for _, s in _tensor_shapes(layers))
        print(f"{layers} layers: {params / 1e9:.2f} B parameters, checkpoint {time.time() - t0:.0f} s", flush=True)
        for method in args.methods.split(","):
            resume = layers == args.resume_layers and method == args.resume_method
            out = args.workdir / "out"
            run = quantize(folder, out, method, args.bits, args.nsamples, args.seqlen, keep=resume)
            run.update({"layers": layers, "method": method, "params_b": params / 1e9,
                        "checkpoint_gib": 2 * params / 2**30, "commit": commit()})
            results["runs"].append(run)
            results["runs"].sort(key=lambda r: (r["method"] != "pvq", r["method"], r["layers"]))
            results["projection"] = projection(results, args.nsamples, args.seqlen)
            print(json.dumps(run), flush=True)
            write_json(out_json, results)
            plot(results, out_json.with_suffix(".png"))
            if resume:  # the same command killed at random moments and rerun: the same bytes?
                reference = digests(out)
                shutil.rmtree(out, ignore_errors=True)
                results["resume"] = {"layers": layers, "method": method, "seed": args.seed, **killed_and_resumed(
                    folder, args.workdir / "out-resumed", method, args.bits, args.nsamples, args.seqlen,
                    reference, run["seconds"], args.kills, args.seed)}
                print(json.dumps(results["resume"]), flush=True)
                write_json(out_json, results)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
