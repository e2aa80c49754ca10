"""The PVQ codec: exact counts, bijective enumeration, search optimality, gains, packing, bits."""
import math

import pytest
import torch

from pvq import codec
from pvq.codec import bitpack, enumeration, gain, gainshape, pyramid, uniform
from pvq.codec.search import search


def sqnr_db(w, w_hat):
    w, w_hat = w.double(), w_hat.double()
    return 10 * math.log10(float((w**2).sum() / ((w - w_hat) ** 2).sum()))


# ---------------------------------------------------------------------------------------- count
def closed_form(n, k):
    if k == 0:
        return 1
    return sum(2**i * math.comb(n, i) * math.comb(k - 1, i - 1) for i in range(1, min(n, k) + 1))


def test_count_known_values_and_closed_form():
    assert codec.count(8, 8) == 157184
    assert all(codec.count(2, k) == 4 * k for k in range(1, 50))
    assert codec.count(5, 0) == 1 and codec.count(1, 7) == 2
    for n in range(1, 13):
        for k in range(0, 13):
            assert codec.count(n, k) == closed_form(n, k)
    # arbitrary precision: V(128, 128) needs 321 bits
    assert codec.count(128, 128).bit_length() == 321
    assert codec.count(128, 128) == closed_form(128, 128)


@pytest.mark.parametrize("n,k", [(0, 3), (-1, 2), (3, -1), (2.5, 3), (True, 2)])
def test_count_rejects_bad_arguments(n, k):
    with pytest.raises(ValueError):
        codec.count(n, k)


# ---------------------------------------------------------------------------------- enumeration
SMALL = [(1, 0), (1, 5), (2, 7), (3, 4), (4, 6), (5, 3), (6, 6), (7, 5), (8, 5), (9, 4), (12, 3), (16, 2)]


@pytest.mark.parametrize("n,k", SMALL)
def test_enumeration_is_a_bijection(n, k):
    v = codec.count(n, k)
    idx = torch.arange(v)
    for enc, dec in [(codec.encode, codec.decode), (pyramid.encode_cwrs, pyramid.decode_cwrs)]:
        y = dec(idx, n, k)
        assert y.shape == (v, n)
        assert bool((y.abs().sum(1) == k).all())
        assert len({tuple(r) for r in y.tolist()}) == v  # all distinct, so all of P(n, k)
        assert torch.equal(enc(y, k), idx)


@pytest.mark.parametrize("n,k", [(16, 29), (16, 56), (8, 100), (12, 40), (24, 24), (10, 17), (20, 33)])
def test_enumeration_round_trip_large(n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    x = torch.randn(3000, n, generator=g)
    y = search(x, k)
    idx = codec.encode(y, k)
    assert int(idx.min()) >= 0 and int(idx.max()) < codec.count(n, k)
    assert torch.equal(codec.decode(idx, n, k), y)
    # random indices, including both ends of the range
    v = codec.count(n, k)
    r = torch.randint(0, 2**62, (2000,), generator=g) % v
    r[0], r[1] = 0, v - 1
    assert torch.equal(codec.encode(codec.decode(r, n, k), k), r)


def test_enumeration_leading_shapes():
    y = search(torch.randn(3, 5, 8), 9)
    idx = codec.encode(y, 9)
    assert idx.shape == (3, 5)
    assert torch.equal(codec.decode(idx, 8, 9), y)


def test_enumeration_refuses_bad_input():
    with pytest.raises(ValueError, match="63"):
        codec.encode(torch.zeros(1, 32, dtype=torch.int64).index_fill_(1, torch.tensor([0]), 60), 60)
    with pytest.raises(ValueError, match="63"):
        codec.decode(torch.zeros(1, dtype=torch.int64), 64, 110)
    with pytest.raises(ValueError, match="outside"):
        codec.decode(torch.tensor([codec.count(4, 3)]), 4, 3)
    with pytest.raises(ValueError, match="outside"):
        codec.decode(torch.tensor([-1]), 4, 3)
    with pytest.raises(ValueError, match="sum"):
        codec.encode(torch.tensor([[1, 1, 0]]), 3)
    with pytest.raises(ValueError, match="integer"):
        codec.encode(torch.tensor([[1.0, 2.0]]), 3)
    with pytest.raises(ValueError, match="int64"):
        codec.decode(torch.tensor([0.0]), 4, 3)
    with pytest.raises(ValueError):
        codec.decode(torch.tensor([0]), 0, 3)


# ----------------------------------------------------------------------------------------- search
def optimal_cosines(x, n, k):
    """Brute force: the best cosine over every point of P(n, k)."""
    pts = codec.decode(torch.arange(codec.count(n, k)), n, k).double()
    pts = pts / pts.norm(dim=1, keepdim=True)
    xs = x / x.norm(dim=1, keepdim=True)
    return torch.cat([(c @ pts.T).max(dim=1).values for c in xs.split(256)])


def cosines(x, y):
    y = y.double()
    return (x * y).sum(1) / y.norm(dim=1) / x.norm(dim=1)


@pytest.mark.parametrize("n,k", [(4, 6), (6, 5), (8, 8), (5, 12), (3, 20), (12, 6), (8, 3)])
def test_search_finds_the_optimum_more_often_than_the_opus_greedy(n, k):
    g = torch.Generator().manual_seed(7 * n + k)
    x = torch.randn(1500, n, dtype=torch.float64, generator=g)
    best = optimal_cosines(x, n, k)
    y_greedy = search(x, k, refine=0)
    y = search(x, k)
    for yy in (y, y_greedy):
        assert bool((yy.abs().sum(1) == k).all())
        assert bool(((yy == 0) | (torch.sign(yy) == torch.sign(x).long())).all())
    rate_greedy = float((cosines(x, y_greedy) >= best - 1e-12).double().mean())
    rate = float((cosines(x, y) >= best - 1e-12).double().mean())
    assert rate >= rate_greedy
    assert rate >= 0.99, (rate, rate_greedy)
    # never worse than the greedy on any single group
    assert bool((cosines(x, y) >= cosines(x, y_greedy) - 1e-12).all())


def test_search_measured_rates_on_8_8():
    """The numbers quoted in search.py: greedy 91%, with pulse moves > 99.5% at n=8, k=8."""
    x = torch.randn(2000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    best = optimal_cosines(x, 8, 8)
    greedy = float((cosines(x, search(x, 8, refine=0)) >= best - 1e-12).double().mean())
    refined = float((cosines(x, search(x, 8)) >= best - 1e-12).double().mean())
    assert 0.85 < greedy < 0.96
    assert refined > 0.995


def test_search_edge_cases():
    assert torch.equal(search(torch.zeros(2, 4), 3).abs().sum(1), torch.tensor([3, 3]))
    assert torch.equal(search(torch.randn(5, 4), 0), torch.zeros(5, 4, dtype=torch.int64))
    y = search(torch.tensor([[0.0, -2.0, 0.0]]), 4)
    assert y.tolist() == [[0, -4, 0]]


@pytest.mark.parametrize(
    "x,k,msg",
    [
        (torch.tensor([[1.0, float("nan")]]), 2, "NaN"),
        (torch.tensor([[1.0, float("inf")]]), 2, "NaN"),
        (torch.tensor([[1, 2]]), 2, "floating"),
        (torch.randn(2, 3), -1, "k"),
        (torch.randn(2, 0), 2, "n"),
    ],
)
def test_search_rejects_bad_input(x, k, msg):
    with pytest.raises(ValueError, match=msg):
        search(x, k)


# ------------------------------------------------------------------------------------------- gain
def rotated_gaussian_gains(n, m, rows=4000):
    """Normalised gains r = |w_g| / rms over a row of i.i.d. Gaussian rows (like rotated weights)."""
    w = torch.randn(rows, m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    norms = w.reshape(rows, m // n, n).norm(dim=-1)
    return norms / norms.pow(2).mean(dim=1, keepdim=True).sqrt()


@pytest.mark.parametrize("n,m,levels", [(16, 576, 8), (8, 1536, 16), (16, 4096, 5)])
def test_beta_lloyd_max_beats_uniform_gain_grid(n, m, levels):
    r = rotated_gaussian_gains(n, m)
    beta = gain.fit_gain_codebook("beta", r, n, m, levels)
    uni = gain.fit_gain_codebook("uniform", r, n, m, levels)
    mse = lambda b: float(((b.dequantize(b.quantize(r)) - r) ** 2).mean())
    assert beta.stored_bits == 0 and uni.stored_bits == 32
    assert mse(beta) < 0.8 * mse(uni)
    # Lloyd-Max condition on the data it was derived for: each level is (near) its cell's mean
    idx = beta.quantize(r)
    for j in range(levels):
        cell = r[idx == j]
        if cell.numel() > 2000:
            assert abs(float(cell.mean()) - float(beta.levels[j])) < 0.02


def test_beta_density_matches_sampled_gains():
    n, m = 16, 576
    grid, p = gain.beta_gain_density(n, m)
    r = rotated_gaussian_gains(n, m)
    mean_model = float((grid * p).sum())
    assert abs(mean_model - float(r.mean())) < 0.01
    assert abs(float((grid**2 * p).sum()) - 1.0) < 1e-3  # E[r^2] = 1 by construction


# ------------------------------------------------------------------------------------------ pack
@pytest.mark.parametrize("width", [1, 2, 3, 7, 8, 9, 13, 31, 32, 33, 48, 52, 57, 63])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1000])
def test_bitpack_round_trip(width, count):
    g = torch.Generator().manual_seed(width * 7919 + count)
    codes = torch.randint(0, 2**62, (count,), generator=g) * 2 + 1 & ((1 << width) - 1)
    if count:
        codes[0] = (1 << width) - 1
    stream = bitpack.pack(codes, width)
    assert stream.dtype == torch.uint8 and stream.numel() == (count * width + 7) // 8
    assert torch.equal(bitpack.unpack(stream, count, width), codes)


def test_bitpack_is_dense_and_rejects_bad_input():
    stream = bitpack.pack(torch.tensor([1, 0, 1], dtype=torch.int64), 1)
    assert stream.tolist() == [0b101]
    with pytest.raises(ValueError):
        bitpack.pack(torch.tensor([4]), 2)
    with pytest.raises(ValueError):
        bitpack.pack(torch.tensor([1]), 64)
    with pytest.raises(ValueError):
        bitpack.unpack(torch.zeros(3, dtype=torch.uint8), 5, 7)


# ------------------------------------------------------------------------------ matrix quantizers
def test_pvq_matrix_round_trip_and_exact_bits():
    w = torch.randn(96, 576, generator=torch.Generator().manual_seed(3))
    spec = codec.PVQSpec.for_code_bits(16, 29, 52)
    assert spec.gain_levels == (1 << 52) // codec.count(16, 29)
    packed = codec.quantize(w, spec)
    w_hat = packed.dequantize()
    # the packed stream decodes to the exact shapes and gains quantize() chose
    idx, lvl = packed.unpack()
    y = search(w.reshape(96, 36, 16), 29)
    assert torch.equal(codec.decode(idx, 16, 29), y)
    rebuilt = gainshape.reconstruct(y, lvl, packed.row_scale, packed.gain_levels).reshape(96, 576)
    assert torch.allclose(rebuilt, w_hat)
    report = codec.bits_per_weight(spec, 96, 576, rotation_seeds=2)
    assert report.codes == 8 * packed.codes.numel() and packed.codes.numel() == math.ceil(96 * 36 * 52 / 8)
    assert report.total == packed.nbits + 128
    assert report.bits_per_weight == pytest.approx((96 * 36 * 52 + 96 * 16 + 128) / (96 * 576))
    # the stored code spends within 0.01 bit per weight of log2 V + log2 L
    info = (codec.index_bits(16, 29) + math.log2(spec.gain_levels)) / 16
    assert 52 / 16 - info < 0.01


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uniform_rtn_round_trip_and_bits(bits):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))
    spec = codec.UniformSpec(bits, 128)
    packed = codec.quantize(w, spec)
    w_hat = packed.dequantize()
    scale = packed.scale.float().repeat_interleave(128, dim=1)
    assert bool(((w - w_hat).abs() <= scale / 2 + 1e-3).all())
    assert packed.nbits == codec.bits_per_weight(spec, 64, 256).total
    assert packed.nbits / w.numel() == bits + 0.25


def test_uniform_short_last_group_costs_its_own_scale():
    w = torch.randn(8, 576, generator=torch.Generator().manual_seed(0))
    packed = codec.quantize(w, codec.UniformSpec(3, 128))
    assert packed.scale.shape == (8, 5)
    assert packed.nbits == 8 * 576 * 3 + 8 * 5 * 32
    scale = packed.scale.float().repeat_interleave(128, dim=1)[:, :576]
    assert bool(((w - packed.dequantize()).abs() <= scale / 2 + 1e-3).all())


def _heavy_tailed(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return torch.where(torch.rand(rows, cols, generator=g) < 0.01, 6 * w, w)  # 1% outliers, as real weights have


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_fit_lowers_the_error_of_the_same_grid(bits):
    w = _heavy_tailed(64, 512, bits)
    spec = codec.UniformSpec(bits, 128)
    rtn, hqq = codec.quantize(w, spec), codec.quantize(w, spec, "hqq")
    assert hqq.nbits == rtn.nbits and torch.equal(hqq.scale, rtn.scale)  # the same step and storage, other offsets
    err = {k: (p.dequantize() - w).abs() for k, p in (("rtn", rtn), ("hqq", hqq))}
    lp = {k: e.pow(uniform.HQQ_P).reshape(64, 4, 128).sum(-1) for k, e in err.items()}
    assert bool((lp["hqq"] <= lp["rtn"] * (1 + 1e-6)).all())  # no group's objective gets worse ...
    assert float(lp["hqq"].sum()) < 0.99 * float(lp["rtn"].sum())  # ... and the whole improves
    assert float(err["hqq"].pow(2).mean()) < float(err["rtn"].pow(2).mean())  # the squared error follows here
    with pytest.raises(ValueError, match="grid fit"):
        codec.quantize(w, spec, "best")


def test_hqq_short_last_group_is_fitted_on_its_own_weights():
    w = _heavy_tailed(8, 576, 7)
    whole = codec.quantize(w, codec.UniformSpec(3, 128), "hqq")
    tail = codec.quantize(w[:, 512:].contiguous(), codec.UniformSpec(3, 64), "hqq")  # the padding must not count
    assert torch.equal(whole.offset[:, 4], tail.offset[:, 0]) and torch.equal(whole.scale[:, 4], tail.scale[:, 0])
    torch.testing.assert_close(whole.dequantize()[:, 512:], tail.dequantize(), rtol=0, atol=0)


def test_pvq_beats_rtn_and_nears_shannon_on_gaussian():
    w = torch.randn(256, 2048, generator=torch.Generator().manual_seed(5))
    pvq_spec = codec.PVQSpec.for_code_bits(16, 29, 52)
    rtn = sqnr_db(w, codec.quantize(w, codec.UniformSpec(3, 128)).dequantize())
    pv = codec.quantize(w, pvq_spec)
    pvq_db = sqnr_db(w, pv.dequantize())
    rate = pv.nbits / w.numel()
    assert abs(rate - 3.25) < 0.02
    assert pvq_db > rtn + 2.5
    assert pvq_db > 6.02 * rate - 2.5  # within 2.5 dB of the Gaussian rate-distortion bound


def test_quantizers_reject_bad_shapes():
    with pytest.raises(ValueError, match="multiple"):
        codec.quantize(torch.randn(4, 100), codec.PVQSpec(16, 10))
    with pytest.raises(ValueError):
        codec.UniformSpec(3, 0)
    with pytest.raises(ValueError, match="63"):
        codec.PVQSpec(64, 110)
    with pytest.raises(ValueError, match="gain"):
        codec.PVQSpec(16, 10, 4, gain="log")
    with pytest.raises(ValueError):
        codec.quantize(torch.randn(4, 16), "rtn")


def test_fake_quantize_gives_the_decoded_floats():
    from pvq.codec.gainshape import fake_quantize

    w = torch.randn(32, 192, generator=torch.Generator().manual_seed(5))
    for spec in (gainshape.PVQSpec(16, 29, 7, "beta", "tensor"), gainshape.PVQSpec(12, 10, 5, "beta", "row"),
                 gainshape.PVQSpec(8, 20, 30, "empirical", "row")):
        assert torch.equal(fake_quantize(w, spec), codec.quantize(w, spec).dequantize())


@pytest.mark.parametrize("scale", ["row", "tensor"])
def test_row_chunks_change_nothing(monkeypatch, scale):
    """The data-free codec and the decoder work a few rows at a time; the codes and floats are those of one pass."""
    from pvq.codec import gainshape

    w = torch.randn(37, 48, generator=torch.Generator().manual_seed(3))
    spec = gainshape.PVQSpec(8, 6, 16, "beta", scale)
    whole = gainshape.quantize(w, spec)
    monkeypatch.setattr(gainshape, "CHUNK_WEIGHTS", 100)  # two rows a chunk, the last one short
    assert len(gainshape.row_chunks(37, 48)) == 19
    parts = gainshape.quantize(w, spec)
    assert torch.equal(parts.codes, whole.codes) and torch.equal(parts.row_scale, whole.row_scale)
    got = parts.dequantize(torch.float32)
    monkeypatch.setattr(gainshape, "CHUNK_WEIGHTS", 1 << 21)
    assert torch.equal(got, whole.dequantize(torch.float32))
    assert torch.equal(got, gainshape.fake_quantize(w, spec))


@pytest.mark.parametrize("width", [1, 7, 13, 52])
def test_a_range_of_packed_codes_unpacks_alone(width):
    """unpack_range reads codes [start, start + count) of a stream, from any start (not only a byte's)."""
    g = torch.Generator().manual_seed(width)
    codes = torch.randint(0, 1 << min(width, 62), (1000,), generator=g, dtype=torch.int64) % (1 << width)
    stream = bitpack.pack(codes, width)
    for start, count in ((0, 1000), (3, 0), (5, 17), (8, 992), (999, 1), (123, 456)):
        assert torch.equal(bitpack.unpack_range(stream, 1000, start, count, width), codes[start:start + count])
    with pytest.raises(ValueError, match="not within"):
        bitpack.unpack_range(stream, 1000, 990, 11, width)


@pytest.mark.parametrize("spec", [codec.PVQSpec(8, 5, 16), codec.PVQSpec(8, 5, 16, scale="tensor"),
                                  codec.UniformSpec(3, 24)], ids=["pvq-row", "pvq-tensor", "uniform"])
def test_rows_of_a_packed_matrix_dequantize_as_the_whole_does(spec):
    w = torch.randn(37, 48, generator=torch.Generator().manual_seed(2))
    packed = codec.quantize(w, spec)
    whole = packed.dequantize()
    for rows in ((0, 37), (0, 1), (5, 19), (36, 37), (7, 7)):
        assert torch.equal(packed.dequantize(rows=rows), whole[rows[0]:rows[1]])
