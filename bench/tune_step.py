"""How long one step of `--finetune model` takes on SmolLM2-135M: forward and backward of 2 x 512 tokens
through every block (activation checkpointing, as the command runs) and the KL divergence to the
unquantized model's distributions, in the calibration's precision (bfloat16 autocast where the CPU has
it, as `--calib-dtype auto` picks).

The quantized model is a data-free `pvq quantize --method pvq --bits 3.25 --scale row` (the codes' values do
not change the step's work; --model DIR times another pvq directory); the tuning samples are calibration
windows of the WikiText-2 validation text and the teacher is the unquantized model on them. A step's time
is (time of 1 + S steps - time of 1 step) / S, so loading, the teacher and the totals that judge the
tuning are not counted.

Writes bench/results/tune_step.json. Run alone:  python bench/tune_step.py   (about 3 minutes)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from calib_dtype import cpu_name  # noqa: E402
from common import write_json  # noqa: E402
from scale import commit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a pvq directory (default: quantize SmolLM2 data-free into a temp dir)")
    ap.add_argument("--steps", type=int, default=8, help="steps timed after the first (default 8)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/tune_step.json"))
    args = ap.parse_args()
    import torch

    from pvq.api import calibration_precision
    from pvq.data import calibration_batches, resolve_text
    from pvq.finetune import BATCH, Teacher, reference_stream, tune_model
    from pvq.loader import load
    from pvq.models.adapters import blocks, capture_block_inputs
    from pvq.models.loading import load_model
    from pvq.settings import QuantConfig

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = str(Path(tmp) / "q")
            subprocess.run([sys.executable, "-m", "pvq.cli", "quantize", "--method", "pvq", "--bits", "3.25", "--scale",
                            "row", "-o", path, "--no-progress"], check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        ref, tok = load_model(None)
        cfg = QuantConfig(method="pvq-gptq", bits=3.25)  # only for its calibration settings and precision
        n = args.steps * BATCH + 2  # the steps draw from all but the last 2 (finetune.held_out), which judge
        ids = calibration_batches(tok, resolve_text(cfg.calib, "calib"), n, cfg.seqlen, cfg.seed)
        with torch.no_grad():
            hidden, kwargs = capture_block_inputs(ref, ids)
            for i, block in enumerate(blocks(ref)):
                hidden = reference_stream(block, hidden, kwargs, i)
            teacher = Teacher.of(ref, hidden, ids)
        del ref, hidden
        model, _ = load(path)
        seconds = {}
        for steps in (1, 1 + args.steps):
            t = time.time()
            tune_model(model, ids, teacher, steps=steps, lr=0.005, seed=0, progress=False,
                       precision=lambda: calibration_precision(cfg, ids))
            seconds[steps] = time.time() - t
    step = (seconds[1 + args.steps] - seconds[1]) / args.steps
    result = {"model": "SmolLM2-135M-Instruct" if args.model is None else args.model, "tokens_per_step": BATCH * cfg.seqlen,
              "calib_dtype": cfg.calib_dtype, "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "seconds_per_step": step, "timed_steps": args.steps, "commit": commit()}
    write_json(Path(args.out), result)
    print(f"{step:.2f} s a tuning step ({BATCH} x {cfg.seqlen} tokens, {cfg.calib_dtype}) -> {args.out}")


if __name__ == "__main__":
    main()
