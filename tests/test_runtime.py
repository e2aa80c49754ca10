"""Running quantized models: native on-the-fly decode, decode modes, transformers loading."""
import copy
import ctypes

import pytest
import torch

import pvq
from pvq import api, checkpoint, loader
from pvq.codec import PVQSpec, UniformSpec, quantize
from pvq.settings import QuantConfig
from pvq.models.loading import tiny_model, tiny_tokenizer
from pvq.modules.linear import OnTheFly, QuantLinear
from pvq.runtime import limits, native
from pvq.runtime.decode import GEMV_TOKENS, Decoder

needs_native = pytest.mark.skipif(native.kernel() is None, reason=f"no native kernel: {native.kernel_error()}")


def _w(rows, cols, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


# every decoder of the kernel: a full table (8, 5), split(table, table) with tabulated halves P(6, <= 10) (12, 10),
# split(split(leaf 4)) (16, 29), split(leaf 4) (8, 12), split(split(leaf 3)) (12, 44), split(leaf 3) (6, 12,
# generic), three levels (24, 12, generic); (12, 55, 100): 58-bit codes, too wide for the exact gain division
SPECS = [PVQSpec(8, 5, 3), PVQSpec(12, 10, 5, scale="tensor"), PVQSpec(16, 29, 7), PVQSpec(16, 4, 1, gain="empirical"),
         PVQSpec(8, 12, 3), PVQSpec(12, 44, 17), PVQSpec(12, 55, 100), PVQSpec(6, 12, 4), PVQSpec(24, 12, 3),
         PVQSpec(4, 130 // 4, 2), UniformSpec(3, 128), UniformSpec(4, 32), UniformSpec(2, 100)]


@needs_native
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_native_decode_matches_the_torch_decoder(spec):
    rows, cols = 37, 96 if not isinstance(spec, PVQSpec) or 96 % spec.n == 0 else 48
    packed = quantize(_w(rows, cols), spec)
    ref = packed.dequantize(torch.float32)
    d = Decoder(packed)
    assert d.native
    if isinstance(spec, PVQSpec):  # small pyramids decode from a full table, large ones by the split enumeration
        assert (d.table is not None) == (limits.lut_bytes(spec.n, spec.k) <= limits.LUT_BYTES)
        assert (d.plan is not None) == (d.table is None)
    torch.testing.assert_close(d.dense(), ref, rtol=1e-6, atol=1e-7)
    # a block of rows in the middle (the tail of the bit stream is read byte by byte)
    torch.testing.assert_close(d.decode_rows(30, 37), ref[30:37], rtol=1e-6, atol=1e-7)
    for tokens in (1, GEMV_TOKENS, GEMV_TOKENS + 1, 19):
        x = _w(tokens, cols, seed=tokens)
        torch.testing.assert_close(d.matmul(x), x @ ref.T, rtol=1e-4, atol=1e-4)


def test_torch_fallback_when_there_is_no_kernel():
    packed = quantize(_w(24, 64), PVQSpec(8, 6, 4))
    d = Decoder(packed)
    d.lib = None
    x = _w(3, 64, 1)
    torch.testing.assert_close(d.matmul(x), x @ packed.dequantize().T)


@pytest.mark.parametrize("method", ["pvq", "rtn"])
def test_on_the_fly_mode_matches_decode_once(tmp_path, method):
    model = tiny_model("llama", intermediate_size=96)
    api.quantize(model, QuantConfig(method=method, bits=3.25), progress=False)
    out = checkpoint.save(model, tiny_tokenizer(), tmp_path / "q")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    once, _ = pvq.load(out, decode="once")
    fly, _ = pvq.load(out, decode="on-the-fly")
    q = fly.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.decode == "on-the-fly"
    with torch.no_grad():
        a, b = once(ids).logits, fly(ids).logits
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        # generation (one token per forward) goes through the fused kernel
        ga = once.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
        gb = fly.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    assert torch.equal(ga, gb)
    # nothing but the packed buffers stays resident: no decoded matrix is kept
    assert isinstance(q.runner, OnTheFly) and not hasattr(q.runner, "weight")
    with pytest.raises(ValueError, match="decode mode"):
        pvq.load(out, decode="sometimes")
    # the default: on the fly where the native kernel builds, else once
    auto, _ = pvq.load(out)
    assert auto.model.layers[1].self_attn.q_proj.decode == ("on-the-fly" if native.kernel() else "once")


def test_bfloat16_models_on_the_fly_multiply_prompts_in_bfloat16_like_decode_once(tmp_path):
    model = tiny_model("llama", intermediate_size=96)
    api.quantize(model, QuantConfig(method="pvq", bits=3.25), progress=False)
    out = checkpoint.save(model, tiny_tokenizer(), tmp_path / "q")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    once, _ = pvq.load(out, dtype=torch.bfloat16, decode="once")
    fly, _ = pvq.load(out, dtype=torch.bfloat16, decode="on-the-fly")
    with torch.no_grad():
        a, b = once(ids).logits, fly(ids).logits  # 24 tokens: decoded blocks, rounded to bfloat16 like once's
        ref = model(ids).logits
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a.float(), rtol=0.02, atol=0.02)
    assert (b.float() - ref).abs().max() < 0.1
    # the decoder itself: each decoded block and the tokens rounded to bfloat16, one bfloat16 GEMM
    d = Decoder(quantize(_w(40, 96), PVQSpec(16, 29, 7)))
    x = _w(9, 96, seed=4)
    got = d.matmul(x, torch.bfloat16)
    assert torch.equal(got, (x.bfloat16() @ d.dense().bfloat16().T).float())
    assert not torch.equal(got, d.matmul(x))


def test_model_to_dtype_keeps_the_stored_scales(tmp_path):
    model = tiny_model("llama", intermediate_size=96)
    api.quantize(model, QuantConfig(method="pvq", bits=2.25), progress=False)
    q = model.model.layers[0].self_attn.q_proj
    before = q.scales.clone()
    model.to(torch.bfloat16)
    assert q.scales.dtype == torch.float16 and torch.equal(q.scales, before)


def test_import_pvq_is_quick_and_registers_when_transformers_loads_its_quantizers(tmp_path):
    """`import pvq` imports neither torch nor transformers (`pvq --help` waited 4 s for them); the pvq method is
    registered the moment transformers imports its quantizer registry, so from_pretrained loads a pvq directory
    all the same, and `from pvq.hf import PVQConfig` registers on its own."""
    import subprocess
    import sys

    model = tiny_model("llama")
    api.quantize(model, QuantConfig(method="pvq", bits=3.25), progress=False)
    out = checkpoint.save(model, tiny_tokenizer(), tmp_path / "q")
    code = f"""
import sys
import pvq
assert not {{"torch", "transformers"}} & set(sys.modules), sorted({{"torch", "transformers"}} & set(sys.modules))
from transformers import AutoModelForCausalLM
print(type(AutoModelForCausalLM.from_pretrained({str(out)!r}).model.layers[0].mlp.up_proj).__name__)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["QuantLinear"], r.stderr[-2000:]
    code = "import pvq.hf\nfrom pvq.hf import PVQConfig\nprint(PVQConfig(decode='once').to_dict()['quant_method'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["pvq"], r.stderr[-2000:]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_transformers_from_pretrained_loads_a_pvq_directory(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from pvq.hf import PVQConfig

    model = tiny_model(family, intermediate_size=96)
    api.quantize(model, QuantConfig(method="pvq", bits=3.25), progress=False)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mem = model(ids).logits
    out = checkpoint.save(model, tiny_tokenizer(), tmp_path / "q")
    hf = AutoModelForCausalLM.from_pretrained(out, quantization_config=PVQConfig(decode="once"))
    assert isinstance(hf.model.layers[1].mlp.up_proj, QuantLinear)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, mem)
        gen = hf.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9)
    from pvq.modules.dense import StoredHead

    assert isinstance(hf.get_output_embeddings(), StoredHead) and hf.get_output_embeddings().weight.dtype == torch.float16
    fly = AutoModelForCausalLM.from_pretrained(out)  # decode="auto": on the fly where the kernel builds
    assert fly.model.layers[0].self_attn.o_proj.decode == ("on-the-fly" if native.kernel() else "once")
    with torch.no_grad():
        torch.testing.assert_close(fly(ids).logits, mem, rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("dim", [16, 96, 192, 576, 1536, 43 * 2])
def test_native_rotation_matches_torch(dim):
    from pvq.runtime.decode import rotate
    from pvq.transforms.hadamard import RandomHadamard

    r = RandomHadamard(dim, 7)
    x = _w(3, dim)
    torch.testing.assert_close(rotate(r, x), r.apply(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotate(r, x, inverse=True), r.apply_inverse(x), rtol=1e-5, atol=1e-5)
    assert rotate(r, _w(100, dim)) is None  # long inputs stay on the torch GEMM path


@needs_native
@pytest.mark.parametrize("n", [1, 3, 8, 16, 64])
def test_native_search_finds_the_torch_points(n):
    import importlib

    S = importlib.import_module("pvq.codec.search")  # the module: pvq.codec.search is also its function
    g = torch.Generator().manual_seed(n)
    x = torch.randn(600, n, generator=g)
    x[0] = 0
    x[1] = 1.0  # every coordinate equal
    x[2:200] = torch.randint(-3, 4, (198, n), generator=g).float()  # ties everywhere
    x[200:260] *= 1e-39  # subnormal
    try:
        for k in (1, 2, 5, 13, 29, 100):
            for refine in (None, 0, 3):
                S.accelerate(None)
                torch_points = S.search(x, k, refine=refine)
                S.accelerate(native.weight_search)
                assert torch.equal(S.search(x, k, refine=refine), torch_points), (n, k, refine)
    finally:
        S.accelerate(native.weight_search)
    assert native.weight_search(x.double(), 5, 0) is None  # not float32: the torch code's
    assert native.weight_search(torch.randn(4, 65), 5, 0) is None  # longer than the kernel's groups


def test_fast_layout_picks_table_decodable_settings():
    from pvq.picker import choose_spec

    for bits in (2.25, 3.25, 4.25):
        fast = choose_spec(QuantConfig(method="pvq", bits=bits, layout="fast"), 576, 1536)
        compact = choose_spec(QuantConfig(method="pvq", bits=bits), 576, 1536)
        assert limits.lut_bytes(fast.n, fast.k) <= limits.LUT_BYTES < limits.lut_bytes(compact.n, compact.k)
    with pytest.raises(ValueError, match="layout"):
        QuantConfig(layout="quick")


def test_plan_tabulates_small_halves_and_buckets_every_split():
    plan = native.plan(12, 10)
    words = plan.words.tolist()
    S, L = native.SPLIT.index, native.LEAF.index  # the word of a field in a split / a leaf
    assert words[S("kind")] == native.NODE_SPLIT and words[S("first")] == words[S("second")]  # one node, both halves
    half = words[S("first")]
    assert words[half + L("kind")] == native.NODE_LEAF and words[half + L("d")] == 6  # every point of P(6, <= 10)
    from pvq.codec.pyramid import count

    lut = native.table(6, 10)[0]
    assert words[half + L("lut")] == lut.data_ptr() and lut.numel() >= sum(count(6, k) for k in range(11)) * 6
    # the bucket table's starting k1 never overshoots: O(k, k1_start) <= the bucket's first index
    K, at = words[S("K")], words[S("bucket_at")]
    offs, shifts = words[words[S("offs_at")]:], words[at:at + K + 1]
    starts = bytes(plan.words[at + K + 1:].numpy().tobytes())
    for k in range(K + 1):
        for b in range(0, 1 << native.BUCKET_BITS, 97):
            k1 = starts[(k << native.BUCKET_BITS) + b]
            assert k1 <= k and offs[k * (K + 1) + k1] <= b << shifts[k]


def test_the_kernel_build_gets_the_plan_layout_and_limits_from_python():
    flags = native._defines()
    for i, name in enumerate(native.LEAF):
        assert f"-DLEAF_{name.upper()}={i}" in flags
    for i, name in enumerate(native.SPLIT):
        assert f"-DSPLIT_{name.upper()}={i}" in flags
    for name, value in [("MAXN", limits.MAX_N), ("MAXK", limits.MAX_K), ("BUCKET_BITS", limits.BUCKET_BITS),
                        ("TABLE_PAD", limits.PAD)]:
        assert f"-D{name}={value}" in flags


@needs_native
def test_a_library_of_another_abi_is_refused(monkeypatch):
    """kernel() loads only a library whose ABI version and struct sizes are this module's."""

    class Wider(ctypes.Structure):
        _fields_ = [("r", native.Rotation), ("more", ctypes.c_int64)]

    try:
        monkeypatch.setattr(native, "ABI_VERSION", native.ABI_VERSION + 1)
        native.kernel.cache_clear()
        assert native.kernel() is None
        err = native.kernel_error()
        assert "ABI version" in err and "\n" not in err
        monkeypatch.undo()
        monkeypatch.setitem(native.STRUCTS, "rotation", Wider)
        native.kernel.cache_clear()
        assert native.kernel() is None
        assert "struct rotation" in native.kernel_error()
    finally:
        monkeypatch.undo()
        native.kernel.cache_clear()
    assert native.kernel() is not None and native.kernel_error() is None


def test_plans_share_their_tables_of_points(fresh_kernel_tables):
    # reserved for a model's settings first, every plan with leaves of 4 points uses one table, P(4, <= 29) at
    # most (2 MiB); sub-pyramids P(6, <= K) share one table too
    settings = [(16, 19), (16, 23), (16, 37), (12, 6), (12, 9)]
    native.reserve(settings)
    t4 = {id(t) for n, k in settings[:3] for t in native.plan(n, k).tables}
    assert len(t4) == 4  # points, base, mask, CWRS table
    assert limits.table_cap(4) == 29 and native.table(4, 29)[0].numel() <= limits.TABLE_BYTES + limits.PAD
    assert {id(t) for t in native.plan(12, 6).tables} == {id(t) for t in native.plan(12, 9).tables}
    # a model mixing many (n, k) keeps each table once
    from pvq.measure import quantized_memory

    layers = [QuantLinear.from_packed(quantize(_w(16, 96, s), PVQSpec(n, k, 7)), (0, 0), decode="on-the-fly")
              for s, (n, k) in enumerate(settings)]
    model = torch.nn.Sequential(*layers)
    for q in layers:
        q.runner
    mem = quantized_memory(model)
    plans = sum(native.plan(n, k).nbytes() for n, k in settings)
    shared = {id(t): t.numel() * t.element_size() for n, k in settings for t in native.plan(n, k).tables}
    assert len(shared) == 4 + 3  # the P(6) table has no CWRS table
    assert mem["shared_plan_bytes"] == plans + sum(shared.values())


@needs_native
@pytest.mark.parametrize("spec", [PVQSpec(16, 41, 7), PVQSpec(8, 30, 5), PVQSpec(12, 88, 7)], ids=lambda s: s.name)
def test_leaves_past_the_table_cap_decode_from_the_cwrs_recurrence(spec):
    """Peaked groups put more pulses in one leaf than its table holds (P(4, <= 29), P(3, <= 80))."""
    w = _w(24, 96)
    w[::2] *= 0.01
    w[::2, :: spec.n] = 5.0  # in every other row one dominant coordinate per group: all k pulses in one leaf
    w[::6, 1 :: spec.n] = -3.0
    packed = quantize(w, spec)
    ref = packed.dequantize(torch.float32)
    d = Decoder(packed)
    torch.testing.assert_close(d.dense(), ref, rtol=1e-6, atol=1e-7)
    for tokens in (1, 2):
        x = _w(tokens, 96, seed=tokens)
        torch.testing.assert_close(d.matmul(x), x @ ref.T, rtol=1e-4, atol=1e-4)


@needs_native
def test_corrupt_codes_are_refused_before_the_kernel_reads_them():
    spec = PVQSpec(12, 10, 5, scale="tensor")
    packed = quantize(_w(8, 48), spec)
    Decoder(packed)  # valid codes pass
    from pvq.codec.pyramid import count

    assert count(12, 10) * 5 < 2 ** spec.code_bits  # the all-ones code is out of range
    packed.codes[:] = 0xFF
    with pytest.raises(ValueError, match="corrupt"):
        Decoder(packed)


def test_keep_stored_refuses_weights_the_stored_dtype_would_change():
    from pvq.modules.dense import StoredEmbedding, keep_stored

    model = tiny_model("llama", intermediate_size=96)  # random float32 embeddings: not float16 values
    emb = model.get_input_embeddings().weight.detach().clone()
    assert not keep_stored(model, torch.float16)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding and torch.equal(model.get_input_embeddings().weight, emb)
    assert not keep_stored(model, torch.float32)  # nothing to gain
    model.get_input_embeddings().weight.data = emb.half().float()
    model.get_output_embeddings().weight.data = model.get_output_embeddings().weight.data.half().float()
    assert keep_stored(model, torch.float16) and isinstance(model.get_input_embeddings(), StoredEmbedding)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [7, 100])
def test_dense16_gemv_is_the_float32_product_of_the_stored_matrix(dtype, cols):
    w = _w(37, cols).to(dtype)
    # zeros, signs, fp16 subnormals and the largest values, in the vector body and the scalar tail (widened by hand)
    special = torch.tensor([0.0, -3e-7, 6e-5, -6.5e4 if dtype == torch.float16 else -3e38, 1e-40]).to(dtype)
    w[:5, 0], w[:5, -1] = special, special
    # one-hot inputs: each output is exactly one widened weight
    picks = [0, 1, cols - 2, cols - 1]
    x = torch.zeros(len(picks), cols)
    x[range(len(picks)), picks] = 1.0
    out = native.dense16_gemv(w, x)
    assert torch.equal(out, w.float()[:, picks].T)
    # and a dense input: the float32 product
    x = _w(2, cols, seed=1)
    w[:5] = 1.0
    out = native.dense16_gemv(w, x)
    torch.testing.assert_close(out, x @ w.float().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_loaded_models_keep_embeddings_and_head_in_the_stored_dtype(tmp_path, tied):
    from pvq.modules.dense import StoredEmbedding, StoredHead

    model = tiny_model("llama", intermediate_size=96, tie_word_embeddings=tied)
    api.quantize(model, QuantConfig(method="pvq", bits=3.25), progress=False)
    out = checkpoint.save(model, tiny_tokenizer(), tmp_path / "q")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    for decode in ("once", "on-the-fly"):
        fly, _ = pvq.load(out, decode=decode)
        emb, head = fly.get_input_embeddings(), fly.get_output_embeddings()
        assert isinstance(emb, StoredEmbedding) and isinstance(head, StoredHead)
        assert emb.weight.dtype == head.weight.dtype == torch.float16
        assert (emb.weight is head.weight) == tied
        assert fly.dtype == torch.float32 and "model.embed_tokens.weight" not in dict(fly.named_parameters())
        with torch.no_grad():
            for t in (1, 12):  # one token: the native 16-bit head; many: blocks widened to float32
                torch.testing.assert_close(fly(ids[:, :t]).logits, model(ids[:, :t]).logits, rtol=1e-5, atol=1e-5)
    # converting the model changes what it computes in, never the stored bits (and a tied pair stays one tensor)
    fly.to(torch.bfloat16)
    assert emb.weight.dtype == torch.float16 and (emb.weight is head.weight) == tied
    with torch.no_grad():
        logits = fly(ids).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), model(ids).logits, rtol=0.05, atol=0.05)
    # a device move keeps a tied pair one tensor ("meta": a device every machine has)
    moved = copy.deepcopy(fly).to("meta")
    assert moved.get_input_embeddings().weight.device.type == "meta"
    assert (moved.get_input_embeddings().weight is moved.get_output_embeddings().weight) == tied
    assert moved.get_input_embeddings().weight.dtype == torch.float16
    # a loaded model saves to the same tensors
    again = checkpoint.save(fly.to(torch.float32), None, tmp_path / "again")
    from safetensors.torch import load_file

    a, b = load_file(str(out / checkpoint.WEIGHTS)), load_file(str(again / checkpoint.WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_SIMD_CHECK = """
import torch
from pvq.codec import PVQSpec, quantize
from pvq.runtime import native
from pvq.runtime.decode import Decoder
assert native.kernel() is not None, native.kernel_error()
g = torch.Generator().manual_seed(0)
for spec in [PVQSpec(12, 10, 5, scale="tensor"), PVQSpec(16, 29, 7), PVQSpec(8, 12, 3), PVQSpec(12, 44, 17),
             PVQSpec(16, 41, 7)]:
    w = torch.randn(37, 96, generator=g)
    if spec.k == 41:  # peaked rows: leaves past their table (the CWRS decoder)
        w[::2, ::16] = 40.0
    packed = quantize(w, spec)
    ref = packed.dequantize(torch.float32)
    torch.testing.assert_close(Decoder(packed).dense(), ref, rtol=1e-6, atol=1e-7)
    for tokens in (1, 2):
        x = torch.randn(tokens, 96, generator=g)
        torch.testing.assert_close(Decoder(packed).matmul(x), x @ ref.T, rtol=1e-4, atol=1e-4)
w, x = torch.randn(37, 100, generator=g).half(), torch.randn(1, 100, generator=g)
out = native.dense16_gemv(w, x)
torch.testing.assert_close(out, x @ w.float().T, rtol=1e-5, atol=1e-5)
from pvq.runtime.decode import rotate
from pvq.transforms.hadamard import RandomHadamard
for dim in (96, 576, 1536):
    r, x = RandomHadamard(dim, 3), torch.randn(2, dim, generator=g)
    torch.testing.assert_close(rotate(r, x), r.apply(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotate(r, x, inverse=True), r.apply_inverse(x), rtol=1e-5, atol=1e-5)
print("ok")
"""


@needs_native
@pytest.mark.skipif(__import__("platform").machine().lower() not in ("x86_64", "amd64"), reason="x86 SIMD flags")
@pytest.mark.parametrize("cflags", ["-mno-avx512f", "-mno-sse4.1 -mno-avx -mno-avx2 -mno-avx512f"])
def test_kernel_paths_for_older_cpus_match_the_torch_decoder(tmp_path, cflags):
    """The SSE4.1 and plain-C paths of the fixed layouts (this machine may only ever run its best one)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PVQ_CFLAGS": cflags, "PVQ_CACHE": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", _SIMD_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


@needs_native
@pytest.mark.parametrize("spec", [PVQSpec(16, 29, 7), PVQSpec(8, 5, 3), UniformSpec(4, 32)], ids=lambda s: s.name)
def test_one_native_call_per_layer_matches_decode_once(spec):
    """pvq_linear: input rotation, decode-and-multiply (plan, full table, uniform grid), output rotation, bias."""
    packed = quantize(_w(40, 96), spec)
    bias = _w(1, 40, seed=9)[0]
    fly = QuantLinear.from_packed(packed, (3, 5), bias=bias, decode="on-the-fly")
    once = QuantLinear.from_packed(packed, (3, 5), bias=bias, decode="once")
    with torch.no_grad():
        for shape in [(1, 96), (2, 96), (1, 1, 96), (2, 1, 96), (1, 2, 96)]:
            x = _w(int(torch.tensor(shape[:-1]).prod()), 96, seed=len(shape)).reshape(shape)
            got = fly(x)
            assert got.shape == (*shape[:-1], 40)
            torch.testing.assert_close(got, once(x), rtol=1e-4, atol=1e-4)
    assert fly.runner.fused is not None


def test_stored_head_gradient_over_many_tokens_is_the_float32_products(monkeypatch):
    """Tuning backpropagates through the head on many tokens at once: its output and the gradient to its
    input are those of the float32 product, with the rows widened a block at a time (the last one short)."""
    from pvq.modules import dense

    model = tiny_model("llama", intermediate_size=96)
    model.get_input_embeddings().weight.data = model.get_input_embeddings().weight.data.half().float()
    model.get_output_embeddings().weight.data = model.get_output_embeddings().weight.data.half().float()
    assert dense.keep_stored(model, torch.float16)
    head = model.get_output_embeddings()
    rows = head.weight.shape[0]
    monkeypatch.setattr(dense, "ROW_BLOCK", rows // 3 + 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3 * GEMV_TOKENS, head.weight.shape[1], generator=g, requires_grad=True)
    r = torch.randn(2, 3 * GEMV_TOKENS, rows, generator=g)
    out = head(x)
    (out * r).sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    ref = ref_x @ head.weight.float().T
    (ref * r).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, ref_x.grad)
    with torch.no_grad():  # and without autograd the same values
        assert torch.equal(head(x), out.detach())
