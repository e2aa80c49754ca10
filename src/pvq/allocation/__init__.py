"""Per-layer bit allocation to a total budget (HIGGS linearity + an exact knapsack), as one library call.

`allocate` does what `pvq quantize --allocate` does before quantizing: measure (or read back) each
layer's sensitivity on calibration windows, for pvq-gptq the error factors of each layer's Hessian,
plan one setting per layer (planner.py), and predict the plan's loss by a rehearsal (probes.py).
It returns the settings with the plan as overrides and the report; `report_files` completes the
report with the errors the quantizer left and renders it for the output directory.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..data import calibration_batches
from ..settings import QuantConfig
from .planner import RATES, options, plan
from .probes import fisher_sensitivities, gptq_error_factors, rehearse, rehearse_plan, sensitivities
from .report import add_measured, plot

__all__ = ["AllocationSettings", "allocate", "report_files", "RATES", "options", "plan", "gptq_error_factors",
           "rehearse", "rehearse_plan", "sensitivities", "fisher_sensitivities", "add_measured", "plot"]

PROBES = ("fisher", "noise")


@dataclass(frozen=True)
class AllocationSettings:
    """How the plan is measured: calibration windows for the sensitivities and how they are probed
    (`probe` "fisher": squared gradients under `fisher_draws` label draws, every layer at once; "noise":
    one noise pair of relative energy `noise` per layer, a forward pass each), the ladder of rates whose
    settings are each layer's options, a floor below the target and the rehearsal draws.
    `factor_samples`: how many of the quantization's calibration windows (the first ones) measure pvq-gptq's
    error factors; None: all of them. The factors' forwards and Hessians grow with the windows; fewer windows
    estimate each Hessian less well (timings and their effect: docs/results.md).
    `sensitivities`: a JSON file read if it exists, else written with what is measured (they do not
    depend on the budget: measure once, allocate many)."""

    samples: int = 8
    seqlen: int = 256
    rates: tuple = RATES
    floor: float | None = 1.0
    draws: int = 3
    noise: float = 0.01
    probe: str = "fisher"
    fisher_draws: int = 2
    sensitivities: str | Path | None = None
    factor_samples: int | None = None

    def __post_init__(self):
        if self.samples < 1 or self.seqlen < 2:
            raise ValueError(f"--allocate-samples must be >= 1 and --allocate-seqlen >= 2, got {self.samples}, "
                             f"{self.seqlen}")
        if self.floor is not None and self.floor < 0:
            raise ValueError(f"--allocate-floor must be >= 0, got {self.floor}")
        if self.draws < 0:
            raise ValueError(f"--allocate-draws must be >= 0, got {self.draws}")
        if self.probe not in PROBES:
            raise ValueError(f"--allocate-probe must be one of {', '.join(PROBES)}, got {self.probe!r}")
        if self.fisher_draws < 1:
            raise ValueError(f"fisher_draws must be >= 1, got {self.fisher_draws}")
        if self.factor_samples is not None and self.factor_samples < 1:
            raise ValueError(f"--allocate-factor-samples must be >= 1, got {self.factor_samples}")
        if not self.rates:
            raise ValueError("--allocate-rates needs at least one rate")


def _read_sensitivities(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--sensitivities {path}: not a readable JSON file ({exc})") from None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def allocate(model, tokenizer, cfg: QuantConfig, text: str, settings: AllocationSettings = AllocationSettings(),
             progress: bool = True) -> tuple[QuantConfig, dict]:
    """(cfg with one setting per layer as overrides, the plan's report) for cfg.bits over the unquantized
    `model`, measured on calibration `text`. The windows for the sensitivities and the rehearsal are
    drawn with seed cfg.seed + 1, those for pvq-gptq's error factors as quantization draws them."""
    if not cfg.is_pvq:
        raise ValueError("--allocate chooses PVQ settings: use --method pvq or pvq-gptq")
    sens_file = Path(settings.sensitivities) if settings.sensitivities else None
    sens = _read_sensitivities(sens_file)
    ids = (calibration_batches(tokenizer, text, settings.samples, settings.seqlen, cfg.seed + 1)
           if sens is None or settings.draws else None)
    if sens is None:
        sens = (fisher_sensitivities(model, ids, settings.fisher_draws, cfg.seed, progress=progress)
                if settings.probe == "fisher" else sensitivities(model, ids, settings.noise, cfg.seed, progress=progress))
        if sens_file is not None:
            _write_atomically(sens_file, json.dumps(sens, indent=1))
    calib = factors = None
    if cfg.uses_data:  # pvq-gptq: its error feedback shrinks each layer's error by a factor of its Hessian
        calib = calibration_batches(tokenizer, text, cfg.nsamples, cfg.seqlen, cfg.seed)[:settings.factor_samples]
        factors = gptq_error_factors(model, cfg, calib, progress=progress)
    overrides, report = plan(model, cfg, None, rates=settings.rates, sens=sens, factors=factors,
                             floor=settings.floor, progress=progress)
    if calib is not None:
        report["factor_windows"] = calib.shape[0]
    if settings.draws:
        rehearse_plan(model, ids, report, settings.draws, cfg.seed, progress=progress)
    return replace(cfg, overrides=overrides), report


def report_files(report: dict, layer_errors: dict[str, float]) -> dict[str, bytes]:
    """allocation.json (the report with each layer's measured error) and allocation.png (where matplotlib,
    the bench extra, is installed), as files for the output directory."""
    add_measured(report, layer_errors)
    files = {"allocation.json": json.dumps(report, indent=1).encode()}
    try:
        buf = io.BytesIO()
        plot(report, buf)
        files["allocation.png"] = buf.getvalue()
    except ImportError:
        pass
    return files
