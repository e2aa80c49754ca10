"""Models bigger than memory (issue "Any size"): a safetensors folder is read one block at a time into a model
built without weights, and the output is written as it goes, in shards when it is big. Tiny random models."""
import json

import pytest
import torch
from safetensors.torch import load_file

import pvq
from pvq import api, checkpoint
from pvq.checkpoint import PVQFormatError
from pvq.cli import main as cli
from pvq.models import streaming
from pvq.models.loading import load_skeleton, streamable, tiny_model, tiny_tokenizer
from pvq.settings import QuantConfig
from tiny_gguf import moe_gguf

IDS = torch.tensor([[1, 7, 42, 99, 3, 250, 17]])


def _folder(root, name, dtype=torch.float32, shard=None, **overrides):
    m = tiny_model("llama", num_hidden_layers=3, **overrides).to(dtype)
    m.save_pretrained(root / name, **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer().save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {"single": _folder(root, "single"),
            "shards": _folder(root, "shards", torch.bfloat16, shard="60KB"),
            "tied": _folder(root, "tied", tie_word_embeddings=True),
            "tied-shards": _folder(root, "tied-shards", torch.bfloat16, shard="60KB", tie_word_embeddings=True)}


def _files(d):
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


@pytest.mark.parametrize("which", ["single", "shards", "tied"])
@pytest.mark.parametrize("method", ["pvq", "pvq-gptq"])
def test_streamed_equals_loaded_whole(folders, tmp_path, which, method):
    src = folders[which]
    if which == "shards":
        assert (src / "model.safetensors.index.json").is_file()
    assert streamable(str(src))
    args = ["--method", method, "--bits", "3", "--nsamples", "2", "--seqlen", "32", "--no-progress"]
    assert cli(["quantize", str(src), *args, "-o", str(tmp_path / "s")]) == 0
    assert cli(["quantize", str(src), *args, "--no-stream", "-o", str(tmp_path / "w")]) == 0
    assert _files(tmp_path / "s") == _files(tmp_path / "w")  # byte for byte


@pytest.mark.parametrize("which, method, embed", [("single", "pvq-gptq", "4"), ("shards", "pvq-gptq", "4"),
                                                 ("shards", "pvq", "4"), ("tied", "pvq-gptq", "4"),
                                                 ("tied", "pvq-gptq", "head"), ("tied-shards", "pvq", None)])
def test_streamed_equals_loaded_whole_with_the_head_and_embeddings_quantized(folders, tmp_path, which, method, embed):
    """Streamed, the head and embedding are read as stored (bfloat16 in the shards), not in float32: the same bytes;
    a tied head quantized alone leaves its twin dense (read as stored, stored in float16)."""
    args = ["--method", method, "--bits", "3", "--head-bits", "4", *(["--embed-bits", embed] if embed else []),
            "--nsamples", "2", "--seqlen", "32", "--no-progress"]
    assert cli(["quantize", str(folders[which]), *args, "-o", str(tmp_path / "s")]) == 0
    assert cli(["quantize", str(folders[which]), *args, "--no-stream", "-o", str(tmp_path / "w")]) == 0
    assert _files(tmp_path / "s") == _files(tmp_path / "w")
    layers = json.loads((tmp_path / "s" / "config.json").read_text())["quantization_config"]["layers"]
    assert layers["lm_head"]["kind"] == "head"
    if embed is None or embed == "head":  # the dense twin of a tied head, or the head's rows
        assert "model.embed_tokens" not in layers
    else:
        assert layers["model.embed_tokens"]["kind"] == "embedding"


def test_blocks_are_read_in_turn_and_released(folders, tmp_path, monkeypatch):
    model, tok, reader = load_skeleton(str(folders["single"]))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"  # buffers are real
    events = []
    get = reader.get
    monkeypatch.setattr(reader, "get", lambda name: events.append(("read", name)) or get(name))
    real_add = checkpoint.Writer.add_block

    def add_block(self, index, tensors, *a, **k):
        events.append(("write", sorted(tensors)[0]))
        return real_add(self, index, tensors, *a, **k)
    monkeypatch.setattr(checkpoint.Writer, "add_block", add_block)
    cfg = QuantConfig(method="pvq", bits=3)
    with checkpoint.Writer(tmp_path / "out") as w:
        api.quantize(model, cfg, progress=False, reader=reader, writer=w)
        for block in model.model.layers:  # written and given back
            assert all(t.device.type == "meta" for t in [*block.parameters(), *block.buffers()])
        w.finish(model, tok)
    reads = [i for i, e in enumerate(events) if e[0] == "read" and ".layers." in e[1]]
    writes = [i for i, e in enumerate(events) if e[0] == "write" and ".layers." in e[1]]
    for b in range(3):  # block b is read after block b-1 was written
        first = min(i for i in reads if f".layers.{b}." in events[i][1])
        assert b == 0 or first > writes[b - 1]
    with torch.no_grad():
        got = pvq.load(tmp_path / "out", decode="once")[0](IDS).logits
    assert torch.isfinite(got).all()


def test_sharded_output_loads_everywhere(folders, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    model, tok, reader = load_skeleton(str(folders["single"]))
    with checkpoint.Writer(tmp_path / "sharded", shard_bytes=8_000) as w:
        api.quantize(model, QuantConfig(method="pvq", bits=3), progress=False, reader=reader, writer=w)
        w.finish(model, tok)
    out = tmp_path / "sharded"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert cli(["quantize", str(folders["single"]), "--method", "pvq", "--bits", "3", "--no-progress",
                "-o", str(tmp_path / "one")]) == 0
    one = load_file(tmp_path / "one" / "model.safetensors")
    merged = {k: v for s in shards for k, v in load_file(out / s).items()}
    assert merged.keys() == one.keys() and all(torch.equal(merged[k], one[k]) for k in one)
    with torch.no_grad():
        want = pvq.load(tmp_path / "one")[0](IDS).logits
        assert torch.equal(pvq.load(out)[0](IDS).logits, want)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(IDS).logits, want)
    assert cli(["info", str(out)]) == 0
    assert f"{len(shards)} shards" in capsys.readouterr().out
    (out / shards[1]).unlink()
    with pytest.raises(PVQFormatError, match="missing"):
        pvq.load(out)
    assert cli(["info", str(out)]) == 2


def test_an_error_in_the_middle_leaves_nothing(folders, tmp_path, monkeypatch):
    model, tok, reader = load_skeleton(str(folders["single"]))
    seen, real = [], api.rotated_rows

    def fail_in_block_2(w, seeds):
        seen.append(sorted(p.name for p in tmp_path.glob("out.tmp-*/*")))
        if len(seen) > 14:  # blocks 0 and 1 are written by then
            raise ValueError("a fault in block 2")
        return real(w, seeds)
    monkeypatch.setattr(api, "rotated_rows", fail_in_block_2)
    with pytest.raises(ValueError, match="a fault in block 2"):
        with checkpoint.Writer(tmp_path / "out", shard_bytes=20_000) as w:
            api.quantize(model, QuantConfig(method="pvq", bits=3), progress=False, reader=reader, writer=w)
    assert {"block-00000.safetensors", "block-00001.safetensors", "manifest.json"} <= set(seen[-1])  # on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_error_in_the_middle_leaves_nothing(folders, tmp_path, monkeypatch, capsys):
    real = api.rotated_rows
    calls = []

    def fail(w, seeds):
        calls.append(1)
        if len(calls) > 14:
            raise ValueError("a fault in block 2")
        return real(w, seeds)
    monkeypatch.setattr(api, "rotated_rows", fail)
    assert cli(["quantize", str(folders["single"]), "--method", "pvq", "--bits", "3", "--no-progress",
                "-o", str(tmp_path / "out")]) == 2
    assert "a fault in block 2" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_checkpoint_tensor_of_the_wrong_shape(folders, tmp_path):
    from safetensors.torch import save_file
    src = tmp_path / "bad"
    import shutil
    shutil.copytree(folders["single"], src)
    t = load_file(src / "model.safetensors")
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:5]
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    model, tok, reader = load_skeleton(str(src))
    with pytest.raises(streaming.CheckpointError, match=r"model.layers.1.mlp.up_proj.weight is \[5, 64\]"):
        api.quantize(model, QuantConfig(method="pvq", bits=3), progress=False, reader=reader)


def test_shard_size_option(folders, tmp_path, capsys):
    for bad in ("0", "12XB", "100KB"):
        assert cli(["quantize", str(folders["single"]), "--shard-size", bad, "-o", str(tmp_path / "x")]) == 2
        assert "argument --shard-size" in capsys.readouterr().err


def test_tensorfile_writes_what_safetensors_writes(tmp_path):
    import random

    from safetensors.torch import save_file

    from pvq import tensorfile
    dtypes = [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.int32, torch.bool]
    for trial in range(30):
        rng, g = random.Random(trial), torch.Generator().manual_seed(trial)
        t = {f"m{rng.randrange(99)}.t{i}": (torch.rand(tuple(rng.randrange(6) for _ in range(rng.randrange(4))),
                                                       generator=g) * 100).to(rng.choice(dtypes))
             for i in range(rng.randint(1, 12))}
        save_file(t, tmp_path / "a", metadata={"format": "pt"})
        tensorfile.write(tmp_path / "b", t, {"format": "pt"})
        assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
        e = tensorfile.entries(tmp_path / "a")
        assert all(torch.equal(e[k].read(), v) for k, v in t.items())
        tensorfile.write(tmp_path / "c", e, {"format": "pt"})  # copied from the file, one tensor at a time
        assert (tmp_path / "c").read_bytes() == (tmp_path / "a").read_bytes()


def test_a_gguf_too_large_for_the_cache_is_streamed(monkeypatch):
    from pvq.models.loading import default_model_path

    gguf = str(default_model_path())
    assert not streamable(gguf)  # small enough for the float cache: loaded whole (from the cache)
    monkeypatch.setenv("PVQ_GGUF_CACHE", "0")
    assert streamable(gguf)
    monkeypatch.setattr("pvq.models.loading.GGUF_CACHE_MAX_BYTES", 1 << 20)
    monkeypatch.delenv("PVQ_GGUF_CACHE")
    assert streamable(gguf)


@pytest.mark.slow
def test_gguf_streamed_equals_loaded_whole(tmp_path, monkeypatch):
    """The real SmolLM2 GGUF read a tensor at a time (dequantized, q/k rows permuted back as transformers
    does) gives the floats a whole load gives (the embeddings, a first and a last block: each kind of tensor;
    what pvq then does with them is the safetensors stream's, tested on every family)."""
    from pvq.models.loading import default_model_path, load_model

    monkeypatch.setenv("PVQ_GGUF_CACHE", "0")
    gguf = str(default_model_path())
    model, _, reader = load_skeleton(gguf)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert "model.layers.0.self_attn.q_proj.weight" in reader and "lm_head.weight" not in reader  # tied head
    last = model.config.num_hidden_layers - 1
    filled = streaming.materialize(model, reader, lambda n: not n.startswith("model.layers.")
                                   or n.startswith(("model.layers.0.", f"model.layers.{last}.")))
    monkeypatch.delenv("PVQ_GGUF_CACHE")
    whole, _ = load_model(gguf)  # the float folder transformers converted it to (cached: the same floats)
    assert len(filled) == 2 * 9 + 3  # 7 linears and 2 norms per block, the embedding (and tied head), final norm
    assert all(torch.equal(model.get_parameter(n), whole.get_parameter(n)) for n in filled)


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "minimax-m2", "qwen35moe", "qwen35"])
def test_a_mixture_of_experts_gguf_is_streamed_an_expert_at_a_time(tmp_path, monkeypatch, arch):
    """A GGUF stores each layer's experts stacked (3-D, quantized), and transformers merges gate and up into one
    tensor on loading: streamed, each expert's linears are read alone (its rows of the stacks: never a whole
    stack) and get the floats a whole load gives; quantized, the same bytes. Qwen3.5 goes through transformers'
    newer GGUF path, whose conversions (norms stored as w + 1, value heads tiled, ...) run on each tensor read."""
    from tiny_gguf import minimax_m2_gguf, qwen35_gguf

    from pvq.models.adapters import blocks_path
    from pvq.models.loading import load_model

    monkeypatch.setenv("PVQ_GGUF_CACHE", "0")
    path = tmp_path / f"{arch}.gguf"
    if arch == "minimax-m2":  # its router's score correction, a buffer, stored as exp_probs_b
        gguf = minimax_m2_gguf(path)
    else:
        gguf = qwen35_gguf(path, experts=4 * (arch == "qwen35moe")) if arch.startswith("qwen35") else moe_gguf(path, arch)
    assert streamable(gguf)
    model, _, reader = load_skeleton(gguf)
    reads = []
    read = reader._read
    monkeypatch.setattr(reader, "_read", lambda g, expert=None: reads.append((g, expert)) or read(g, expert))
    filled = streaming.materialize(model, reader, lambda n: True)
    whole, _ = load_model(gguf)
    blocks_path(whole)  # its experts split as the streamed model's are
    params = dict(whole.named_parameters())
    assert sorted(filled) == sorted(params)
    assert all(torch.equal(model.get_parameter(n), params[n]) for n in filled)
    held = [n for n, _ in whole.named_buffers() if n in whole.state_dict()]
    assert all(torch.equal(model.get_buffer(n), whole.get_buffer(n)) for n in held)
    assert arch != "minimax-m2" or (held and all(whole.get_buffer(n).any() for n in held))
    stacked = [r for r in reads if "_exps." in r[0]]
    assert len(stacked) == 2 * 3 * 4 * (arch != "qwen35") and all(e is not None for _, e in stacked)  # layers x stacks x experts
    if arch in ("qwen2moe", "qwen35", "minimax-m2"):  # the quantized bytes: the other families' check
        return
    args = ["--method", "pvq-gptq", "--bits", "3", "--nsamples", "2", "--seqlen", "32", "--no-progress"]
    assert cli(["quantize", gguf, *args, "-o", str(tmp_path / "s")]) == 0
    assert cli(["quantize", gguf, *args, "--no-stream", "-o", str(tmp_path / "w")]) == 0
    assert _files(tmp_path / "s") == _files(tmp_path / "w")


def test_a_gguf_transformers_could_keep_packed_is_read_as_floats(tmp_path, monkeypatch):
    """transformers keeps LFM2's (and Qwen3.5's) GGUF weights in their blocks, as modules that are no nn.Linear,
    when it can fetch a matmul kernel for them (online, with the `kernels` package): pvq loads them as floats all
    the same (here the kernel is faked), and the streamed file gives the same floats."""
    import transformers.quantizers.quantizer_gguf as quantizer
    from tiny_gguf import lfm2_gguf

    from pvq.models.loading import load_model

    monkeypatch.setenv("PVQ_GGUF_CACHE", "0")
    gguf = lfm2_gguf(tmp_path / "lfm2.gguf")
    plain, _ = load_model(gguf)
    monkeypatch.setattr(quantizer, "get_gguf_kernel", lambda: type("Kernel", (), {"supports": lambda *a: True})())
    whole, _ = load_model(gguf)
    assert all(isinstance(whole.get_submodule(n), torch.nn.Linear) for n, m in plain.named_modules()
               if isinstance(m, torch.nn.Linear))
    a, b = plain.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, _, reader = load_skeleton(gguf)
    filled = streaming.materialize(model, reader, lambda n: True)
    assert all(torch.equal(model.get_parameter(n), whole.get_parameter(n)) for n in filled)


def test_collections_between_blocks_leave_out_what_lived_before(monkeypatch):
    """quantize freezes the objects alive when it starts (imported modules, the model's modules), so the
    garbage collection between blocks walks only what it made, and hands them back at the end; a float
    weight it replaces is freed during the run all the same. A caller's own gc.freeze is left as it is."""
    import gc
    import weakref

    gc.unfreeze()  # as in a process that froze nothing (conftest freezes the test process's heap)
    model = tiny_model("llama", num_hidden_layers=3)
    first = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)
    seen = []
    real = api.release_memory
    monkeypatch.setattr(api, "release_memory", lambda: (real(), seen.append((gc.get_freeze_count(), first()))))
    api.quantize(model, QuantConfig(method="pvq", bits=3.0), progress=False)
    assert len(seen) == 3 and all(frozen > 0 and w is None for frozen, w in seen)
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        api.quantize(tiny_model("llama", num_hidden_layers=3), QuantConfig(method="pvq", bits=3.0), progress=False)
        assert gc.get_freeze_count() > 0  # not handed back by quantize
    finally:
        gc.unfreeze()


def test_offloaded_activations_give_the_same_bytes(folders, tmp_path, monkeypatch, capsys):
    """--offload keeps the calibration activations in memory-mapped files (removed at the end); the output is
    byte for byte the one calibrated in memory. Without the option it happens when they would not fit."""
    from pvq import offload

    src = folders["single"]
    args = ["--method", "pvq-gptq", "--bits", "3", "--nsamples", "3", "--seqlen", "32", "--no-progress"]
    assert cli(["quantize", str(src), *args, "-o", str(tmp_path / "mem")]) == 0
    made = []
    real = offload.ActivationFiles.empty_like
    monkeypatch.setattr(offload.ActivationFiles, "empty_like", lambda self, t: made.append(self.folder) or real(self, t))
    assert cli(["quantize", str(src), *args, "--offload", str(tmp_path / "acts"), "-o", str(tmp_path / "off")]) == 0
    assert "kept in files under" in capsys.readouterr().err
    assert len(made) == 4 and made[0].parent == tmp_path / "acts"  # block 0's inputs, then each block's outputs
    assert list((tmp_path / "acts").iterdir()) == []  # removed at the end
    assert _files(tmp_path / "off") == _files(tmp_path / "mem")
    monkeypatch.setattr(offload, "available_bytes", lambda: 1000)  # a machine where they would not fit
    assert cli(["quantize", str(src), *args, "-o", str(tmp_path / "auto")]) == 0
    assert len(made) == 8 and made[-1].parent == tmp_path
    assert _files(tmp_path / "auto") == _files(tmp_path / "mem")
    assert not any(p.name.endswith(".pvq-activations") for p in tmp_path.iterdir())
    (tmp_path / ".auto.pvq-activations").mkdir()  # what a killed run left: cleared by the next
    (tmp_path / ".auto.pvq-activations" / "activations-0.bin").write_bytes(b"x" * 10)
    assert cli(["quantize", str(src), *args, "-o", str(tmp_path / "auto"), "--force"]) == 0
    assert not (tmp_path / ".auto.pvq-activations").exists()
