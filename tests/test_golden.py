"""The same inputs give the same bytes, release after release: sha256 of quantized files of a tiny model.

A change that means to keep behaviour (a reshaping of the package, a faster solver) must keep these
hashes. The tiny model's weights are drawn here from our own generator, not from transformers'
initialisers, so the data-free methods (rtn, pvq) depend only on pvq's own code. The methods that
calibrate also run the model's forward pass, whose float summation order belongs to transformers
and torch: their hashes are checked under the versions they were recorded with and skipped, with
the reason, under others. A hash that changes on purpose (a format change, a bug fix that changes
codes) is recorded again with `PVQ_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py` and said
in the commit.
"""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import transformers

from pvq.cli import main as cli
from pvq.models.loading import tiny_model, tiny_tokenizer

GOLDEN = Path(__file__).with_name("golden.json")
# settings of one run each: the CLI's quantize options after the model and before -o
RUNS = {
    "rtn-3.25": ["--method", "rtn", "--bits", "3.25"],
    "pvq-3.25": ["--method", "pvq", "--bits", "3.25"],
    "pvq-2.25-row-empirical": ["--method", "pvq", "--bits", "2.25", "--scale", "row", "--gain", "empirical"],
    "pvq-fast-4.25": ["--method", "pvq", "--bits", "4.25", "--layout", "fast"],
    "pvq-3.25-a6pvq": ["--method", "pvq", "--bits", "3.25", "--abits", "6", "--act-method", "pvq"],
    # float32 calibration named: "auto" would take bfloat16 on CPUs that have it, whose products differ by kernel
    "gptq-3.25": ["--method", "gptq", "--bits", "3.25", "--nsamples", "4", "--seqlen", "32", "--calib-dtype", "float32"],
    "pvq-gptq-3.25": ["--method", "pvq-gptq", "--bits", "3.25", "--nsamples", "4", "--seqlen", "32",
                      "--calib-dtype", "float32"],
    "pvq-gptq-2.5-allocate": ["--method", "pvq-gptq", "--bits", "2.5", "--nsamples", "4", "--seqlen", "32",
                              "--calib-dtype", "float32",
                              "--allocate", "--allocate-samples", "2", "--allocate-seqlen", "32",
                              "--allocate-draws", "1", "--allocate-rates", "2,2.5,3.25", "--allocate-probe", "noise"],
}
DATA_FREE = {"rtn-3.25", "pvq-3.25", "pvq-2.25-row-empirical", "pvq-fast-4.25", "pvq-3.25-a6pvq"}
HASHED = ("model.safetensors", "config.json", "allocation.json")
# An allocation's report (config.json, allocation.json) holds float32 loss differences of 1e-4 on a loss
# of 5.6, whose last bits follow the CPU's kernels (Intel and AMD machines differ); the plan they give,
# and so the quantized tensors, is what must not change.
CPU_ROUNDED = {"pvq-gptq-2.5-allocate": ("config.json", "allocation.json", "config.json without transformers_version")}


def _versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny llama (intermediate 96: sizes that are not powers of two) with weights from a fixed generator,
    saved as a Hugging Face folder, and a calibration text file."""
    root = tmp_path_factory.mktemp("golden")
    model = tiny_model("llama", intermediate_size=96)
    g = torch.Generator().manual_seed(20261202)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    words = ["river", "stone", "bridge", "market", "tower", "clock", "field", "rice", "snow", "boat"]
    gen = torch.Generator().manual_seed(7)
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (3000,), generator=gen))
    (root / "calib.txt").write_text(text)
    return root


# config.json records the transformers version that wrote it (and its own checksum covers that, as its
# checksum of the source's generation_config.json does): under another transformers, the data-free runs
# compare everything else of it
VERSIONLESS = "config.json without transformers_version"


def _digest(out: Path) -> dict:
    got = {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in HASHED if (out / f).is_file()}
    if (out / "config.json").is_file():
        config = json.loads((out / "config.json").read_text())
        config.pop("transformers_version", None)
        config["quantization_config"]["checksums"].pop("config", None)
        # the source's generation defaults, carried along, record the transformers version that wrote them
        config["quantization_config"]["checksums"]["files"].pop("generation_config.json", None)
        got[VERSIONLESS] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return got


@pytest.mark.parametrize("run", list(RUNS))
def test_quantized_bytes_match_the_recorded_hashes(source, monkeypatch, run):
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"versions": _versions(), "runs": {}}
    # relative paths: config.json records the source and calibration paths as given
    monkeypatch.chdir(source)
    out = source / run
    assert cli(["quantize", "hf", *RUNS[run], "--calib", "calib.txt", "--no-progress", "-o", run]) == 0
    got = _digest(out)
    assert "model.safetensors" in got and "config.json" in got
    if os.environ.get("PVQ_RECORD_GOLDEN"):
        golden["versions"] = _versions()
        golden["runs"][run] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    want = golden["runs"].get(run)
    assert want is not None, f"no recorded hashes for {run}: record them with PVQ_RECORD_GOLDEN=1"
    if golden["versions"] != _versions():
        if run not in DATA_FREE:
            pytest.skip(f"{run} calibrates through transformers' forward pass; hashes recorded under "
                        f"{golden['versions']}, this is {_versions()}")
        got.pop("config.json")
        want = {f: h for f, h in want.items() if f != "config.json"}
    if not os.environ.get("PVQ_GOLDEN_STRICT"):
        got = {f: h for f, h in got.items() if f not in CPU_ROUNDED.get(run, ())}
        want = {f: h for f, h in want.items() if f not in CPU_ROUNDED.get(run, ())}
    assert got == want, f"{run}: the quantized files changed (same inputs must give the same bytes)"
