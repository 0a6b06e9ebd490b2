"""Per-call work of the skip path: activation-sized temporaries are what costs in eager on a CPU (each
fresh one page-faults), so the predictor and the statistic allocate as few as they can."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastcache_compile import approx, forecast, rule


class _NewTensors(TorchDispatchMode):
    """Counts op outputs of ``numel`` elements that are not written in place."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inplace = func._schema.name.endswith("_") or any(a.alias_info is not None for a in func._schema.arguments)
        if isinstance(out, torch.Tensor) and out.numel() == self.numel and not inplace:
            self.count += 1
        return out


def _count(fn, *args) -> tuple[int, torch.Tensor]:
    mode = _NewTensors(args[0].numel())
    with mode:
        out = fn(*args)
    return mode.count, out


def test_forecast_allocates_one_tensor_and_sums_correctly():
    gen = torch.Generator().manual_seed(0)
    x, *rs = (torch.randn(4, 16, 8, generator=gen) for _ in range(4))
    w = torch.tensor([1.5, -0.75, 0.25])
    count, out = _count(forecast.forecast, x, rs, w)
    assert count == 1  # the out-of-place sum made 2 per residual (a product and a sum)
    assert torch.allclose(out, x + 1.5 * rs[0] - 0.75 * rs[1] + 0.25 * rs[2], atol=1e-6)
    assert out.data_ptr() not in {t.data_ptr() for t in (x, *rs)}  # the state is not written


def test_trajectory_allocates_one_tensor():
    gen = torch.Generator().manual_seed(1)
    x, r, rp = (torch.randn(4, 16, 8, generator=gen) for _ in range(3))
    t, s, sp, beta = torch.tensor(5.0), torch.tensor(4.0), torch.tensor(2.0), torch.tensor(0.3)
    before = [v.clone() for v in (x, r, rp)]
    count, out = _count(approx.trajectory, x, r, rp, t, s, sp, beta)
    assert count == 1  # out of place it made four
    assert torch.allclose(out, x + r + 0.3 * (r - rp) * 0.5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, (x, r, rp)))


def test_relative_change_allocates_one_tensor_per_stream():
    gen = torch.Generator().manual_seed(2)
    x, ref = torch.randn(4, 16, 8, generator=gen), torch.randn(4, 16, 8, generator=gen)
    count, delta2 = _count(lambda a, b: rule.relative_change([a], [b]), x, ref)
    assert count == 1  # (x − x̂)², squared in place; ‖x̂‖² reduces without a temporary
    assert torch.allclose(delta2, ((x - ref) ** 2).sum() / (ref**2).sum(), rtol=1e-5)
