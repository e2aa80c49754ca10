"""Faults a tester reproduced (issue "Works on a fresh machine, and never destroys, corrupts or silently
spoils"): each test here failed before its fix. Tiny random models only."""
import math
from pathlib import Path

import pytest
import torch

from pvq import picker
from pvq.codec import INDEX_LIMIT, bits_per_weight
from pvq.codec.gainshape import fake_quantize
from pvq.settings import QuantConfig

SMOL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # SmolLM2-135M's linears


def _small_proxy(spec):
    """The picker's Gaussian SQNR proxy on a small matrix: the same ranking idea, seconds instead of minutes
    for the hundreds of large-k settings near 8 bits per weight."""
    w = torch.randn(8, 48, generator=torch.Generator().manual_seed(1234))
    return 10 * math.log10(float((w**2).sum() / ((w - fake_quantize(w, spec)) ** 2).sum()))


@pytest.fixture
def small_proxy(monkeypatch):
    monkeypatch.setattr(picker, "proxy_sqnr", _small_proxy)


def test_a_full_63_bit_code_gives_only_valid_candidates():
    for n in (8, 12, 16):
        specs = picker.pvq_candidates(n, 63, "beta", "tensor")
        assert specs and all(s.radix <= INDEX_LIMIT and 2 <= s.gain_levels <= 512 for s in specs)


@pytest.mark.parametrize("bits", [3.933, 3.95, 3.996, 7.871, 7.9, 7.996])
def test_bits_next_to_a_full_63_bit_code_are_reachable(bits, small_proxy):
    # n=16 (or n=8) fills a 63-bit code there: its k=1 setting is over the codec's limit (and one bit more
    # than 63 has no setting at all), but k>1, n=12 or a code of one bit less reach it
    for rows, cols in SMOL_SHAPES:
        spec = picker.choose_spec(QuantConfig(method="pvq", bits=bits), rows, cols)
        assert bits - 1 / 8 - 0.002 < bits_per_weight(spec, rows, cols, rotation_seeds=2).bits_per_weight <= bits + 0.005


# --- the CLI on a tiny model -------------------------------------------------------------------------------

from pvq import api, checkpoint  # noqa: E402
from pvq.cli import main as cli  # noqa: E402
from pvq.models.loading import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny Llama as a Hugging Face folder (hf) and its rtn-quantized pvq directory (q)."""
    root = tmp_path_factory.mktemp("faults")
    tiny_model("llama").save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    assert cli(["quantize", str(root / "hf"), "--method", "rtn", "-o", str(root / "q"), "--no-progress"]) == 0
    return root


def _error(capsys) -> str:
    """The one error line the last command printed (progress bars aside), and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("pvq")]
    assert len(lines) == 1 and ": error: " in lines[0], err
    return lines[0]


def _quantize(src, out, *extra):
    return cli(["quantize", str(src), "--method", "rtn", "-o", str(out), "--no-progress", *extra])


def _leftovers(where):
    return sorted(p.name for p in where.iterdir() if ".tmp-" in p.name or ".probe-" in p.name)


@pytest.fixture
def no_work(monkeypatch):
    """Records whether quantizing started (a refusal must come before it)."""
    calls, real = [], api.quantize
    monkeypatch.setattr(api, "quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_bits_4_on_a_tiny_model(dirs, tmp_path, small_proxy):
    assert cli(["quantize", str(dirs / "hf"), "--method", "pvq", "--bits", "4", "-o", str(tmp_path / "q"),
                "--no-progress"]) == 0
    assert checkpoint.read_config(tmp_path / "q")["quantization_config"]["achieved"]["bits_per_weight"] <= 4.005


# 7, 11. bad input (an option out of range, an empty prompt, a pvq directory to quantize, a format version
# that is not an integer) is one line naming it, never a traceback

def test_empty_prompt(dirs, capsys):
    assert cli(["generate", str(dirs / "q"), ""]) == 2
    assert "prompt" in _error(capsys)


@pytest.mark.parametrize("argv, option", [
    (["bench-run", "{q}", "--prompt-tokens", "0"], "--prompt-tokens"),
    (["bench-run", "{q}", "--gen-tokens", "0"], "--gen-tokens"),
    (["generate", "{q}", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["quantize", "{hf}", "--method", "rtn", "--group-size", "0", "-o", "{tmp}/x"], "--group-size"),
    (["quantize", "{hf}", "--method", "pvq", "--bits", "1e308", "-o", "{tmp}/x"], "--bits"),
    (["quantize", "{hf}", "--method", "pvq", "--bits", "nan", "-o", "{tmp}/x"], "--bits"),
    (["quantize", "{hf}", "--method", "pvq", "--group-dim", "0", "-o", "{tmp}/x"], "--group-dim"),
    (["quantize", "{hf}", "--nsamples", "0", "-o", "{tmp}/x"], "--nsamples"),
    (["quantize", "{hf}", "--damp", "-1", "-o", "{tmp}/x"], "--damp"),
    (["quantize", "{hf}", "--seed", "-1", "-o", "{tmp}/x"], "--seed"),
    (["quantize", "{hf}", "--allocate", "--allocate-noise", "0", "-o", "{tmp}/x"], "--allocate-noise"),
    (["eval", "{q}", "--windows", "-1"], "--windows"),
    (["bench-run", "{q}", "--threads", "0"], "--threads"),
])
def test_option_ranges_are_checked_when_parsing(dirs, tmp_path, capsys, argv, option):
    argv = [a.format(q=dirs / "q", hf=dirs / "hf", tmp=tmp_path) for a in argv]
    assert cli(argv) == 2
    assert f"argument {option}" in _error(capsys)  # argparse's refusal: nothing was loaded
    assert not (tmp_path / "x").exists()


def test_settings_refuse_what_the_parser_refuses():
    for bad in ({"group_size": 0}, {"bits": 1e308}, {"group_dim": 0}):
        with pytest.raises(ValueError, match="--" + next(iter(bad)).replace("_", "-")):
            QuantConfig(method="pvq", **bad)


def test_quantizing_a_pvq_directory(dirs, tmp_path, capsys, no_work):
    assert _quantize(dirs / "q", tmp_path / "again") == 2
    assert "already a pvq directory" in _error(capsys)
    assert not no_work


def test_format_version_written_as_a_string(dirs, tmp_path, capsys):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(dirs / "q", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = "1"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert cli(["info", str(bad)]) == 2
    line = _error(capsys)
    assert "not an integer" in line and "newer" not in line


# 2, 6, 8, 11. the output location: --force replaces only a pvq output (or an empty directory), never the input
# nor a directory above it or the current one; links, unwritable places and too little space are refused
# before the work; a failure while writing leaves nothing; temporaries of dead runs are cleaned up

def test_force_never_replaces_a_directory_above_the_current_one(dirs, tmp_path, monkeypatch, capsys, no_work):
    (tmp_path / "p" / "child").mkdir(parents=True)
    (tmp_path / "p" / "unrelated.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path / "p" / "child")
    assert _quantize(dirs / "hf", "..", "--force") == 2
    assert "current directory" in _error(capsys)
    assert (tmp_path / "p" / "unrelated.txt").read_text() == "keep me" and (tmp_path / "p" / "child").is_dir()
    assert not no_work and _leftovers(tmp_path) == []


def test_force_never_replaces_the_input(dirs, tmp_path, capsys, no_work):
    import shutil

    src = tmp_path / "holder" / "m"
    shutil.copytree(dirs / "hf", src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert _quantize(src, src, "--force") == 2
    assert "input model" in _error(capsys)
    assert _quantize(src, tmp_path / "holder", "--force") == 2  # a directory holding the input
    assert "input model" in _error(capsys)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before and not no_work


def test_force_replaces_a_pvq_output_but_nothing_else(dirs, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert _quantize(dirs / "hf", other, "--force") == 2
    assert "not a pvq output" in _error(capsys)
    assert (other / "notes.txt").read_text() == "mine"
    out = tmp_path / "q"
    assert _quantize(dirs / "hf", out) == 0
    assert _quantize(dirs / "hf", out, "--force", "--bits", "4.5") == 0  # a pvq output: replaced
    assert checkpoint.read_config(out)["quantization_config"]["config"]["bits"] == 4.5
    (tmp_path / "empty").mkdir()
    assert _quantize(dirs / "hf", tmp_path / "empty", "--force") == 0
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("what", ["weights", "tokenizer"])
def test_disk_full_while_writing_leaves_nothing(dirs, tmp_path, monkeypatch, capsys, what):
    import errno

    from pvq import tensorfile
    from pvq.models import loading

    if what == "weights":
        def write(filename, tensors, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)  # a truncated file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(tensorfile, "write", write)
    else:
        real = loading.load_skeleton  # a folder is streamed

        def load_skeleton(spec, *a, **k):
            model, tok, reader = real(spec, *a, **k)

            def save_pretrained(directory, *a, **k):
                (Path(directory) / "tokenizer.json").write_text('{"trunc')
                raise Exception("No space left on device (os error 28)")  # what the tokenizers library raises

            tok.save_pretrained = save_pretrained
            return model, tok, reader

        monkeypatch.setattr(loading, "load_skeleton", load_skeleton)
    out = tmp_path / "out"
    assert _quantize(dirs / "hf", out) == 2
    line = _error(capsys)
    assert "No space left on device" in line and str(out) in line
    assert not out.exists() and _leftovers(tmp_path) == []


def test_too_little_free_space_is_found_before_the_work(dirs, tmp_path, monkeypatch, capsys, no_work):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - 4096, 4096))
    assert _quantize(dirs / "hf", tmp_path / "out") == 2
    assert "free space" in _error(capsys)
    assert not no_work and not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("dangling", [False, True])
def test_symbolic_link_as_output(dirs, tmp_path, capsys, no_work, dangling):
    target = tmp_path / "elsewhere"
    if not dangling:
        target.mkdir()
    (tmp_path / "link").symlink_to(target)
    assert _quantize(dirs / "hf", tmp_path / "link") == 2
    assert "symbolic link" in _error(capsys)
    assert not no_work and _leftovers(tmp_path) == [] and (tmp_path / "link").is_symlink()
    assert dangling or list(target.iterdir()) == []


def test_unwritable_output_location(dirs, tmp_path, monkeypatch, capsys, no_work):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.mkdir

    def mkdir(path, *a, **k):  # what a read-only directory does (root ignores chmod, so pretend)
        if Path(path).resolve().parent == locked.resolve():
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    assert _quantize(dirs / "hf", locked / "out") == 2
    assert "cannot write" in _error(capsys)
    assert not no_work and list(locked.iterdir()) == []
    (tmp_path / "file").write_text("")
    assert _quantize(dirs / "hf", tmp_path / "file" / "out") == 2
    assert "not a directory" in _error(capsys)
    assert not no_work


def test_stale_temporaries_of_the_same_output_are_removed(dirs, tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live, other = (tmp_path / f"out.tmp-{dead.pid}", tmp_path / f"out.tmp-{os.getppid()}",
                          tmp_path / f"another.tmp-{dead.pid}")
    for d in (stale, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    assert _quantize(dirs / "hf", tmp_path / "out") == 0
    assert not stale.exists()  # its process is gone
    assert live.exists() and other.exists()  # a running process's, another output's


# 11. calibration windows longer than the model's context

@pytest.mark.parametrize("option, extra", [
    ("--seqlen", ["--method", "gptq"]), ("--seqlen", ["--method", "gptq", "--no-stream"]),
    ("--allocate-seqlen", ["--method", "pvq", "--allocate"])])
def test_seqlen_beyond_the_model_context(dirs, tmp_path, capsys, monkeypatch, no_work, option, extra):
    from pvq.models import loading

    loads, real = [], loading.load_model  # a whole load (--no-stream, --allocate) comes after the refusal
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    assert cli(["quantize", str(dirs / "hf"), *extra, "--nsamples", "1", option, "300",
                "-o", str(tmp_path / "x"), "--no-progress"]) == 2
    line = _error(capsys)
    assert option in line and "300" in line and "256" in line
    assert not no_work and not loads and not (tmp_path / "x").exists()


# 1. the run seed changes the rotations (torch's CPU generator reads only the low 32 bits of its seed)

def test_the_seed_changes_every_rotation():
    from pvq.transforms.hadamard import RandomHadamard
    from pvq.transforms.rotate import derive_seed, layer_seeds
    seeds = (0, 1, 12345, 2**32 - 1)
    for tag in ("model.layers.0.self_attn.q_proj:in", "model.layers.3.mlp.down_proj:out"):
        signs = [RandomHadamard(64, derive_seed(s, tag)).apply(torch.eye(64, dtype=torch.float64)) for s in seeds]
        assert all(not torch.equal(a, b) for i, a in enumerate(signs) for b in signs[i + 1:]), tag
    # the default seed keeps the rotations files were written with before
    assert layer_seeds(0, "model.layers.0.mlp.up_proj", True) == tuple(
        __import__("zlib").crc32(f"model.layers.0.mlp.up_proj:{side}".encode()) for side in ("in", "out"))


def test_seed_changes_the_quantized_model(dirs, tmp_path):
    from safetensors.torch import load_file
    files = {}
    for seed in (0, 1, 12345):
        out = tmp_path / f"s{seed}"
        assert cli(["quantize", str(dirs / "hf"), "--method", "pvq", "--bits", "3", "-o", str(out),
                    "--seed", str(seed), "--no-progress"]) == 0
        files[seed] = load_file(out / "model.safetensors")
    codes = [k for k in files[0] if k.endswith(".codes")]
    assert codes
    for a, b in ((0, 1), (0, 12345), (1, 12345)):
        assert all(not torch.equal(files[a][k], files[b][k]) for k in codes), (a, b)


def test_seed_beyond_32_bits_is_refused(capsys, dirs, tmp_path):
    assert cli(["quantize", str(dirs / "hf"), "--seed", str(2**32), "-o", str(tmp_path / "x")]) == 2
    assert "argument --seed" in _error(capsys)
    with pytest.raises(ValueError, match="--seed"):
        QuantConfig(seed=2**32)


# 4. values the stored dtype cannot hold are refused before anything is written (they became inf: a NaN model)

def _edited(dirs, tmp_path, key, value):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(dirs / "hf")
    with torch.no_grad():
        m.get_parameter(key).view(-1)[3] = value
    m.save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    return tmp_path / "src"


@pytest.mark.parametrize("method, value", [("rtn", 1e6), ("rtn", -1e6), ("pvq", 1e7), ("gptq", 1e6), ("pvq-gptq", 1e7)])
def test_a_weight_too_large_for_fp16_scales(dirs, tmp_path, capsys, method, value):
    src = _edited(dirs, tmp_path, "model.layers.0.self_attn.q_proj.weight", value)
    assert cli(["quantize", str(src), "--method", method, "-o", str(tmp_path / "x"), "--no-progress",
                "--nsamples", "2", "--seqlen", "32"]) == 2
    line = _error(capsys)
    assert "model.layers.0.self_attn.q_proj" in line and "fp16" in line, line
    assert not (tmp_path / "x").exists() and not _leftovers(tmp_path)


def test_a_norm_too_large_for_the_dense_dtype(dirs, tmp_path, capsys, no_work):
    src = _edited(dirs, tmp_path, "model.layers.1.input_layernorm.weight", 1e5)
    assert _quantize(src, tmp_path / "x") == 2
    line = _error(capsys)
    assert "model.layers.1.input_layernorm.weight" in line and "--dense-dtype" in line, line
    assert not no_work and not (tmp_path / "x").exists()
    assert _quantize(src, tmp_path / "x", "--dense-dtype", "bfloat16") == 0  # wider storage holds it
    assert cli(["eval", str(tmp_path / "x"), "--ppl", "--windows", "1", "--no-progress"]) == 0
    assert "nan" not in capsys.readouterr().out


def test_nan_weights_are_refused_before_the_work(dirs, tmp_path, capsys, no_work):
    src = _edited(dirs, tmp_path, "model.layers.1.mlp.down_proj.weight", float("nan"))
    assert _quantize(src, tmp_path / "x") == 2
    assert "model.layers.1.mlp.down_proj.weight" in _error(capsys)
    assert not no_work


# 3, 9, 10. a stored tensor missing, changed in place or cut off is refused on every loading path

import json  # noqa: E402
import shutil  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402

import pvq  # noqa: E402
from pvq.checkpoint import PVQFormatError  # noqa: E402


def _copy(dirs, tmp_path, checksums=True):
    d = tmp_path / "copy"
    shutil.copytree(dirs / "q", d)
    if not checksums:  # as pvq wrote directories before it stored checksums
        cfg = json.loads((d / "config.json").read_text())
        del cfg["quantization_config"]["checksums"]
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def _rewrite(d, edit):
    t = load_file(d / "model.safetensors")
    edit(t)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def _from_pretrained(d):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(d)


def _refused_everywhere(d, match):
    for load in (lambda: pvq.load(d), lambda: pvq.load(d, decode="once"), lambda: _from_pretrained(d)):
        with pytest.raises(PVQFormatError, match=match):
            load()


LAYER = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("checksums", [True, False])
@pytest.mark.parametrize("key", ["scales", "seeds", "codes"])
def test_a_missing_tensor_is_refused_by_transformers_too(dirs, tmp_path, checksums, key):
    d = _copy(dirs, tmp_path, checksums)
    _rewrite(d, lambda t: t.pop(f"{LAYER}.{key}"))
    _refused_everywhere(d, f"{LAYER}.{key} is missing")


@pytest.mark.parametrize("checksums", [True, False])
def test_a_missing_norm_is_refused_by_transformers_too(dirs, tmp_path, checksums):
    d = _copy(dirs, tmp_path, checksums)
    _rewrite(d, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    _refused_everywhere(d, "post_attention_layernorm.weight is missing")


def test_a_code_changed_in_place_is_refused(dirs, tmp_path, capsys):
    d = _copy(dirs, tmp_path)

    def flip(t):
        t[f"{LAYER}.codes"][5] ^= 1
    _rewrite(d, flip)
    _refused_everywhere(d, f"{LAYER}.codes .*checksum mismatch")
    assert cli(["info", str(d)]) == 2
    assert "checksum mismatch" in _error(capsys)


def test_a_dense_tensor_retyped_in_place_is_refused(dirs, tmp_path):
    d = _copy(dirs, tmp_path)  # same bytes read as another dtype: the checksum covers dtype and shape

    def retype(t):
        t["model.norm.weight"] = t["model.norm.weight"].view(torch.bfloat16)
    _rewrite(d, retype)
    _refused_everywhere(d, "model.norm.weight .*checksum mismatch")


@pytest.mark.parametrize("checksums", [True, False])
def test_seeds_tensor_against_the_config(dirs, tmp_path, checksums):
    d = _copy(dirs, tmp_path, checksums)

    def reseed(t):
        t[f"{LAYER}.seeds"] = torch.tensor([7, 8], dtype=torch.int64)
    _rewrite(d, reseed)
    _refused_everywhere(d, f"{LAYER}.seeds" + (" .*checksum mismatch" if checksums else " .*differs from the seeds"))


def test_a_changed_config_is_refused(dirs, tmp_path, capsys):
    d = _copy(dirs, tmp_path)
    text = (d / "config.json").read_text()
    assert '"rms_norm_eps": 1e-05' in text
    (d / "config.json").write_text(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-04'))
    _refused_everywhere(d, "config.json was changed")
    assert cli(["info", str(d)]) == 2
    assert "config.json was changed" in _error(capsys)


def test_an_edited_tokenizer_or_generation_config_is_said_not_refused(dirs, tmp_path, capsys):
    """A chat template or end-of-turn id edited after quantizing is common: the model loads, with a warning naming
    the file, and `pvq info` reports it; the weights and config.json stay checked."""
    d = _copy(dirs, tmp_path)
    with open(d / "tokenizer.json", "ab") as f:
        f.write(b" ")
    with pytest.warns(UserWarning, match="tokenizer.json: changed since pvq wrote it"):
        pvq.load(d)
    assert cli(["info", str(d)]) == 0
    assert "changed since pvq wrote them: tokenizer.json" in capsys.readouterr().out


@pytest.mark.parametrize("cut", [1, 100, 0.5])
def test_info_on_a_truncated_file(dirs, tmp_path, capsys, cut):
    d = _copy(dirs, tmp_path, checksums=False)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:int(len(data) * cut) if cut < 1 else len(data) - cut])
    assert cli(["info", str(d)]) == 2
    assert "truncated" in _error(capsys)
    _refused_everywhere(d, "truncated")


def test_an_intact_directory_loads_everywhere(dirs, capsys):
    ids = torch.tensor([[1, 5, 9, 3]])
    a = pvq.load(dirs / "q")[0](ids).logits
    assert torch.equal(a, _from_pretrained(dirs / "q")(ids).logits)
    assert cli(["info", str(dirs / "q")]) == 0
    assert "every checksum matches" in capsys.readouterr().out


def test_transformers_without_pvq_refuses_instead_of_random_weights(dirs):
    # transformers skips a quant_method it does not know and would fill the missing weights at random
    import subprocess
    import sys
    code = ("from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(dirs / 'q')!r})\nprint('LOADED')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "mismatch" in r.stderr.lower()
