"""GPU checks: run where a CUDA device exists, skipped with the reason elsewhere."""

import pytest
import torch

import fastcache_compile as fc
from models import CASES, sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_cuda_tau_zero_matches_and_large_tau_skips(name):
    case = CASES[name]
    model = case.build().cuda()

    def run(m):
        # the sampling helpers build CPU tensors; move every call's tensors to the GPU
        class OnCuda(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = m

            def forward(self, **kw):
                kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
                out = self.m(**kw)
                return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out

        return sample(OnCuda(), case, steps=6)

    ref = run(model)
    cm = torch.compile(model, backend="fastcache", options={"threshold": 0.0}, fullgraph=True)
    torch.testing.assert_close(run(cm), ref, rtol=1e-3, atol=1e-3)
    torch._dynamo.reset()
    cm = torch.compile(model, backend="fastcache", options={"threshold": 0.5, "warmup_steps": 1})
    run(cm)
    assert fc.stats(cm)["blocks_skipped"] > 0
