"""`pvq quantize --device`: where a block's calibration forwards, Hessians and solver run. On the CPU the
device path (every move made, to the CPU) gives the plain run's bytes; on a CUDA GPU (the tests at the end,
skipped without one) the results are the CPU's up to the order of floating-point sums."""
import pytest
import torch

from pvq import api, checkpoint
from pvq.cli import main as cli
from pvq.models.loading import tiny_model, tiny_tokenizer
from pvq.settings import QuantConfig

CUDA = torch.cuda.is_available()


def _ids(n, length, seed):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _quantized(method, device, tmp_path, name, family="qwen2"):
    model = tiny_model(family, intermediate_size=96)
    cfg = QuantConfig(method=method, bits=3.25, nsamples=8, seqlen=32, calib_dtype="float32")
    summary = api.quantize(model, cfg, _ids(8, 32, 3), progress=False, device=device)
    return model, summary, checkpoint.save(model, tiny_tokenizer(), tmp_path / name)


@pytest.mark.parametrize("method", ["gptq", "pvq-gptq"])
def test_the_device_path_on_the_cpu_gives_the_plain_runs_bytes(tmp_path, method):
    _, _, plain = _quantized(method, None, tmp_path, "plain")
    model, _, moved = _quantized(method, "cpu", tmp_path, "moved")
    assert (plain / "model.safetensors").read_bytes() == (moved / "model.safetensors").read_bytes()
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_device_that_cannot_run_it_is_one_clear_line(tmp_path, capsys, monkeypatch):
    root = tmp_path / "hf"
    tiny_model("llama", intermediate_size=96).save_pretrained(root)
    tiny_tokenizer().save_pretrained(root)
    capsys.readouterr()

    def error(*extra):
        assert cli(["quantize", str(root), "-o", str(tmp_path / "q"), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "'gpu0': not a torch device" in error("--method", "pvq-gptq", "--device", "gpu0")
    assert "quantizing runs on the CPU or on a CUDA GPU" in error("--method", "pvq-gptq", "--device", "meta")
    if not CUDA:
        assert "this torch sees no CUDA GPU" in error("--method", "pvq-gptq", "--device", "cuda")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "has 1 CUDA GPU" in error("--method", "pvq-gptq", "--device", "cuda:1") or torch.cuda.device_count() > 1
    assert "needs no calibration" in error("--method", "pvq", "--device", "cuda")
    assert "--finetune runs on the CPU" in error("--method", "pvq-gptq", "--finetune", "blocks", "--device", "cuda")
    assert "--offload" in error("--method", "gptq", "--offload", str(tmp_path / "acts"), "--device", "cuda")
    assert not (tmp_path / "q").exists()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["gptq", "pvq-gptq"])
def test_on_a_gpu_the_same_layers_about_the_same_errors_and_outputs(tmp_path, method):
    cpu_model, cpu, _ = _quantized(method, None, tmp_path, "cpu", family="llama")
    gpu_model, gpu, _ = _quantized(method, "cuda", tmp_path, "gpu", family="llama")
    assert all(p.device.type == "cpu" for p in gpu_model.parameters())  # the model stays where it was
    assert gpu["bits_per_weight"] == cpu["bits_per_weight"]
    for name, e in cpu["layer_errors"].items():
        assert abs(gpu["layer_errors"][name] - e) <= 0.05 * e + 1e-6, (name, e, gpu["layer_errors"][name])
    ids = _ids(2, 32, 9)
    ref = tiny_model("llama", intermediate_size=96)
    with torch.no_grad():
        want = ref(ids).logits
        a, b = cpu_model(ids).logits, gpu_model(ids).logits
    # the two quantizations differ from each other far less than either differs from the float model
    assert float((a - b).pow(2).mean()) < 0.25 * float((a - want).pow(2).mean())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_on_a_gpu_the_triton_kernels_in_bfloat16():
    """What Triton's interpreter cannot check on a CPU (its bfloat16 products are wrong in 3.9): the fused tiled
    product with bfloat16 operands, and tiles decoded into bfloat16 (rounded to nearest on a GPU)."""
    pytest.importorskip("triton")
    from pvq.codec import PVQSpec
    from pvq.codec.gainshape import quantize
    from pvq.runtime import gpu

    for spec in (PVQSpec.for_code_bits(12, 10, 27), PVQSpec.for_code_bits(16, 29, 52, scale="row")):
        p = quantize(torch.randn(300, 40 * spec.n, generator=torch.Generator().manual_seed(0)), spec)
        ref = p.dequantize(torch.float32).cuda()
        op = gpu.Operands(type(p)(p.spec, p.shape, p.codes.cuda(), p.row_scale.cuda(), p.gain_levels.cuda()))
        assert torch.equal(op.decode(dtype=torch.bfloat16), ref.bfloat16())
        x = torch.randn(200, ref.shape[1], device="cuda")
        want = x.bfloat16().float() @ ref.bfloat16().float().T
        torch.testing.assert_close(op.matmul(x, torch.bfloat16), want, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(op.matmul(x, torch.float32), x @ ref.T, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(op.gemv(x[:5]), x[:5] @ ref.T, rtol=1e-4, atol=1e-4)
