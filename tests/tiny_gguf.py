"""Tiny random GGUF files as llama.cpp writes them, for the tests that read GGUFs other than the packaged
SmolLM2 (a family transformers converts differently, experts stacked in 3-D tensors)."""
import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q


def moe_gguf(path, arch, layers=2, hidden=64, heads=4, kv=2, head_dim=16, experts=4, seed=0):
    """A tiny random mixture-of-experts GGUF as llama.cpp writes one (experts stacked in 3-D tensors, Q8_0) with a
    byte-level vocabulary. transformers reads no expert width for these families: its defaults (768, 1408)."""
    rng = np.random.default_rng(seed)
    ff, shared = (768, 0) if arch == "qwen3moe" else (1408, 5632)
    w = gguf.GGUFWriter(str(path), arch)
    vocab = _vocabulary(w)
    w.add_block_count(layers), w.add_context_length(256), w.add_embedding_length(hidden)
    w.add_feed_forward_length(128), w.add_head_count(heads), w.add_head_count_kv(kv), w.add_key_length(head_dim)
    w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(experts), w.add_expert_used_count(2)
    add = _adder(w, rng)
    add("token_embd.weight", vocab, hidden, scale=0.5), add("output_norm.weight", hidden, scale=0)
    add("output.weight", vocab, hidden)
    for b in range(layers):
        for n in ("attn_norm", "ffn_norm") + (("attn_q_norm", "attn_k_norm") if arch == "qwen3moe" else ()):
            add(f"blk.{b}.{n}.weight", head_dim if "_q_" in n or "_k_" in n else hidden, scale=0)
        for n, rows in (("q", heads), ("k", kv), ("v", kv)):
            add(f"blk.{b}.attn_{n}.weight", rows * head_dim, hidden)
            if arch == "qwen2moe":
                add(f"blk.{b}.attn_{n}.bias", rows * head_dim)
        add(f"blk.{b}.attn_output.weight", hidden, heads * head_dim), add(f"blk.{b}.ffn_gate_inp.weight", experts, hidden)
        add(f"blk.{b}.ffn_gate_exps.weight", experts, ff, hidden, kind=Q.Q8_0)
        add(f"blk.{b}.ffn_up_exps.weight", experts, ff, hidden, kind=Q.Q8_0)
        add(f"blk.{b}.ffn_down_exps.weight", experts, hidden, ff, kind=Q.Q8_0)
        if shared:  # Qwen2-MoE's shared expert and its gate
            add(f"blk.{b}.ffn_gate_inp_shexp.weight", hidden)
            add(f"blk.{b}.ffn_gate_shexp.weight", shared, hidden, kind=Q.Q8_0)
            add(f"blk.{b}.ffn_up_shexp.weight", shared, hidden, kind=Q.Q8_0)
            add(f"blk.{b}.ffn_down_shexp.weight", hidden, shared, kind=Q.Q8_0)
    return _written(w, path)


def lfm2_gguf(path, layers=2, hidden=64, ff=128, heads=4, kv=2, l_cache=3, seed=0):
    """A tiny random LFM2 GGUF (short-convolution and attention layers in turn, Q8_0, the head tied): a family
    transformers loads through its newer GGUF path, which can keep the weights packed."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "lfm2")
    vocab = _vocabulary(w)
    w.add_block_count(layers), w.add_context_length(256), w.add_embedding_length(hidden), w.add_feed_forward_length(ff)
    w.add_head_count(heads), w.add_head_count_kv([0, kv] * (layers // 2)), w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5), w.add_uint32("lfm2.shortconv.l_cache", l_cache)
    add, head_dim = _adder(w, rng), hidden // heads
    add("token_embd.weight", vocab, hidden, scale=0.5), add("token_embd_norm.weight", hidden, scale=0)
    for b in range(layers):
        p = f"blk.{b}."
        add(p + "attn_norm.weight", hidden, scale=0), add(p + "ffn_norm.weight", hidden, scale=0)
        if b % 2:
            add(p + "attn_q.weight", hidden, hidden, kind=Q.Q8_0), add(p + "attn_k.weight", kv * head_dim, hidden, kind=Q.Q8_0)
            add(p + "attn_v.weight", kv * head_dim, hidden, kind=Q.Q8_0)
            add(p + "attn_output.weight", hidden, hidden, kind=Q.Q8_0)
            add(p + "attn_q_norm.weight", head_dim, scale=0), add(p + "attn_k_norm.weight", head_dim, scale=0)
        else:
            add(p + "shortconv.in_proj.weight", 3 * hidden, hidden, kind=Q.Q8_0)
            add(p + "shortconv.conv.weight", hidden, l_cache), add(p + "shortconv.out_proj.weight", hidden, hidden, kind=Q.Q8_0)
        for n, shape in (("gate", (ff, hidden)), ("up", (ff, hidden)), ("down", (hidden, ff))):
            add(f"{p}ffn_{n}.weight", *shape, kind=Q.Q8_0)
    return _written(w, path)


def _vocabulary(w) -> int:
    """A byte-level BPE vocabulary (GPT-2's byte symbols, two merges, an end token) into the file; its size."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's bytes that stand for themselves
    others = [b for b in range(256) if b not in printable]
    tokens = [chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)]
    merges = ["Ġ t", "h e"]  # transformers reads a GGUF BPE vocabulary without merges as another kind
    tokens += [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
    eos = len(tokens) - 1
    w.add_vocab_size(len(tokens)), w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default")
    w.add_token_list(tokens), w.add_token_types([1] * eos + [3]), w.add_token_merges(merges)
    w.add_eos_token_id(eos), w.add_bos_token_id(eos)
    return len(tokens)


def _adder(w, rng):
    """add(name, *shape, kind, scale): a random tensor (ones where scale is 0) into the file, float32 or quantized."""
    def add(name, *shape, kind=Q.F32, scale=0.05):
        a = (rng.standard_normal(shape) * scale).astype(np.float32) if scale else np.ones(shape, np.float32)
        w.add_tensor(name, a if kind == Q.F32 else gguf.quants.quantize(a, kind), raw_dtype=None if kind == Q.F32 else kind)
    return add


def _written(w, path) -> str:
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return str(path)


def qwen35_gguf(path, layers=2, hidden=64, heads=4, kv=2, head_dim=16, k_heads=2, v_heads=4, state=16,
                v_dim=16, conv=4, experts=4, ff=32, shared=64, seed=0):
    """A tiny random Qwen3.5-MoE GGUF (dense Qwen3.5 with experts=0; linear-attention and full-attention layers in
    turn, Q8_0): a family transformers loads through its newer GGUF path, with conversions on the way (norms
    stored as w + 1, `ssm_a` as -exp(A_log), the convolution squeezed, value heads tiled, gate and up stacked
    apart)."""
    rng = np.random.default_rng(seed)
    arch = "qwen35moe" if experts else "qwen35"
    w = gguf.GGUFWriter(str(path), arch)
    vocab = _vocabulary(w)
    for key, value in (("block_count", layers), ("context_length", 256), ("embedding_length", hidden),
                       ("attention.head_count", heads), ("attention.head_count_kv", kv),
                       ("attention.key_length", head_dim), ("attention.value_length", head_dim),
                       ("full_attention_interval", 2), ("ssm.conv_kernel", conv), ("ssm.state_size", state),
                       ("ssm.group_count", k_heads), ("ssm.time_step_rank", v_heads), ("ssm.inner_size", v_heads * v_dim),
                       ("rope.dimension_count", head_dim // 2)) + ((
                       ("expert_count", experts), ("expert_used_count", 2), ("expert_feed_forward_length", ff),
                       ("expert_shared_feed_forward_length", shared)) if experts else (("feed_forward_length", ff),)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0), w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_array(f"{arch}.rope.dimension_sections", [2, 1, 1, 0])
    add = _adder(w, rng)
    add("token_embd.weight", vocab, hidden, scale=0.5), add("output_norm.weight", hidden)
    add("output.weight", vocab, hidden, kind=Q.Q8_0)
    qkv = 2 * k_heads * state + v_heads * v_dim
    for b in range(layers):
        p = f"blk.{b}."
        add(p + "attn_norm.weight", hidden), add(p + "post_attention_norm.weight", hidden)
        if b % 2 == 0:  # linear attention
            add(p + "attn_qkv.weight", qkv, hidden, kind=Q.Q8_0), add(p + "attn_gate.weight", v_heads * v_dim, hidden, kind=Q.Q8_0)
            add(p + "ssm_alpha.weight", v_heads, hidden), add(p + "ssm_beta.weight", v_heads, hidden)
            add(p + "ssm_conv1d.weight", qkv, conv), add(p + "ssm_norm.weight", v_dim)
            add(p + "ssm_out.weight", hidden, v_heads * v_dim, kind=Q.Q8_0), add(p + "ssm_dt.bias", v_heads)
            w.add_tensor(p + "ssm_a", -np.exp(rng.standard_normal(v_heads)).astype(np.float32))
        else:  # full attention, its query rows doubled by the output gate
            add(p + "attn_q.weight", 2 * heads * head_dim, hidden, kind=Q.Q8_0)
            add(p + "attn_k.weight", kv * head_dim, hidden, kind=Q.Q8_0)
            add(p + "attn_v.weight", kv * head_dim, hidden, kind=Q.Q8_0)
            add(p + "attn_output.weight", hidden, heads * head_dim, kind=Q.Q8_0)
            add(p + "attn_q_norm.weight", head_dim), add(p + "attn_k_norm.weight", head_dim)
        if not experts:
            for n, shape in (("gate", (ff, hidden)), ("up", (ff, hidden)), ("down", (hidden, ff))):
                add(f"{p}ffn_{n}.weight", *shape, kind=Q.Q8_0)
            continue
        add(p + "ffn_gate_inp.weight", experts, hidden)
        add(p + "ffn_gate_exps.weight", experts, ff, hidden, kind=Q.Q8_0)
        add(p + "ffn_up_exps.weight", experts, ff, hidden, kind=Q.Q8_0)
        add(p + "ffn_down_exps.weight", experts, hidden, ff, kind=Q.Q8_0)
        add(p + "ffn_gate_inp_shexp.weight", hidden)
        add(p + "ffn_gate_shexp.weight", shared, hidden, kind=Q.Q8_0), add(p + "ffn_up_shexp.weight", shared, hidden, kind=Q.Q8_0)
        add(p + "ffn_down_shexp.weight", hidden, shared, kind=Q.Q8_0)
    return _written(w, path)


def minimax_m2_gguf(path, seed=0):
    """pvq's tiny MiniMax-M2 (models.loading.tiny_model, its router's score correction randomized) written as a GGUF
    under the names transformers' GGUF map gives its tensors (gate and up experts stacked apart, Q8_0), its
    vocabulary padded to the byte-level one's."""
    import torch
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, get_gguf_hf_weights_map

    from pvq.models.loading import tiny_model

    model = tiny_model("minimax_m2", seed=seed)
    c = model.config
    rng = np.random.default_rng(seed)
    names = {}
    for g, hf in get_gguf_hf_weights_map(model, TENSOR_PROCESSORS["minimax-m2"](config=c.to_dict())).items():
        names.setdefault(hf, []).append(g if g.endswith((".weight", ".bias")) else f"{g}.weight")
    w = gguf.GGUFWriter(str(path), "minimax-m2")
    vocab = _vocabulary(w)
    arch = "minimax-m2"
    for key, value in (("block_count", c.num_hidden_layers), ("context_length", 256), ("embedding_length", c.hidden_size),
                       ("feed_forward_length", c.intermediate_size), ("attention.head_count", c.num_attention_heads),
                       ("attention.head_count_kv", c.num_key_value_heads), ("attention.key_length", c.head_dim),
                       ("rope.dimension_count", c.head_dim), ("expert_count", c.num_local_experts),
                       ("expert_used_count", c.num_experts_per_tok)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0), w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    for hf, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if hf.endswith("e_score_correction_bias"):
            a = rng.standard_normal(a.shape).astype(np.float32)
        if hf in ("model.embed_tokens.weight", "lm_head.weight"):  # rows for the tokens past the tiny vocabulary
            a = np.concatenate([a, rng.standard_normal((vocab - a.shape[0], a.shape[1])).astype(np.float32) * 0.02])
        parts = np.split(a, 2, axis=1) if len(names[hf]) == 2 else [a]  # gate_up: gate rows, then up rows
        for g, part in zip(sorted(names[hf], key=lambda n: "ffn_up_exps" in n), parts):
            part = np.ascontiguousarray(part)
            quantize = part.ndim > 1 and part.shape[-1] % 32 == 0
            w.add_tensor(g, gguf.quants.quantize(part, Q.Q8_0) if quantize else part, raw_dtype=Q.Q8_0 if quantize else None)
    return _written(w, path)
