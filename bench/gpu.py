"""GPU kernels, layer by layer: the Triton decode-in-the-product against a bfloat16 GEMM on the linears of an
8B-shaped Llama (hidden 4096, intermediate 14336, 32 heads, 8 KV heads).

The packed matrices hold random valid codes (uniform shape indices below V(n, k), random gain levels):
the kernels' time does not depend on the weights, and packing 8B-sized matrices with the PVQ search
would take longer than a GPU session allows. Per setting (the picker's choice for 3.25 and 2.25 bits)
and layer shape it measures: time of one token (1-token GEMV) and of a 512-token prompt (its tiles decoded,
and rebuilt inside the fused tiled product: the two ways gpu.PROMPT offers), against
torch's bfloat16 GEMM on the same shape; the bytes resident on the device for the packed layer.

With --model, the whole model too: an 8B-shaped Llama (--layers of its 32 blocks, so that building it
fits a short session; the blocks are identical, so tokens/s scale with 1/layers) in bfloat16 against the
same model with every block's linears pvq-packed (random valid codes, decoded on the fly by the Triton
kernels): tokens/s generating 128 tokens greedily after a 512-token prompt at batch 1, prompt tokens/s, and
the GPU memory the quantized linears hold against their packed size.

    PYTHONPATH=src python bench/gpu.py            # on a CUDA machine: bench/results/gpu.json
    PYTHONPATH=src python bench/gpu.py --model    # the layers, then the whole 8B-shaped model
    TRITON_INTERPRET=1 PYTHONPATH=src python bench/gpu.py --tiny --model   # CPU smoke run of the same code

`pvq quantize --device cuda` is timed with the CLI itself (SmolLM2 must be on the machine: its GGUF is
98 MB, over one call's 64 MiB, so it travels in two carried halves that a warm machine keeps):
    time PYTHONPATH=src python -m pvq.cli quantize SmolLM2.gguf --method pvq-gptq --bits 3.25 --device cuda -o q --ppl
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from pvq.codec import PackedPVQ, bitpack  # noqa: E402
from pvq.models.adapters import block_linear_names, set_module  # noqa: E402
from pvq.modules.linear import QuantLinear  # noqa: E402
from pvq.codec.gain import beta_codebook  # noqa: E402
from pvq.codec.gainshape import law_length  # noqa: E402
from pvq.codec.pyramid import count  # noqa: E402
from pvq.picker import choose_spec  # noqa: E402
from pvq.runtime import gpu  # noqa: E402
from pvq.runtime.decode import Decoder  # noqa: E402
from pvq.settings import QuantConfig  # noqa: E402
from pvq.transforms.rotate import layer_seeds  # noqa: E402

SHAPES_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}
SHAPES_TINY = {"small": (48, 96)}
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False)
LLAMA_TINY = dict(hidden_size=96, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)
OUT = Path(__file__).resolve().parent / "results" / "gpu.json"


def random_packed(spec, rows: int, cols: int, device, seed: int = 0) -> PackedPVQ:
    g = torch.Generator().manual_seed(seed)
    groups = rows * cols // spec.n
    v = count(spec.n, spec.k)
    idx = (torch.rand(groups, generator=g, dtype=torch.float64) * v).long().clamp_max(v - 1)
    lvl = torch.randint(0, spec.gain_levels, (groups,), generator=g)
    codes = bitpack.pack(idx * spec.gain_levels + lvl, spec.code_bits)
    levels = beta_codebook(spec.n, law_length(spec, rows, cols), spec.gain_levels)
    scale = torch.ones(rows if spec.scale == "row" else 1, dtype=torch.float16)
    return PackedPVQ(spec, (rows, cols), codes.to(device), scale.to(device), levels.to(device))


def prompt_product(dec, x, how: str):
    """A prompt's product through the runtime's own path, its tiles decoded (gpu.PROMPT "tiles") or rebuilt
    inside the fused tiled product ("fused"), in bfloat16 as a bfloat16 model multiplies."""
    keep, gpu.PROMPT = gpu.PROMPT, how
    try:
        return dec.matmul(x, torch.bfloat16)
    finally:
        gpu.PROMPT = keep


def timed(fn, reps: int, sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def llama(shape: dict, layers: int, device):
    """A randomly initialised Llama of `shape` with `layers` blocks, in bfloat16, built on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=layers, **shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def pack_model(model, bits: float, device) -> int:
    """Swap every block linear of `model` for a QuantLinear holding random valid codes of the setting the
    picker chooses at `bits` (one random matrix per shape, copied into each layer: the kernels' time does not
    depend on the values), decoded on the fly. Returns the packed bytes (codes, scales, stored levels)."""
    made, packed_bytes = {}, 0
    for name, lin in block_linear_names(model):
        rows, cols = lin.out_features, lin.in_features
        spec = choose_spec(QuantConfig(method="pvq", bits=bits), rows, cols)
        if (rows, cols) not in made:
            made[(rows, cols)] = random_packed(spec, rows, cols, "cpu")
        seeds = layer_seeds(0, name, True)
        q = QuantLinear.from_packed(made[(rows, cols)], seeds, decode="on-the-fly").to(device)
        packed_bytes += sum(b.numel() * b.element_size() for b in q.buffers())
        set_module(model, name, q)
    return packed_bytes


def generation(model, vocab: int, prompt: int, new: int, sync, device, reps: int = 3) -> dict:
    """Greedy generation of `new` tokens after a random `prompt`-token prompt at batch 1: prompt tokens/s
    (one forward over the prompt) and generated tokens/s (the time of prompt + new tokens less that of
    prompt + 1)."""
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)

    def run(n):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)

    with torch.no_grad():
        run(2)  # warm-up: kernels compiled, runners built
        first = timed(lambda: model(ids, use_cache=False), reps, sync)
        one = timed(lambda: run(1), reps, sync)
        full = timed(lambda: run(new + 1), reps, sync)
    return dict(prompt_tokens_per_s=prompt / first, gen_tokens_per_s=new / (full - one))


def whole_model(tiny: bool, layers: int, device, sync) -> dict:
    shape, prompt, new = (LLAMA_TINY, 16, 8) if tiny else (LLAMA_8B, 512, 128)
    cuda = device.type == "cuda"
    mem = torch.cuda.memory_allocated if cuda else (lambda: 0)
    out = dict(shape=shape, layers=layers, prompt_tokens=prompt, new_tokens=new, rows=[])
    model = llama(shape, layers, device)
    r = dict(model="bfloat16", **generation(model, shape["vocab_size"], prompt, new, sync, device))
    r["linear_bytes"] = sum(lin.weight.numel() * 2 for _, lin in block_linear_names(model))
    print(f"bfloat16: prompt {r['prompt_tokens_per_s']:.0f} tokens/s, generation {r['gen_tokens_per_s']:.1f} tokens/s",
          flush=True)
    out["rows"].append(r)
    del model
    for bits in (3.25, 2.25):
        if cuda:
            torch.cuda.empty_cache()
        m0 = mem()
        model = llama(shape, layers, device)
        dense = sum(p.numel() * p.element_size() for p in model.parameters()) - sum(
            lin.weight.numel() * lin.weight.element_size() for _, lin in block_linear_names(model))
        packed_bytes = pack_model(model, bits, device)
        r = dict(model=f"pvq {bits}", **generation(model, shape["vocab_size"], prompt, new, sync, device))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        r.update(packed_bytes=packed_bytes, resident_bytes=mem() - m0 - dense if cuda else None)
        r["resident_over_packed"] = None if r["resident_bytes"] is None else r["resident_bytes"] / packed_bytes
        r["gen_speedup"] = r["gen_tokens_per_s"] / out["rows"][0]["gen_tokens_per_s"]
        r["prompt_ratio"] = r["prompt_tokens_per_s"] / out["rows"][0]["prompt_tokens_per_s"]
        print(f"pvq {bits}: prompt {r['prompt_tokens_per_s']:.0f} tokens/s ({r['prompt_ratio']:.2f}x), generation "
              f"{r['gen_tokens_per_s']:.1f} tokens/s ({r['gen_speedup']:.2f}x), linears resident "
              f"{r['resident_over_packed'] or float('nan'):.2f}x packed", flush=True)
        out["rows"].append(r)
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="one small layer, few repetitions (a CPU smoke run)")
    ap.add_argument("--model", action="store_true", help="the whole 8B-shaped model too (generation, prompts, memory)")
    ap.add_argument("--layers", type=int, default=8, help="blocks of the 8B-shaped model (default 8 of its 32)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        sys.exit("bench/gpu.py: no CUDA GPU here (use --tiny with TRITON_INTERPRET=1 for a CPU smoke run)")
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shapes = SHAPES_TINY if args.tiny else SHAPES_8B
    reps, prompt = (1, 16) if args.tiny else (50, 512)
    rows_out = []
    for bits in (3.25, 2.25):
        for name, (rows, cols) in shapes.items():
            spec = choose_spec(QuantConfig(method="pvq", bits=bits), rows, cols)
            dec = Decoder(random_packed(spec, rows, cols, dev), triton=True)
            op = dec.gpu
            w16 = torch.randn(rows, cols, device=dev).to(torch.bfloat16)
            x1 = torch.randn(1, cols, device=dev)
            xp = torch.randn(prompt, cols, device=dev)
            packed_bytes = op.codes.numel() + 2 * op.packed.row_scale.numel()
            tables = op.tab.nbytes()
            r = dict(bits=bits, layer=name, rows=rows, cols=cols, spec=spec.name,
                     gemv_ms=1e3 * timed(lambda: op.gemv(x1), reps, sync),
                     bf16_gemv_ms=1e3 * timed(lambda: x1.to(torch.bfloat16) @ w16.T, reps, sync),
                     prompt_ms=1e3 * timed(lambda: prompt_product(dec, xp, "tiles"), reps, sync),
                     fused_prompt_ms=1e3 * timed(lambda: prompt_product(dec, xp, "fused"), reps, sync),
                     bf16_prompt_ms=1e3 * timed(lambda: xp.to(torch.bfloat16) @ w16.T, reps, sync),
                     packed_bytes=packed_bytes, resident_bytes=packed_bytes + 4 * op.levels.numel() + 4 * op.scales.numel(),
                     shared_table_bytes=tables, bf16_bytes=2 * rows * cols)
            r["gemv_speedup"] = r["bf16_gemv_ms"] / r["gemv_ms"]
            r["prompt_ratio"] = r["bf16_prompt_ms"] / r["prompt_ms"]
            r["fused_prompt_ratio"] = r["bf16_prompt_ms"] / r["fused_prompt_ms"]
            print(f"{bits} {name:9s} {spec.name}: 1 token {r['gemv_ms']:.3f} ms (bf16 {r['bf16_gemv_ms']:.3f}, "
                  f"{r['gemv_speedup']:.2f}x); {prompt} tokens {r['prompt_ms']:.2f} ms decoded in tiles, "
                  f"{r['fused_prompt_ms']:.2f} fused (bf16 {r['bf16_prompt_ms']:.2f}: {r['prompt_ratio']:.2f}x, "
                  f"{r['fused_prompt_ratio']:.2f}x)", flush=True)
            rows_out.append(r)
    result = dict(device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)", tiny=args.tiny,
                  prompt_tokens=prompt, reps=reps, rows=rows_out,
                  command="PYTHONPATH=src python bench/gpu.py" + (" --tiny" if args.tiny else "")
                  + (f" --model --layers {args.layers}" if args.model else ""))
    if args.model:
        result["model"] = whole_model(args.tiny, args.layers, dev, sync)
    if args.tiny and args.out == OUT:
        print("smoke run: nothing written (pass --out to keep it)")
        return
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
