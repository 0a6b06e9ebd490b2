import pytest
import torch

from fastcache_compile import forecast


def _poly_sequence(degree: int, steps: int, seed: int) -> torch.Tensor:
    """(T, 4, 8) residuals r(t) = Σ_j c_j t^j with random coefficient tensors (degree ≤ K − 1)."""
    g = torch.Generator().manual_seed(seed)
    coef = torch.randn(degree + 1, 4, 8, generator=g, dtype=torch.float64)
    t = torch.arange(steps, dtype=torch.float64) / steps
    return sum(coef[j] * t[:, None, None] ** j for j in range(degree + 1))


def _gram(seq: torch.Tensor) -> torch.Tensor:
    flat = seq.reshape(seq.shape[0], -1)
    return flat @ flat.T


def test_pattern_index_is_table_order():
    for order, gmax in [(1, 3), (2, 4), (3, 4)]:
        pats = forecast.patterns(order, gmax)
        assert len(pats) == forecast.num_patterns(order, gmax)
        idx = forecast.pattern_index(torch.tensor(pats), gmax)
        assert idx.tolist() == list(range(len(pats)))
    # gaps beyond max_gap share the last bucket
    assert int(forecast.pattern_index(torch.tensor([9, 1]), 4)) == int(forecast.pattern_index(torch.tensor([4, 1]), 4))


def test_lagrange_weights_by_hand():
    assert forecast.lagrange_weights((3,)) == [1.0]  # K = 1: reuse
    # K = 2, t − s1 = 2, s1 − s2 = 1: r1 + 2 (r1 − r2) → (3, −2), the trajectory form with β = 1
    assert forecast.lagrange_weights((2, 1)) == pytest.approx([3.0, -2.0])
    # K = 3, unit gaps: second-order extrapolation 3 r1 − 3 r2 + r3
    assert forecast.lagrange_weights((1, 1, 1)) == pytest.approx([3.0, -3.0, 1.0])


@pytest.mark.parametrize("order", [1, 2, 3])
def test_polynomial_residual_of_degree_k_minus_1_is_forecast_exactly(order):
    gmax, steps = 3, 12
    seqs = [_poly_sequence(order - 1, steps, seed) for seed in range(3)]
    table, counts = forecast.fit_table([_gram(s) for s in seqs], order, gmax, ridge=0.0, min_count=1)
    assert (counts > 0).all()
    # fresh sequence (other coefficients), every pattern, through the in-graph path
    fresh = _poly_sequence(order - 1, steps, seed=99)
    x = torch.randn(4, 8, dtype=torch.float64)
    worst = 0.0
    ts, ss, _ = forecast.examples(steps, order, gmax)
    for t, s in zip(ts.tolist(), ss.tolist()):
        w = forecast.select_weights(table, torch.tensor(float(t)), [torch.tensor(float(v)) for v in s], gmax)
        y = forecast.forecast(x, [fresh[v] for v in s], w.double())
        worst = max(worst, float((y - (x + fresh[t])).norm() / (x + fresh[t]).norm()))
    assert worst < 1e-4  # float32 weights
    # the fit recovers the fixed polynomial weights where they are exact
    assert torch.allclose(table, forecast.lagrange_table(order, gmax), atol=1e-3)


def test_lower_order_forecaster_is_not_exact_on_higher_degree():
    # guard that the exactness test can fail: K = 2 cannot follow a quadratic
    seqs = [_poly_sequence(2, 12, seed) for seed in range(3)]
    table, _ = forecast.fit_table([_gram(s) for s in seqs], 2, 3, ridge=0.0, min_count=1)
    fresh = _poly_sequence(2, 12, seed=99)
    t, s, rows = forecast.examples(12, 2, 3)
    assert forecast.squared_errors(_gram(fresh), t, s, table[rows]).max() > 1e-3


def test_rare_pattern_falls_back_to_pooled_fit():
    # 4 steps, K = 2, G = 3: pattern (3, x) cannot occur; (1, 1) occurs twice per sequence
    seqs = [_poly_sequence(1, 4, seed) for seed in range(2)]
    table, counts = forecast.fit_table([_gram(s) for s in seqs], 2, 3, ridge=0.0, min_count=3)
    pats = forecast.patterns(2, 3)
    rare = [i for i, c in enumerate(counts.tolist()) if c < 3]
    frequent = [i for i, c in enumerate(counts.tolist()) if c >= 3]
    assert rare and frequent
    for i in rare[1:]:
        assert torch.equal(table[i], table[rare[0]])  # one pooled row
    assert counts[pats.index((1, 1))] == 4
    assert torch.allclose(table[pats.index((1, 1))], torch.tensor([2.0, -1.0]), atol=1e-4)


def test_examples_and_squared_errors_by_hand():
    # rows 0..3 are the patterns (1,1) (2,1) (1,2) (2,2); every s_2 must be >= 0
    t, s, rows = forecast.examples(4, 2, 2)
    got = sorted(zip(t.tolist(), map(tuple, s.tolist()), rows.tolist()))
    assert got == [(2, (1, 0), 0), (3, (1, 0), 1), (3, (2, 0), 2), (3, (2, 1), 0)]
    seq = _poly_sequence(2, 6, seed=0)
    w = torch.tensor([[1.5, -0.7]])
    direct = float(((w[0, 0] * seq[3] + w[0, 1] * seq[1] - seq[5]) ** 2).sum())
    err = forecast.squared_errors(_gram(seq), torch.tensor([5]), torch.tensor([[3, 1]]), w)
    assert float(err) == pytest.approx(direct, rel=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="order K"):
        forecast.lagrange_table(5, 3)
    with pytest.raises(ValueError, match="max_gap"):
        forecast.patterns(2, 0)
    with pytest.raises(ValueError, match="square"):
        forecast.fit_table([torch.zeros(3, 4)], 2, 2)


def test_fit_on_recorded_sequences_picks_the_exact_order():
    from fastcache_compile import forecast_fit
    from fastcache_compile.passes.insert_cache import BlockLayout

    # recorded as calibration does: per generation, per step, per block ([x per stream], [r per output])
    lay = BlockLayout(0, (0,), (0,))
    gens = []
    for seed in range(4):
        r = _poly_sequence(2, 10, seed).float().reshape(10, 4, 8)  # quadratic in t: K = 3 is exact
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)) + 0.01 * r
        gens.append([[([x[t]], [r[t]])] for t in range(10)])
    tensors, metrics = forecast_fit.fit(gens, [lay], ridge=0.0, min_count=1)  # 10 steps: rare patterns
    scores = metrics["forecast_heldout_rel_error"]
    assert metrics["forecast_order"] == 3
    assert scores["fitted_k3"] < 1e-4 < scores["fitted_k2"] < scores["fitted_k1"]
    assert scores["fixed_k3"] < 1e-4  # the polynomial weights are exact here too
    assert tensors["fc_table.0"].shape == (forecast_fit.MAX_GAP**3, 3)
    assert tensors["fc_pred.0"].shape == tensors["fc_err.0"].shape and tensors["fc_err.0"].numel() > 0
    assert set(forecast_fit.block_params(tensors)[0]) == {"table", "coef", "pred", "err"}
    with pytest.raises(ValueError, match="at least 2"):
        forecast_fit.fit(gens[:1], [lay])
