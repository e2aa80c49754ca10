"""End to end on tiny random models: rotate, quantize, save, load, CLI, and the errors users meet."""
import json
import math

import pytest
import torch

from pvq import api, checkpoint, loader
from pvq.cli import main as cli
from pvq.picker import choose_spec
from pvq.settings import QuantConfig
from pvq.models.adapters import block_linears, blocks, run_block, set_module
from pvq.models.loading import tiny_model, tiny_tokenizer
from pvq.codec import UniformSpec
from pvq.modules.linear import QuantLinear
from pvq.transforms.rotate import layer_seeds, rotate_weight

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


class _RotationOnly(QuantLinear):
    """A QuantLinear whose decoded matrix is the exact rotated float matrix: rotation without quantization."""

    def __init__(self, w_rot, seeds, bias):
        super().__init__(UniformSpec(8), tuple(w_rot.shape), bias=bias is not None)
        self.seeds.copy_(torch.tensor(seeds, dtype=torch.int64))
        if bias is not None:
            self.bias.data.copy_(bias.detach())
        self.w = w_rot

    def rotated_weight(self):
        return self.w


def _ids(n=2, length=48, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_rotated_unquantized_model_gives_the_same_logits(family):
    model = tiny_model(family, intermediate_size=96)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        for i, block in enumerate(blocks(model)):
            for name, mod in block_linears(block).items():
                seeds = layer_seeds(3, f"model.layers.{i}.{name}", True)
                w_rot = rotate_weight(mod.weight.detach(), seeds)
                set_module(block, name, _RotationOnly(w_rot, seeds, mod.bias))
        out = model(ids).logits
    assert (out - ref).abs().max().item() < 1e-3
    q = blocks(model)[0].self_attn.q_proj
    assert not torch.allclose(q.rotated_weight(), q.weight_in_original_basis())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rtn", "hqq", "pvq"])
def test_quantize_save_load_gives_identical_logits(tmp_path, family, method):
    model = tiny_model(family, intermediate_size=96)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    summary = api.quantize(model, QuantConfig(method=method, bits=3.25), progress=False)
    with torch.no_grad():
        mem = model(ids).logits
    assert 0 < (mem - ref).abs().max().item() < 5
    out = checkpoint.save(model, tiny_tokenizer(), tmp_path / "q")
    loaded, tok = loader.load(out, decode="once")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, mem)
    assert tok is not None
    # no full-precision weight of a quantized linear is stored
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    assert all(t[k].numel() == 0 for k in t if k.endswith("proj.weight"))  # only the empty guards
    stored = sum(8 * t[k].numel() * t[k].element_size() for k in t if k.rpartition(".")[0] in
                 json.loads((out / "config.json").read_text())["quantization_config"]["layers"] and not k.endswith(".bias"))
    assert stored == summary["linear_bits"]


@pytest.mark.parametrize("method", ["gptq", "pvq-gptq"])
def test_calibrated_methods_round_trip_and_help(tmp_path, method):
    model = tiny_model("llama", intermediate_size=96)
    calib = _ids(8, 64, seed=1)
    ids = _ids(4, 64, seed=2)
    with torch.no_grad():
        ref = model(ids).logits
    data_free = tiny_model("llama", intermediate_size=96)
    base = {"gptq": "rtn", "pvq-gptq": "pvq"}[method]
    api.quantize(data_free, QuantConfig(method=base, bits=3.25), progress=False)
    api.quantize(model, QuantConfig(method=method, bits=3.25, nsamples=8, seqlen=64), calib, progress=False)
    with torch.no_grad():
        mem = model(ids).logits
        err = float(((mem - ref) ** 2).mean())
        err_free = float(((data_free(ids).logits - ref) ** 2).mean())
    assert err < err_free  # error feedback on in-distribution inputs beats the data-free method
    loaded, _ = loader.load(checkpoint.save(model, tiny_tokenizer(), tmp_path / "q"), decode="once")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, mem)


@pytest.mark.parametrize("calib_dtype", ["float32", "bfloat16"])
def test_same_seed_gives_byte_identical_files(tmp_path, calib_dtype):
    files = []
    for run in range(2):
        model = tiny_model("qwen2", intermediate_size=96)
        api.quantize(model, QuantConfig(method="pvq-gptq", bits=2.25, nsamples=4, seqlen=32, calib_dtype=calib_dtype),
                     _ids(4, 32, 5), progress=False)
        out = checkpoint.save(model, tiny_tokenizer(), tmp_path / f"r{run}")
        files.append([(out / f).read_bytes() for f in ("model.safetensors", "config.json")])
    assert files[0] == files[1]


def test_calibration_dtype_is_checked_resolved_and_stored():
    from pvq.settings import native_bf16

    with pytest.raises(ValueError, match="--calib-dtype"):
        QuantConfig(method="pvq-gptq", calib_dtype="float16")
    assert QuantConfig(method="pvq-gptq").calib_dtype == ("bfloat16" if native_bf16() else "float32")
    assert QuantConfig(method="pvq").calib_dtype == "float32"  # no forward to run
    assert QuantConfig.from_dict({"method": "pvq-gptq"}).calib_dtype == "float32"  # stored before the option
    model = tiny_model("llama", intermediate_size=96)
    api.quantize(model, QuantConfig(method="pvq-gptq", bits=3.25, nsamples=4, seqlen=32, calib_dtype="bfloat16"),
                 _ids(4, 32, 5), progress=False)
    assert model.config.quantization_config["config"]["calib_dtype"] == "bfloat16"


def test_bfloat16_calibration_is_as_good_as_float32():
    ids = _ids(4, 64, seed=2)
    ref_model = tiny_model("llama", intermediate_size=96)
    with torch.no_grad():
        ref = ref_model(ids).logits
    err = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_model("llama", intermediate_size=96)
        api.quantize(model, QuantConfig(method="pvq-gptq", bits=3.25, nsamples=8, seqlen=64, calib_dtype=dtype),
                     _ids(8, 64, seed=1), progress=False)
        with torch.no_grad():
            err[dtype] = float(((model(ids).logits - ref) ** 2).mean())
    assert err["bfloat16"] < 1.1 * err["float32"]


def test_a_block_run_with_its_quantized_matrices_as_dense_weights_equals_its_quantlinears():
    model = tiny_model("llama", intermediate_size=96)
    block = blocks(model)[0]
    hidden, kwargs = api.capture_block_inputs(model, _ids(2, 32, 3))
    cfg = QuantConfig(method="pvq", bits=3.25)
    made, _, _ = api.quantize_linears(block, "model.layers.0.", cfg, {}, None, [])
    with torch.no_grad():
        dense = api.run_as_quantized(block, made, hidden, kwargs[0])
        api.install(block, made)
        quant = run_block(block, hidden, kwargs[0])
    torch.testing.assert_close(dense, quant, rtol=1e-4, atol=1e-5)


def test_bits_target_is_met_and_counted():
    cfg = QuantConfig(method="pvq", bits=3.25)
    spec = choose_spec(cfg, 1536, 576)
    from pvq.codec import bits_per_weight

    bpw = bits_per_weight(spec, 1536, 576, rotation_seeds=2).bits_per_weight
    assert 3.2 < bpw <= 3.2551
    with pytest.raises(ValueError, match="bits"):
        choose_spec(QuantConfig(method="pvq", bits=0.2), 1536, 576)
    with pytest.raises(ValueError, match="bits"):
        choose_spec(QuantConfig(method="rtn", bits=1.0), 1536, 576)


def test_nan_weight_is_refused():
    model = tiny_model("llama")
    with torch.no_grad():
        blocks(model)[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj"):
        api.quantize(model, QuantConfig(method="pvq"), progress=False)


def test_unsupported_architecture_is_refused():
    model = tiny_model("llama")
    model.config.num_hidden_layers = 3  # no list of 3 blocks: pvq cannot tell which are the decoder's
    with pytest.raises(ValueError, match="unsupported architecture 'llama'.*one list of 3 decoder blocks"):
        api.quantize(model, QuantConfig(method="pvq"), progress=False)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder, and its pvq-quantized directory via the CLI."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model("llama", intermediate_size=96)
    model.save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    rc = cli(["quantize", str(root / "hf"), "--method", "pvq", "--bits", "3.25", "-o", str(root / "q"), "--no-progress"])
    assert rc == 0
    return root


def test_cli_bench_run_hands_the_cache_on_as_the_model_takes_it(tiny_dirs, capsys):
    """transformers 5.x names the key-value cache `cache` (`past_key_values` warns, and goes in 5.40)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert cli(["bench-run", str(tiny_dirs / "q"), "--prompt-tokens", "16", "--gen-tokens", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["gen_tokens"] == 3 and res["gen_tokens_per_s"] > 0


def test_cli_info_and_eval(tiny_dirs, capsys):
    assert cli(["info", str(tiny_dirs / "q"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "pvq" and 3.0 < info["bits_per_weight"] <= 3.26
    assert info["file_bytes"] == (tiny_dirs / "q" / "model.safetensors").stat().st_size
    assert cli(["eval", str(tiny_dirs / "q"), "--ppl", "--windows", "2", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(res["ppl"]) and res["ppl"] > 1 and res["bits_per_weight"] == info["bits_per_weight"]
    assert "arc_easy_acc" not in res


def test_cli_quantize_ppl_is_what_the_saved_directory_measures(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli(["quantize", str(tiny_dirs / "hf"), "--method", "pvq", "--bits", "2.25", "-o", str(out), "--ppl", "--json",
                "--no-progress"]) == 0
    after = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone (the summary line goes to stderr)
    assert after["ppl_windows"] == 16 and math.isfinite(after["ppl"])
    for decode in ("once", "on-the-fly"):
        assert cli(["eval", str(out), "--ppl", "--json", "--no-progress", "--decode", decode]) == 0
        loaded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert loaded["ppl"] == pytest.approx(after["ppl"], rel=1e-5)


def test_the_files_that_say_how_to_run_the_model_come_along(tiny_dirs, tmp_path):
    """A chat model's end-of-turn tokens are often only in generation_config.json, and a vision model's image
    processing in its processor files: the quantized directory carries them, and both loaders use them."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    src = tmp_path / "hf"
    src.mkdir()
    for f in (tiny_dirs / "hf").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    GenerationConfig(eos_token_id=[2, 7], bos_token_id=1, temperature=0.6, do_sample=True).save_pretrained(src)
    (src / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    (src / "preprocessor_config.json").write_text('{"size": 28}')
    assert cli(["quantize", str(src), "--method", "rtn", "--bits", "4.25", "-o", str(tmp_path / "q"), "--no-progress"]) == 0
    for f in ("generation_config.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (tmp_path / "q" / f).read_bytes() == (src / f).read_bytes()
    model, tok = loader.load(tmp_path / "q")
    assert model.generation_config.eos_token_id == [2, 7] and model.generation_config.temperature == 0.6
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "q").generation_config.eos_token_id == [2, 7]
    (tmp_path / "q" / "generation_config.json").write_text("{")  # damaged after writing: the checksum says so
    with pytest.raises(checkpoint.PVQFormatError, match="generation_config.json"):
        loader.load(tmp_path / "q")


def test_cli_generate_chat_uses_the_chat_template(tiny_dirs, tmp_path, capsys):
    q = tmp_path / "q"
    q.mkdir()
    for f in (tiny_dirs / "q").iterdir():
        (q / f.name).write_bytes(f.read_bytes())
    assert cli(["generate", str(q), "hi", "--chat", "--max-new-tokens", "2"]) == 2
    assert "has no chat template" in capsys.readouterr().err
    (q / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}[bot] ")
    assert cli(["generate", str(q), "hi", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("hi")  # a continuation starts with the prompt
    assert cli(["generate", str(q), "hi", "--chat", "--max-new-tokens", "2"]) == 0
    reply = capsys.readouterr().out
    assert "[user]" not in reply and "[bot]" not in reply and 0 < len(reply.encode()) <= 2 * 4 + 1  # two tokens, a newline


@pytest.mark.parametrize("method,flag", [("rtn", "--rotate"), ("pvq", "--no-rotate")])
def test_cli_rotation_can_be_turned_on_or_off(tiny_dirs, tmp_path, capsys, method, flag):
    from pvq.transforms.rotate import NO_SEED

    out = tmp_path / "q"
    assert cli(["quantize", str(tiny_dirs / "hf"), "--method", method, "--bits", "3.25", flag, "-o", str(out), "--ppl",
                "--json", "--no-progress"]) == 0
    after = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config"]["rotate"] is (flag == "--rotate")
    seeds = [e["seeds"] for e in qc["layers"].values()]
    assert seeds and all((NO_SEED not in s) == (flag == "--rotate") for s in seeds)
    assert cli(["eval", str(out), "--ppl", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] == pytest.approx(after["ppl"], rel=1e-5)
    default = json.loads((tiny_dirs / "q" / "config.json").read_text())["quantization_config"]
    assert default["config"]["rotate"] is None  # the method's own default is stored as it always was
    assert after["bits_per_weight"] == qc["achieved"]["bits_per_weight"]
    assert cli(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rotated"] is (flag == "--rotate")
    if method == "pvq":  # the seeds are stored (NO_SEED markers) and counted either way: the target holds unrotated
        assert after["bits_per_weight"] <= 3.25 + 0.005


def test_cli_errors_are_one_line(tiny_dirs, tmp_path, capsys):
    q = tiny_dirs / "q"
    # refuses to overwrite, names the option
    assert cli(["quantize", str(tiny_dirs / "hf"), "--method", "pvq", "-o", str(q)]) == 2
    assert "--force" in capsys.readouterr().err
    # truncated safetensors
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((q / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((q / "model.safetensors").read_bytes()[:1000])
    assert cli(["eval", str(bad), "--json"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Traceback" not in err
    # a newer format version
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(cfg))
    assert cli(["info", str(bad)]) == 2
    assert "newer" in capsys.readouterr().err
    # a missing directory
    assert cli(["info", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    # an unreachable target
    assert cli(["quantize", str(tiny_dirs / "hf"), "--method", "pvq", "--bits", "0.3", "-o", str(tmp_path / "x")]) == 2
    assert "bits" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # an option of another method: refused before any work, not ignored nor failed deep inside the solver
    for method, option in (("pvq-gptq", ["--act-order"]), ("pvq", ["--group-size", "64"]), ("rtn", ["--scale", "row"]),
                           ("hqq", ["--group-dim", "8"])):
        assert cli(["quantize", str(tiny_dirs / "hf"), "--method", method, *option, "-o", str(tmp_path / "x")]) == 2
        assert option[0] in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_calibration_options_given_to_a_data_free_method_are_said_to_be_unused(tiny_dirs, tmp_path, capsys):
    args = ["--method", "rtn", "--bits", "4.25", "--no-progress"]
    assert cli(["quantize", str(tiny_dirs / "hf"), *args, "--nsamples", "4", "--damp", "0.1", "-o", str(tmp_path / "a")]) == 0
    assert "note: rtn is data-free: --nsamples, --damp are not used" in capsys.readouterr().err
    assert cli(["quantize", str(tiny_dirs / "hf"), *args, "-o", str(tmp_path / "b")]) == 0
    assert "data-free" not in capsys.readouterr().err
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    # options of an option not given
    assert cli(["quantize", str(tiny_dirs / "hf"), *args, "--asymmetric-samples", "2", "--sensitivities",
                str(tmp_path / "s.json"), "-o", str(tmp_path / "c")]) == 0
    assert ("note: --asymmetric-samples is not used without --asymmetric; --sensitivities is not used without "
            "--allocate") in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_tokenizer_files_broken_or_absent(tiny_dirs, tmp_path):
    import shutil

    from pvq.checkpoint import TOKENIZER_FILES

    bare = tmp_path / "bare"
    shutil.copytree(tiny_dirs / "q", bare)
    for f in TOKENIZER_FILES + ("special_tokens_map.json",):
        (bare / f).unlink(missing_ok=True)
    model, tok = loader.load(bare)
    assert tok is None and model is not None
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs / "q", broken)
    (broken / "tokenizer.json").write_text("{ not json")
    with pytest.raises(checkpoint.PVQFormatError, match="tokenizer"):
        loader.load(broken)
