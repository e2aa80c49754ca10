"""Kernel micro-benchmark: on-the-fly decode-and-multiply speed of one matrix, in G weights per second.

For the settings the picker uses at 2.25 and 3.25 bits, with the default compact layout and with
`--layout fast` (data-free `pvq` on a random Gaussian 1536x576 matrix, the shape of SmolLM2's MLP
projections), the best of 30 x 10 calls of the fused gemv (one token) with 1 and 2 threads, and the matching decode of all rows (prompt processing); and the head of SmolLM2
(49152 x 576, one token) as float32 (F.linear) against the float16 weights widened in the kernel
(runtime/dense.py). Writes bench/results/kernel.json. Run on a quiet machine: `python bench/kernel.py`.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import write_json  # noqa: E402

MEASURE = r"""
import json, sys, time, torch
from pvq import codec
from pvq.picker import choose_spec
from pvq.settings import QuantConfig
from pvq.runtime.decode import Decoder
threads = int(sys.argv[1])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
out = []
for bits, layout in ((2.25, "compact"), (3.25, "compact"), (2.25, "fast"), (3.25, "fast")):
    w = torch.randn(1536, 576, generator=g)
    spec = choose_spec(QuantConfig(method="pvq", bits=bits, layout=layout), 1536, 576)
    d = Decoder(codec.quantize(w, spec))
    x = torch.randn(1, 576, generator=g)
    def best(f, reps):
        b = 1e9
        for _ in range(30):
            t = time.perf_counter()
            for _ in range(reps):
                f()
            b = min(b, (time.perf_counter() - t) / reps)
        return b
    gemv, dec = best(lambda: d.matmul(x), 10), best(lambda: d.decode_rows(0, 1536), 2)
    out.append({"bits": bits, "layout": layout, "spec": spec.name, "threads": threads, "gemv_gweights_per_s": w.numel() / gemv / 1e9,
                "decode_gweights_per_s": w.numel() / dec / 1e9})
from pvq.modules.dense import StoredHead
head = torch.nn.Linear(576, 49152, bias=False)
x = torch.randn(1, 1, 576, generator=g)
with torch.inference_mode():
    fp32 = best(lambda: head(x), 10)
    del head._parameters["weight"]
    head.register_buffer("weight", torch.randn(49152, 576, generator=g).half())
    head.__class__ = StoredHead
    f16 = best(lambda: head(x), 10)
out.append({"head": "49152x576", "threads": threads, "float32_ms": fp32 * 1e3, "float16_stored_ms": f16 * 1e3})
print(json.dumps(out))
"""


def main() -> None:
    runs = []
    for threads in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                   PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = subprocess.run([sys.executable, "-c", MEASURE, str(threads)], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-2000:])
        runs += json.loads(p.stdout.strip().splitlines()[-1])
    for r in runs:
        if "head" in r:
            print(f"head {r['head']} {r['threads']} thread(s): float32 {r['float32_ms']:.2f} ms, "
                  f"float16 kept {r['float16_stored_ms']:.2f} ms")
        else:
            print(f"{r['spec']} ({r['layout']}) {r['threads']} thread(s): gemv {r['gemv_gweights_per_s']:.2f}, "
                  f"decode {r['decode_gweights_per_s']:.2f} G weights/s")
    write_json(ROOT / "bench" / "results" / "kernel.json",
               {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "protocol": "random Gaussian 1536x576, data-free pvq at the picker's 2.25 / 3.25 setting; SmolLM2's "
                            "head; best of 30",
                "runs": runs})


if __name__ == "__main__":
    main()
