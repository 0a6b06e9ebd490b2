"""Bad input gets a clear ValueError at the door: options, calibration files (issue 9, items 8 and 9)."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from fastcache_compile import FastCacheConfig, calibration

# -- options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"threshold": True}, "threshold"),
        ({"threshold": math.inf}, "threshold"),
        ({"threshold": math.nan}, "threshold"),
        ({"alpha": True}, "alpha"),
        ({"num_steps": True}, "num_steps"),
        ({"max_streams": True}, "max_streams"),
        ({"warmup_steps": False}, "warmup_steps"),
        ({"merge_ratio": False}, "merge_ratio"),
        ({"merge_k": True}, "merge_k"),
        ({"merge_lambda": True}, "merge_lambda"),
        ({"merge_lambda": math.inf}, "merge_lambda"),
        ({"token_threshold": True}, "token_threshold"),
        ({"token_threshold": math.nan}, "token_threshold"),
        ({"token_buckets": (0.5, 0.5, 1.0)}, "duplicate"),
        ({"token_buckets": (1, 0.5, 1.0)}, "duplicate"),
        ({"audit": 1}, "audit"),
        ({"warmup_steps": 2.0}, "warmup_steps"),
    ],
)
def test_bad_option_values_raise(options, needle):
    with pytest.raises(ValueError, match=needle):
        FastCacheConfig.from_options(options)


def test_good_numbers_still_accepted():
    cfg = FastCacheConfig(threshold=1, alpha=0.1, merge_ratio=0, merge_lambda=2, token_threshold=0, audit=True)
    assert cfg.threshold == 1 and cfg.audit and FastCacheConfig().audit is False


def test_replace_rejects_unknown_and_bad_values():
    cfg = FastCacheConfig()
    with pytest.raises(ValueError, match=r"unknown fastcache option\(s\) \['treshold'\]"):
        cfg.replace(treshold=0.1)
    with pytest.raises(ValueError, match="threshold"):
        cfg.replace(threshold=True)
    assert cfg.replace(threshold=0.2).threshold == 0.2


def test_merge_k_against_token_count():
    from fastcache_compile.config import check_token_count

    cfg = FastCacheConfig(token_merge=True, merge_k=8)
    check_token_count(cfg, 9)  # 8 neighbours besides the token itself exist
    with pytest.raises(ValueError, match=r"merge_k=8 .* 8 tokens"):
        check_token_count(cfg, 8)
    check_token_count(FastCacheConfig(merge_k=8), 4)  # merging off: merge_k is unused


# -- calibration files --------------------------------------------------------------------------------

FP = {"num_blocks": 2, "widths": [[8], [8, 4]], "param_hash": "0" * 32}


def _tensors():
    t = {f"beta.{i}": torch.tensor(0.5) for i in range(2)}
    for i, k, d in [(0, 0, 8), (1, 0, 8), (1, 1, 4)]:
        t[f"a.{i}.{k}"], t[f"w.{i}.{k}"], t[f"b.{i}.{k}"] = torch.eye(d), torch.eye(d), torch.zeros(d)
    t["stack.w"] = torch.zeros(8, 8)
    return t


def _write(tmp_path, tensors=None, fp=FP, name="c.safetensors"):
    path = tmp_path / name
    calibration.Calibration(fp, _tensors() if tensors is None else tensors, "trajectory", {}).save(path)
    return path


def test_valid_file_loads(tmp_path):
    loaded = calibration.load(_write(tmp_path))
    assert loaded.fingerprint == FP and loaded.recommended == "trajectory"
    assert set(loaded.block_params("direct")[1]) == {"w_0", "b_0", "w_1", "b_1"}


def _rewrite(path, change):
    """The file's tensors, edited by ``change``, written back under the file's own metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda t: t["a.1.1"].__setitem__((0, 0), math.nan), r"NaN/Inf value\(s\) in tensor 'a.1.1'"),
        (lambda t: t.__setitem__("beta.0", torch.tensor(math.inf)), "NaN/Inf value.*'beta.0'"),
        (lambda t: t.pop("beta.1"), r"missing tensor\(s\) \['beta.1'\]"),
        (lambda t: t.__setitem__("w.0.0", torch.eye(4)), r"'w.0.0' of shape \[4, 4\], written as \[8, 8\]"),
    ],
)
def test_damaged_tensors_are_named(tmp_path, change, needle):
    path = _write(tmp_path)
    _rewrite(path, change)
    with pytest.raises(ValueError, match=needle) as err:
        calibration.load(path)
    assert str(path) in str(err.value) and "re-run fastcache_compile.calibrate" in str(err.value)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda t: t.pop("beta.1"), r"missing tensor\(s\) \['beta.1'\]"),
        (lambda t: t.pop("b.1.1"), r"missing tensor\(s\) \['b.1.1'\]"),
        (lambda t: t.__setitem__("a.0.0", torch.zeros(8, 4)), r"'a.0.0' of shape \[8, 4\]; expected D x D"),
        (lambda t: t.__setitem__("b.1.0", torch.zeros(4)), "different widths for block 1 output 0"),
        (lambda t: t.__setitem__("w.1.1", torch.zeros(6, 6)), r"expected D x D with D in \[8, 4\]"),
        (lambda t: t.__setitem__("beta.0", torch.zeros(3)), r"a β is one number"),
        (lambda t: t.__setitem__("beta.2", torch.tensor(0.1)), "unexpected tensor 'beta.2'"),
        (lambda t: t.__setitem__("stack.w", torch.zeros(4, 4)), r"'stack.w' of shape \[4, 4\]"),
    ],
)
def test_inconsistent_tensors_without_shape_metadata(tmp_path, change, needle):
    # a file written without the shape list (or with a doctored one) is still checked for consistency
    tensors = _tensors()
    change(tensors)
    meta = {"format_version": "1", "fingerprint": json.dumps(FP), "recommended": "reuse", "metrics": "{}"}
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=needle):
        calibration.load(tmp_path / "c.safetensors")


def test_unreadable_files(tmp_path):
    good = _write(tmp_path).read_bytes()
    cases = {
        "truncated.safetensors": good[: len(good) - 16],
        "header.safetensors": good[:6],
        "empty.safetensors": b"",
        "calib.json": json.dumps({"beta.0": 0.5}).encode(),
        "flipped.safetensors": good[:8] + b"#" + good[9:],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=r"cannot be read as safetensors.*re-run fastcache_compile.calibrate"):
            calibration.load(tmp_path / name)
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        calibration.load(tmp_path / "dir.safetensors")


def test_damaged_metadata(tmp_path):
    meta = {"format_version": "1", "fingerprint": "{not json", "recommended": "reuse"}
    save_file(_tensors(), str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="damaged metadata"):
        calibration.load(tmp_path / "m.safetensors")
    meta["fingerprint"] = json.dumps({"num_blocks": 3, "widths": [[8]]})
    save_file(_tensors(), str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="damaged fingerprint"):
        calibration.load(tmp_path / "m.safetensors")


def test_segment_lowerings_refuse_token_options() -> None:
    from fastcache_compile import FastCacheConfig

    assert FastCacheConfig(lowering="segments").lowering == "segments"
    for lowering in ("segments", "tensorrt"):
        with pytest.raises(ValueError, match="in-graph cond form"):
            FastCacheConfig(lowering=lowering, token_select=True)
