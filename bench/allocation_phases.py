"""Where `pvq quantize --method pvq-gptq --bits B --allocate` spends its time before the first block, phase
by phase, on SmolLM2-135M with the settings the command uses (--scale row, as the tuned rows of
bench/finetune.py): Fisher sensitivities, pvq-gptq's error factors, the plan (each candidate setting's proxy
SQNR, the knapsack) and the rehearsal of the plan (a reported prediction only: the plan is chosen before it).

Writes bench/results/allocation_phases.json. Run alone:  python bench/allocation_phases.py  (about 6 minutes)
The error factors on the first 32 calibration windows:  python bench/allocation_phases.py --factor-samples 32 \
    --out bench/results/allocation_phases-32.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import write_json  # noqa: E402
from scale import commit  # noqa: E402

PHASES = {"fisher_sensitivities": "fisher", "gptq_error_factors": "gptq_error_factors", "plan": "plan",
          "rehearse_plan": "rehearse"}  # allocate()'s steps -> the names the results file has used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, default=3.25)
    ap.add_argument("--factor-samples", type=int, default=None,
                    help="calibration windows for the error factors (pvq quantize --allocate-factor-samples; default all)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/allocation_phases.json"))
    args = ap.parse_args()
    import pvq.allocation as alloc
    from pvq.data import resolve_text
    from pvq.models.loading import load_model
    from pvq.settings import QuantConfig

    seconds = {}

    def timed(name, fn):
        def run(*a, **k):
            t = time.time()
            out = fn(*a, **k)
            seconds[name] = time.time() - t
            print(f"{name}: {seconds[name]:.1f} s", flush=True)
            return out
        return run

    model, tok = timed("load", load_model)(None)
    cfg, s = QuantConfig(method="pvq-gptq", bits=args.bits, scale="row"), alloc.AllocationSettings(factor_samples=args.factor_samples)
    # the phases of the command's own allocate(), each timed where it calls it (no copy of its sequence here)
    for phase, name in PHASES.items():
        setattr(alloc, phase, timed(name, getattr(alloc, phase)))
    _, report = alloc.allocate(model, tok, cfg, resolve_text(cfg.calib, "calib"), s, progress=False)
    write_json(Path(args.out), {"model": "SmolLM2-135M-Instruct", "bits": args.bits, "scale": "row",
                                "fisher_draws": s.fisher_draws, "rehearsal_draws": s.draws,
                                "calibration_windows": cfg.nsamples, "factor_windows": report["factor_windows"],
                                "seconds": seconds,
                                "total_seconds": sum(seconds.values()), "commit": commit()})


if __name__ == "__main__":
    main()
