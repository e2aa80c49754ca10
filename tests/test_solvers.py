"""The Hessian-aware solver (GPTQ with vector steps): exact reduction to the codec at H = I, the
block-LDL algebra, the gain over round-to-nearest on correlated inputs, and a packed result that
is exactly the simulated one (Frantar et al., "GPTQ", arXiv 2210.17323)."""
import pytest
import torch

from pvq import codec
from pvq.codec import gainshape, uniform
from pvq.solvers.gptq import group_metrics, gptq, inverse_cholesky
from pvq.solvers import hessian as hessian_module
from pvq.solvers.hessian import HessianAccumulator
from pvq.solvers.steppers import PVQStepper, Stepper, UniformStepper

ROWS, COLS, N_CALIB = 64, 256, 2048
UNI = codec.UniformSpec(3, 128)  # 3-bit g128: 3.25 bits per weight
PVQ = codec.PVQSpec.for_code_bits(16, 27, 52)  # n=16, k=27, L=21: 52-bit codes, 3.25 bits per weight


def calib(cols=COLS, seed=0, zero_cols=()):
    """Correlated inputs X = Z M [N, cols]; M's latent directions have log-normal scales, so H's
    spectrum is spread the way LLM activations' is (a few strong directions, many weak ones)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * torch.exp(torch.randn(cols, 1, generator=g))
    x = torch.randn(N_CALIB, cols, generator=g) @ mix
    x[:, list(zero_cols)] = 0
    return x


def weights(rows=ROWS, cols=COLS, seed=1):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def hessian_of(x):
    return (x.double().T @ x.double()) / x.shape[0]


def out_err(x, w, w_hat):
    """||X W^T - X W_hat^T||^2: the layer output error the solver minimises."""
    return float(((x.double() @ (w - w_hat).double().T) ** 2).sum())


# ------------------------------------------------------------------------------ Hessian
def test_hessian_accumulator_matches_direct_sum_over_batches():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 50, 32, generator=g), torch.randn(7, 32, generator=g).bfloat16(),
               torch.randn(3, 4, 5, 32, generator=g), torch.zeros(0, 32)]
    acc = HessianAccumulator(32)
    for b in batches:
        acc.add_batch(b)
    x = torch.cat([b.reshape(-1, 32).double() for b in batches])  # bf16 values are exact in float64
    assert acc.count == x.shape[0] == 167
    h = acc.hessian()
    assert h.dtype == torch.float64 and h.shape == (32, 32)
    # each chunk's product is float32 (hessian.py says why): about 1e-7 of an entry, never more
    torch.testing.assert_close(h, x.T @ x / x.shape[0], rtol=1e-6, atol=1e-6)


def test_hessian_accumulator_rejects_bad_input():
    acc = HessianAccumulator(8)
    with pytest.raises(ValueError, match="no input rows"):
        acc.hessian()
    with pytest.raises(ValueError, match=r"x\[\.\.\., 8\]"):
        acc.add_batch(torch.randn(4, 7))
    with pytest.raises(ValueError):
        acc.add_batch(torch.ones(4, 8, dtype=torch.int64))
    acc.add_batch(torch.ones(2, 8))
    for bad in (float("nan"), float("inf")):
        x = torch.ones(3, 8)
        x[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            acc.add_batch(x)
    huge = torch.ones(3, 8)
    huge[0, 5] = 3e30  # finite, but its square is not a float32
    with pytest.raises(ValueError, match="too large"):
        acc.add_batch(huge)
    # a rejected batch leaves the running sum untouched
    assert acc.count == 2 and torch.equal(acc.hessian(), torch.ones(8, 8, dtype=torch.float64))


def test_a_bad_value_in_any_chunk_of_a_batch_is_refused_before_any_chunk_is_added(monkeypatch):
    """Batches are multiplied in chunks of rows, each checked by its product's diagonal; a batch of several
    chunks is checked whole first, or the chunks before the bad one would already be in the sum."""
    monkeypatch.setattr(hessian_module, "_ROWS_PER_CHUNK", 4)
    acc = HessianAccumulator(8)
    acc.add_batch(torch.ones(2, 8))
    for row in (0, 5, 9):  # first, middle and last of three chunks
        for bad in (float("nan"), float("-inf")):
            x = torch.ones(10, 8)
            x[row, 7] = bad
            with pytest.raises(ValueError, match="NaN or inf"):
                acc.add_batch(x)
    assert acc.count == 2 and torch.equal(acc.hessian(), torch.ones(8, 8, dtype=torch.float64))
    x = torch.randn(10, 8)
    acc.add_batch(x)  # and in chunks, the same sum as whole
    want = (torch.ones(2, 8).double().T @ torch.ones(2, 8).double() + x.double().T @ x.double()) / 12
    assert torch.allclose(acc.hessian(), want, atol=1e-6)
    for dim in (0, -3, 2.0, True):
        with pytest.raises(ValueError):
            HessianAccumulator(dim)


# ----------------------------------------------------------------------- block-LDL algebra
def test_group_metric_is_the_loss_left_after_optimal_compensation():
    """A_G = inv(U_GG^T U_GG) must equal the Schur complement of the still-free columns F = [j, cols):
    min over the later weights of the quadratic loss, for a fixed error on group G."""
    cols, d, lam = 48, 8, 0.1
    h = hessian_of(calib(cols, seed=3)[:200])
    u = inverse_cholesky(h, lam)
    hd = h + lam * torch.eye(cols, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(hd), rtol=1e-9, atol=1e-12)
    assert torch.equal(u, u.triu())
    u_inv, metric = group_metrics(u, d)
    for gi in range(cols // d):
        j = gi * d
        f = hd[j:, j:]
        schur = f[:d, :d] - f[:d, d:] @ torch.linalg.solve(f[d:, d:], f[d:, :d])
        torch.testing.assert_close(metric[gi], schur, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(u_inv[gi] @ u[j : j + d, j : j + d], torch.eye(d, dtype=torch.float64))


def test_lazy_block_updates_equal_eager_updates():
    """Lazy batched updates are the same sums regrouped: blocks of one step (eager) and of 128
    columns give the same codes up to rare float32 rounding ties."""
    x = calib()
    h, w = hessian_of(x), weights()
    for make in (lambda: UniformStepper(UNI), lambda: PVQStepper(PVQ)):
        eager, _ = gptq(w, h, make(), block_size=1)
        lazy, _ = gptq(w, h, make(), block_size=128)
        assert float((eager != lazy).float().mean()) < 0.01
        assert out_err(x, w, lazy) == pytest.approx(out_err(x, w, eager), rel=0.01)


# ------------------------------------------------------------ H = I is round-to-nearest
@pytest.mark.parametrize("spec", [UNI, codec.UniformSpec(4, 64), codec.UniformSpec(2, 96)])
@pytest.mark.parametrize("shape", [(ROWS, COLS), (24, 200)])  # 200 columns: a short last group
def test_identity_hessian_uniform_is_exactly_rtn(spec, shape):
    w = weights(*shape)
    w_hat, packed = gptq(w, torch.eye(shape[1], dtype=torch.float64), UniformStepper(spec))
    ref = uniform.quantize(w, spec)
    assert torch.equal(w_hat, ref.dequantize())
    assert torch.equal(w_hat, packed.dequantize())
    assert torch.equal(packed.codes, ref.codes) and torch.equal(packed.scale, ref.scale)
    assert torch.equal(packed.offset, ref.offset)


@pytest.mark.parametrize(
    "spec",
    [PVQ, codec.PVQSpec(8, 10, 16), codec.PVQSpec(16, 12, 16, gain="empirical"),
     codec.PVQSpec(8, 6, 8, gain="uniform", scale="tensor")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_hessian_pvq_is_exactly_the_codec(spec, dtype):
    w = weights().to(dtype)
    w_hat, packed = gptq(w, torch.eye(COLS, dtype=torch.float64), PVQStepper(spec))
    ref = gainshape.quantize(w, spec)
    assert torch.equal(w_hat, ref.dequantize())
    assert torch.equal(w_hat, packed.dequantize())
    assert torch.equal(packed.codes, ref.codes) and torch.equal(packed.row_scale, ref.row_scale)
    assert torch.equal(packed.gain_levels, ref.gain_levels)


# ------------------------------------------------------------------ correlated inputs
@pytest.mark.parametrize("spec,make", [(UNI, lambda: UniformStepper(UNI)), (PVQ, lambda: PVQStepper(PVQ))],
                         ids=["uniform-3bit-g128", "pvq-n16k27"])
def test_gptq_beats_rtn_on_correlated_inputs(spec, make):
    x = calib()
    w = weights()
    w_hat, packed = gptq(w, hessian_of(x), make())
    assert torch.equal(w_hat, packed.dequantize())  # the simulated and the packed paths agree
    assert w_hat.dtype == torch.float32 and w_hat.shape == w.shape
    rtn = out_err(x, w, codec.quantize(w, spec).dequantize())
    ratio = out_err(x, w, w_hat) / rtn
    assert ratio <= 0.9, f"GPTQ/RTN output error {ratio:.3f}"


def test_hessian_gain_is_optimal_per_group_when_groups_do_not_interact():
    """With H block-diagonal over the groups nothing is compensated (U_GR = 0), so both runs pick the
    same shapes as RTN, and the A-metric gain (u A w)/(u A u), rounded to the nearest level, is the
    best level for each group's loss e A e^T: hessian_gain=True is no worse in every row."""
    g = torch.Generator().manual_seed(5)
    blocks = [hessian_of(torch.randn(N_CALIB, 16, generator=g) @ torch.randn(16, 16, generator=g))
              for _ in range(COLS // 16)]
    h, w = torch.block_diag(*blocks), weights()
    on, p_on = gptq(w, h, PVQStepper(PVQ, hessian_gain=True))
    off, p_off = gptq(w, h, PVQStepper(PVQ, hessian_gain=False))
    assert torch.equal(on, p_on.dequantize()) and torch.equal(off, p_off.dequantize())
    assert torch.equal(off, gainshape.quantize(w, PVQ).dequantize())  # plain gains: exactly RTN
    hd = h + 0.01 * h.diagonal().mean() * torch.eye(COLS, dtype=torch.float64)  # the metric gptq used

    def row_loss(w_hat):
        d = (w - w_hat).double()
        return ((d @ hd) * d).sum(1)

    l_on, l_off = row_loss(on), row_loss(off)
    assert bool((l_on <= l_off * (1 + 1e-9)).all())
    assert float(l_on.sum()) <= 0.97 * float(l_off.sum())


def test_hessian_gain_is_no_worse_on_correlated_inputs():
    """On dense correlated Hessians each group's loss still drops, but the pushed errors change all
    later choices, so single runs scatter by a few per cent either way; summed over four problems
    the A-metric gain must not lose."""
    on = off = 0.0
    for seed in range(4):
        x = calib(seed=seed)
        w, h = weights(seed=10 + seed), hessian_of(x)
        w_on, p_on = gptq(w, h, PVQStepper(PVQ, hessian_gain=True))
        w_off, p_off = gptq(w, h, PVQStepper(PVQ, hessian_gain=False))
        assert torch.equal(w_on, p_on.dequantize()) and torch.equal(w_off, p_off.dequantize())
        on += out_err(x, w, w_on)
        off += out_err(x, w, w_off)
    assert on <= off


@pytest.mark.parametrize("make", [lambda: UniformStepper(UNI), lambda: PVQStepper(PVQ)], ids=["uniform", "pvq"])
def test_dead_inputs(make):
    dead = (0, 17, 100, 255)
    x = calib(zero_cols=dead)
    w, h = weights(), hessian_of(x)
    assert all(float(h[i, i]) == 0 for i in dead)
    h_before = h.clone()
    w_hat, packed = gptq(w, h, make())
    assert torch.equal(h, h_before)  # the caller's Hessian is not modified
    assert torch.isfinite(w_hat).all() and torch.equal(w_hat, packed.dequantize())
    spec = UNI if isinstance(packed, codec.PackedUniform) else PVQ
    assert out_err(x, w, w_hat) <= 0.9 * out_err(x, w, codec.quantize(w, spec).dequantize())


def test_act_order_uniform_only():
    x = calib()
    w, h = weights(), hessian_of(x)
    plain, _ = gptq(w, h, UniformStepper(UNI))
    ordered, packed = gptq(w, h, UniformStepper(UNI), act_order=True)
    assert torch.equal(ordered, packed.dequantize())
    assert not torch.equal(ordered, plain)
    err = out_err(x, w, ordered)
    assert err == err and err < float("inf")
    assert err <= out_err(x, w, uniform.quantize(w, UNI).dequantize())
    # static groups: the grid of every group is the RTN grid of the unpermuted w
    ref = uniform.quantize(w, UNI)
    assert torch.equal(packed.scale, ref.scale) and torch.equal(packed.offset, ref.offset)
    with pytest.raises(ValueError, match="act_order is only supported for the uniform grid"):
        gptq(w, h, PVQStepper(PVQ), act_order=True)


# ------------------------------------------------------------------------- robustness
def test_singular_hessian_is_damped_and_indefinite_one_is_refused():
    x = calib()[:, :64].repeat(1, 4)  # every input appears 4 times: H has rank 64 of 256
    h, w = hessian_of(x), weights()
    w_hat, packed = gptq(w, h, UniformStepper(UNI), damp=0.0)  # undamped fails; retries add damping
    assert torch.isfinite(w_hat).all() and torch.equal(w_hat, packed.dequantize())
    with pytest.raises(ValueError, match="not positive definite"):
        gptq(w, -torch.eye(COLS, dtype=torch.float64), UniformStepper(UNI))


def test_bad_arguments():
    w, h = weights(), torch.eye(COLS, dtype=torch.float64)
    with pytest.raises(ValueError):
        gptq(w, h[:-1, :-1], UniformStepper(UNI))
    with pytest.raises(ValueError, match="multiple"):
        gptq(w[:, :250], h[:250, :250], PVQStepper(PVQ))
    bad = w.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        gptq(bad, h, UniformStepper(UNI))
    with pytest.raises(ValueError):
        gptq(w, h, UniformStepper(UNI), block_size=0)
    with pytest.raises(RuntimeError):
        PVQStepper(PVQ).finish()
    # the Protocol's members with its signatures (isinstance on a runtime Protocol checks names only)
    import inspect

    for stepper in (UniformStepper(UNI), PVQStepper(PVQ)):
        for name in ("begin", "step", "finish"):
            want = list(inspect.signature(getattr(Stepper, name)).parameters)[1:]
            got = list(inspect.signature(getattr(stepper, name)).parameters)
            assert got[: len(want)] == want, (type(stepper).__name__, name, got)
    assert UniformStepper(UNI).dim == 1 and PVQStepper(PVQ).dim == PVQ.n


# ------------------------------------------------------------------------------ row blocks
@pytest.mark.parametrize("make, act_order", [
    (lambda: PVQStepper(PVQ), False),
    (lambda: PVQStepper(codec.PVQSpec(16, 27, 21, scale="tensor")), False),
    (lambda: UniformStepper(UNI), False),
    (lambda: UniformStepper(UNI), True),
], ids=["pvq-row", "pvq-tensor", "uniform", "uniform-act-order"])
def test_a_matrix_solved_a_block_of_rows_at_a_time_gives_the_same_codes(monkeypatch, make, act_order):
    """Rows never interact in GPTQ, so solving 200 rows in blocks of 48 (and a short last one) gives the bytes
    and the values of one solve of them all, a dead input and act-order included, and reports every block."""
    x = calib(zero_cols=(3,))
    w, h = weights(rows=200), hessian_of(x)
    import pvq.solvers.gptq as solver
    whole_hat, whole = gptq(w, h, make(), act_order=act_order)
    import pvq.codec.gainshape as gainshape
    monkeypatch.setattr(gainshape, "CHUNK_WEIGHTS", 16 * COLS)  # row chunks of 16 rows, solves of 3 chunks
    monkeypatch.setattr(solver, "SOLVE_WEIGHTS", 48 * COLS)
    assert solver.rows_per_solve(200, COLS) == 48
    seen = []
    hat, packed = gptq(w, h, make(), act_order=act_order, on_rows=lambda part, q: seen.append((part, q.clone())))
    assert torch.equal(packed.codes, whole.codes) and torch.equal(hat, whole_hat)
    assert [(p.start, p.stop) for p, _ in seen] == [(0, 48), (48, 96), (96, 144), (144, 192), (192, 200)]
    assert torch.equal(torch.cat([q for _, q in seen]), whole_hat)
    none, again = gptq(w, h, make(), act_order=act_order, keep_hat=False)
    assert none is None and torch.equal(again.codes, whole.codes)


def test_the_error_summed_over_blocks_of_rows_is_the_whole_matrix_error():
    from pvq.solvers.hessian import ErrorSum, relative_error
    w = weights(rows=300)
    w_hat = w + 0.1 * weights(rows=300, seed=5)
    h = hessian_of(calib())
    for metric in (None, h):
        total = ErrorSum(COLS, metric)
        for s in range(0, 300, 128):
            total.add(w[s:s + 128], w_hat[s:s + 128])
        assert total.value() == pytest.approx(relative_error(w, w_hat, metric), rel=1e-12)


def test_a_matrix_of_no_rows_solves_to_no_codes():
    hat, packed = gptq(torch.zeros(0, COLS), torch.eye(COLS, dtype=torch.float64), PVQStepper(PVQ))
    assert hat.shape == (0, COLS) and packed.codes.numel() == 0


# ------------------------------------------------------------------ the factor in H's memory
def test_the_factor_is_made_in_the_hessians_memory_and_retried_from_its_backup():
    from pvq.solvers.gptq import column_major, factor_in_place
    h = hessian_of(calib()[:300])
    lam = 0.01 * float(h.diagonal().mean())
    want = inverse_cholesky(h, lam)
    for work in (h.clone(), h.T.contiguous().T):  # row-major, and column-major as a rotated Hessian comes
        ptr = work.data_ptr()
        u, used = factor_in_place(work, lam)
        assert torch.equal(u, want) and used == lam and u.data_ptr() == ptr
    # singular and undamped: the first try fails, the retries start again from the kept lower triangle
    x = calib()[:, :64].repeat(1, 4)
    single = hessian_of(x)
    u, used = factor_in_place(single.clone(), 0.0)
    assert used > 0 and torch.equal(u, inverse_cholesky(single, used))
    # a matrix that is not exactly symmetric keeps its values when made column-major (read as it was)
    m = torch.randn(5, 5, dtype=torch.float64)
    assert torch.equal(column_major(m.clone()), m) and column_major(m.clone()).mT.is_contiguous()
    with pytest.raises(ValueError, match="not positive definite"):
        factor_in_place(-torch.eye(8, dtype=torch.float64), 0.0)


@pytest.mark.parametrize("make, act_order", [
    (lambda: PVQStepper(PVQ), False),
    (lambda: UniformStepper(UNI), True),
], ids=["pvq", "uniform-act-order"])
def test_a_consumed_hessian_gives_the_codes_of_a_copied_one(make, act_order):
    x = calib(zero_cols=(3, 17))
    w, h = weights(), hessian_of(x)
    kept = h.clone()
    hat, packed = gptq(w, h, make(), act_order=act_order)
    assert torch.equal(h, kept)  # not consumed: the caller's h as it was
    for given in (h.clone(), h.T.contiguous().T):
        again_hat, again = gptq(w, given, make(), act_order=act_order, consume_h=True)
        assert torch.equal(again.codes, packed.codes) and torch.equal(again_hat, hat)


@pytest.mark.parametrize("make, act_order, damp", [
    (lambda: PVQStepper(PVQ), False, 0.01),
    (lambda: UniformStepper(UNI), True, 0.01),
    (lambda: UniformStepper(UNI), False, 0.0),  # undamped: retried with damping, the error's lam is the last one
], ids=["pvq", "uniform-act-order", "retried"])
def test_the_solve_measures_its_error_through_its_factor(make, act_order, damp):
    """tr(D H D^T) read off the factor (no H kept) is relative_error with H, dead inputs and act-order included."""
    from pvq.solvers.hessian import ErrorSum, relative_error
    x = calib(zero_cols=(5,))
    if damp == 0:
        x = x[:, :64].repeat(1, 4)
    w, h = weights(), hessian_of(x)
    total = ErrorSum(COLS)
    hat, _ = gptq(w, h, make(), act_order=act_order, damp=damp, error=total)
    assert total.value() == pytest.approx(relative_error(w, hat, h), rel=1e-9)
    assert 0 < total.value() < 1


def test_the_hessian_is_the_whole_products_sum_though_made_a_few_rows_at_a_time():
    """The float32 product of a chunk is made and added 256 of its rows at a time (never a whole [dim, dim] float32):
    on the CPUs tried those rows are the whole product's to the bit, so the sum is the one of the whole product."""
    x = torch.randn(300, 600) * torch.exp(torch.randn(600))
    acc = HessianAccumulator(600)
    acc.add_batch(x)
    assert torch.equal(acc.take(), (x.T @ x).double() / 300)
