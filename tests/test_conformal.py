import math

import pytest
import torch

from fastcache_compile import conformal


def test_rank_by_hand():
    assert conformal.rank(19, 0.05) == 19  # (19 + 1) · 0.95 = 19 exactly, no float round-up
    assert conformal.rank(18, 0.05) == 19  # > n: no finite quantile
    assert conformal.rank(99, 0.1) == 90
    assert conformal.quantile(torch.arange(18.0), 0.05) == math.inf
    assert conformal.quantile(torch.arange(1.0, 20.0).flip(0), 0.05) == 19.0  # order statistic, not position
    with pytest.raises(ValueError, match="alpha"):
        conformal.rank(10, 1.5)


def test_quantile_gives_promised_coverage_on_fresh_data():
    # uniform scores: coverage of a quantile q is q itself, and E[q] = k / (n + 1) exactly
    g = torch.Generator().manual_seed(0)
    n, alpha, trials = 49, 0.1, 4000
    cal = torch.rand(trials, n, generator=g)
    k = conformal.rank(n, alpha)
    q = torch.tensor([conformal.quantile(row, alpha) for row in cal])
    promised = k / (n + 1)
    assert promised >= 1 - alpha
    se = float(q.std()) / trials**0.5
    assert abs(float(q.mean()) - promised) < 4 * se
    # and by direct check on fresh heavy-tailed scores
    cal = torch.randn(trials, n, generator=g).exp()
    fresh = torch.randn(trials, generator=g).exp()
    q = torch.tensor([conformal.quantile(row, alpha) for row in cal])
    covered = float((fresh <= q).double().mean())
    assert covered >= 1 - alpha - 3 * (alpha * (1 - alpha) / trials) ** 0.5
    assert covered <= promised + 3 * (alpha * (1 - alpha) / trials) ** 0.5  # not vacuous either


def _synthetic(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    pred = (torch.randn(n, generator=g) * 1.0 - 3.0).exp()  # predicted errors, spread over decades
    err = pred * (torch.randn(n, generator=g) * 0.5).exp()  # true error: the prediction times noise
    return pred, err


def test_skip_cutoff_bounds_violation_rate_of_skipped_blocks():
    g = torch.Generator().manual_seed(1)
    tau, alpha = 0.05, 0.1
    rates, skipped = [], []
    for _ in range(40):
        pred, err = _synthetic(400, g)
        c = conformal.skip_cutoff(pred, err, tau, alpha)
        fp, fe = _synthetic(5000, g)
        skip = fp <= c
        skipped.append(float(skip.double().mean()))
        rates.append(float((fe[skip] > tau).double().mean()))
    # mean violation rate among skips within sampling slack of α, and the rule does skip
    assert sum(rates) / len(rates) <= alpha + 0.02
    assert sum(skipped) / len(skipped) > 0.3
    # the rank rule is what holds it there: skipping wherever the prediction alone is ≤ τ violates more
    fp, fe = _synthetic(20000, g)
    assert float((fe[fp <= tau] > tau).double().mean()) > alpha + 0.03


def test_skip_cutoff_edge_cases():
    pred = torch.linspace(0.001, 0.01, 100)
    assert conformal.skip_cutoff(pred, pred, 0.0, 0.05) == -math.inf  # τ = 0 never skips
    assert conformal.skip_cutoff(pred[:10], pred[:10], 1.0, 0.05) == -math.inf  # too few points to certify
    assert conformal.skip_cutoff(pred, pred, 1.0, 0.05) == pytest.approx(0.01)  # everything is fine
    # ties are skipped together: a cutoff never separates equal predictions
    tied = torch.ones(40)
    err = torch.cat([torch.zeros(30), torch.ones(10)])
    assert conformal.skip_cutoff(tied, err, 0.5, 0.05) == -math.inf
    with pytest.raises(ValueError, match="1-D"):
        conformal.skip_cutoff(pred, pred[:5], 0.1, 0.05)


def test_error_model_recovers_log_linear_law():
    g = torch.Generator().manual_seed(2)
    n = 200
    delta2 = torch.rand(n, generator=g) * 1e-2 + 1e-5
    gap = torch.randint(1, 4, (n,), generator=g).float()
    step = torch.randint(0, 30, (n,), generator=g).float()
    feats = conformal.error_features(delta2, gap, step)
    coef_true = torch.tensor([-1.0, 0.5, 0.8, -0.02])
    err = conformal.predict_error(coef_true, feats)
    coef = conformal.fit_error_model(feats, err, ridge=0.0)
    assert torch.allclose(coef, coef_true, atol=1e-4)
    # a non-finite δ² yields finite features (the decision computes such blocks regardless)
    assert torch.isfinite(conformal.error_features(torch.tensor(math.nan), torch.tensor(1.0), torch.tensor(0.0))).all()


def test_joint_cutoff_passes_both_pair_sets():
    """The min of two per-set cutoffs can fail the rule on one set; the joint cutoff cannot."""
    tau, alpha = 0.1, 0.1  # rank rule: ceil((n + 1) 0.9) of the n skipped errors must be <= tau
    pred, err = torch.linspace(0.01, 1.0, 60), torch.full((60,), 0.05)
    err[36:] = 0.5  # held-out pairs: violations above pred ~0.61
    dpred, derr = torch.linspace(0.01, 0.95, 40), torch.full((40,), 0.05)
    derr[10:12] = 0.5  # drift pairs: 2 violations at pred ~0.25; all 40 together still pass
    c_full, c_drift = conformal.skip_cutoff(pred, err, tau, alpha), conformal.skip_cutoff(dpred, derr, tau, alpha)
    c = conformal.joint_cutoff(pred, err, dpred, derr, tau, alpha)

    def passes(p, e, cut):
        sel = e[p <= cut]
        need = conformal.rank(sel.numel(), alpha)
        return need <= sel.numel() and int((sel <= tau).sum()) >= need

    assert not passes(dpred, derr, min(c_full, c_drift))  # what the min of the two would have certified
    assert -math.inf < c < min(c_full, c_drift)
    assert passes(pred, err, c) and passes(dpred, derr, c)
    assert conformal.joint_cutoff(pred, err, dpred[:0], derr[:0], tau, alpha) == -math.inf  # nothing observed
