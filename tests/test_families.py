"""Every tested family (models.loading.SUPPORTED_MODEL_TYPES) found, quantized, saved, loaded and run.

Tiny random models built from each family's transformers config: blocks and linears are discovered
(models/adapters.py), so this is what proves a family works, not a table entry."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

import pvq  # noqa: F401  (registers pvq with transformers)
from pvq import api
from pvq.checkpoint import save
from pvq.hf import PVQConfig
from pvq.loader import load
from pvq.models.adapters import block_linear_names, blocks_path, carry, check_supported, set_module
from pvq.models.classes import auto_class
from pvq.models.loading import SUPPORTED_MODEL_TYPES, tiny_model, tiny_tokenizer
from pvq.modules.linear import Rotations
from pvq.settings import QuantConfig
from pvq.transforms.rotate import layer_seeds, rotate_weight

EXTRA = {"gemma2": {"sliding_window": 8}, "mistral": {"sliding_window": 8}}  # windows shorter than IDS


def family_model(mt: str):
    return tiny_model(mt, **EXTRA.get(mt, {}))


IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


class _Rotated(nn.Module):
    """A linear run as pvq runs it, in its rotated basis, but unquantized: y = ((x R_in) W'^T) R_out^T + b."""

    def __init__(self, lin: nn.Linear, seeds):
        super().__init__()
        self.rot = Rotations(lin.out_features, lin.in_features, seeds)  # what QuantLinear runs
        self.w = rotate_weight(lin.weight.detach().float(), seeds)
        self.bias = lin.bias

    def forward(self, x):
        y = self.rot.out_of(F.linear(self.rot.into(x), self.w))
        return y if self.bias is None else y + self.bias


@pytest.mark.parametrize("mt", SUPPORTED_MODEL_TYPES)
@torch.no_grad()
def test_rotated_unquantized_gives_the_original_logits(mt):
    model = family_model(mt)
    ref = model(IDS).logits
    for name, lin in block_linear_names(model):
        set_module(model, name, _Rotated(lin, layer_seeds(0, name, True)))
    assert (model(IDS).logits - ref).abs().max() < 1e-3


# pvq-gptq runs every family's blocks (calibration, Hessians, the solver); the data-free methods only
# find, replace and store linears, so a few families of each kind stand for the rest
DATA_FREE = ("llama", "gemma2", "qwen3_moe", "gpt_oss", "deepseek_v3", "falcon_h1")


@pytest.mark.parametrize("mt,method", [(mt, "pvq-gptq") for mt in SUPPORTED_MODEL_TYPES]
                         + [(mt, m) for mt in DATA_FREE for m in ("rtn", "pvq")])
@torch.no_grad()
def test_family_quantize_save_load_generate(mt, method, tmp_path):
    model = family_model(mt)
    linears = len(block_linear_names(model))
    assert linears >= 2 * 2  # per block at least an input and an output linear (a Mamba-2 mixer has only those)
    cfg = QuantConfig(method=method, bits=4.25, nsamples=4, seqlen=32)
    summary = api.quantize(model, cfg, IDS if cfg.uses_data else None, progress=False)
    assert summary["layers"] == linears
    want = model(IDS).logits
    save(model, tiny_tokenizer(), tmp_path)
    loaded, _ = load(tmp_path, decode="once")
    assert torch.equal(loaded(IDS).logits, want)
    # decoded once as pvq.load's model is: on the fly the sums run in another order, and a family that picks keys
    # by top-k (Mistral Large 4's indexer) can then pick others (test_pipeline compares the two modes)
    hf = auto_class(loaded.config).from_pretrained(tmp_path, quantization_config=PVQConfig(decode="once"))
    assert (hf(IDS).logits - want).abs().max() < 1e-4
    out = hf.generate(IDS[:1, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)


def test_blocks_without_a_linear_to_quantize_are_one_clear_line():
    model = tiny_model("llama", hidden_size=8, intermediate_size=8, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=4)  # every linear narrower than adapters.MIN_ROWS: gates, kept dense
    with pytest.raises(ValueError, match="unsupported architecture 'llama'.*model.layers hold no nn.Linear"):
        check_supported(model)


@torch.no_grad()
def test_a_looped_model_is_refused_for_calibration_with_one_line():
    """Dory runs its recurrent layers once per loop, the loops joined by the model's own code: handing each
    block's output to the next block once is not its computation. The data-free methods run no block."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("dory", hidden_size=64, intermediate_size=128, num_hidden_layers=3, head_dim=16,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, n_input_layers=1,
                                  n_output_layers=1, n_recurrent_loops=2, sliding_window=8)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="'dory': its forward runs block 1 again after block 1 .*looped"):
        api.quantize(model, QuantConfig(method="pvq-gptq", bits=4.25, nsamples=4, seqlen=32), IDS, progress=False)
    assert api.quantize(model, QuantConfig(method="pvq", bits=4.25), None, progress=False)["layers"] == 3 * 8


@torch.no_grad()
def test_gpt2_conv1d_becomes_the_same_linear():
    """GPT-2's Conv1D (weight stored [in, out]) is swapped for the nn.Linear of its transpose: same outputs."""
    model = family_model("gpt2")
    ref = model(IDS).logits
    conv = model.transformer.h[0].attn.c_attn
    w = conv.weight.detach().clone()
    blocks_path(model)
    lin = model.transformer.h[0].attn.c_attn
    assert type(lin) is nn.Linear and lin.pvq_transposed and torch.equal(lin.weight, w.T)
    assert torch.equal(model(IDS).logits, ref)


@torch.no_grad()
def test_a_base_model_checkpoint_streams_under_the_models_names(tmp_path):
    """The hub's GPT-2 stores its base model (`h.0.attn.c_attn.weight`, the model's `transformer.h.0...`), each
    Conv1D weight as [in, out]: streamed, every tensor is the one the whole load gives."""
    from pvq.models.loading import load_skeleton
    from pvq.models.streaming import materialize

    model = family_model("gpt2")
    model.transformer.save_pretrained(tmp_path)
    model, _, reader = load_skeleton(str(tmp_path))
    whole = family_model("gpt2")
    blocks_path(model), blocks_path(whole)
    assert sorted(materialize(model, reader, lambda n: True)) == sorted(dict(whole.named_parameters(remove_duplicate=False)))
    assert all(torch.equal(p, whole.get_parameter(n)) for n, p in model.named_parameters())


@pytest.mark.parametrize("mt", ["mamba", "jamba"])
def test_a_linear_whose_weight_the_family_reads_itself_stays_dense(mt):
    """Mamba's mixer multiplies by `self.dt_proj.weight` (a QuantLinear holds codes, no weight): dt_proj stays
    dense, the mixer's other linears are quantized; BLOOM reads its linears' weights only when pretraining_tp > 1,
    a branch on the module's settings, so they are quantized."""
    from pvq.models.adapters import block_linears, blocks

    mixers = [b for b in blocks(tiny_model(mt)) if hasattr(b, "mamba") or hasattr(b, "mixer")]
    names = set(block_linears(mixers[0]))
    prefix = "mixer." if mt == "mamba" else "mamba."
    assert {f"{prefix}in_proj", f"{prefix}x_proj", f"{prefix}out_proj"} <= names and f"{prefix}dt_proj" not in names
    assert {"self_attention.dense", "mlp.dense_4h_to_h"} <= set(block_linears(blocks(tiny_model("bloom"))[0]))


def test_guard_tensors_are_expected_under_the_names_transformers_renames_them_to(tmp_path):
    """Mistral Large 4's conversion mapping renames `.experts.` to `.mlp.experts.` even in the names the model has
    already: the empty tensors pvq stores under its experts' weight names are expected under the renamed names
    too, so from_pretrained of the directory reports nothing unexpected."""
    model = family_model("mistral_large4")
    api.quantize(model, QuantConfig(method="pvq", bits=4.25), progress=False)
    save(model, tiny_tokenizer(), tmp_path)
    _, info = auto_class(model.config).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]


def test_a_linear_whose_weight_a_block_reads_through_its_children_stays_dense():
    """Ergo's block reads `self.self_attn.o_proj.weight.dtype`: o_proj stays dense in every block, the
    attention's other linear is quantized."""
    from pvq.models.adapters import block_linears, blocks

    for block in blocks(tiny_model("ergo")):
        names = set(block_linears(block))
        assert "self_attn.qkv_proj" in names and "self_attn.o_proj" not in names


@torch.no_grad()
def test_token_ids_held_per_sample_follow_the_samples_into_each_shard():
    """DeepSeek-V4's blocks read each sample's token ids (adapters.PerToken): calibrated in two shards, each
    shard's blocks get its own samples' ids, so the Hessians are those of one pass (the Ray workers' shards
    are cut the same way, models.shards.shard_bounds)."""
    from pvq.models.adapters import blocks, capture_block_inputs
    from pvq.models.shards import sharded_hessians

    model = family_model("deepseek_v4")
    hidden, kwargs = capture_block_inputs(model, IDS)
    one = sharded_hessians(blocks(model)[0], hidden, kwargs[0], 1)
    two = sharded_hessians(blocks(model)[0], hidden, kwargs[0], 2)
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)


def test_tuning_on_samples_of_its_own_gives_the_blocks_those_samples_inputs(monkeypatch):
    """--finetune model on tuning data of its own (tune_ids): the unquantized stream it matches runs each block with
    the tuning samples' own per-sample inputs (DeepSeek-V4's token ids for its hash routing), not the calibration
    samples': at the end of the blocks it gives the unquantized model's logits on the tuning samples."""
    from pvq.models.adapters import logits_after_blocks

    model = family_model("deepseek_v4")
    tune = IDS.flip(1)[:2]
    with torch.no_grad():
        want = model(tune).logits
    streams = []
    teacher = api.Teacher.of
    monkeypatch.setattr(api.Teacher, "of", lambda m, hidden, ids, **k: streams.append(
        logits_after_blocks(m, hidden, ids)) or teacher(m, hidden, ids, **k))
    cfg = QuantConfig(method="pvq-gptq", bits=4.25, nsamples=4, seqlen=32, finetune="model", finetune_model_steps=1)
    api.quantize(model, cfg, IDS, progress=False, tune_ids=tune)
    assert (streams[0] - want).abs().max() < 1e-4


@torch.no_grad()
def test_a_linear_class_that_computes_something_else_stays_dense():
    """DeepSeek-V4's grouped output projection is an nn.Linear whose forward is block-diagonal over head groups:
    replaced by x W^T it would be another function, so it stays dense; Falcon's nn.Linear subclass computes
    x W^T + b and is quantized."""
    from pvq.models.adapters import block_linears, blocks

    assert not any(n.endswith("o_a_proj") for n in block_linears(blocks(tiny_model("deepseek_v4"))[0]))
    assert "self_attention.dense" in block_linears(blocks(tiny_model("falcon"))[0])


def test_what_a_block_hands_the_next_is_carried_and_without_it_one_clear_line():
    """GLM-5 (glm_moe_dsa) hands each block's indexer choices to the next: a layer with an indexer of its own
    ignores them, a layer that shares its predecessor's choices reads them. pvq runs one block at a time: what a
    block hands on is held for every sample and given to the next block of its stream (carry; the replay test
    checks the logits). Where nothing carries it (a Ray worker), the reading block stops with one line naming
    the block and the argument, not a traceback from inside the model, nor a run on something else."""
    from pvq.models.adapters import blocks, call_block, capture_block_inputs

    model = tiny_model("glm_moe_dsa", indexer_types=["full", "shared"])
    with torch.no_grad():
        hidden, kwargs = capture_block_inputs(model, IDS)
        with pytest.raises(ValueError, match="'glm_moe_dsa': block 1 reads 'prev_topk_indices', which block 0 hands "
                                             "it beside the hidden states"):
            call_block(blocks(model)[1], hidden, kwargs[1])


def test_state_a_block_writes_for_later_ones_is_carried_on_each_stream():
    """Gemma 4's key-value sharing: a layer stores its keys and values in a mapping every block is given, and later
    layers read them. pvq runs one block at a time, batch by batch: what a block writes is held for every sample
    and handed to the later blocks of its own stream (carry). The unquantized stream of --asymmetric, run beside a
    quantized one whose keys and values differ, must read its own: the model's logits at the end (with the
    quantized stream's, they move). Run without carrying, a reading block stops with one line."""
    from pvq.models.adapters import (blocks, call_block, capture_block_inputs, logits_after_blocks, run_block,
                                     run_carrying)
    from pvq.models.shards import sharded_asymmetric_sums

    model = family_model("gemma4_text")  # layers 2 and 3 read what layers 0 and 1 store
    with torch.no_grad():
        want = model(IDS).logits
        hidden, kwargs = capture_block_inputs(model, IDS)
        fp, fp_kwargs = hidden.clone(), [dict(kw) for kw in kwargs]
        noisy = hidden + 0.5 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
        for i, block in enumerate(blocks(model)):
            written = {}
            _, _, fp = sharded_asymmetric_sums(block, noisy, fp, kwargs[i], 2, ref_kwargs=fp_kwargs[i],
                                               ref_written=written)
            carry(fp_kwargs, i, written, fp.shape[0])
            noisy = run_carrying(block, noisy, kwargs, i)
        assert (logits_after_blocks(model, fp, IDS) - want).abs().max() < 1e-5
        mixed = capture_block_inputs(model, IDS)[0]  # the unquantized stream reading the other stream's state
        for i, block in enumerate(blocks(model)):
            mixed = run_block(block, mixed, kwargs[i])
        assert (logits_after_blocks(model, mixed, IDS) - want).abs().max() > 1e-3
        with pytest.raises(ValueError, match="Gemma4TextDecoderLayer reads 'sliding_attention' from its argument "
                                             "'shared_kv_states', which an earlier block writes"):
            call_block(blocks(model)[2], hidden, capture_block_inputs(model, IDS)[1][2])


@pytest.mark.parametrize("mt,dies_at", [("gemma4_text", 3)])
def test_a_run_killed_after_a_block_that_writes_state_resumes_to_the_same_bytes(tmp_path, monkeypatch, mt, dies_at):
    """What the blocks before a killed run's last saved activations wrote for later ones (Gemma 4's shared keys
    and values) is saved with those activations: the resumed run, on both streams of --asymmetric, writes the
    bytes of an uninterrupted one (without it, block 3 could not read what block 1 stored), with the block
    tuning's targets computed from what was carried. What a block hands the next is saved the same way
    (test_resume.test_what_blocks_carry_is_saved_with_the_activations_and_read_back_in_sample_order; ("hy_v4", 1)
    here runs it whole, 10 s)."""
    import subprocess
    import sys

    from pvq import checkpoint

    # bfloat16 forwards write bfloat16 keys and values; the block tuning's targets run without autocast
    cfg = QuantConfig(method="pvq-gptq", bits=3.25, nsamples=4, seqlen=32, asymmetric=0.5, calib_dtype="bfloat16",
                      finetune="blocks", finetune_steps=1)
    tok = tiny_tokenizer()

    def run(out):
        with checkpoint.Writer(out, fingerprint={"test": 1}) as w:
            model = family_model(mt)
            api.quantize(model, cfg, IDS, progress=False, writer=w)
            w.finish(model, tok)
        return {f.name: f.read_bytes() for f in sorted(out.iterdir())}

    whole = run(tmp_path / "whole")
    add_block = checkpoint.Writer.add_block

    def dies(self, index, *a, **k):
        if index == dies_at:
            raise KeyboardInterrupt
        return add_block(self, index, *a, **k)
    monkeypatch.setattr(checkpoint.Writer, "add_block", dies)
    monkeypatch.setattr(checkpoint.Writer, "abort", lambda self: None)  # what a kill -9 leaves
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    monkeypatch.undo()
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (left,) = tmp_path.glob("killed.tmp-*")
    left.rename(tmp_path / f"killed.tmp-{dead.pid}")  # a process that no longer runs
    assert run(tmp_path / "killed") == whole


def test_fused_experts_without_the_experts_interface_are_one_clear_line():
    model = tiny_model("qwen2_moe")
    del model.model.layers[0].mlp.experts.has_gate  # what a family outside transformers' experts interface lacks
    with pytest.raises(ValueError, match=r"'qwen2_moe'.*model\.layers\.0\.mlp\.experts .*3-D.*no has_gate"):
        check_supported(model)


# Llama 4's experts are called another way (every token, scaled by its score): test_llama4_experts_see_their_own_tokens
MOE = [mt for mt in SUPPORTED_MODEL_TYPES if "moe" in mt and mt != "jetmoe" or mt in ("mixtral", "gpt_oss", "deepseek_v2", "deepseek_v3",
                                                                    "deepseek_v32",
                                                                    "dots1", "qwen3_next", "minimax", "minimax_m2",
                                                                    "flex_olmo", "jamba", "mimo_v2_flash",
                                                                    "kimi_linear", "gemma4_text", "axk1", "axk2",
                                                                    "sarvam_mla", "aria_text", "kolibri1", "laguna",
                                                                    "mellum", "minimax_m3_vl_text", "dots3_note_text",
                                                                    "lara_mini", "bailing_hybrid", "longcat_flash",
                                                                    "glm_moe_dsa", "deepseek_v4", "ergo", "dbrx",
                                                                    "qwen4_exp_text", "mistral4")]


@pytest.mark.parametrize("mt", MOE)
@torch.no_grad()
def test_each_expert_gets_the_hessian_of_the_tokens_routed_to_it(mt):
    """One linear per expert, its Hessian from exactly the tokens its router sent it; the router stays dense."""
    from pvq.models.adapters import block_hessians, block_linears, blocks, capture_block_inputs, run_carrying
    from pvq.models.experts import fused_leaves

    model = tiny_model(mt)
    hidden, kwargs = capture_block_inputs(model, IDS)
    routed_experts = lambda n: n.rpartition(".")[2] == "experts"  # noqa: E731  (not AFMoE's shared_experts)
    j = next(j for j, b in enumerate(blocks(model)) if any(routed_experts(n) for n, _ in b.named_modules()))
    for k in range(j):  # the blocks before the first with experts (DeepSeek-style: dense first)
        hidden = run_carrying(blocks(model)[k], hidden, kwargs, k)
    block = blocks(model)[j]
    experts = next(m for n, m in block.named_modules() if routed_experts(n))
    name = next(n for n, m in block.named_modules() if m is experts)
    routed = []
    experts.register_forward_pre_hook(lambda m, a: routed.append((a[0].clone(), a[1].clone(), a[2].clone())))
    hess, _ = block_hessians(block, hidden, kwargs[j])
    x = torch.cat([h.reshape(-1, h.shape[-1]) for h, _, _ in routed]).double()  # DBRX's experts get [B, T, H]
    # a slot of weight 0 is no routing (LongCat-Flash's identity experts park their tokens so)
    idx = torch.cat([i.masked_fill(w == 0, -1) for _, i, w in routed])
    first = next(iter(fused_leaves(experts).values()))[0]  # gate_up, or up (or DBRX's gate)
    n_experts = len(getattr(experts, first))
    fused = [p for m in block.modules() if not isinstance(m, nn.modules.conv._ConvNd)
             for p in m.parameters(recurse=False) if p.dim() == 3]  # a Mamba block's convolution is 3-D too, and stays
    assert n_experts == 4 and not fused
    for e in range(n_experts):
        xe = x[(idx == e).any(-1)]
        assert xe.shape[0] > 0
        want = xe.T @ xe / xe.shape[0]  # float32 products summed in float64: to a few ulps of its largest entry
        assert torch.allclose(hess[f"{name}.{first}.{e}"], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    lin = block_linears(block)
    # (Gemma 4 E2B's per_layer_input_gate is a projection, not a router: quantized)
    assert f"{name}.down.0" in lin and not any(n.endswith(("gate", "router")) and lin[n].out_features == n_experts
                                               for n in lin)


class _RunTwice(nn.Module):
    """q and k read the hidden states; v also projects a zero state of one token (Zaya's delayed values)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q, self.k, self.v = (nn.Linear(16, 16) for _ in range(3))
        for lin in (self.q, self.k, self.v):
            lin.weight.data = torch.randn(16, 16, generator=g)
            lin.bias.data = torch.randn(16, generator=g)

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x) - self.v(x.new_zeros(x.shape[0], 1, 16))


@torch.no_grad()
def test_a_linear_run_twice_in_a_call_gets_each_input_and_the_hessian_of_both():
    from pvq.models.adapters import BATCH, block_hessians

    block = _RunTwice()
    hidden = torch.randn(BATCH + 3, 5, 16, generator=torch.Generator().manual_seed(1))  # a second, partial batch
    hess, out = block_hessians(block, hidden, {}, keep=True)
    assert torch.equal(out, block(hidden))  # each call's own input (a hook handing back the first changed it)
    x = hidden.reshape(-1, 16).double()
    both = torch.cat([x, torch.zeros(hidden.shape[0], 16, dtype=torch.float64)])
    assert torch.allclose(hess["q"], x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6) and hess["k"] is hess["q"]
    assert torch.allclose(hess["v"], both.T @ both / both.shape[0], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_jetmoe_experts_of_attention_and_mlp_get_the_hessians_of_their_own_tokens():
    """JetMoE's experts (its MLP's and its attention's query and output projections) are stacked linears
    called with the tokens sorted by expert and each expert's count: one linear each, its Hessian from its share."""
    from pvq.models.adapters import block_hessians, blocks, capture_block_inputs

    model = tiny_model("jetmoe")
    block = blocks(model)[0]
    stacks = {n: m for n, m in block.named_modules() if hasattr(m, "linears")}
    assert sorted(stacks) == ["mlp.input_linear", "mlp.output_linear", "self_attention.experts.input_linear",
                              "self_attention.experts.output_linear"]
    calls = {n: [] for n in stacks}
    for n, m in stacks.items():
        m.register_forward_pre_hook(lambda m, a, n=n: calls[n].append(a[0].split(a[1])))
    hidden, kwargs = capture_block_inputs(model, IDS)
    hess, _ = block_hessians(block, hidden, kwargs[0])
    for n in stacks:
        for e in range(4):
            xe = torch.cat([parts[e] for parts in calls[n]]).double()
            assert 0 < xe.shape[0] < hidden.shape[0] * hidden.shape[1] * 2  # top 2 of 4
            assert torch.allclose(hess[f"{n}.linears.{e}"], xe.T @ xe / xe.shape[0], rtol=1e-5, atol=1e-7)


@torch.no_grad()
def test_an_expert_no_token_reached_is_rounded_without_data():
    model = tiny_model("mixtral")
    for layer in model.model.layers:  # the router never picks expert 3
        layer.mlp.gate.register_forward_hook(lambda m, a, out: (out[0], out[1], out[2].masked_fill(out[2] == 3, 0)))
    summary = api.quantize(model, QuantConfig(method="pvq-gptq", bits=4.25, nsamples=4, seqlen=32), IDS, progress=False)
    assert summary["uncalibrated"] == [f"model.layers.{i}.mlp.experts.{k}.3" for i in range(2) for k in ("gate_up", "down")]
    assert summary["layers"] == 2 * (4 + 2 * 4)


def test_blocks_the_forward_skips_on_text_are_rounded_without_data_and_run_beside_an_image(tmp_path, capsys):
    """Llama 3.2 Vision's cross-attention layers run only beside an image: on calibration text its forward skips
    them, so they hand their inputs on (adapters.SKIPPED), are rounded without data and named, streamed or loaded
    whole alike. Built with the vision tower (classes.WITH_TOWER), the quantized model reads an image through
    them."""
    src = tmp_path / "src"
    model = family_model("mllama")
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    tiles = model.config.vision_config.max_num_tiles
    image = dict(pixel_values=torch.randn(1, 1, tiles, 3, 28, 28, generator=torch.Generator().manual_seed(0)),
                 aspect_ratio_ids=torch.tensor([[1]]), aspect_ratio_mask=torch.ones(1, 1, tiles, dtype=torch.long),
                 cross_attention_mask=torch.ones(1, 9, 1, tiles, dtype=torch.long))
    ids = torch.cat([torch.tensor([[255]]), IDS[:1, :8]], dim=1)  # the image token, then text
    with torch.no_grad():
        seen = model(ids, **image).logits - model(ids).logits  # what the image does to the logits
    assert seen.abs().max() > 1e-3
    streamed = _streamed_and_whole_write_the_same_bytes(src, tmp_path)
    out = capsys.readouterr().out
    assert out.count("7 linears of 1 block that the model runs only beside an image") == 2
    assert "language_model.layers.1.cross_attn.q_proj" in out and "experts nobody" not in out
    loaded, _ = load(streamed)
    assert type(loaded).__name__ == "MllamaForConditionalGeneration"
    with torch.no_grad():
        got = loaded(ids, **image).logits - loaded(ids).logits
    assert F.cosine_similarity(got.flatten(), seen.flatten(), dim=0) > 0.9  # through the quantized cross-attention


@pytest.mark.parametrize("mt", ["phimoe", "llama4_text"])
@torch.no_grad()
def test_a_router_stays_dense_however_many_experts(mt):
    """With 16 experts a router has 16 outputs (MIN_ROWS); PhiMoE's and Llama 4's are nn.Linear subclasses
    whose own forward takes the top k: quantized, the swap to a QuantLinear would drop it."""
    model = tiny_model(mt, num_local_experts=16)
    router = next(m for n, m in model.named_modules() if n.endswith("router"))
    kind, weight = type(router), router.weight.clone()
    assert isinstance(router, nn.Linear) and router.out_features == 16
    names = [n for n, _ in block_linear_names(model)]
    assert not any("router" in n for n in names) and sum(".experts." in n for n in names) == 2 * 2 * 16
    api.quantize(model, QuantConfig(method="rtn", bits=4.25), None, progress=False)
    router = next(m for n, m in model.named_modules() if n.endswith("router"))
    assert type(router) is kind and torch.equal(router.weight, weight.half().float())  # dense, as float16 stores it
    assert torch.isfinite(model(IDS).logits).all()


@torch.no_grad()
def test_llama4_experts_see_their_own_tokens():
    """Llama 4 calls its experts with every token for every expert, each scaled by the router's score (zero
    where the router did not choose that expert): each expert's Hessian is that of its own tokens alone."""
    from pvq.models.adapters import block_hessians, blocks, capture_block_inputs

    model = tiny_model("llama4_text")
    block = blocks(model)[0]
    seen, scores = [], []
    block.feed_forward.experts.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    block.feed_forward.router.register_forward_hook(lambda m, a, out: scores.append(out[0].clone()))
    hidden, kwargs = capture_block_inputs(model, IDS)
    hess, _ = block_hessians(block, hidden, kwargs[0])
    x = torch.cat([t.view(4, -1, t.shape[-1]) for t in seen], dim=1).double()  # [experts, tokens, hidden]
    chosen = torch.cat([t.T for t in scores], dim=1) > 0
    assert torch.equal(chosen.sum(0), torch.full((x.shape[1],), 2))  # top 2 of 4
    for e in range(4):
        xe = x[e][chosen[e]]
        assert 0 < xe.shape[0] < x.shape[1] and not x[e][~chosen[e]].any()
        assert torch.allclose(hess[f"feed_forward.experts.gate_up.{e}"], xe.T @ xe / xe.shape[0], rtol=1e-5, atol=1e-7)


@torch.no_grad()
def test_a_vision_language_model_quantizes_its_language_model(tmp_path):
    """Gemma 3 with its vision tower: the blocks are the language model's (the tower has a list of as many),
    the tower stays dense, and an image runs through the saved and loaded model as through the quantized one."""
    model = family_model("gemma3")
    proj = model.model.multi_modal_projector.mm_input_projection_weight  # zeros at random init: no image would count
    proj.copy_(torch.randn(proj.shape, generator=torch.Generator().manual_seed(3)) / 8)
    names = [n for n, _ in block_linear_names(model)]
    assert len(names) == 14 and all(n.startswith("model.language_model.layers.") for n in names)
    api.quantize(model, QuantConfig(method="pvq-gptq", bits=4.25, nsamples=4, seqlen=32), IDS, progress=False)
    save(model, tiny_tokenizer(), tmp_path)
    ids = IDS[:1] % 250
    ids[0, 4:8] = model.config.image_token_index  # one image: mm_tokens_per_image tokens
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    want = model(input_ids=ids, pixel_values=pixels).logits
    assert not torch.equal(want, model(input_ids=ids, pixel_values=pixels.flip(-1)).logits)  # the image counts
    loaded, _ = load(tmp_path, decode="once")
    assert torch.equal(loaded(input_ids=ids, pixel_values=pixels).logits, want)


def test_blocks_are_found_where_each_family_keeps_them():
    assert blocks_path(family_model("gpt_neox")) == "gpt_neox.layers"
    assert blocks_path(family_model("llama")) == "model.layers"


@torch.no_grad()
def test_each_block_is_calibrated_with_its_own_mask():
    """gemma2 alternates sliding-window and full attention: the captured call arguments of block 1 are
    the full causal mask, not block 0's sliding one, and running the blocks with them gives the model."""
    from pvq.models.adapters import blocks, capture_block_inputs, run_block

    model = family_model("gemma2")
    hidden, kwargs = capture_block_inputs(model, IDS)
    assert len(kwargs) == 2
    m0, m1 = (getattr(kw["attention_mask"], "tensor", kw["attention_mask"]) for kw in kwargs)  # held per sample
    assert m0 is not None and m1 is not None and not torch.equal(m0, m1)  # 32 tokens > window 8
    for block, kw in zip(blocks(model), kwargs):
        hidden = run_block(block, hidden, kw)
    want = model(IDS, output_hidden_states=True).hidden_states[-1]
    assert (model.model.norm(hidden) - want).abs().max() < 1e-4


@torch.no_grad()
def test_cli_quantizes_a_saved_mixture_of_experts_folder(tmp_path, capsys):
    """A folder save_pretrained wrote (experts stored one tensor per expert, the hub's form) goes through
    `pvq quantize`, streamed (each expert's linear read from its own tensors), and the result runs."""
    from pvq.cli import main as cli

    src = tmp_path / "src"
    tiny_model("qwen3_moe").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    args = ["--method", "pvq-gptq", "--bits", "4.25", "--nsamples", "2", "--seqlen", "32", "--no-progress"]
    assert cli(["quantize", str(src), *args, "-o", str(tmp_path / "q")]) == 0
    assert "loading the whole model instead" not in capsys.readouterr().err
    model, tok = load(tmp_path / "q", decode="once")
    assert sum(".experts.gate_up." in n for n, _ in block_linear_names(model)) == 2 * 4
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert (hf(IDS).logits - model(IDS).logits).abs().max() < 1e-4
    assert hf.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 12)


def _streamed_and_whole_write_the_same_bytes(src, tmp_path):
    """`pvq quantize` of the folder src (pvq-gptq 4.25) streamed and with --no-stream write the same files, byte for
    byte; the streamed output's folder."""
    from pvq.cli import main as cli

    args = ["--method", "pvq-gptq", "--bits", "4.25", "--nsamples", "2", "--seqlen", "32", "--no-progress"]
    assert cli(["quantize", str(src), *args, "-o", str(tmp_path / "s")]) == 0
    assert cli(["quantize", str(src), *args, "--no-stream", "-o", str(tmp_path / "w")]) == 0
    files = sorted(f.name for f in (tmp_path / "w").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "s").iterdir())
    assert all((tmp_path / "s" / f).read_bytes() == (tmp_path / "w" / f).read_bytes() for f in files)
    return tmp_path / "s"


@pytest.mark.parametrize("mt", ["llama4", "qwen3_5_moe", "qwen4_exp"])
@torch.no_grad()
def test_cli_quantizes_the_language_model_of_a_saved_vision_language_folder(mt, tmp_path):
    """A Llama 4, Qwen3.5 or Qwen4-Exp checkpoint as the hub has it (vision model, projector, language model) loads for text
    generation without its vision parts, as transformers loads it; pvq quantizes that language model, streamed
    and whole to the same bytes, and the result runs the same through pvq.load and transformers."""
    from transformers import AutoModelForImageTextToText

    from pvq.models.loading import _tiny_config

    src = tmp_path / "src"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full = AutoModelForImageTextToText.from_config(_tiny_config(mt, {})).eval()
    full.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    text_only = AutoModelForCausalLM.from_pretrained(src)
    ids = IDS % 250  # below the image tokens
    assert torch.equal(text_only(ids).logits, full(ids).logits)
    out = _streamed_and_whole_write_the_same_bytes(src, tmp_path)
    model, _ = load(out, decode="once")
    experts = ".experts.gate_up." if mt == "llama4" else ".mlp.experts.gate_up."
    assert sum(experts in n for n, _ in block_linear_names(model)) == 2 * 4
    got = model(ids).logits
    assert (AutoModelForCausalLM.from_pretrained(out)(ids).logits - got).abs().max() < 1e-4
    assert 0 < (got - full(ids).logits).abs().max() < 0.5


@pytest.mark.parametrize("mt", ["llama", "falcon", "bamba", "openai-gpt", "xglm", "recurrent_gemma", "deepseek_v4",
                                "gemma4_text", "gemma3n_text", "glm_moe_dsa", "kolibri1_1", "qwen4_exp_text"])
@torch.no_grad()
def test_blocks_replayed_one_by_one_give_the_models_logits(mt):
    """Captured arguments, each block run on its own, then whatever follows the blocks: the model's logits,
    however the family takes a block's output (a tensor; item 0 of a tuple, Falcon; two unpacked, Bamba; item 0
    of a list, GPT-1: a tensor handed on there would lose all but the first sample) and however it hands a block
    its arguments (XGLM's mask and RecurrentGemma's positions positionally: a mask dropped would change them;
    DeepSeek-V4's token ids for its hash routing, each sample's own: the first sample's for all would too; Gemma 4
    E2B/E4B's per-layer inputs, floats computed from each sample's tokens, and the keys and values its first layers
    store for the last ones: test_state_a_block_writes_for_later_ones_is_carried_on_each_stream; Gemma 3n's
    AltUp hidden states [4 streams, batch, L, D], held batch first; GLM-5's indexer choices and Kolibri 1.1's index
    pools, which a block hands the next; Qwen4-Exp's token ids for its per-layer n-gram embeddings)."""
    from pvq.models.adapters import blocks, capture_block_inputs, logits_after_blocks, run_carrying

    model = family_model(mt)
    hidden, kwargs = capture_block_inputs(model, IDS)
    for i, block in enumerate(blocks(model)):
        hidden = run_carrying(block, hidden, kwargs, i)
    assert (logits_after_blocks(model, hidden, IDS) - model(IDS).logits).abs().max() < 1e-5


@pytest.mark.parametrize("mt", ["gpt_neox", "gemma2", "olmoe"])
@torch.no_grad()
def test_allocation_probes_run_whatever_follows_the_blocks(mt):
    """The sensitivity probes end in the family's own final norm and head (gpt_neox's final_layer_norm and
    embed_out, gemma2's logit soft-capping), so allocation plans any family."""
    from pvq.allocation.probes import fisher_sensitivities, sensitivities

    model = family_model(mt)
    base = float(torch.nn.functional.cross_entropy(model(IDS).logits[:, :-1].reshape(-1, 256), IDS[:, 1:].reshape(-1)))
    got = sensitivities(model, IDS, progress=False)
    assert abs(got["_base_loss"] - base) < 1e-4
    names = [n for n, _ in block_linear_names(model)]
    assert [k for k in got if not k.startswith("_")] == names
    assert all(torch.isfinite(torch.tensor(got[n]["dloss"])) for n in names)
    fisher = fisher_sensitivities(model, IDS, draws=1, progress=False)
    assert abs(fisher["_base_loss"] - base) < 1e-4
    assert [k for k in fisher if not k.startswith("_")] == names
    assert all(math.isfinite(fisher[n]["a"]) and fisher[n]["a"] >= 0 for n in names)


# Conv1D weights transposed as they are read (gpt2), a renamed head on disk (gpt_neox), position embeddings
# before the blocks (opt), a Mamba block's 3-D convolution that is no expert (falcon_h1), a vision tower beside
# the blocks with a 3-D pooling probe (gemma3), experts stored one tensor per expert, gate and up apart
# (qwen3_moe), experts stored fused and transposed, a slice each (gpt_oss), a language model stored under its
# older names, the base model's prefix put on name by name (llava), a vision tower's fused q/k/v split and
# permuted by transformers' conversion, run on the tensors as they are read (kimi_k25), experts stacked in two
# tensors a conversion concatenates, then sliced (step3p7), a layer's experts stacked and split into text and
# image experts by the family's own op, run on them all (ernie4_5_vl_moe), experts stacked along the first axis of
# 2-D tensors, the down projection's transposed (dbrx). (qwen4_exp's n-gram tables, stored in parts: in
# test_cli_quantizes_the_language_model_of_a_saved_vision_language_folder.)
# Every dense family passed this when it was written (gemma2's alternating masks, phi3's fused projections,
# starcoder2, phi, cohere too; mixtral's renamed experts as well; exaone, olmo_hybrid, llava_next,
# llava_onevision, param2moe, sarvam_moe, ergo, nemotron_h, kimi_linear, lara_mini and bailing_hybrid when
# conversions were first run on read); these keep it short.
STREAMED = ("gpt2", "gpt_neox", "opt", "falcon_h1", "gemma3", "qwen3_moe", "gpt_oss", "llava", "kimi_k25", "step3p7",
            "ernie4_5_vl_moe", "dbrx")  # and mllama: test_blocks_the_forward_skips_on_text_...


@pytest.mark.parametrize("mt", STREAMED)
def test_a_saved_folder_streams_to_the_same_bytes(mt, tmp_path):
    """Read block by block from the folder save_pretrained wrote (under the names transformers stores:
    gpt_neox's head is embed_out on disk), the output is byte-identical to quantizing the model loaded whole."""
    from pvq.models.loading import load_skeleton

    src = tmp_path / "src"
    family_model(mt).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    load_skeleton(str(src))  # streamable: no fallback to a whole load
    _streamed_and_whole_write_the_same_bytes(src, tmp_path)


def test_experts_named_by_regex_patterns_are_read_one_expert_at_a_time(tmp_path):
    """MiniMax-M3-VL's conversion names its experts with regexes (`\\.experts.*.w1.weight`): each expert's linear
    is still read from its own tensors (not the whole layer's, as an unknown conversion would be)."""
    from pvq.models.loading import load_skeleton

    family_model("minimax_m3_vl").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    _, _, reader = load_skeleton(str(tmp_path))
    gate_up = [n for n in reader.parts if ".experts.gate_up." in n]
    assert len(gate_up) == 2 * 4 and all(len(reader.parts[n]) == 2 for n in gate_up)  # gate and up of its own
    assert not any(".experts." in k for k in reader._groups)


@pytest.mark.parametrize("mt", ["deepseek_v3", "deepseek_v4"])
def test_buffers_the_checkpoint_holds_are_read_when_streaming(mt, tmp_path):
    """A router's score correction (DeepSeek-V3's e_score_correction_bias) and DeepSeek-V4's token-to-expert
    table are buffers the checkpoint holds: streamed, each block's are read from it as a whole load reads them
    (not left at the values the model is built with; a tiny model's zeros hid this), to the same bytes.
    DeepSeek-V4's final norm, which one of its renamings would rename as an attention norm, keeps its name, as
    transformers keeps it."""
    from pvq.models import streaming
    from pvq.models.loading import load_skeleton

    src = tmp_path / "src"
    model = family_model(mt)
    g = torch.Generator().manual_seed(0)
    held = {n: b for n, b in model.named_buffers() if n in model.state_dict()}
    for n, b in held.items():
        b.copy_(torch.randn(b.shape, generator=g) if b.is_floating_point() else b.flip(0))
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    skeleton, _, reader = load_skeleton(str(src))
    streaming.materialize(skeleton, reader, lambda n: True)
    assert held and all(torch.equal(skeleton.get_buffer(n), b) for n, b in held.items())
    _streamed_and_whole_write_the_same_bytes(src, tmp_path)


def test_experts_stored_with_two_axes_swapped_stream_to_the_same_bytes(tmp_path):
    """Qwen3-VL-MoE's hub checkpoints store each layer's fused experts as [E, H, 2I] and [E, I, H], which
    transformers' loader transposes (when the shape is not the model's already): streamed, each expert's
    linears are the same slices, so the output is the whole load's byte for byte."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    from pvq.models.loading import load_skeleton

    src = tmp_path / "src"
    model = tiny_model("qwen3_vl_moe", moe_intermediate_size=48)  # not square: a swap shows in the shape
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    swapped = {k: (v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v) for k, v in tensors.items()}
    assert sum(".mlp.experts." in k for k in swapped) == 2 * 2
    save_file(swapped, src / "model.safetensors", metadata={"format": "pt"})
    whole = AutoModelForImageTextToText.from_pretrained(src)
    assert all(torch.equal(p, whole.get_parameter(n)) for n, p in model.named_parameters())  # transposed back
    load_skeleton(str(src))  # streamable: no fallback to a whole load
    _streamed_and_whole_write_the_same_bytes(src, tmp_path)
