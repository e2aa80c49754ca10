"""The Triton kernels (runtime/gpu.py) against the torch decoder, run by Triton's interpreter on CPU tensors."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first defined

import pytest
import torch

pytest.importorskip("triton")

from pvq.codec import PVQSpec, enumeration
from pvq.codec.gainshape import quantize
from pvq.codec.pyramid import count
from pvq.modules.linear import QuantLinear
from pvq.picker import choose_spec
from pvq.runtime import gpu
from pvq.runtime.decode import Decoder
from pvq.settings import QuantConfig


def picked_specs() -> list[PVQSpec]:
    """Every setting the picker chooses for the usual layer shapes at 2-4 bits, compact and fast layouts."""
    out = {}
    for bits in (2.25, 2.5, 3.0, 3.25, 4.0, 4.25):
        for layout in ("compact", "fast"):
            for rows, cols in ((576, 576), (1536, 576), (4096, 4096), (4096, 14336), (768, 3072)):
                s = choose_spec(QuantConfig(method="pvq", bits=bits, layout=layout), rows, cols)
                out[s.name] = s
    return sorted(out.values(), key=lambda s: s.name)


SPECS = picked_specs()


def packed(spec: PVQSpec, rows: int, groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(rows, groups * spec.n, generator=g), spec)


def test_the_picker_chooses_only_settings_the_kernels_cover():
    assert len(SPECS) >= 8
    assert all(gpu.supports(s) for s in SPECS), [s.name for s in SPECS if not gpu.supports(s)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_points_equal_the_torch_decoder_and_products_match(spec):
    p = packed(spec, rows=19, groups=13)  # rows and groups off every block size
    op = gpu.Operands(p)
    idx, _ = p.unpack()
    assert torch.equal(op.shapes().long(), enumeration.decode(idx, spec.n, spec.k))
    ref = p.dequantize(torch.float32)
    torch.testing.assert_close(op.decode(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(op.decode(5, 11), ref[5:11], rtol=1e-6, atol=1e-6)
    x = torch.randn(70, ref.shape[1], generator=torch.Generator().manual_seed(1))
    for t in (1, 2, 5, 8):
        torch.testing.assert_close(op.gemv(x[:t]), x[:t] @ ref.T, rtol=1e-5, atol=1e-5)
    # the fused tiled product: two tiles of tokens, the second short; exact float32 products, float16 operands
    torch.testing.assert_close(op.matmul(x, torch.float32), x @ ref.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(op.decode(dtype=torch.float16), ref.half())
    assert _rel(op.matmul(x[:20], torch.float16), x[:20].half().float() @ ref.half().float().T) < 2e-3
    ids = torch.tensor([18, 0, 7, 7, 3])  # an embedding's lookup: any order, repeats
    torch.testing.assert_close(op.decode_rows(ids), ref[ids], rtol=1e-6, atol=1e-6)
    assert torch.equal(op.decode_rows(ids, torch.float16), ref[ids].half())
    assert op.bad_group() == -1


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error of a product with float16 operands: Triton's interpreter also rounds each tl.dot's result
    to float16 (a GPU sums in float32), a few 1e-4 of the sum; a wrong weight or column would be order 1."""
    return float((got - want).norm() / want.norm())


def test_row_scales_and_wide_codes():
    for spec in (PVQSpec.for_code_bits(8, 29, 34, scale="row"), PVQSpec.for_code_bits(16, 50, 63)):
        p = packed(spec, rows=7, groups=5, seed=3)
        op = gpu.Operands(p)
        ref = p.dequantize(torch.float32)
        torch.testing.assert_close(op.decode(), ref, rtol=1e-6, atol=1e-6)
        x = torch.randn(3, ref.shape[1])
        torch.testing.assert_close(op.gemv(x), x @ ref.T, rtol=1e-5, atol=1e-5)


def _corrupt(p, group: int):
    """p with group `group`'s shape index set to V(n, k) (one past the last)."""
    from pvq.codec import bitpack

    s = p.spec
    rows, cols = p.shape
    code = bitpack.unpack(p.codes, rows * cols // s.n, s.code_bits)
    code[group] = count(s.n, s.k) * s.gain_levels  # index V, level 0: still fits the code width
    assert code[group] < 1 << s.code_bits
    return type(p)(s, p.shape, bitpack.pack(code, s.code_bits), p.row_scale, p.gain_levels)


def test_codes_out_of_range_are_reported_and_never_read_outside_a_table():
    spec = PVQSpec.for_code_bits(16, 12, 36)
    bad = _corrupt(packed(spec, rows=6, groups=4), group=9)
    op = gpu.Operands(bad)
    assert op.bad_group() == 9
    w = op.decode()  # clamped inside the kernel: finite values, no stray read
    assert torch.isfinite(w).all()
    x = torch.randn(20, w.shape[1])
    assert torch.isfinite(op.gemv(x[:3])).all() and torch.isfinite(op.matmul(x, torch.float32)).all()
    with pytest.raises(ValueError, match=r"group 9 holds a shape index >= V\(16, 12\)"):
        Decoder(bad, triton=True)


def test_unsupported_setting_is_refused_by_name():
    spec = PVQSpec(10, 3, 4)  # 10 -> 5 + 5 -> 2 + 3: not an even split
    assert not gpu.supports(spec)
    with pytest.raises(ValueError, match="pvq-n10k3L4"):
        gpu.Operands(packed(spec, rows=2, groups=2))


def test_decoder_routes_few_tokens_to_the_fused_product_and_many_to_decoded_tiles(monkeypatch):
    spec = PVQSpec.for_code_bits(12, 10, 27)
    p = packed(spec, rows=40, groups=6)
    monkeypatch.setattr(gpu, "DECODE_ROWS", 16)  # three tiles
    dec = Decoder(p, triton=True)
    assert dec.gpu is not None and not dec.native
    ref = p.dequantize(torch.float32)
    torch.testing.assert_close(dec.dense(), ref, rtol=1e-6, atol=1e-6)
    for t in (1, 8, 9, 20):
        x = torch.randn(2, t, ref.shape[1])
        torch.testing.assert_close(dec.matmul(x), x @ ref.T, rtol=1e-5, atol=1e-5)
        assert _rel(dec.matmul(x, torch.float16), x.half().float() @ ref.half().float().T) < 2e-3
    monkeypatch.setattr(gpu, "PROMPT", "fused")  # the other way to multiply a prompt: the fused tiled product
    for t in (9, 20, 70):
        x = torch.randn(t, ref.shape[1])
        torch.testing.assert_close(dec.matmul(x), x @ ref.T, rtol=1e-5, atol=1e-5)
        assert _rel(dec.matmul(x, torch.float16), x.half().float() @ ref.half().float().T) < 2e-3
    op = dec.gpu
    with pytest.raises(ValueError, match="dtype must be"):
        op.matmul(x, torch.float64)
    with pytest.raises(ValueError, match="dtype must be"):
        op.decode(dtype=torch.int32)
    with pytest.raises(ValueError, match="rows of 72 values"):
        op.matmul(x[:, :5])


def test_a_whole_quantized_linear_with_rotations_and_bias():
    spec = PVQSpec.for_code_bits(16, 29, 52, scale="tensor")
    w = torch.randn(48, 64)
    bias = torch.randn(48)
    ref = QuantLinear.from_packed(quantize(w, spec), seeds=(11, 12), bias=bias, decode="once")
    layer = QuantLinear.from_packed(quantize(w, spec), seeds=(11, 12), bias=bias, decode="on-the-fly")
    run = layer.runner
    run.decoder, run.fused = Decoder(layer.packed, triton=True), None  # the Triton path on CPU tensors
    for t in (1, 4, 8, 30):
        x = torch.randn(t, 64)
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_an_embedding_on_a_gpu_decodes_only_the_rows_it_looks_up():
    """A quantized embedding table (--embed-bits) whose decoder is the Triton one gathers its rows with the decode
    kernel (the table stays packed, nothing kept), the rows of the torch decoder, rotated back and scaled."""
    from pvq.modules.embedding import QuantEmbedding

    spec = PVQSpec.for_code_bits(16, 29, 52)
    w = torch.randn(40, 64)
    ref = QuantEmbedding.from_packed(quantize(w, spec), seeds=(11, -1), decode="once")
    emb = QuantEmbedding.from_packed(quantize(w, spec), seeds=(11, -1), decode="on-the-fly")
    emb.runner.decoder = Decoder(emb.packed, triton=True)
    ids = torch.tensor([[3, 39, 3], [0, 17, 5]])
    torch.testing.assert_close(emb(ids), ref(ids), rtol=1e-5, atol=1e-5)
    emb.embed_scale = ref.embed_scale = 8.0
    torch.testing.assert_close(emb(ids), ref(ids), rtol=1e-5, atol=1e-5)
    assert emb.runner.kept is None
    with pytest.raises(IndexError, match="outside"):
        emb.runner.decoder.gpu.decode_rows(torch.tensor([40]))


def test_load_names_a_bad_or_absent_device(tmp_path):
    from pvq.loader import check_device

    with pytest.raises(ValueError, match="'gpu0': not a torch device"):
        check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda': this torch sees no CUDA GPU"):
            check_device("cuda")
    assert check_device("cpu").type == "cpu"


def test_on_a_gpu_auto_decodes_covered_pvq_layers_on_the_fly_and_the_rest_once():
    from torch import nn

    from pvq.codec import UniformSpec
    from pvq.loader import replace_linears
    from pvq.settings import spec_to_dict

    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 16), nn.Linear(16, 8))
    specs = {"0": PVQSpec.for_code_bits(16, 29, 52), "1": UniformSpec(3, 16), "2": PVQSpec(8, 3, 4)}
    layers = {name: {**spec_to_dict(s), "shape": list(model.get_submodule(name).weight.shape)}
              for name, s in specs.items()}
    replace_linears(model, layers, decode="auto", gpu=True)
    modes = {name: model.get_submodule(name).decode for name in specs}
    assert modes == {"0": "on-the-fly", "1": "once", "2": "on-the-fly"}
    replace_linears(model := nn.Sequential(nn.Linear(32, 16)), {"0": layers["0"]}, decode="once", gpu=True)
    assert model[0].decode == "once"
