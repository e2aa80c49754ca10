"""Per-layer bit allocation: the exact knapsack, sensitivities, and --allocate end to end on a tiny model."""
import itertools
import json
import math
import random

import pytest
import torch

from pvq import allocation, api
from pvq.cli import main as cli
from pvq.picker import choose_spec
from pvq.settings import QuantConfig, spec_to_dict
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
from pvq.models.loading import tiny_model, tiny_tokenizer
from pvq.solvers.knapsack import multiple_choice_knapsack


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_matches_brute_force(seed):
    rnd = random.Random(seed)
    layers = rnd.randint(2, 5)
    bits = [sorted(rnd.sample(range(1, 40), 3)) for _ in range(layers)]
    costs = [sorted((rnd.random() for _ in range(3)), reverse=True) for _ in range(layers)]
    budget = rnd.randint(sum(b[0] for b in bits), sum(b[-1] for b in bits))
    pick = multiple_choice_knapsack(costs, bits, budget, resolution=budget)  # one unit per bit: exact
    best = min((sum(c[j] for c, j in zip(costs, js)), js) for js in itertools.product(range(3), repeat=layers)
               if sum(b[j] for b, j in zip(bits, js)) <= budget)
    assert sum(b[j] for b, j in zip(bits, pick)) <= budget
    assert sum(c[j] for c, j in zip(costs, pick)) == pytest.approx(best[0])


def test_knapsack_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="budget"):
        multiple_choice_knapsack([[1.0, 0.5]], [[10, 20]], 9)


def test_plan_meets_the_budget_and_restores_the_weights():
    model = tiny_model("llama", intermediate_size=96)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    cfg = QuantConfig(method="pvq", bits=3.0)
    overrides, report = allocation.plan(model, cfg, ids, rates=(2.0, 2.5, 3.0, 3.5, 4.0), progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # the noise probes leave the model as it was
    assert report["allocated_bits"] <= report["budget_bits"] and report["bits_per_weight"] <= 3.0
    assert set(overrides) == set(report["layers"]) and len(overrides) == 2 * 7
    assert report["predicted_dloss"] <= report["uniform_predicted_dloss"] + 1e-12
    assert all(math.isfinite(v["a"]) for v in report["layers"].values())
    summary = api.quantize(model, QuantConfig(method="pvq", bits=3.0, overrides=overrides), progress=False)
    layers = model.config.quantization_config["layers"]
    for name, d in overrides.items():
        assert {k: layers[name][k] for k in d} == d
    assert summary["bits_per_weight"] <= 3.0


def test_cli_allocate_writes_the_report(tmp_path):
    model = tiny_model("llama", intermediate_size=96)
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    out = tmp_path / "q"
    args = ["quantize", str(tmp_path / "hf"), "--method", "pvq", "--bits", "2.5", "--allocate", "--allocate-samples", "2",
            "--allocate-seqlen", "32", "--allocate-rates", "2,2.5,3", "--sensitivities", str(tmp_path / "s.json"),
            "--no-progress"]
    assert cli([*args, "-o", str(out)]) == 0
    assert (tmp_path / "s.json").is_file()
    # the second budget reuses the measured sensitivities and allocates the same way
    assert cli([*args, "-o", str(tmp_path / "q2")]) == 0
    assert (tmp_path / "q2" / "allocation.json").read_text() == (out / "allocation.json").read_text()
    report = json.loads((out / "allocation.json").read_text())
    assert report["bits_per_weight"] <= 2.5 and len(report["layers"]) == 14
    assert report["prediction"].startswith("joint") and report["predicted_dloss"] == report["joint_predicted_dloss"]
    assert all(v["measured_err"] > 0 and v["measured_contribution"] >= 0 for v in report["layers"].values())
    assert (out / "allocation.png").read_bytes()[:4] == b"\x89PNG"
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["achieved"]["bits_per_weight"] <= 2.5 + 0.01
    assert cli(["quantize", str(tmp_path / "hf"), "--method", "rtn", "--allocate", "-o", str(tmp_path / "r")]) == 2


def test_a_budget_above_every_rate_is_said(tmp_path, capsys):
    # said as the options are read, before any work (here refused next, for --workers, so nothing runs)
    assert cli(["quantize", str(tmp_path / "hf"), "--method", "pvq", "--bits", "4", "--allocate", "--allocate-rates",
                "2,3", "--workers", "2", "-o", str(tmp_path / "q")]) == 2
    assert "--bits 4 is above every --allocate-rates option (at most 3)" in capsys.readouterr().err


def test_gptq_error_factor_is_one_for_white_inputs_and_smaller_for_correlated_ones():
    from pvq.solvers.gptq import error_factors

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 32, generator=g, dtype=torch.float64)
    white = error_factors(x.T @ x, (1, 8), damp=0.0)
    assert all(abs(f - 1) < 0.01 for f in white.values())
    mixed = x[:, :16] @ torch.randn(16, 32, generator=g, dtype=torch.float64) + 0.1 * x
    f = error_factors(mixed.T @ mixed, (1, 8, 32))
    # feedback through more columns helps more: scalar LDL <= groups of 8 <= one group (no feedback at all)
    assert f[1] <= f[8] + 1e-12 and f[8] < 0.5 and abs(f[32] - 1) < 1e-9


def test_gptq_factors_scale_the_prediction_and_the_floor_holds():
    model = tiny_model("llama", intermediate_size=96)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(method="pvq-gptq", bits=3.0, nsamples=4, seqlen=32)
    factors = allocation.gptq_error_factors(model, cfg, ids, progress=False)
    assert set(factors) == {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
    assert all(0 < f <= 1 + 1e-9 for d in factors.values() for f in d.values())
    sens = allocation.sensitivities(model, ids, progress=False)
    rates = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
    _, free = allocation.plan(model, cfg, None, rates=rates, sens=sens, floor=None)
    _, fed = allocation.plan(model, cfg, None, rates=rates, sens=sens, factors=factors, floor=0.5)
    assert fed["uniform_predicted_dloss"] < free["uniform_predicted_dloss"]
    assert min(v["bits_per_weight"] for v in fed["layers"].values()) >= 2.5 - 1e-9
    assert fed["bits_per_weight"] <= 3.0
    # a layer no calibration token reaches measures a sensitivity of exactly 0, which says nothing of it: it keeps
    # the uniform setting rather than the cheapest one above the floor
    deaf = "model.layers.1.mlp.down_proj"
    overrides, _ = allocation.plan(model, cfg, None, rates=rates, sens={**sens, deaf: {**sens[deaf], "a": 0.0}},
                                   factors=factors, floor=0.5)
    assert overrides[deaf] == spec_to_dict(choose_spec(cfg, *model.get_submodule(deaf).weight.shape))


def test_gptq_factors_of_an_expert_no_token_reaches_are_the_data_free_error():
    model = tiny_model("mixtral")
    for layer in model.model.layers:  # the router never picks expert 3
        layer.mlp.gate.register_forward_hook(lambda m, a, out: (out[0], out[1], out[2].masked_fill(out[2] == 3, 0)))
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    factors = allocation.gptq_error_factors(model, QuantConfig(method="pvq-gptq", bits=3.0), ids, progress=False)
    unreached = [n for n in factors if n.endswith(".3")]
    assert len(unreached) == 2 * 2 and all(f == 1.0 for n in unreached for f in factors[n].values())
    assert all(f < 1.0 for n in factors if n not in unreached for f in factors[n].values())


def test_rehearsal_is_exact_at_zero_noise_grows_with_noise_and_restores_the_weights():
    model = tiny_model("llama", intermediate_size=96)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    zero = allocation.rehearse(model, ids, {n: 0.0 for n in names}, draws=1, progress=False)
    assert zero["dloss"] == 0.0
    small = allocation.rehearse(model, ids, {n: 0.01 for n in names}, draws=2, progress=False)
    big = allocation.rehearse(model, ids, {n: 0.3 for n in names}, draws=2, progress=False)
    assert big["dloss"] > small["dloss"] and len(big["draws"]) == 2
    again = allocation.rehearse(model, ids, {n: 0.3 for n in names}, draws=2, progress=False)
    assert again == big  # seeded: the same noise every time
    for n in names:
        assert torch.equal(model.get_submodule(n).weight, before[n])
    with pytest.raises(ValueError, match="draws"):
        allocation.rehearse(model, ids, {names[0]: 0.1}, draws=0, progress=False)
    with pytest.raises(ValueError, match=names[0]):
        allocation.rehearse(model, ids, {names[0]: -1.0}, progress=False)


def test_rehearse_plan_replaces_the_linear_prediction_and_keeps_it():
    model = tiny_model("llama", intermediate_size=96)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(method="pvq", bits=2.5)
    _, report = allocation.plan(model, cfg, ids, rates=(2.0, 2.5, 3.0), progress=False)
    linear = report["predicted_dloss"]
    allocation.rehearse_plan(model, ids, report, draws=2, progress=False)
    assert report["linear_predicted_dloss"] == linear
    assert report["predicted_dloss"] == report["joint_predicted_dloss"] != linear
    assert report["predicted_ppl_factor"] == pytest.approx(2.718281828459045 ** report["joint_predicted_dloss"])
    assert "uniform_joint_predicted_dloss" in report and report["prediction"].startswith("joint")


def test_relative_error_is_the_isotropic_noise_equivalent():
    from pvq.solvers.hessian import relative_error

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    noise = 0.1 * torch.randn(64, 32, generator=g)
    frob = relative_error(w, w + noise)
    assert frob == pytest.approx(float(noise.pow(2).sum() / w.pow(2).sum()))
    assert relative_error(w, w + noise, torch.eye(32, dtype=torch.float64)) == pytest.approx(frob)
    # an error on the one input that is active costs 32x more than the same energy spread over all
    h = torch.zeros(32, 32, dtype=torch.float64)
    h[0, 0] = 1.0
    d = torch.zeros(64, 32)
    d[:, 0] = noise.pow(2).sum(1).sqrt()
    assert relative_error(w, w + d, h) == pytest.approx(32 * frob)
    assert relative_error(torch.zeros(4, 4), torch.ones(4, 4)) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        relative_error(w, w[:, :8])


def test_quantize_reports_each_layers_error():
    from pvq import codec
    from pvq.picker import choose_spec

    model = tiny_model("llama", intermediate_size=96)
    cfg = QuantConfig(method="pvq", bits=3.0)
    ref = model.model.layers[0].self_attn.q_proj.weight.detach().float().clone()
    summary = api.quantize(model, cfg, progress=False)
    errs = summary["layer_errors"]
    assert len(errs) == 14 and all(0 < e < 0.2 for e in errs.values())
    from pvq.transforms.rotate import layer_seeds
    from pvq.transforms.rotate import rotate_weight

    w = rotate_weight(ref, layer_seeds(0, "model.layers.0.self_attn.q_proj", True))
    w_hat = codec.quantize(w, choose_spec(cfg, *w.shape)).dequantize()
    assert errs["model.layers.0.self_attn.q_proj"] == pytest.approx(float((w - w_hat).pow(2).sum() / w.pow(2).sum()), rel=1e-6)


def test_fisher_sensitivity_is_the_expected_gauss_newton_curvature():
    """a_l = ||W||^2 / numel * tr(GN_l) / (2 T), tr(GN_l) = sum_t E_{y ~ p_t} ||grad log p_t(y)||^2: computed
    exactly here (every label at every position) and matched by the sampled estimate within its noise."""
    torch.manual_seed(0)
    model = tiny_model("llama", intermediate_size=96)
    ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(0))
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    weights = [model.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    logp = model(ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)
    exact = torch.zeros(len(names), dtype=torch.float64)
    for t in range(logp.shape[0]):
        for y in range(logp.shape[1]):
            grads = torch.autograd.grad(logp[t, y], weights, retain_graph=True)
            exact += float(logp[t, y].detach().exp()) * torch.tensor([float(g.pow(2).sum()) for g in grads], dtype=torch.float64)
    want = {n: float(w.detach().pow(2).sum()) / w.numel() * float(e) / (2 * logp.shape[0])
            for n, w, e in zip(names, weights, exact)}
    got = allocation.fisher_sensitivities(model, ids, draws=150, seed=0, progress=False)
    assert set(n for n in got if not n.startswith("_")) == set(names)
    ratios = torch.tensor([got[n]["a"] / want[n] for n in names])
    assert ratios.mean().sub(1).abs() < 0.06 and ratios.min() > 0.8 and ratios.max() < 1.25, ratios
    assert all(w.requires_grad for w in weights)  # the flags it found are put back
    again = allocation.fisher_sensitivities(model, ids, draws=150, seed=0, progress=False)
    assert again == got  # seeded labels: the same figures every time


def test_the_plan_computes_each_settings_proxy_once(monkeypatch):
    # the options of every rate for several layer shapes revisit the same settings in the same order: each
    # proxy SQNR (a PVQ search over a 256 x 2304 Gaussian matrix) must be computed once, not once per shape
    from pvq import picker
    from pvq.allocation import planner

    seen = []

    def counted(w, spec):
        seen.append(spec)
        return w * (1 - 1 / (2 + spec.k))

    monkeypatch.setattr(picker, "fake_quantize", counted)
    picker.proxy_sqnr.cache_clear()
    try:
        cfg = QuantConfig(method="pvq-gptq", bits=3.25, scale="row")
        for rows, cols in ((576, 576), (1536, 576)):
            planner.options(cfg, rows, cols)
        assert len(seen) > 256 and len(seen) == len(set(seen))
    finally:
        picker.proxy_sqnr.cache_clear()  # nothing computed with the stand-in may stay behind


def test_allocate_measures_the_error_factors_on_the_first_calibration_windows(monkeypatch):
    from dataclasses import replace

    model, tok = tiny_model("llama", intermediate_size=96), tiny_tokenizer()
    cfg = QuantConfig(method="pvq-gptq", bits=3.0, nsamples=6, seqlen=32)
    text = " ".join(["river stone bridge market tower clock field"] * 300)
    seen, real = [], allocation.gptq_error_factors

    def spy(model, cfg, ids, progress=True):
        seen.append(ids.clone())
        return real(model, cfg, ids, progress=progress)

    monkeypatch.setattr(allocation, "gptq_error_factors", spy)
    s = allocation.AllocationSettings(samples=2, seqlen=32, draws=0, rates=(2.0, 3.0, 4.0))
    _, full = allocation.allocate(model, tok, cfg, text, s, progress=False)
    _, few = allocation.allocate(model, tok, cfg, text, replace(s, factor_samples=2), progress=False)
    assert seen[0].shape == (6, 32) and torch.equal(seen[1], seen[0][:2])
    assert full["factor_windows"] == 6 and few["factor_windows"] == 2
    with pytest.raises(ValueError, match="--allocate-factor-samples"):
        allocation.AllocationSettings(factor_samples=0)
