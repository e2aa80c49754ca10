"""The GPU kernels' resources, counted on a machine without a GPU: every launch gpu.Operands makes (decode into
each dtype, the points, the fused product for 1-8 tokens, the fused tiled product with each operand dtype),
compiled by Triton down to machine code for an H100 (sm_90) and an A100 (sm_80), for the settings the picker
chooses at 2.25, 3.25 and 4.25 bits (compact and fast layouts) on the linears of an 8B Llama. Per kernel: the
registers a thread uses, local memory (spilled registers), the stack, shared memory, warps and pipeline stages
(cuobjdump of the cubin, Triton's metadata); and the fused tiled product with 4 warps against the 8 it runs
with. Registers past 255 spill, and spills or a large stack in an inner
loop are what to suspect first when a kernel is slow on a GPU; bench/gpu.py measures the time where one is lent.

    python bench/gpu_compile.py          # bench/results/gpu_compile.json, about 5 minutes on 2 cores
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, whatever the shell says

import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402
from scale import commit  # noqa: E402

from pvq.codec.gainshape import quantize  # noqa: E402
from pvq.picker import choose_spec  # noqa: E402
from pvq.runtime import gpu  # noqa: E402
from pvq.settings import QuantConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_compile.json"
SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))  # q/o, k/v, gate/up, down of an 8B Llama
CAPABILITIES = (90, 80)


def settings() -> dict:
    out = {}
    for bits in (2.25, 3.25, 4.25):
        for layout in ("compact", "fast"):
            for rows, cols in SHAPES:
                s = choose_spec(QuantConfig(method="pvq", bits=bits, layout=layout), rows, cols)
                out.setdefault(s.name, (s, []))[1].append(f"{bits} {layout} {rows}x{cols}")
    return out


def resources(cubin: bytes) -> dict:
    """REG, STACK, SHARED and LOCAL of the one function in a cubin (cuobjdump --dump-resource-usage)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        f.write_bytes(cubin)
        text = subprocess.run([str(tool), "--dump-resource-usage", str(f)], capture_output=True, text=True,
                              check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def count(name: str) -> list[dict]:
    spec = settings()[name][0]
    op = gpu.Operands(quantize(torch.randn(3, 2 * spec.n), spec))
    rows = []
    for launch_name, launch in op.launches().items():
        for cap in CAPABILITIES:
            t0 = time.time()
            k = launch.compile(cap)
            rows.append({"setting": name, "launch": launch_name, "kernel": launch.kernel, "sm": cap,
                         **resources(k.asm["cubin"]), "triton_shared_bytes": k.metadata.shared,
                         "warps": k.metadata.num_warps, "stages": k.metadata.num_stages,
                         "compile_s": round(time.time() - t0, 2)})
        print(name, launch_name, {r["sm"]: (r["reg"], r["local"]) for r in rows[-len(CAPABILITIES):]}, flush=True)
    return rows


def warps(name: str) -> list[dict]:
    """The fused tiled product (bfloat16 operands, sm_90) with 4 warps (Triton's default) and 8 (gpu.GEMM_WARPS's
    choice, made from these counts)."""
    spec = settings()[name][0]
    launch = gpu.Operands(quantize(torch.randn(3, 2 * spec.n), spec)).launches()["matmul bfloat16"]
    rows = []
    for w in (4, 8):
        launch.options = {**launch.options, "num_warps": w}
        rows.append({"setting": name, "warps": w, **resources(launch.compile(90).asm["cubin"])})
    return rows


def main() -> None:
    import triton

    chosen = settings()
    # spawned, not forked: a fork of a process that has run torch's thread pools can hang
    with ProcessPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = [r for part in pool.map(count, sorted(chosen)) for r in part]
        gemm_warps = [r for part in pool.map(warps, sorted(chosen)) for r in part]
    spills = [r for r in rows if r["local"] or r["stack"]]
    write_json(RESULTS, {
        "command": "python bench/gpu_compile.py", "commit": commit(), "triton": triton.__version__,
        "settings": {n: uses for n, (_, uses) in sorted(chosen.items())},
        "constants": {k: getattr(gpu, k) for k in ("BLOCK_GROUPS", "GEMV_ROWS", "GEMV_GROUPS", "MAX_TOKENS",
                                                    "GEMM_TOKENS", "GEMM_ROWS", "GEMM_WIDTH")},
        "summary": {"kernels_compiled": len(rows), "with_spills_or_stack": len(spills),
                    "most_registers": max(r["reg"] for r in rows),
                    "spilling": sorted({f"{r['launch']} sm_{r['sm']}" for r in spills})},
        "gemm_warps_bfloat16_sm_90": gemm_warps,
        "kernels": rows})
    print(json.dumps({"compiled": len(rows), "spilling": sorted({(r["launch"], r["sm"]) for r in spills})}))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
