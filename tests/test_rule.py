import math

import pytest
import torch
from scipy.stats import chi2

from fastcache_compile import rule


@pytest.mark.parametrize("dof", [1, 10, 128, 4096, 10**6])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2])
def test_quantile_matches_scipy(dof, alpha):
    assert rule.chi2_quantile_ratio(dof, alpha) == pytest.approx(chi2.ppf(1 - alpha, dof) / dof, rel=1e-12)


@pytest.mark.parametrize("dof", [64, 512, 4096, 10**6])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2])
def test_wilson_hilferty_within_1e3_of_scipy(dof, alpha):
    exact = chi2.ppf(1 - alpha, dof) / dof
    assert rule.chi2_quantile_ratio_wh(dof, alpha) == pytest.approx(exact, rel=1e-3)


def test_threshold_formula():
    # τ² · χ²_{K,1−α} / K, worked out with scipy
    tau, alpha, k = 0.1, 0.05, 1000
    assert rule.skip_threshold(tau, alpha, k) == pytest.approx(0.01 * chi2.ppf(0.95, k) / k)
    assert rule.skip_threshold(0.0, alpha, k) < 0  # τ = 0 never skips, even for identical inputs


def test_relative_change_by_hand():
    ref = torch.ones(2, 3, 4)  # ‖x̂‖² = 24
    x = ref.clone()
    x[0, 0, 0] = 3.0  # ‖x − x̂‖² = 4
    assert float(rule.relative_change([x], [ref])) == pytest.approx(4 / 24)
    # two streams are pooled: numerators and denominators add
    assert float(rule.relative_change([x, ref], [ref, ref])) == pytest.approx(4 / 48)


def test_decision():
    no = torch.tensor(False)
    thr = rule.skip_threshold(0.1, 0.05, 10**6)
    assert not rule.should_compute(torch.tensor(0.5 * thr), thr, no)
    assert rule.should_compute(torch.tensor(2.0 * thr), thr, no)
    assert rule.should_compute(torch.tensor(0.0), thr, torch.tensor(True))  # warm-up / forced
    for bad in (math.nan, math.inf):
        assert rule.should_compute(torch.tensor(bad), thr, no)  # non-finite statistic computes
    assert rule.should_compute(torch.tensor(0.0), rule.skip_threshold(0.0, 0.05, 10), no)
