import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every test compiles models anew; without a reset, Dynamo's per-code-object recompile limit
    # would silently send later tests to eager.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def built():
    """Every test model, built once per module (fixed weight seed)."""
    from models import CASES

    return {name: case.build() for name, case in CASES.items()}
