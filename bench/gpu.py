"""GPU kernels, layer by layer: the Triton decode-in-the-product against a bfloat16 GEMM on the linears of an
8B-shaped Llama (hidden 4096, intermediate 14336, 32 heads, 8 KV heads).

The packed matrices hold random valid codes (uniform shape indices below V(n, k), random gain levels):
the kernels' time does not depend on the weights, and packing 8B-sized matrices with the PVQ search
would take longer than a GPU session allows. Per setting (the picker's choice for 3.25 and 2.25 bits)
and layer shape it measures: time of one token (1-token GEMV) and of a 512-token prompt, against
torch's bfloat16 GEMM on the same shape; the bytes resident on the device for the packed layer.

    PYTHONPATH=src python bench/gpu.py            # on a CUDA machine: bench/results/gpu.json
    TRITON_INTERPRET=1 PYTHONPATH=src python bench/gpu.py --tiny   # CPU smoke run of the same code

Not measured here yet (issue #17): whole-model tokens/s, `pvq quantize --device cuda`.
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
from pvq.codec.gain import beta_codebook  # noqa: E402
from pvq.codec.gainshape import law_length  # noqa: E402
from pvq.codec.pyramid import count  # noqa: E402
from pvq.picker import choose_spec  # noqa: E402
from pvq.runtime import gpu  # noqa: E402
from pvq.settings import QuantConfig  # noqa: E402

SHAPES_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}
SHAPES_TINY = {"small": (48, 96)}
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


def timed(fn, reps: int, sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="one small layer, few repetitions (a CPU smoke run)")
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
            op = gpu.Operands(random_packed(spec, rows, cols, dev))
            w16 = torch.randn(rows, cols, device=dev).to(torch.bfloat16)
            x1 = torch.randn(1, cols, device=dev)
            xp = torch.randn(prompt, cols, device=dev)
            packed_bytes = op.codes.numel() + 2 * op.packed.row_scale.numel()
            tables = op.tab.nbytes()
            r = dict(bits=bits, layer=name, rows=rows, cols=cols, spec=spec.name,
                     gemv_ms=1e3 * timed(lambda: op.gemv(x1), reps, sync),
                     bf16_gemv_ms=1e3 * timed(lambda: x1.to(torch.bfloat16) @ w16.T, reps, sync),
                     prompt_ms=1e3 * timed(lambda: (xp.to(torch.bfloat16) @ op.decode().to(torch.bfloat16).T), reps,
                                           sync),
                     bf16_prompt_ms=1e3 * timed(lambda: xp.to(torch.bfloat16) @ w16.T, reps, sync),
                     packed_bytes=packed_bytes, resident_bytes=packed_bytes + 4 * op.levels.numel() + 4 * op.scales.numel(),
                     shared_table_bytes=tables, bf16_bytes=2 * rows * cols)
            r["gemv_speedup"] = r["bf16_gemv_ms"] / r["gemv_ms"]
            r["prompt_ratio"] = r["bf16_prompt_ms"] / r["prompt_ms"]
            print(f"{bits} {name:9s} {spec.name}: 1 token {r['gemv_ms']:.3f} ms (bf16 {r['bf16_gemv_ms']:.3f}, "
                  f"{r['gemv_speedup']:.2f}x); {prompt} tokens {r['prompt_ms']:.2f} ms (bf16 {r['bf16_prompt_ms']:.2f}, "
                  f"{r['prompt_ratio']:.2f}x)", flush=True)
            rows_out.append(r)
    result = dict(device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)", tiny=args.tiny,
                  prompt_tokens=prompt, reps=reps, rows=rows_out,
                  command="PYTHONPATH=src python bench/gpu.py" + (" --tiny" if args.tiny else ""))
    if args.tiny and args.out == OUT:
        print("smoke run: nothing written (pass --out to keep it)")
        return
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
