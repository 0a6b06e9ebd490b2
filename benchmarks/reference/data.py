"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (no download needed).

``apt-get install dataset-fashion-mnist`` puts the four IDX files under
``/usr/share/datasets/fashion-mnist``; ``FASHION_MNIST_DIR`` overrides the location.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _data_dir() -> Path:
    path = Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIR))
    if not (path / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {path}. Install it with "
            "`apt-get install dataset-fashion-mnist` or set FASHION_MNIST_DIR."
        )
    return path


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str = "train", pad_to: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] as ``(N, 1, pad_to, pad_to)`` float32 and labels as int64."""
    prefix = {"train": "train", "test": "t10k"}[split]
    root = _data_dir()
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")  # (N, 28, 28) uint8
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")  # (N,)
    x = torch.from_numpy(images.copy()).float().div(127.5).sub(1.0).unsqueeze(1)
    pad = (pad_to - 28) // 2
    if pad > 0:
        # Pad with the background value (-1 = black) so the border looks like the data.
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
    return x, torch.from_numpy(labels.astype(np.int64))
