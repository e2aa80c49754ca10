"""Tests for pvq.transforms.hadamard: exact Hadamard orders, orthogonality,
fast apply vs dense matrix, rotation plans, determinism, mixing, bad input."""

import pytest
import torch

from pvq.transforms.hadamard import (
    RandomHadamard,
    hadamard_matrix,
    has_hadamard,
    rotation_plan,
)

F64 = torch.float64


def _eye(n):
    return torch.eye(n, dtype=F64)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 44, 60, 64, 128, 24, 48, 96, 148, 8 * 36])
def test_hadamard_exact(n):
    h = hadamard_matrix(n)
    assert h.dtype == F64 and h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=F64))  # entries are +-1
    assert torch.equal(h @ h.T, n * _eye(n))  # exact, no tolerance


def test_every_supported_order_below_200_is_hadamard():
    orders = [n for n in range(1, 201) if has_hadamard(n)]
    # Paley I (q+1), Paley II (2(q+1)) and their 2^k multiples up to 200
    assert orders[:12] == [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert 172 not in orders and 92 not in orders  # 171, 85 / 91, 45 not prime
    for n in orders:
        h = hadamard_matrix(n)
        assert torch.equal(h @ h.T, n * _eye(n)), n


def test_hadamard_matrix_cache_is_not_mutable_from_outside():
    h = hadamard_matrix(12)
    h.zero_()
    assert torch.equal(hadamard_matrix(12) @ hadamard_matrix(12).T, 12 * _eye(12))


@pytest.mark.parametrize("n", [3, 6, 10, 14, 172, 0, -4])
def test_hadamard_missing_order_raises(n):
    assert not has_hadamard(n)
    with pytest.raises(ValueError, match=str(n)):
        hadamard_matrix(n)


def test_rotation_plans():
    assert rotation_plan(576) == ("hadamard", 36, 16)
    assert rotation_plan(1536) == ("hadamard", 12, 128)
    assert rotation_plan(4096) == ("hadamard", 1, 4096)
    assert rotation_plan(11008) == ("random_orthogonal", 43, 256)  # 172 not Paley
    assert has_hadamard(5504)  # Paley I (5503 prime) exists but is too big a factor
    assert rotation_plan(14336) == ("hadamard", 28, 512)  # 28 = Paley II, q = 13
    assert rotation_plan(18944) == ("hadamard", 148, 128)  # 148 = Paley II, q = 73
    assert rotation_plan(7) == ("random_orthogonal", 7, 1)
    assert rotation_plan(1) == ("hadamard", 1, 1)
    for d in [1, 7, 12, 576, 1536, 4096, 11008, 14336, 18944, 896, 3584]:
        _, m, p = rotation_plan(d)
        assert m * p == d and p & (p - 1) == 0


@pytest.mark.parametrize("dim", [1, 7, 12, 20, 28, 36, 64, 576, 1536])
def test_dense_matrix_orthogonal(dim):
    r = RandomHadamard(dim, seed=11).matrix()
    assert r.dtype == F64 and r.shape == (dim, dim)
    assert (r @ r.T - _eye(dim)).abs().max().item() < 1e-12  # square: R^T R = I too


def test_dense_matrix_orthogonal_4096():
    r = RandomHadamard(4096, seed=5).matrix()
    # pure Sylvester with signs: entries are exactly +-1/64 (rows spot-checked)
    assert torch.equal(r[::97].abs() * 64, torch.ones(43, 4096, dtype=F64))
    x = torch.randn(8, 4096, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert ((x @ r) @ r.T - x).abs().max().item() < 1e-12


@pytest.mark.parametrize("dim", [7, 576, 1536, 4096, 11008, 14336, 18944])
def test_apply_preserves_norms_and_inverts(dim):
    rot = RandomHadamard(dim, seed=3)
    x = torch.randn(4, 3, dim, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = rot.apply(x)
    assert y.dtype == F64 and y.shape == x.shape
    rel = (y.norm(dim=-1) / x.norm(dim=-1) - 1).abs().max().item()
    assert rel < 1e-12
    # inner products too (orthogonality, not just isometry of these vectors)
    xf, yf = x.reshape(-1, dim), y.reshape(-1, dim)
    assert ((yf @ yf.T) - (xf @ xf.T)).abs().max().item() < 1e-12 * dim
    assert (rot.apply_inverse(y) - x).abs().max().item() < 1e-12
    assert (rot.apply(rot.apply_inverse(x)) - x).abs().max().item() < 1e-12


@pytest.mark.parametrize("dim", [7, 12, 576, 1536])
def test_apply_matches_dense(dim):
    rot = RandomHadamard(dim, seed=42)
    r = rot.matrix()
    x = torch.randn(16, dim, dtype=F64, generator=torch.Generator().manual_seed(2))
    assert (rot.apply(x) - x @ r).abs().max().item() < 1e-12
    assert (rot.apply_inverse(x) - x @ r.T).abs().max().item() < 1e-12


def test_float32_apply_keeps_dtype_and_is_close():
    rot = RandomHadamard(576, seed=9)
    x = torch.randn(32, 576, generator=torch.Generator().manual_seed(3))
    y = rot.apply(x)
    assert y.dtype == torch.float32
    ref = (x.to(F64) @ rot.matrix()).float()
    assert (y - ref).abs().max().item() < 1e-5
    assert (rot.apply_inverse(y) - x).abs().max().item() < 1e-5


def test_seed_determinism():
    a, b = RandomHadamard(576, seed=7), RandomHadamard(576, seed=7)
    assert torch.equal(a.matrix(), b.matrix())
    assert a == b and hash(a) == hash(b)
    c = RandomHadamard(576, seed=8)
    assert a != c
    assert (a.matrix() - c.matrix()).abs().max().item() > 0.01
    # the fallback's random orthogonal factor is seeded too
    f1, f2, f3 = (RandomHadamard(7, seed=s) for s in (7, 7, 8))
    assert torch.equal(f1.matrix(), f2.matrix())
    assert (f1.matrix() - f3.matrix()).abs().max().item() > 0.01


def test_attributes_and_repr():
    rot = RandomHadamard(1536, seed=123)
    assert rot.dim == 1536 and rot.seed == 123
    assert rot.plan == ("hadamard", 12, 128)
    assert "1536" in repr(rot) and "123" in repr(rot)


@pytest.mark.parametrize("dim", [576, 11008])
def test_rotation_spreads_outlier_column(dim):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, dim, generator=g)
    w[:, 5] *= 1000.0  # one huge outlier input channel
    before = w.abs().max().item()
    after = RandomHadamard(dim, seed=1).apply(w).abs().max().item()
    assert before / after > 4.0


@pytest.mark.parametrize("dim", [0, -3, 2.0, "8", True, None])
def test_bad_dim(dim):
    with pytest.raises(ValueError):
        RandomHadamard(dim, seed=0)


@pytest.mark.parametrize("seed", [1.5, "1", None, -1, 2**64])
def test_bad_seed(seed):
    with pytest.raises(ValueError):
        RandomHadamard(8, seed=seed)


def test_bad_inputs_to_apply():
    rot = RandomHadamard(12, seed=0)
    with pytest.raises(ValueError, match=r"12.*10"):
        rot.apply(torch.zeros(3, 10))
    with pytest.raises(ValueError, match="12"):
        rot.apply_inverse(torch.zeros(12, 3))
    with pytest.raises(ValueError, match="12"):
        rot.apply(torch.tensor(1.0))
    with pytest.raises(ValueError, match="dtype"):
        rot.apply(torch.zeros(2, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="dtype"):
        rot.apply_inverse(torch.zeros(12, dtype=torch.int32))
    with pytest.raises(ValueError):
        rotation_plan(0)
