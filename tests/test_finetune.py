"""--finetune blocks (finetune.py): a quantized block's stored scales, biases and norms tuned against the
unquantized block, the file the same size, the same bytes twice, the tuned values what is stored."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pvq import api
from pvq.cli import main as cli
from pvq.finetune import Teacher, _log_rest, block_targets, tune_block
from pvq.loader import load
from pvq.models.adapters import blocks, capture_block_inputs
from pvq.models.loading import tiny_model, tiny_tokenizer
from pvq.settings import QuantConfig


SRC = Path(__file__).resolve().parents[1] / "src"


def _text(seed: int, words: int) -> str:
    """Words drawn at random from a small vocabulary: calibration and held-out text of one distribution."""
    vocab = "the of and a to in is was for on that with as by it from at his an were are which be this".split()
    g = torch.Generator().manual_seed(seed)
    return " ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (words,), generator=g))


ARGS = ["--method", "pvq-gptq", "--bits", "3", "--nsamples", "4", "--seqlen", "32", "--calib-dtype", "float32",
        "--finetune-tokens", "128", "--no-progress"]


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


def test_the_coarsened_kl_is_exact_when_one_token_is_left_out_and_zero_for_the_reference_itself():
    g = torch.Generator().manual_seed(0)
    ref, other = torch.randn(3, 5, 12, generator=g), torch.randn(3, 5, 12, generator=g)
    lp, lq = ref.log_softmax(-1), other.log_softmax(-1)
    full = (lp.exp() * (lp - lq)).sum(-1).mean()
    top = lp.topk(11, dim=-1)
    t = Teacher(top.indices, top.values, _log_rest(top.values))
    assert float(t.kl(other, slice(0, 3))) == pytest.approx(float(full), rel=1e-5)
    assert abs(float(t.kl(ref, slice(0, 3)))) < 1e-6
    few = lp.topk(3, dim=-1)  # fewer tokens kept: a lower bound of the full divergence
    t3 = Teacher(few.indices, few.values, _log_rest(few.values))
    assert 0 <= float(t3.kl(other, slice(0, 3))) <= float(full) + 1e-6


def test_the_coarsened_kl_gradient_is_autograds_through_log_softmax_even_for_tiny_rests():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(2, 6, 300, generator=g, dtype=torch.float64) * 3
    ref[0, 0, :8] += 40  # a position whose reference keeps almost all its mass in the kept tokens
    top = ref.log_softmax(-1).float().topk(16, dim=-1)
    t = Teacher(top.indices, top.values, _log_rest(top.values))

    def by_autograd(z):  # the loss written plainly: log_softmax, the kept tokens, logsumexp of the others
        lq = z.log_softmax(-1)
        lq_rest = torch.logsumexp(lq.scatter(-1, t.index, float("-inf")), dim=-1)
        return ((t.logp.exp() * (t.logp - lq.gather(-1, t.index))).sum(-1) + t.rest.exp() * (t.rest - lq_rest)).mean()

    for scale in (1.0, 3.0):
        z = (torch.randn(2, 6, 300, generator=g) * scale).requires_grad_(True)
        z0 = z.detach().double().requires_grad_(True)
        fused = t.kl(z, slice(0, 2))
        fused.backward()
        plain = by_autograd(z0)
        plain.backward()
        assert float(fused.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
        assert torch.allclose(z.grad.double(), z0.grad, atol=1e-8, rtol=1e-4)
    bf = torch.randn(2, 6, 300, generator=g).bfloat16().requires_grad_(True)  # autocast's logits
    t.kl(bf, slice(0, 2)).backward()
    assert bf.grad.dtype == torch.bfloat16 and torch.isfinite(bf.grad.float()).all()


def _kl_to(ref, d: Path, ids) -> float:
    with torch.no_grad():
        lp = ref(ids).logits.log_softmax(-1)
        lq = load(str(d))[0](ids).logits.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_model_tuning_is_deterministic_keeps_the_size_and_lowers_the_divergence(model_dir, tmp_path):
    plain = _quantize(model_dir, tmp_path / "plain")
    tune = ["--finetune-model-steps", "12", "--lr", "6e-3"]  # cosine: half the mean rate
    a = _quantize(model_dir, tmp_path / "a", "--finetune", "model", *tune)
    b = _quantize(model_dir, tmp_path / "b", "--finetune", "model", *tune)
    both = _quantize(model_dir, tmp_path / "both", "--finetune", "both", "--finetune-steps", "10", *tune)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    qa = json.loads((a / "config.json").read_text())["quantization_config"]
    assert qa["config"]["finetune"] == "model" and qa["config"]["finetune_model_steps"] == 12
    assert "finetune_steps" not in qa["config"]  # unused by model tuning: a resume may change it
    for d in (a, both):
        assert (d / "model.safetensors").stat().st_size == (plain / "model.safetensors").stat().st_size
    ref = tiny_model("qwen2")
    ids = tiny_tokenizer()(_text(1, 400), return_tensors="pt").input_ids[:, :128]  # held out
    kl = {k: _kl_to(ref, d, ids) for k, d in (("plain", plain), ("model", a), ("both", both))}
    assert kl["model"] < kl["plain"] and kl["both"] < kl["plain"], kl


def test_model_tuning_on_more_tokens_than_the_calibration_draws_windows_after_it_and_judges_by_held_out_ones(
        model_dir, tmp_path, capsys):
    from pvq.data import calibration_batches

    tok, text = tiny_tokenizer(), (model_dir / "calib.txt").read_text()
    assert torch.equal(calibration_batches(tok, text, 12, 32, 0)[:4], calibration_batches(tok, text, 4, 32, 0))
    tune = ["--finetune", "model", "--finetune-model-steps", "8", "--lr", "3e-3", "--json"]
    a = _quantize(model_dir, tmp_path / "a", *tune, "--finetune-tokens", "384")  # 12 windows of 32
    t = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["finetune_model"]
    assert (t["samples"], t["held_out"]) == (11, 1), t
    b = _quantize(model_dir, tmp_path / "b", *tune, "--finetune-tokens", "384")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    c = _quantize(model_dir, tmp_path / "c", *tune)  # the 4 calibration windows only: other values
    t = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["finetune_model"]
    assert (t["samples"], t["held_out"]) == (3, 1), t
    assert (c / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_held_out_samples_are_an_eighth_at_most_32_and_none_of_one():
    from pvq.finetune import held_out

    assert [held_out(n) for n in (1, 2, 7, 8, 128, 256, 432)] == [0, 1, 1, 1, 16, 32, 32]


_DIE = """import os, sys
import {module} as m
setattr({target}, {attr!r}, lambda *a, **k: os._exit(3))
from pvq.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _killed(root, out, module, target, attr, extra):
    """Run `pvq quantize` in a process that dies (os._exit, as kill -9 would leave it) where `attr` is called."""
    script = _DIE.format(module=module, target=target, attr=attr)
    cmd = [sys.executable, "-c", script, "quantize", str(root / "hf"), *ARGS, "--calib", str(root / "calib.txt"),
           "-o", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def test_a_run_killed_while_or_after_tuning_the_model_resumes_to_the_same_bytes(model_dir, tmp_path):
    tune = ["--finetune", "model", "--finetune-model-steps", "6", "--lr", "3e-3", "--finetune-tokens", "512"]
    want = _quantize(model_dir, tmp_path / "want", *tune)
    out = tmp_path / "out"
    r = _killed(model_dir, out, "pvq.api", "m", "tune_model", tune)  # every block written, the model not tuned
    assert r.returncode == 3 and not out.exists()
    manifest = json.loads(next(tmp_path.glob("out.tmp-*/manifest.json")).read_text())
    assert len(manifest["blocks"]) == 2 and "tuned" not in manifest
    r = _killed(model_dir, out, "pvq.checkpoint", "m.Writer", "finish", tune)  # tuned and recorded, not assembled
    assert r.returncode == 3 and "resuming" in r.stderr and not out.exists()
    manifest = json.loads(next(tmp_path.glob("out.tmp-*/manifest.json")).read_text())
    assert manifest["tuned"]["summary"]["kept"]
    assert cli(["quantize", str(model_dir / "hf"), *ARGS, "--calib", str(model_dir / "calib.txt"), "-o", str(out),
                *tune]) == 0
    assert (out / "model.safetensors").read_bytes() == (want / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "want"]


def test_a_whole_loaded_run_of_both_tunings_killed_while_tuning_the_model_resumes_to_the_streamed_bytes(
        model_dir, tmp_path):
    tune = ["--finetune", "both", "--finetune-steps", "5", "--finetune-model-steps", "6", "--lr", "3e-3"]
    want = _quantize(model_dir, tmp_path / "want", *tune)  # streamed, one block in memory at a time
    out = tmp_path / "out"
    r = _killed(model_dir, out, "pvq.api", "m", "tune_model", [*tune, "--no-stream"])
    assert r.returncode == 3 and not out.exists()
    assert cli(["quantize", str(model_dir / "hf"), *ARGS, "--calib", str(model_dir / "calib.txt"), "-o", str(out),
                *tune, "--no-stream"]) == 0
    assert (out / "model.safetensors").read_bytes() == (want / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((want / "config.json").read_text())


def test_tuning_in_bfloat16_like_its_calibration_is_deterministic_and_still_lowers_the_divergence(
        model_dir, tmp_path, capsys):
    tune = ["--finetune", "both", "--finetune-steps", "5", "--finetune-model-steps", "8", "--lr", "3e-3",
            "--calib-dtype", "bfloat16", "--finetune-tokens", "512", "--json"]
    outs, summaries = [], []
    for name in ("a", "b"):
        outs.append(_quantize(model_dir, tmp_path / name, *tune))
        summaries.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    t = summaries[0]["finetune_model"]
    assert t["kept"] and t["kl_after"] < t["kl_before"], t
    assert all(b["loss_after"] <= b["loss_before"] for b in summaries[0]["finetune"])
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
    qc = json.loads((outs[0] / "config.json").read_text())["quantization_config"]
    assert qc["config"]["calib_dtype"] == "bfloat16"


def test_a_norm_weight_two_modules_share_is_tuned_once():
    from pvq.finetune import _TunedNorms

    block = torch.nn.Module()
    block.a, block.b = torch.nn.LayerNorm(4, bias=False), torch.nn.LayerNorm(4, bias=False)
    block.b.weight = block.a.weight
    with torch.no_grad():
        block.a.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    norms = _TunedNorms(block, {}, torch.float32)
    assert len(norms.items) == 2 and len(norms.deltas()) == 1
    with torch.no_grad():
        norms.deltas()[0].fill_(0.5)
    norms.set()
    assert torch.equal(block.a.weight, block.b.weight)
    norms.restore(True)
    assert block.a.weight is block.b.weight and isinstance(block.a.weight, torch.nn.Parameter)
    assert torch.equal(block.a.weight.detach(), torch.tensor([1.5, 3.0, 4.5, 6.0]))


def test_the_schedule_is_recorded_changes_the_tuned_bytes_and_a_file_from_before_schedules_reads_as_constant(
        model_dir, tmp_path):
    from pvq.finetune import _rate

    cos = _rate("cosine", 10)
    assert cos(0) == 1.0 and 0 < cos(9) < 0.03 and all(cos(t) > cos(t + 1) for t in range(9))
    assert _rate("constant", 10)(9) == 1.0
    # at 2 bits: at 3 the tiny model's KL is so small (2e-5) that on some CPUs no step lowers it, and both keep the
    # untuned values
    tune = ["--finetune", "model", "--finetune-model-steps", "8", "--lr", "3e-3", "--bits", "2"]
    a = _quantize(model_dir, tmp_path / "a", *tune)
    c = _quantize(model_dir, tmp_path / "c", *tune, "--finetune-schedule", "constant")
    config = {d: json.loads((d / "config.json").read_text())["quantization_config"]["config"] for d in (a, c)}
    assert config[a]["finetune_schedule"] == "cosine" and config[c]["finetune_schedule"] == "constant"
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    before = {k: v for k, v in config[c].items() if k != "finetune_schedule"}
    assert QuantConfig.from_dict(before).finetune_schedule == "constant"
    assert "finetune_schedule" not in QuantConfig(method="pvq-gptq", bits=3).to_dict()  # untuned: as ever
    assert cli(["quantize", str(model_dir / "hf"), *ARGS, "--finetune-schedule", "linear", "-o", str(tmp_path / "x")]) != 0
