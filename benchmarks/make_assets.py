"""Cut the bundled Fashion-MNIST slices from the Debian package ``dataset-fashion-mnist`` (seeded).

    python benchmarks/make_assets.py

* ``fashion_mnist_train_slice.npz``: 2048 images drawn from the *train* split, class-balanced
  (calibration, fine-tuning and BN re-estimation in the demo and tests);
* ``fashion_mnist_test_slice.npz``: 2000 images drawn from the *test* split, class-balanced (evaluation).

The two never share an image, so nothing is evaluated on images used to calibrate or fine-tune.
"""

from __future__ import annotations

import numpy as np

from rescompress.data import ASSETS, DEBIAN_FASHION_MNIST, _idx_files, _read_idx


def balanced_slice(split: str, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _idx_files(DEBIAN_FASHION_MNIST, split)
    x, y = _read_idx(images), _read_idx(labels)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)])
    idx = rng.permutation(idx)
    return x[idx], y[idx].astype(np.uint8)


def main() -> None:
    for split, per_class, name in (("train", 205, "fashion_mnist_train_slice.npz"),
                                   ("test", 200, "fashion_mnist_test_slice.npz")):
        x, y = balanced_slice(split, per_class, seed=20261126)
        if split == "train":
            x, y = x[:2048], y[:2048]
        np.savez_compressed(ASSETS / name, x=x, y=y)
        print(name, x.shape, np.bincount(y))


if __name__ == "__main__":
    main()
