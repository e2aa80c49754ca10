"""Activation quantization: the per-token quantizers (codec/activation.py) and their plumbing (actquant.py)."""
import json
import math

import pytest
import torch

from pvq import api, checkpoint, loader
from pvq.modules import actquant
from pvq.cli import main as cli
from pvq.codec import PVQSpec, count
from pvq.codec import activation as am
from pvq.settings import ActConfig, QuantConfig
from pvq.models.loading import tiny_model, tiny_tokenizer
from pvq.picker import act_shapes, act_spec
from pvq.transforms.hadamard import RandomHadamard


def _sqnr(x, xh):
    return 10 * math.log10(float(x.pow(2).sum() / (x - xh).pow(2).sum()))


def test_rtn_codes_lie_on_a_per_token_grid():
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 64)[:, None]
    for bits in (4, 6, 8):
        xh = am.rtn(x, bits)
        top = 2 ** (bits - 1) - 1
        s = (x.abs().amax(1, keepdim=True) / top).half().float()
        q = xh / s
        assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= top + 1
        assert ((x - xh).abs() <= s / 2 * (1 + 1e-3) + 1e-6).all()  # round to nearest, no clipping
    # per token: one token's scale does not change another's codes
    y = x.clone()
    y[0] *= 1000
    assert torch.equal(am.rtn(y, 4)[1:], am.rtn(x, 4)[1:])
    assert am.rtn_bits(4, 576) == 4 + 16 / 576
    assert _sqnr(x, am.rtn(x, 8)) > _sqnr(x, am.rtn(x, 6)) + 10 > _sqnr(x, am.rtn(x, 4)) + 20


def test_pvq_activations_are_gain_times_pyramid_shape():
    spec = act_spec(4, 576)
    assert spec.code_bits == 4 * spec.n and math.log2(count(spec.n, spec.k) * spec.gain_levels) <= spec.code_bits
    assert am.pvq_bits(spec, 576) == pytest.approx(4 + 16 / 576)
    x = torch.randn(32, 576, generator=torch.Generator().manual_seed(1))
    xh = am.pvq(x, spec).reshape(32, -1, spec.n)
    # each group is a non-negative multiple of an integer point of P(n, k)
    g = xh.norm(dim=-1, keepdim=True)
    u = xh / g.clamp_min(1e-30)
    y = u * (spec.k / u.abs().sum(-1, keepdim=True))
    assert torch.allclose(y, y.round(), atol=1e-3)
    # same stored bits per activation: PVQ beats per-token rtn on Gaussian (rotated) tokens
    assert _sqnr(x, am.pvq(x, spec)) > _sqnr(x, am.rtn(x, 4)) + 3


def test_native_search_matches_torch():
    from pvq.runtime import native

    if native.kernel() is None:
        pytest.skip(f"no native kernel: {native.kernel_error()}")
    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(2))
    x[0] = 0  # an all-zero group
    for k in (3, 12, 25):
        u1, g1 = am.pvq_shapes(x, k)
        u2, g2 = act_shapes(x, k)
        same = ((u1 - u2).abs().amax(1) < 1e-6).float().mean()
        assert same > 0.999 and torch.allclose(g1, g2, atol=1e-4, rtol=1e-4)
        assert g2[0] == 0


def test_rotation_spreads_an_outlier_channel():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    x[:, 5] = 30 * x[:, 5].sign()
    cfg = ActConfig(4)
    raw = actquant.ActQuantizer(cfg, 64)
    rot = actquant.ActQuantizer(cfg, 64, RandomHadamard(64, 7))
    # without the rotation the outlier's scale rounds most other channels of the token to zero
    rest = torch.ones(64, dtype=torch.bool)
    rest[5] = False
    assert (raw(x)[:, rest] == 0).float().mean() > 0.6
    assert _sqnr(x[:, rest], rot(x)[:, rest]) > _sqnr(x[:, rest], raw(x)[:, rest]) + 3


def test_settings_are_checked():
    with pytest.raises(ValueError, match="abits"):
        ActConfig(1)
    with pytest.raises(ValueError, match="activation quantizer"):
        ActConfig(4, "nf4")
    with pytest.raises(ValueError, match="abits"):
        QuantConfig(abits=3.5)
    with pytest.raises(ValueError, match="no PVQ setting"):
        act_spec(4, 7)


def _ids():
    return torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["rtn", "pvq"])
def test_quantized_activations_survive_save_and_load(tmp_path, method):
    model = tiny_model("llama", intermediate_size=96)
    ids = _ids()
    cfg = QuantConfig(method="pvq", bits=4.25, abits=4, act_method=method)
    summary = api.quantize(model, cfg, progress=False)
    assert summary["bits_per_activation"] == pytest.approx(4 + 16 * 7 / (6 * 64 + 96))
    with torch.no_grad():
        mem = model(ids).logits
        actquant.attach(model, None)
        wonly = model(ids).logits
    assert not torch.allclose(mem, wonly)
    out = checkpoint.save(model, tiny_tokenizer(), tmp_path / "q")
    loaded, _ = loader.load(out, decode="once")
    assert actquant.bits_per_activation(loaded) == pytest.approx(summary["bits_per_activation"])
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, mem)
        assert torch.allclose(hf(ids).logits, mem, atol=1e-5)
        # quantizing before the rotation is another computation
        actquant.attach(loaded, ActConfig(4, method, rotate=False))
        assert not torch.allclose(loaded(ids).logits, mem)


def test_dense_models_quantize_their_inputs_through_hooks():
    model = tiny_model("qwen2", intermediate_size=96)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        actquant.attach(model, ActConfig(16))
        a16 = model(ids).logits
        actquant.attach(model, ActConfig(4))
        a4 = model(ids).logits
        actquant.attach(model, None)
        back = model(ids).logits
    assert (a16 - ref).abs().max() < 1e-2 < (a4 - ref).abs().max()
    assert torch.equal(back, ref)
    assert actquant.bits_per_activation(model) is None


def test_cli_reports_bits_per_activation(tmp_path, capsys):
    model = tiny_model("llama", intermediate_size=96)
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    q = tmp_path / "q"
    assert cli(["quantize", str(tmp_path / "hf"), "--method", "rtn", "--bits", "4.25", "--abits", "8", "-o", str(q),
                "--no-progress"]) == 0
    capsys.readouterr()
    assert cli(["info", str(q), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["abits"] == 8 and info["act_rotate"] and info["bits_per_activation"] == pytest.approx(
        8 + 16 * 7 / (6 * 64 + 96))
    assert cli(["eval", str(q), "--windows", "1", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bits_per_activation"] == pytest.approx(info["bits_per_activation"]) and res["act_method"] == "rtn"
    assert cli(["eval", str(tmp_path / "hf"), "--windows", "1", "--abits", "6", "--act-method", "pvq", "--json",
                "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["act_method"] == "pvq" and 6 < res["bits_per_activation"] < 6.3 and math.isfinite(res["ppl"])
    assert cli(["eval", str(tmp_path / "hf"), "--abits", "1", "--json"]) == 2
    assert "abits" in capsys.readouterr().err
    assert cli(["eval", str(tmp_path / "hf"), "--act-method", "pvq", "--json"]) == 2
    assert "need --abits" in capsys.readouterr().err
