"""--asymmetric: GPTQ aimed at the unquantized model's outputs from the quantized model's inputs (asymmetric
calibration). The target's algebra, the paired sums, and the runs around it (deterministic, resumable,
offloaded, streamed) on tiny random models."""
import hashlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from pvq.cli import main as cli
from pvq.models.adapters import block_hessian_sums, block_input_sums, block_linears, blocks, capture_block_inputs
from pvq.models.loading import tiny_model, tiny_tokenizer
from pvq.models.shards import paired_bounds, reference_outputs, sharded_asymmetric_sums, sharded_hessians
from pvq.settings import QuantConfig
from pvq.solvers.gptq import asymmetric_target
from pvq.solvers.hessian import CrossAccumulator

from test_resume import _blocks_done, _env


def _pairs(t=3000, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d, dtype=torch.float64)
    r = x + 0.3 * torch.randn(t, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    return x, r


def test_the_target_is_the_damped_least_squares_fit_of_the_unquantized_outputs():
    x, r = _pairs()
    w = torch.randn(7, x.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h, c = x.T @ x / len(x), x.T @ (r - x) / len(x)
    damp = 0.05
    lam = damp * float(h.diagonal().mean())
    # argmin_Q  mean ||Q x - W r||^2 + lam ||Q - W||^2, solved directly
    best = torch.linalg.solve(h + lam * torch.eye(len(h), dtype=h.dtype), x.T @ r / len(x) @ w.T + lam * w.T).T
    got = asymmetric_target(w.float(), h, c, damp)
    assert torch.allclose(got.double(), best, atol=1e-5)
    assert torch.equal(asymmetric_target(w.float(), h, c, damp, share=0), w.float())
    half = asymmetric_target(w.float(), h, c, damp, share=0.5).double()
    assert torch.allclose(half, (w + best) / 2, atol=1e-5)
    assert torch.equal(asymmetric_target(w.float(), h, torch.zeros_like(c), damp), w.float())  # same inputs: W
    with pytest.raises(ValueError, match="share"):
        asymmetric_target(w.float(), h, c, damp, share=-1)
    with pytest.raises(ValueError, match="must be"):
        asymmetric_target(w.float(), h[:5, :5], c, damp)


def test_cross_sums_pair_rows_and_merge_in_shards():
    x, r = _pairs(t=500, d=6)
    whole = CrossAccumulator(6)
    whole.add_batch(x.float(), r.float())
    a, b = CrossAccumulator(6), CrossAccumulator(6)
    a.add_batch(x[:200].float().reshape(10, 20, 6), r[:200].float().reshape(10, 20, 6))
    b.add_batch(x[200:].float(), r[200:].float())
    a.merge(b)
    want = x.float().double().T @ (r.float().double() - x.float().double()) / len(x)
    assert torch.allclose(a.take(), want, atol=1e-6)
    assert torch.allclose(whole.take(), want, atol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        CrossAccumulator(6).add_batch(x[:3].float(), r[:4].float())
    with pytest.raises(ValueError, match="NaN"):
        CrossAccumulator(6).add_batch(x[:3].float(), torch.full((3, 6), float("nan")))
    # a bad value in either stream, also where the other is 0 (0 * inf is NaN), leaves the sums as they were
    acc = CrossAccumulator(6)
    acc.add_batch(x[:4].float(), r[:4].float())
    before = acc._sum.clone()
    for which, value in (("x", float("nan")), ("x", float("inf")), ("ref", float("inf")), ("ref", float("-inf"))):
        xb, rb = torch.zeros(3, 6), torch.ones(3, 6)
        (xb if which == "x" else rb)[2, 4] = value
        with pytest.raises(ValueError, match="NaN or inf"):
            acc.add_batch(xb, rb)
    assert acc.count == 4 and torch.equal(acc._sum, before)
    with pytest.raises(ValueError, match="no input rows"):
        CrossAccumulator(6).take()


@pytest.fixture(scope="module")
def block_and_streams():
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, model.config.vocab_size, (11, 16))  # more than one batch of 8, and a short last one
    hidden, kwargs = capture_block_inputs(model, ids)
    block = blocks(model)[0]
    return block, hidden, hidden + 0.05 * torch.randn_like(hidden), kwargs[0]


def test_block_input_sums_pair_each_linears_two_inputs(block_and_streams):
    block, hidden, ref, kwargs = block_and_streams
    lead, accs, out = block_hessian_sums(block, hidden, kwargs, keep=True)
    lead2, accs2, crosses, out2, ref_out = block_input_sums(block, hidden, kwargs, keep=True, reference=ref)
    assert lead == lead2 and torch.equal(out, out2)
    assert all(torch.equal(accs[k].take(), accs2[k].take()) for k in accs)  # the Hessians as without pairing
    assert torch.equal(ref_out, block_hessian_sums(block, ref, kwargs, keep=True)[2])
    # the inputs of every linear in both streams, caught directly
    caught = {"q": {}, "r": {}}
    linears = block_linears(block)
    for side, stream in (("q", hidden), ("r", ref)):
        hs = [m.register_forward_pre_hook(lambda m, a, n=n, side=side: caught[side].setdefault(n, []).append(a[0]))
              for n, m in linears.items()]
        with torch.no_grad():
            for s in range(0, len(stream), 8):
                block(stream[s:s + 8], **kwargs)
        for h in hs:
            h.remove()
    assert set(crosses) == {lead[n] for n in linears}  # one per distinct input
    for name in linears:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in caught["q"][name]]).double()
        r = torch.cat([t.reshape(-1, t.shape[-1]) for t in caught["r"][name]]).double()
        got = crosses[lead[name]].hessian()
        assert torch.allclose(got, x.T @ (r - x) / len(x), atol=1e-5, rtol=1e-4), name
    # in shards: the same Hessians, one C per linear, the reference's outputs
    hess, cross, ref_out3 = sharded_asymmetric_sums(block, hidden, ref, kwargs, 3)
    assert torch.equal(ref_out3, ref_out)
    want = sharded_hessians(block, hidden, kwargs, 3)
    assert set(hess) == set(cross) == set(linears)
    assert all(torch.equal(hess[k], want[k]) for k in want)
    assert cross["self_attn.q_proj"] is cross["self_attn.k_proj"]  # one input, one C
    assert hess["self_attn.q_proj"] is hess["self_attn.v_proj"] and hess["mlp.gate_proj"] is hess["mlp.up_proj"]
    assert hess["self_attn.o_proj"] is not hess["self_attn.q_proj"]


@pytest.mark.parametrize("paired", [3, 9])  # inside the first batch of 8; straddling the second
def test_a_reference_of_the_first_samples_pairs_those_and_sums_hessians_over_all(block_and_streams, paired):
    block, hidden, ref, kwargs = block_and_streams
    _, accs, _ = block_hessian_sums(block, hidden, kwargs)
    lead, accs2, crosses, _, ref_out = block_input_sums(block, hidden, kwargs, reference=ref[:paired])
    assert all(torch.equal(accs[k].take(), accs2[k].take()) for k in accs)  # every sample's Hessian
    _, _, want, _, want_out = block_input_sums(block, hidden[:paired], kwargs, reference=ref[:paired])
    assert set(crosses) == set(want) and torch.equal(ref_out, want_out)
    for k in want:  # the cross moments of the first samples only
        assert crosses[k].count == want[k].count == paired * hidden.shape[1]
        assert torch.allclose(crosses[k].take(), want[k].take(), atol=1e-6, rtol=1e-5), k
    # in shards, some of which have no paired sample: the same sums
    hess, cross, ref_out3 = sharded_asymmetric_sums(block, hidden, ref[:paired], kwargs, 3)
    whole_h, whole_c, _ = sharded_asymmetric_sums(block, hidden, ref[:paired], kwargs, 1)
    assert torch.allclose(ref_out3, ref_out, atol=1e-6) and set(cross) == set(whole_c) == set(block_linears(block))
    assert all(torch.allclose(hess[k], whole_h[k], atol=1e-6) and torch.allclose(cross[k], whole_c[k], atol=1e-6)
               for k in whole_h)
    # a resumed run carries the stream on through the blocks it skips in the same pieces: the same floats
    assert torch.equal(reference_outputs(block, ref[:paired], kwargs, hidden.shape[0], 3), ref_out3)
    assert paired_bounds(11, paired, 3) == ([(0, 3), None, None] if paired == 3 else [(0, 4), (4, 8), (8, 9)])
    with pytest.raises(ValueError, match="first samples"):
        block_input_sums(block, hidden[:2], kwargs, reference=ref[:3])


def test_the_same_stream_gives_no_correction(block_and_streams):
    block, hidden, _, kwargs = block_and_streams
    _, _, crosses, _, _ = block_input_sums(block, hidden, kwargs, reference=hidden.clone())
    assert crosses
    for c in crosses.values():
        assert float(c.take().abs().max()) == 0.0


def test_config_checks_and_storage():
    assert "asymmetric" not in QuantConfig().to_dict()  # files made without it are stored as before
    assert QuantConfig(asymmetric=0.25).to_dict()["asymmetric"] == 0.25
    assert QuantConfig.from_dict(QuantConfig(asymmetric=0.5).to_dict()).asymmetric == 0.5
    assert "asymmetric_samples" not in QuantConfig(asymmetric_samples=32).to_dict()  # meaningless without it
    assert QuantConfig.from_dict(QuantConfig(asymmetric=0.5, asymmetric_samples=32).to_dict()).asymmetric_samples == 32
    assert QuantConfig.from_dict({"asymmetric": 0.5}).asymmetric_samples == 0  # stored before it: every sample
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="--asymmetric-samples"):
            QuantConfig(asymmetric=0.5, asymmetric_samples=bad)
    with pytest.raises(ValueError, match="--asymmetric must be a number from 0 to 1"):
        QuantConfig(asymmetric=1.5)
    with pytest.raises(ValueError, match="calibrated method"):
        QuantConfig(method="pvq", asymmetric=0.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("asym")
    torch.manual_seed(0)
    tiny_model("llama", num_hidden_layers=6).save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    (root / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return root


ARGS = ["--method", "pvq-gptq", "--bits", "2.5", "--nsamples", "4", "--seqlen", "32", "--no-progress"]


def _run(root, out, *extra):
    assert cli(["quantize", str(root / "hf"), *ARGS, "--calib", str(root / "calib.txt"), "-o", str(out), *extra]) == 0
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())}


def _logits(out, ids):
    import pvq
    with torch.no_grad():
        return pvq.load(out, decode="once")[0](ids).logits


def test_asymmetric_runs_are_deterministic_and_offload_and_stream_alike(model_dir, tmp_path, capsys):
    import json
    plain = _run(model_dir, tmp_path / "plain")
    asym = _run(model_dir, tmp_path / "a", "--asymmetric", "1")
    assert asym != plain
    assert _run(model_dir, tmp_path / "b", "--asymmetric", "1") == asym  # same inputs, same bytes
    assert _run(model_dir, tmp_path / "w", "--asymmetric", "1", "--no-stream") == asym  # loaded whole
    assert _run(model_dir, tmp_path / "o", "--asymmetric", "1", "--offload", str(tmp_path / "acts")) == asym
    assert list((tmp_path / "acts").iterdir()) == []
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]["config"]
    assert cfg["asymmetric"] == 1.0
    assert "asymmetric" not in json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]["config"]
    # block 0 sees the same inputs in both models: its linears are quantized exactly as without the option
    from safetensors.torch import load_file
    a, p = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert all(torch.equal(a[k], p[k]) for k in a if ".layers.0." in k)
    assert any(not torch.equal(a[k], p[k]) for k in a if ".layers.5." in k)
    assert torch.isfinite(_logits(tmp_path / "a", torch.tensor([[1, 5, 9, 200]]))).all()


def test_asymmetric_samples_pair_the_first_calibration_samples(model_dir, tmp_path):
    """--asymmetric-samples N: the unquantized stream on the first N samples only; N at least the calibration
    samples is every sample (the same weights), fewer gives other weights, the same ones with offloading."""
    import json
    full = _run(model_dir, tmp_path / "a", "--asymmetric", "1")
    assert _run(model_dir, tmp_path / "all", "--asymmetric", "1", "--asymmetric-samples", "9")["model.safetensors"] \
        == full["model.safetensors"]
    part = _run(model_dir, tmp_path / "p", "--asymmetric", "1", "--asymmetric-samples", "2")
    assert part["model.safetensors"] != full["model.safetensors"]
    plain = _run(model_dir, tmp_path / "plain")
    assert part["model.safetensors"] != plain["model.safetensors"]
    assert _run(model_dir, tmp_path / "o", "--asymmetric", "1", "--asymmetric-samples", "2", "--offload",
                str(tmp_path / "acts")) == part
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]["config"]
    assert cfg["asymmetric_samples"] == 2


@pytest.mark.parametrize("extra", [[], ["--asymmetric-samples", "3", "--calib-shards", "3", "--calib-dtype", "float32",
                                         "--workers", "2"]], ids=["one-process", "workers"])
def test_killed_asymmetric_run_resumes_to_the_same_bytes(model_dir, tmp_path, extra):
    """The unquantized stream is not saved with a killed run's blocks: the rerun recomputes it through the float
    blocks it skips (on its paired samples, shard by shard), and writes the bytes an uninterrupted run in one
    process writes; on workers too (3 shards of the 4 samples, the first 3 paired: the last shard has none), which
    take it over from the first block they quantize."""
    if "--workers" in extra:
        pytest.importorskip("ray")
    out = tmp_path / "out"
    one = extra[:-2] if "--workers" in extra else extra
    want = _run(model_dir, tmp_path / "whole", "--asymmetric", "1", *one)
    cmd = [sys.executable, "-m", "pvq.cli", "quantize", str(model_dir / "hf"), *ARGS, "--calib",
           str(model_dir / "calib.txt"), "--asymmetric", "1", *extra, "-o", str(out)]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None and _blocks_done(out) < 3:
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists() and _blocks_done(out) >= 3
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())} == want
