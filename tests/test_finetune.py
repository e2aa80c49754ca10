"""--finetune blocks (finetune.py): a quantized block's stored scales, biases and norms tuned against the
unquantized block, the file the same size, the same bytes twice, the tuned values what is stored."""
import json

import pytest
import torch

from pvq import api
from pvq.cli import main as cli
from pvq.finetune import block_targets, tune_block
from pvq.loader import load
from pvq.models.adapters import blocks, capture_block_inputs
from pvq.models.loading import tiny_model, tiny_tokenizer
from pvq.settings import QuantConfig


def _text(seed: int, words: int) -> str:
    """Words drawn at random from a small vocabulary: calibration and held-out text of one distribution."""
    vocab = "the of and a to in is was for on that with as by it from at his an were are which be this".split()
    g = torch.Generator().manual_seed(seed)
    return " ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (words,), generator=g))


ARGS = ["--method", "pvq-gptq", "--bits", "3", "--nsamples", "4", "--seqlen", "32", "--calib-dtype", "float32",
        "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    tiny_model("qwen2").save_pretrained(root / "hf")  # biases on q, k, v: tuned too
    tiny_tokenizer().save_pretrained(root / "hf")
    (root / "calib.txt").write_text(_text(0, 3000))
    return root


def _quantize(root, out, *extra):
    assert cli(["quantize", str(root / "hf"), *ARGS, "--calib", str(root / "calib.txt"), "-o", str(out), *extra]) == 0
    return out


def test_tuning_lowers_the_block_error_and_changes_only_stored_continuous_values():
    model = tiny_model("qwen2")
    ids = torch.randint(0, model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(method="pvq-gptq", bits=3, nsamples=6, seqlen=32, calib_dtype="float32", scale="row")
    hidden, kwargs = capture_block_inputs(model, ids)
    block = blocks(model)[0]
    target = block_targets(block, hidden, kwargs[0])
    made, _, _ = api.quantize_linears(block, "model.layers.0.", cfg, {}, None, [])
    codes = {n: q.codes.clone() for n, q in made.items()}
    scales = {n: q.scales.clone() for n, q in made.items()}
    norm = block.input_layernorm.weight.detach().clone()
    stats = tune_block(block, made, hidden, target, kwargs[0], steps=40, lr=3e-3, seed=1, progress=False)
    assert stats["kept"] and stats["loss_after"] < 0.95 * stats["loss_before"], stats
    assert all(torch.equal(q.codes, codes[n]) for n, q in made.items())  # the codes never change
    assert any(not torch.equal(q.scales, scales[n]) for n, q in made.items())
    assert all(q.scales.dtype == torch.float16 for q in made.values())
    assert not torch.equal(block.input_layernorm.weight, norm)
    assert isinstance(block.input_layernorm.weight, torch.nn.Parameter)
    # the block as it will be stored reproduces the loss tune_block reported
    api.install(block, made)
    with torch.no_grad():
        out = block(hidden, **kwargs[0])
    out = out[0] if isinstance(out, tuple) else out
    rel = float((out - target).pow(2).mean() / target.pow(2).mean())
    assert rel == pytest.approx(stats["loss_after"], rel=1e-3)


def test_tuned_files_are_the_same_size_deterministic_and_closer_to_the_float_model(model_dir, tmp_path):
    plain = _quantize(model_dir, tmp_path / "plain")
    a = _quantize(model_dir, tmp_path / "a", "--finetune", "blocks", "--finetune-steps", "30", "--lr", "3e-3")
    b = _quantize(model_dir, tmp_path / "b", "--finetune", "blocks", "--finetune-steps", "30", "--lr", "3e-3")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    qa = json.loads((a / "config.json").read_text())["quantization_config"]
    qp = json.loads((plain / "config.json").read_text())["quantization_config"]
    assert qa["config"]["finetune"] == "blocks" and qa["config"]["finetune_steps"] == 30
    assert "finetune" not in qp["config"]
    assert qa["achieved"]["linear_bits"] == qp["achieved"]["linear_bits"]  # the same stored bits: tuned values in their own fields
    assert (a / "model.safetensors").stat().st_size == (plain / "model.safetensors").stat().st_size
    ref = tiny_model("qwen2")
    ids = tiny_tokenizer()(_text(1, 400), return_tensors="pt").input_ids[:, :128]  # held out
    with torch.no_grad():
        want = ref(ids).logits
        err = {k: float((load(str(d))[0](ids).logits - want).pow(2).mean()) for k, d in (("plain", plain), ("tuned", a))}
    assert err["tuned"] < err["plain"], err


def test_finetune_needs_a_calibrated_method_and_one_process(model_dir, tmp_path, capsys):
    assert cli(["quantize", str(model_dir / "hf"), "--method", "pvq", "--bits", "3", "--finetune", "blocks",
                "-o", str(tmp_path / "x"), "--no-progress"]) != 0
    assert "--finetune blocks tunes against calibration data" in capsys.readouterr().err
    pytest.importorskip("ray")
    assert cli(["quantize", str(model_dir / "hf"), *ARGS, "--finetune", "blocks", "--workers", "2",
                "-o", str(tmp_path / "y")]) != 0
    assert "runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
