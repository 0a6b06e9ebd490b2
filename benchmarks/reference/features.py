"""Feature extractor for FID-FMNIST: a small Fashion-MNIST classifier whose penultimate layer
stands in for Inception-v3's pool3 features (no Inception weights are available offline).

The numbers it yields are *not* comparable with Inception FID; they only rank samples of
32x32 Fashion-MNIST-like images against each other and against the shipped test-set statistics.
Train the shipped weights with ``python -m benchmarks.reference.train_features``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

FEATURE_DIR = Path(__file__).resolve().parent / "feature-net"
DEFAULT_WEIGHTS = FEATURE_DIR / "model.safetensors"
DEFAULT_STATS = FEATURE_DIR / "fmnist_test_stats.npz"
FEATURE_DIM = 128


def _block(c_in: int, c_out: int) -> nn.Sequential:
    # Two 3x3 convs per resolution, then halve it: the usual VGG-style recipe. Widths are kept
    # small (16/32/64) so an epoch takes well under a minute on one CPU thread.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FeatureNet(nn.Module):
    """32x32x1 -> 3 conv blocks (32x32 -> 4x4) -> 128-d embedding -> 10 logits."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), dim: int = FEATURE_DIM) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.body = nn.Sequential(_block(1, w1), _block(w1, w2), _block(w2, w3))
        self.embed = nn.Sequential(
            nn.Flatten(),
            nn.Linear(w3 * 4 * 4, dim, bias=False),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
        )
        # Dropout only sits between the embedding and the head, so it never touches the features.
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(dim, 10))

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(x))


def load_feature_net(path: str | Path = DEFAULT_WEIGHTS) -> FeatureNet:
    """The shipped (float16-stored) weights, upcast to float32, in eval mode."""
    net = FeatureNet()
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    net.load_state_dict(state)
    return net.eval()


@torch.no_grad()
def features(net: FeatureNet, images: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Penultimate (128-d, post-ReLU) activations of ``images`` in [-1, 1], shape (N, 1, 32, 32)."""
    if images.ndim != 4 or images.shape[1:] != (1, 32, 32):
        raise ValueError(f"expected (N, 1, 32, 32) images, got {tuple(images.shape)}")
    was_training = net.training
    net.eval()  # BatchNorm must use running stats, or features would depend on the batch
    try:
        out = [net.embedding(images[i : i + batch].float()).double() for i in range(0, len(images), batch)]
    finally:
        net.train(was_training)
    if not out:
        return np.zeros((0, FEATURE_DIM), dtype=np.float64)
    return torch.cat(out).numpy()


@torch.no_grad()
def accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    was_training = net.training
    net.eval()
    try:
        correct = sum(
            int((net(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum())
            for i in range(0, len(images), batch)
        )
    finally:
        net.train(was_training)
    return correct / max(len(images), 1)
