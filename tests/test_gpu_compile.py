"""The Triton kernels compiled for NVIDIA GPUs on this machine without one: Triton's compiler down to machine
code (its bundled ptxas) for an H100 (sm_90) and an A100 (sm_80), with the argument types and constants the
launches use (gpu.Operands.launches), so CI catches what only the compiler rejects; the interpreter of
tests/test_gpu_kernels.py checks the numbers, and runs any Python. In a subprocess: kernels imported under
TRITON_INTERPRET=1, which that file sets for this process, cannot be compiled."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# found, not imported: Triton imported before test_gpu_kernels sets TRITON_INTERPRET would not interpret
TRITON = importlib.util.find_spec("triton")

SCRIPT = r"""
import json, sys, torch
from pvq.codec.gainshape import quantize
from pvq.runtime import gpu
from test_gpu_kernels import picked_specs

by_n = {}  # per group size (the kernels' structure), the setting with the longest codes
for s in picked_specs():
    if s.n not in by_n or s.code_bits > by_n[s.n].code_bits:
        by_n[s.n] = s
done = []
for i, spec in enumerate(sorted(by_n.values(), key=lambda s: s.n)):
    op = gpu.Operands(quantize(torch.randn(3, 2 * spec.n), spec))
    for name, launch in op.launches().items():
        every = i == 0  # the first setting with every launch, the others with the ones a model runs most
        if every or name in ("decode bfloat16", "gemv 8 tokens", "matmul bfloat16"):
            for cap in ((90, 80) if every and name in ("gemv 8 tokens", "matmul bfloat16") else (90,)):
                kernel = launch.compile(cap)
                done.append([spec.name, name, cap, len(kernel.asm["cubin"])])
print(json.dumps(done))
"""


def _ptxas() -> bool:
    """Triton's wheels carry NVIDIA's assembler (Linux x86-64 and aarch64); elsewhere TRITON_PTXAS_PATH names one."""
    bundled = Path(TRITON.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.is_file() or bool(os.environ.get("TRITON_PTXAS_PATH"))


@pytest.mark.skipif(TRITON is None, reason="needs triton")
@pytest.mark.skipif(TRITON is not None and not _ptxas(), reason="no ptxas: Triton cannot build for NVIDIA GPUs here")
def test_every_kernel_compiles_for_h100_and_a100():
    tests = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="0")  # kept by test_gpu_kernels' setdefault when imported there
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent / "src"), str(tests), env.get("PYTHONPATH", "")])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, said aloud to silence its warning
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads(r.stdout.strip().splitlines()[-1])
    assert {n.split("-")[1][:3] for n, *_ in done} >= {"n4k", "n6k", "n8k", "n12", "n16"}
    assert {(launch, cap) for _, launch, cap, _ in done} >= {("matmul bfloat16", 80), ("matmul bfloat16", 90),
                                                             ("gemv 1 tokens", 90), ("shapes", 90)}
    assert all(size > 1000 for *_, size in done)  # machine code came out
