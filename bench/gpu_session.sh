#!/bin/bash
# The GPU checks of issue #17 as one call of the device tool (run from the repository root there):
#   run(command="bash bench/gpu_session.sh", timeout_s=540, carry=[".whl", ".model"])
# - tests/test_device.py: `pvq quantize --device cuda` against the CPU on tiny models (the GPU tests skip here);
# - bench/gpu.py --model: the kernels layer by layer and the whole 8B-shaped model (bench/results/gpu.json);
# - `pvq quantize --device cuda` of SmolLM2-135M, timed, with its perplexity, where the model came along.
# SmolLM2's GGUF (98 MB) is over one call's 64 MiB: split it here into .model/smollm2.gguf.aa and .ab
# (`split -b 48M FILE .model/smollm2.gguf.`, .model in .git/info/exclude), carry .model/smollm2.gguf.aa in a
# first short call (`true`), then run this with .model/smollm2.gguf.ab within the warm period: a warm
# machine keeps what earlier calls carried. Reading GGUF needs the `gguf` wheel there (.whl, see the device
# tool's README for `pip download`).
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=src:/tmp/site
fi
nvidia-smi -L
python3 -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$OUT/tests.log"
timeout 300 python3 bench/gpu.py --model --layers 8 --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
if [ -f .model/smollm2.gguf.aa ] && [ -f .model/smollm2.gguf.ab ]; then
  cat .model/smollm2.gguf.aa .model/smollm2.gguf.ab > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
  ( time python3 -m pvq.cli quantize /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --method pvq-gptq --bits 3.25 \
      --device cuda -o /tmp/q --force --ppl --json --no-progress ) 2>&1 | tee "$OUT/quantize.log"
fi
