import dataclasses

import pytest

from fastcache_compile import FastCacheConfig


def test_defaults_and_dict():
    cfg = FastCacheConfig.from_options({"threshold": 0.1, "alpha": 0.01})
    assert cfg.threshold == 0.1 and cfg.alpha == 0.01 and cfg.lowering == "inductor"
    assert FastCacheConfig.from_options(cfg) is cfg
    assert FastCacheConfig.from_options(None) == FastCacheConfig()


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"threshold": -0.1}, "threshold"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"lowering": "tvm"}, "'inductor', 'eager'"),
        ({"approximation": "cubic"}, "approximation"),
        ({"max_streams": 0}, "max_streams"),
        ({"calibration": 3}, "calibration"),
        ({"treshold": 0.1}, "treshold"),
    ],
)
def test_bad_options_raise(options, needle):
    with pytest.raises(ValueError, match=needle):
        FastCacheConfig.from_options(options)


def test_unknown_key_lists_allowed():
    with pytest.raises(ValueError, match=r"allowed keys are .*threshold"):
        FastCacheConfig.from_options({"foo": 1})


def test_frozen():
    cfg = FastCacheConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.threshold = 1.0  # type: ignore[misc]
    assert cfg.replace(threshold=0.2).threshold == 0.2 and cfg.threshold == 0.05
