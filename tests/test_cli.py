"""The ``fastcache`` command line, run from directories that are not the repository.

Most tests drive ``main()`` in-process on a tiny random reference-format folder (seconds); one runs the
installed console script on the shipped reference model from a temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import torch

from fastcache_compile._png import grid, write_png
from fastcache_compile.cli import main

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reference-format folder: a 2-block SD3 transformer on 8×8 one-channel images, random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("tiny-reference")
    torch.manual_seed(0)
    SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        pos_embed_max_size=4,
    ).save_pretrained(out)
    save_file({"tokens": torch.randn(11, 3, 16), "pooled": torch.randn(11, 16)}, str(out / "label_encoder.safetensors"))
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(out / "scheduler")
    (out / "sampling.json").write_text(json.dumps({"steps": 4, "guidance": 3.0}))
    return out


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory outside the repository; sys.path and the user's module restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    sys.modules.pop("my_models", None)


def _png(path: Path) -> torch.Tensor:
    with PIL.open(path) as im:
        return torch.tensor(list(im.getdata()), dtype=torch.uint8).reshape(im.height, im.width, -1)


def test_png_grid_pixels(tmp_path):
    images = torch.stack([torch.full((1, 2, 3), -1.0), torch.full((1, 2, 3), 1.0), torch.zeros(1, 2, 3)])
    write_png(tmp_path / "g.png", images, columns=2)
    pixels = _png(tmp_path / "g.png")[..., 0]  # (H, W)
    # 2 columns, 2 rows, 2-pixel black gaps: width 2 + 2·(3 + 2), height 2 + 2·(2 + 2).
    assert pixels.shape == (10, 12)
    assert pixels[2:4, 2:5].eq(0).all() and pixels[2:4, 7:10].eq(255).all() and pixels[6:8, 2:5].eq(128).all()
    assert pixels[6:8, 7:10].eq(0).all()  # no fourth image: background
    rgb = torch.rand(2, 3, 4, 4) * 2 - 1
    write_png(tmp_path / "rgb.png", rgb)
    assert torch.equal(_png(tmp_path / "rgb.png"), grid(rgb).permute(1, 2, 0))
    with pytest.raises(ValueError, match="1 or 3"):
        grid(torch.zeros(1, 2, 4, 4))


def test_argument_errors(elsewhere, tiny, capsys):
    with pytest.raises(SystemExit):  # argparse: no command
        main([])
    with pytest.raises(SystemExit, match="module:factory"):
        main(["generate", "--model", "no-such-thing", "--out", "o"])
    assert main(["generate", "--model", str(tiny), "--out", "o", "--threshold", "-1"]) == 2
    assert "threshold must be" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny), "--out", "o", "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err
    assert not (elsewhere / "o" / "uncached.png").exists()
    calibrate = ["calibrate", "--model", str(tiny), "--out", "c.safetensors"]
    assert main([*calibrate, "--forecast-orders", "2,x"]) == 2
    assert "--forecast-orders takes comma-separated orders" in capsys.readouterr().err
    assert main([*calibrate, "--forecast-max-gap", "40"]) == 2
    assert "forecast_max_gap must be an int in 1..16" in capsys.readouterr().err
    assert not (elsewhere / "c.safetensors").exists()


def test_plain_diffusers_folder_is_refused(elsewhere, tiny, capsys):
    plain = elsewhere / "plain"
    shutil.copytree(tiny, plain, ignore=shutil.ignore_patterns("label_encoder.safetensors", "sampling.json"))
    assert main(["generate", "--model", str(plain), "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "plain diffusers model folder (SD3Transformer2DModel)" in err and "module:make" in err


def test_factory_from_current_directory(elsewhere, tiny, capsys):
    (elsewhere / "my_models.py").write_text(
        "import torch\n"
        "from fastcache_compile.reference import load\n"
        f"def make():\n    return load({str(tiny)!r})\n"
        "def pair():\n    return torch.nn.Linear(2, 2), {'input': torch.zeros(1, 2)}\n"
    )
    argv = ["--n", "2", "--steps", "3", "--lowering", "eager", "--threshold", "0"]
    assert main(["generate", "--model", "my_models:make", "--out", "o", *argv]) == 0
    result = json.loads((elsewhere / "o" / "generate.json").read_text())
    # τ = 0: the cached sampler computes every block and reproduces the uncached images.
    assert result["max_abs_diff"] < 1e-5 and result["stats"]["blocks_skipped"] == 0
    assert torch.equal(_png(elsewhere / "o" / "uncached.png"), _png(elsewhere / "o" / "fastcache.png"))
    capsys.readouterr()
    assert main(["generate", "--model", "my_models:pair", "--out", "o"]) == 2
    assert "fastcache export" in capsys.readouterr().err
    assert main(["generate", "--model", "my_models:missing", "--out", "o"]) == 2
    assert "cannot load my_models:missing" in capsys.readouterr().err


def test_generate_skips_and_reports(elsewhere, tiny, capsys):
    argv = ["--n", "3", "--steps", "4", "--lowering", "eager", "--threshold", "0.5", "--warmup-steps", "1"]
    assert main(["generate", "--model", str(tiny), "--out", "o", *argv]) == 0
    out = capsys.readouterr().out
    assert "speed-up: wall" in out and "CPU" in out
    result = json.loads((elsewhere / "o" / "generate.json").read_text())
    s = result["stats"]
    # Warm-up generations are not counted: one generation of 4 steps, CFG as one batch.
    assert (s["calls"], s["generations"]) == (4, 1)
    # Steps 0 (warm-up) and 3 (last of --steps) always compute: at most 2 of 4 steps skip.
    assert 0 < s["blocks_skipped"] <= 2 * 2
    assert result["psnr_db"] > 10
    assert _png(elsewhere / "o" / "fastcache.png").shape == (2 + 10, 2 + 3 * 10, 1)  # 3 images of 8×8


def test_calibrate_and_use_the_file(elsewhere, tiny, capsys):
    from fastcache_compile.calibration import load

    argv = ["--n", "1", "--steps", "4", "--generations", "2", "--drift-threshold", "0.3"]
    assert main(["calibrate", "--model", str(tiny), "--out", "c.safetensors", *argv]) == 0
    assert "recommended approximation" in capsys.readouterr().out
    calib = load(elsewhere / "c.safetensors")
    assert calib.fingerprint["num_blocks"] == 2 and calib.metrics["generations"] == 2
    assert calib.metrics["forecast_drift"]["options"] == {"threshold": 0.3, "num_steps": 4}  # the drift pass ran
    gen = ["--n", "1", "--steps", "4", "--lowering", "eager", "--threshold", "0.5", "--calibration", "c.safetensors"]
    assert main(["generate", "--model", str(tiny), "--out", "o", *gen]) == 0


def test_bench_table(elsewhere, tiny, capsys):
    argv = ["--n", "1", "--steps", "3", "--repeats", "2", "--lowering", "eager", "--threshold", "0", "--json", "b.json"]
    assert main(["bench", "--model", str(tiny), *argv]) == 0
    table = capsys.readouterr().out
    assert "| uncached eager |" in table and "| fastcache τ=0 (eager) |" in table
    rows = json.loads((elsewhere / "b.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["uncached eager", "fastcache τ=0 (eager)"]
    assert rows[1]["skip_ratio"] == 0.0 and rows[1]["psnr_db"] > 100  # τ = 0 reproduces the uncached images
    assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 for r in rows)


def _installed() -> bool:
    try:
        metadata.distribution("fastcache-compile")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed(), reason="fastcache-compile is not pip-installed (pip install -e .)")
def test_console_script_on_the_shipped_reference(tmp_path):
    script = shutil.which("fastcache", path=os.path.dirname(sys.executable)) or shutil.which("fastcache")
    assert script, "the fastcache console script is not on PATH"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the installation provides
    # The timeouts only guard against a hang: on an idle 2-core machine this takes well under a minute.
    cmd = [script, "generate", "--model", "reference", "--n", "2", "--steps", "3", "--lowering", "eager"]
    done = subprocess.run([*cmd, "--out", "out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "speed-up: wall" in done.stdout
    assert _png(tmp_path / "out" / "uncached.png").shape == (2 + 34, 2 + 2 * 34, 1)  # 2 images of 32×32
    bad = [sys.executable, "-m", "fastcache_compile.cli", "generate", "--model", "nope:make", "--out", "o"]
    done = subprocess.run(bad, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "cannot load nope:make" in done.stderr
