"""A global-statistics baseline: logistic regression on moments and radius histograms.

It sees each cloud only through summary numbers that ignore where parts are (moments of
height and radial distance, covariance eigenvalues, a histogram of distances to the centre),
all invariant to the rotation about the up axis the benchmark applies. Its test accuracy is
the bar a point-cloud network must clear to show it uses local geometry; the README
reports it. Hand-written in torch (softmax regression, full-batch L-BFGS) because the project
does not depend on scikit-learn.

    python -m data.baseline    # prints chance and baseline accuracy on the default benchmark
"""
from __future__ import annotations

import numpy as np
import torch

from data.metrics import classification_metrics

__all__ = ["baseline_accuracy", "baseline_predict", "global_features"]

RADIUS_BINS = 16


def _standardized_moments(v: np.ndarray) -> np.ndarray:
    """Mean, std, skewness, kurtosis of each row of v (S, N) -> (S, 4)."""
    mean, std = v.mean(1), v.std(1) + 1e-8
    z = (v - mean[:, None]) / std[:, None]
    return np.stack([mean, std, (z ** 3).mean(1), (z ** 4).mean(1)], 1)


def global_features(points: np.ndarray) -> np.ndarray:
    """Rotation-about-y-invariant summary of each cloud, (S, F) float32.

    Args:
        points: (S, N, 3) clouds, y up.
    """
    pts = points - points.mean(axis=1, keepdims=True)
    y, r_xz, r = pts[..., 1], np.linalg.norm(pts[..., [0, 2]], axis=-1), np.linalg.norm(pts, axis=-1)
    r = r / (r.max(1, keepdims=True) + 1e-8)
    hist = np.stack([np.histogram(row, bins=RADIUS_BINS, range=(0, 1))[0] for row in r]) / r.shape[1]
    cov = np.einsum("snc,snd->scd", pts, pts) / pts.shape[1]
    eig_all = np.linalg.eigvalsh(cov)  # (S, 3)
    eig_xz = np.linalg.eigvalsh(cov[:, [[0], [2]], [0, 2]])  # (S, 2), horizontal spread
    cross = np.stack([(y * r_xz ** 2).mean(1), (y ** 2 * r_xz ** 2).mean(1)], 1)
    feats = [_standardized_moments(y), _standardized_moments(r_xz), _standardized_moments(r), eig_all, eig_xz, cross, hist]
    return np.concatenate(feats, 1).astype(np.float32)


def baseline_predict(train_points: np.ndarray, train_labels: np.ndarray, test_points: np.ndarray,
                     weight_decay: float = 1e-3, steps: int = 200) -> np.ndarray:
    """Fit softmax regression on `global_features` of the training clouds; predict the test clouds.

    Args:
        train_points: (S, N, 3) training clouds.
        train_labels: (S,) int labels.
        test_points: (T, M, 3) test clouds.
        weight_decay: L2 penalty on the weights (features are standardised first).
        steps: L-BFGS iterations; the problem is convex, so the result is deterministic.

    Returns:
        (T,) predicted classes.
    """
    x_train, x_test = (torch.from_numpy(global_features(p)).double() for p in (train_points, test_points))
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.as_tensor(train_labels, dtype=torch.long)
    num_classes = int(train_labels.max()) + 1
    w = torch.zeros(x_train.shape[1], num_classes, dtype=torch.double, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_train @ w + b, y_train) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (x_test @ w + b).argmax(1).numpy()


def baseline_accuracy(train_points: np.ndarray, train_labels: np.ndarray, test_points: np.ndarray,
                      test_labels: np.ndarray, **kwargs: float) -> float:
    """Test overall accuracy (percent) of `baseline_predict`; kwargs go to it."""
    preds = baseline_predict(train_points, train_labels, test_points, **kwargs)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return classification_metrics(preds, test_labels, num_classes)["oa"]


def main() -> None:
    """Print chance, baseline OA/mAcc and per-class accuracy on the default benchmark."""
    import time

    from data.shapes import class_names
    from data.synthetic import SyntheticConfig, generate

    start = time.perf_counter()
    splits = generate(SyntheticConfig())
    print(f"generated the default benchmark in {time.perf_counter() - start:.1f} s")
    (trx, try_), (tex, tey) = splits["train"], splits["test"]
    names = class_names()
    m = classification_metrics(baseline_predict(trx, try_, tex), tey, len(names))
    print(f"chance: {100 / len(names):.2f} %")
    print(f"baseline (global statistics + logistic regression): OA {m['oa']:.2f} %, mAcc {m['macc']:.2f} %")
    print("per class: " + ", ".join(f"{n} {a:.0f}" for n, a in zip(names, m["per_class"])))


if __name__ == "__main__":
    main()
