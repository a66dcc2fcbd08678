"""A small RGB dataset to try cnnlab on your own data: coloured shapes on noise, 32 x 32.

    .venv/bin/python examples/make_shapes.py            # -> examples/shapes/shapes.npz and examples/shapes/folder/
    .venv/bin/cnnlab study examples/rgb_study.toml      # uses npz:examples/shapes/shapes.npz

Four classes (square, circle, triangle, cross); each image has a random colour, size and
position, so only the shape tells the class. The same images are written twice, in the two
forms cnnlab reads your own data from:

- shapes.npz: x_train (N, 32, 32, 3) uint8, y_train (N,), x_test, y_test, classes;
- folder/train/<class>/*.png and folder/test/<class>/*.png.

Deterministic: the same --seed gives the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CLASSES = ("square", "circle", "triangle", "cross")
SIZE = 32


def draw(kind: int, rng: np.random.Generator) -> np.ndarray:
    """One (32, 32, 3) uint8 image of shape `kind` on dark noise."""
    img = rng.uniform(0.0, 0.35, (SIZE, SIZE, 3))
    r = rng.uniform(5.0, 11.0)
    cx, cy = rng.uniform(r + 1, SIZE - r - 1, 2)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    dx, dy = x - cx, y - cy
    if kind == 0:
        mask = (np.abs(dx) < r * 0.8) & (np.abs(dy) < r * 0.8)
    elif kind == 1:
        mask = dx**2 + dy**2 < r**2
    elif kind == 2:
        mask = (dy > -r) & (dy < r) & (np.abs(dx) < (dy + r) / 2)
    else:
        arm = r / 3
        mask = ((np.abs(dx) < arm) & (np.abs(dy) < r)) | ((np.abs(dy) < arm) & (np.abs(dx) < r))
    colour = rng.uniform(0.45, 1.0, 3)
    img[mask] = colour
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)


def make(n_train: int, n_test: int, seed: int = 0):
    rng = np.random.default_rng(seed)

    def split(n):
        y = np.arange(n) % len(CLASSES)
        rng.shuffle(y)
        return np.stack([draw(int(k), rng) for k in y]), y.astype(np.int64)

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return x_train, y_train, x_test, y_test


def write(out: Path, n_train: int = 4000, n_test: int = 1000, seed: int = 0, folder: bool = True) -> Path:
    """Write shapes.npz (and folder/) under out; returns out."""
    x_train, y_train, x_test, y_test = make(n_train, n_test, seed)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "shapes.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                        classes=np.array(CLASSES))
    if folder:
        from PIL import Image

        for part, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
            for c in CLASSES:
                (out / "folder" / part / c).mkdir(parents=True, exist_ok=True)
            for i, (img, label) in enumerate(zip(xs, ys)):
                Image.fromarray(img).save(out / "folder" / part / CLASSES[label] / f"{i:05d}.png")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "shapes"), help="output folder")
    p.add_argument("--train", type=int, default=4000, help="training images (default 4000)")
    p.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-folder", action="store_true", help="write only shapes.npz")
    a = p.parse_args()
    out = write(Path(a.out), a.train, a.test, a.seed, not a.no_folder)
    print(f"wrote {out / 'shapes.npz'}" + ("" if a.no_folder else f" and {out / 'folder'}/"))


if __name__ == "__main__":
    main()
