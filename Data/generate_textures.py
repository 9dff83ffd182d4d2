"""Generate the small synthetic texture set used by the demo and the tests.

Eleven categories named like the template's (argyle, checkered, dotted, floral,
herringbone, houndstooth, leopard, paisley, striped, tartan, zebra), drawn
procedurally with random colours, scales, rotations, phases and noise, written as
JPEG files in one sub-folder per category: the layout ``imgsim sync`` reads.

    python Data/generate_textures.py OUT_DIR [--per-category 32] [--size 160] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ("argyle", "checkered", "dotted", "floral", "herringbone", "houndstooth",
              "leopard", "paisley", "striped", "tartan", "zebra")


def _colours(rng, n):
    return rng.uniform(0, 255, size=(n, 3))


def _paint(mask, fg, bg):
    mask = np.clip(mask, 0.0, 1.0)[..., None]
    return mask * fg + (1.0 - mask) * bg


def _pattern(category, x, y, s, rng):
    """RGB float array of ``category`` over rotated, scaled coordinates ``x, y``."""
    c = _colours(rng, 4)
    if category == "striped":
        return _paint(np.sin(2 * np.pi * x / s) > rng.uniform(-0.5, 0.5), c[0], c[1])
    if category == "checkered":
        return _paint((np.floor(x / s) + np.floor(y / s)) % 2, c[0], c[1])
    if category == "dotted":
        gx, gy = (x / s) % 1 - 0.5, (y / s) % 1 - 0.5
        return _paint(np.hypot(gx, gy) < rng.uniform(0.15, 0.3), c[0], c[1])
    if category == "argyle":
        u, v = (x / s) % 2 - 1, (y / (1.6 * s)) % 2 - 1
        diamond = (np.abs(u) + np.abs(v)) < 1
        shade = ((np.floor(x / s) + np.floor(y / (1.6 * s))) % 2 == 0)
        base = _paint(diamond * shade, c[0], _paint(diamond, c[1], c[2]))
        lines = (np.abs(((x / s + y / (1.6 * s)) % 2) - 1) < 0.04) | \
                (np.abs(((x / s - y / (1.6 * s)) % 2) - 1) < 0.04)
        return _paint(lines, c[3], base)
    if category == "herringbone":
        band = np.floor(x / s)
        slope = np.where(band % 2 == 0, 1.0, -1.0)
        return _paint(np.sin(2 * np.pi * (y + slope * (x % s)) / (s / 2.5)) > 0, c[0], c[1])
    if category == "houndstooth":
        u, v = (x / s) % 1, (y / s) % 1
        cell = (np.floor(x / s) + np.floor(y / s)) % 2
        teeth = ((u + v) % 0.5) < 0.25
        return _paint(np.where(cell == 0, teeth, 1 - teeth), c[0], c[1] * 0.3 + 200)
    if category == "zebra":
        wave = np.sin(2 * np.pi * x / s + rng.uniform(1, 3) * np.sin(2 * np.pi * y / (3 * s)))
        return _paint(wave > 0, np.array([20, 20, 20]) + c[0] * 0.1,
                      np.array([235, 235, 235]) - c[1] * 0.1)
    if category == "tartan":
        bands_x = np.sin(2 * np.pi * x / s) + 0.5 * np.sin(2 * np.pi * x / (s / 3))
        bands_y = np.sin(2 * np.pi * y / s) + 0.5 * np.sin(2 * np.pi * y / (s / 3))
        img = c[0] * 0.4 + 0.3 * (_paint(bands_x > 0.3, c[1], c[2]) +
                                  _paint(bands_y > 0.3, c[1], c[2]))
        thin = (np.abs(bands_x - 1.2) < 0.08) | (np.abs(bands_y - 1.2) < 0.08)
        return _paint(thin, c[3], img)
    # Scattered motifs: leopard rosettes, floral flowers, paisley teardrops.
    img = np.broadcast_to(c[0], x.shape + (3,)).copy()
    count = int(x.size / (s * s) * 1.2) + 4
    for _ in range(count):
        cx, cy = rng.uniform(x.min(), x.max()), rng.uniform(y.min(), y.max())
        dx, dy = x - cx, y - cy
        r, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
        size = s * rng.uniform(0.25, 0.45)
        if category == "leopard":
            ring = np.abs(r - size * (1 + 0.25 * np.sin(3 * theta + rng.uniform(0, 6)))) < 0.25 * size
            img = _paint(r < size * 0.8, c[1], img)
            img = _paint(ring, np.array([30, 20, 10]), img)
        elif category == "floral":
            petals = r < size * (0.6 + 0.4 * np.cos(rng.integers(4, 8) * theta))
            img = _paint(petals, _colours(rng, 1)[0], img)
            img = _paint(r < size * 0.2, c[2], img)
        else:  # paisley
            angle = rng.uniform(0, 2 * np.pi)
            along = dx * np.cos(angle) + dy * np.sin(angle)
            tail = np.clip(along / size, -1, 2.5)
            drop = r < size * (1.0 - 0.35 * np.maximum(tail, 0)) * (along > -size)
            img = _paint(drop, c[1], img)
            img = _paint(np.abs(r - 0.5 * size) < 0.08 * size, c[2], img)
            img = _paint(r < 0.2 * size, c[3], img)
    return img


def texture(category: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One random image of ``category``."""
    scale = rng.uniform(0.08, 0.2) * size
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    x = np.cos(angle) * xx - np.sin(angle) * yy + rng.uniform(0, 100)
    y = np.sin(angle) * xx + np.cos(angle) * yy + rng.uniform(0, 100)
    img = _pattern(category, x, y, scale, rng)
    img = img * rng.uniform(0.8, 1.2) + rng.normal(0, rng.uniform(3, 15), img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def generate(out_dir, per_category: int = 32, size: int = 160, seed: int = 0,
             categories=CATEGORIES) -> Path:
    """Write ``per_category`` JPEGs of each category under ``out_dir/<category>/``."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for category in categories:
        (out / category).mkdir(parents=True, exist_ok=True)
        for n in range(per_category):
            texture(category, size, rng).save(out / category / f"{category}_{n:03d}.jpg",
                                              quality=90)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--per-category", type=int, default=32)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = generate(args.out_dir, args.per_category, args.size, args.seed)
    print(f"wrote {args.per_category * len(CATEGORIES)} images to {out}")


if __name__ == "__main__":
    main()
