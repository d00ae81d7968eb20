"""Render a gallery of the synthetic benchmark: a few test clouds per class, one row per class.

    python tools/make_gallery.py                       # -> docs/synthetic_gallery.png
    python tools/make_gallery.py --per-class 4 --seed 1 --out /tmp/gallery.png

Reads the same cached h5 files training reads (generating them if needed), so what you see is
what the model sees, before augmentation.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
import numpy as np

from data.modelnet40 import load_modelnet40
from data.synthetic import SyntheticConfig, ensure_synthetic

DEFAULT_ROOT = Path(os.environ.get("KDQAT_CACHE", Path.home() / ".cache" / "kdqat")) / "synthetic"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="synthetic cache dir (dataset.root)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (dataset.seed)")
    parser.add_argument("--per-class", type=int, default=3, help="clouds shown per class")
    parser.add_argument("--classes-per-row", type=int, default=4, help="classes side by side in one row")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "synthetic_gallery.png")
    args = parser.parse_args()

    split = load_modelnet40(ensure_synthetic(args.root, SyntheticConfig(seed=args.seed)), "test", 1)
    n, k, cols = len(split.class_names), args.per_class, args.classes_per_row
    rows = -(-n // cols)
    fig = plt.figure(figsize=(1.5 * k * cols, 1.7 * rows))
    for c, name in enumerate(split.class_names):
        for j, i in enumerate(np.flatnonzero(split.labels == c)[:k]):
            xyz = split.points[i]
            ax = fig.add_subplot(rows, k * cols, (c // cols) * k * cols + (c % cols) * k + j + 1, projection="3d")
            # matplotlib's z is up; the data are y-up, so plot (x, z, y)
            ax.scatter(xyz[:, 0], xyz[:, 2], xyz[:, 1], s=0.8, c=xyz[:, 1], cmap="viridis", linewidths=0)
            lim = 0.75  # the 3-D box shrinks the plot; the unit sphere still fits
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), zlim=(-lim, lim))
            ax.view_init(elev=20, azim=-60)
            ax.set_axis_off()
            if j == 0:
                ax.set_title(name, fontsize=11, loc="left")
    fig.subplots_adjust(0, 0, 1, 0.97, 0, 0.12)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out} ({n} classes x {k} test clouds)")


if __name__ == "__main__":
    main()
