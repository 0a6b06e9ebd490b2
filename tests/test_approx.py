import torch

from fastcache_compile import approx


def test_ridge_recovers_exactly_linear_block():
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(16, 16, generator=g)
    b_true = torch.randn(16, generator=g)
    x = torch.randn(512, 16, generator=g)
    y = x @ w_true.T + b_true
    w, b = approx.ridge(x, y, lam=1e-9)
    assert torch.allclose(w, w_true, atol=1e-5)
    assert torch.allclose(b, b_true, atol=1e-5)


def test_ridge_penalty_shrinks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 8, generator=g).T
    w_small, _ = approx.ridge(x, y, lam=1e-6)
    w_big, _ = approx.ridge(x, y, lam=1e6)
    assert w_big.norm() < 0.01 * w_small.norm()


def test_fit_beta_exact():
    d = [torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])]
    e = [0.7 * t for t in d]
    assert abs(approx.fit_beta(d, e) - 0.7) < 1e-6  # float32 inputs
    assert approx.fit_beta([torch.zeros(3)], [torch.ones(3)]) == 0.0


def test_forms_by_hand():
    x = torch.tensor([[1.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0]])
    r_hat = torch.tensor([[0.5, -0.5]])
    r_prev = torch.tensor([[0.25, -0.25]])
    assert torch.equal(approx.reuse(x, r_hat), torch.tensor([[1.5, 1.5]]))
    # trajectory: x + r̂ + β (r̂ − r̂′)(t − s)/(s − s′) with β = 0.5, t − s = 2, s − s′ = 1
    out = approx.trajectory(
        x, r_hat, r_prev, torch.tensor(5.0), torch.tensor(3.0), torch.tensor(2.0), torch.tensor(0.5)
    )
    assert torch.allclose(out, torch.tensor([[1.5 + 0.25, 1.5 - 0.25]]))
    # linear with A − I = 0 is plain reuse; with A − I = I it doubles the input change
    assert torch.equal(approx.linear(x, x_hat, r_hat, torch.zeros(2, 2)), approx.reuse(x, r_hat))
    assert torch.allclose(approx.linear(x, x_hat, r_hat, torch.eye(2)), torch.tensor([[1.5, 2.5]]))
    assert torch.allclose(approx.direct(x, 2 * torch.eye(2), torch.ones(2)), torch.tensor([[3.0, 5.0]]))
