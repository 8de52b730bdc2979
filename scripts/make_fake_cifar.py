"""A generated CIFAR-10-shaped ImageFolder tree for runs that need no real data (scripts/gpu_check.sh):
train/<10 class folders>/*.png and test/<10 class folders>/*.png, 32×32 RGB, plus unlabeled.npz in the format
of train_misc.py --unlabeled-data (uint8 'data' N×32×32×3 and 'extrapolated_targets').

Each image is its class's colour plus Gaussian noise (σ = 40 of 255), so a small network learns the classes in a
few steps; the numbers measured on it say nothing about CIFAR-10, only the speeds transfer.

Usage:  python scripts/make_fake_cifar.py OUT_DIR [--train-per-class 1024] [--test-per-class 100] [--unlabeled 1280]
Cost: about 10,000 images/s on one core (PNG without compression).
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def images(c, n, rng):
    """n uint8 32×32×3 images of class c: the class's colour + N(0, 40²) per pixel, clipped to [0, 255]."""
    base = np.array([(c * 25) % 256, (c * 70) % 256, (255 - c * 25) % 256], np.float32)
    return np.clip(base + rng.normal(0, 40, (n, 32, 32, 3)).astype(np.float32), 0, 255).astype(np.uint8)


def make(out, train_per_class, test_per_class, unlabeled=0, seed=0):
    """Write the tree (and unlabeled.npz when `unlabeled` > 0) under `out`; returns the image counts."""
    rng, out = np.random.default_rng(seed), Path(out)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(CLASSES):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images(c, n, rng)):
                Image.fromarray(img).save(folder / f"{i:05d}.png", compress_level=0)
    if unlabeled:
        labels = np.arange(unlabeled) % len(CLASSES)
        data = np.concatenate([images(c, int((labels == c).sum()), rng) for c in range(len(CLASSES))])
        np.savez(out / "unlabeled.npz", data=data, extrapolated_targets=np.sort(labels))
    return {"train": train_per_class * len(CLASSES), "test": test_per_class * len(CLASSES), "unlabeled": unlabeled}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="folder to create: OUT/train, OUT/test, OUT/unlabeled.npz")
    p.add_argument("--train-per-class", type=int, default=1024, help="training images per class")
    p.add_argument("--test-per-class", type=int, default=100, help="test images per class")
    p.add_argument("--unlabeled", type=int, default=1280, help="pseudo-labelled images in unlabeled.npz (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if min(args.train_per_class, args.test_per_class) < 1 or args.unlabeled < 0:
        p.error("--train-per-class and --test-per-class must be >= 1, --unlabeled >= 0")
    counts = make(args.out, args.train_per_class, args.test_per_class, args.unlabeled, args.seed)
    print(f"wrote {counts['train']} train, {counts['test']} test, {counts['unlabeled']} unlabeled images to {args.out}")


if __name__ == "__main__":
    main()
