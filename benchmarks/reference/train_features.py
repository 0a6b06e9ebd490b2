"""Train the FID-FMNIST feature network and compute the Fashion-MNIST test-set reference statistics.

    python -m benchmarks.reference.train_features

Writes, under ``benchmarks/reference/feature-net/``:
  model.safetensors        FeatureNet weights, float16 storage
  card.json                test accuracy, epochs, wall time, command
  fmnist_test_stats.npz    mean (128,) and covariance (128, 128), float64, of the test-set features

Accuracy and statistics are computed with the weights *as shipped* (after the float16 round trip),
so the reference statistics match exactly what ``load_feature_net`` returns.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from benchmarks.reference import data
from benchmarks.reference.features import FEATURE_DIR, FeatureNet, accuracy, features, load_feature_net
from benchmarks.reference.fid import stats


def augment(x: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flip plus a random translation of up to ``max_shift`` pixels.

    Both keep images on the data manifold (garments are roughly left-right symmetric and the
    32x32 canvas has a 2-pixel background margin), so they regularise without changing what a
    "Fashion-MNIST-looking" image is -- which matters because the features are later used to
    judge exactly that.
    """
    n = x.shape[0]
    flip = torch.rand(n) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # background value, as in data.load
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n)).tolist()
    size = x.shape[-1]
    return torch.stack([padded[i, :, dy[i] : dy[i] + size, dx[i] : dx[i] + size] for i in range(n)])


def save_half(net: FeatureNet, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # float16 halves the file; BatchNorm's integer step counter is kept as is.
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
        for k, v in net.state_dict().items()
    }
    save_file(state, str(path), metadata={"format": "pt", "model": "FeatureNet", "dtype": "float16"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=FEATURE_DIR)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()

    x_train, y_train = data.load("train")
    x_test, y_test = data.load("test")

    net = FeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    steps_per_epoch = len(x_train) // args.batch  # drop the ragged last batch (BatchNorm dislikes tiny ones)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )
    history = []
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x_train))
        total, t0 = 0.0, time.time()
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch : (step + 1) * args.batch]
            loss = F.cross_entropy(net(augment(x_train[idx])), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        acc = accuracy(net, x_test, y_test)
        history.append({"epoch": epoch + 1, "train_loss": total / steps_per_epoch, "test_acc": acc})
        print(
            f"epoch {epoch + 1}/{args.epochs}  loss {total / steps_per_epoch:.4f}  "
            f"test acc {acc:.4f}  ({time.time() - t0:.0f}s)",
            flush=True,
        )
    train_seconds = time.time() - start

    weights = args.out / "model.safetensors"
    save_half(net, weights)
    shipped = load_feature_net(weights)  # evaluate what is actually shipped (float16 round trip)
    test_acc = accuracy(shipped, x_test, y_test)
    mu, sigma = stats(features(shipped, x_test))
    np.savez(args.out / "fmnist_test_stats.npz", mu=mu, sigma=sigma)

    card = {
        "name": "FID-FMNIST feature network",
        "note": (
            "Small CNN trained on Fashion-MNIST train; its 128-d penultimate (post-ReLU) activations "
            "replace Inception-v3 pool3 features. FID-FMNIST values are not comparable with Inception FID."
        ),
        "architecture": ("3 x (2 x conv3x3-BN-ReLU, maxpool) widths 16/32/64 -> linear 1024->128 BN ReLU -> 10"),
        "parameters": sum(t.numel() for t in net.parameters()),
        "storage_dtype": "float16",
        "input": "(N, 1, 32, 32) in [-1, 1], 28x28 Fashion-MNIST padded with -1",
        "test_accuracy": test_acc,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "augmentation": "random horizontal flip, random translation up to 2 px",
        "history": history,
        "train_wall_seconds": round(train_seconds, 1),
        "total_wall_seconds": round(time.time() - start, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python -m benchmarks.reference.train_features", *sys.argv[1:]]),
        "reference_stats": "fmnist_test_stats.npz: mu (128,), sigma (128, 128), float64, 10000 test images",
    }
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps({k: card[k] for k in ("test_accuracy", "epochs", "total_wall_seconds")}))


if __name__ == "__main__":
    main()
