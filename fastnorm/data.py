"""Small real datasets with no download: scikit-learn's bundled 8x8 digits, and MNIST
from the four standard IDX files in a directory the user supplies (raw or .gz)."""
import gzip
import os
import struct

import numpy as np

from ._random import generator

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DataError(ValueError):
    """A dataset that is missing or malformed."""


def read_idx(path):
    """Read one IDX file (``.gz`` or raw) into an ndarray of its stored shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: expected {expected} bytes of data for shape {shape}, "
                        f"got {len(raw) - header}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _find(directory, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise DataError(f"{directory}: missing MNIST file {stem} (or {stem}.gz)")


def load_mnist(directory):
    """MNIST from ``directory``: ((x_train, y_train), (x_test, y_test)), images as
    float32 (N, 1, 28, 28) scaled to [0, 1], labels int64."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: not a directory")
    arrays = {k: read_idx(_find(directory, v)) for k, v in MNIST_FILES.items()}
    out = []
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{directory}: {part} images {images.shape} and labels "
                            f"{labels.shape} do not match")
        out.append(((images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)))
    return tuple(out)


def load_digits(test_fraction=0.2, seed=0):
    """scikit-learn's 8x8 digits (1,797 images): ((x_train, y_train), (x_test, y_test)),
    images float32 (N, 1, 8, 8) scaled to [0, 1]; a fixed stratified split."""
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError:
        raise DataError("the digits data set needs scikit-learn: pip install scikit-learn") from None
    d = _sk_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test[idx[:int(round(len(idx) * test_fraction))]] = True
    return (x[~test], y[~test]), (x[test], y[test])


def load(spec):
    """``digits`` or ``mnist:DIR``."""
    if spec == "digits":
        return load_digits()
    if spec.startswith("mnist:"):
        return load_mnist(spec[len("mnist:"):])
    raise DataError(f"--data: expected 'digits' or 'mnist:DIR', got {spec!r}")


def batches(x, y, batch_size, shuffle=True):
    """Mini-batches of (x, y), shuffled with fastnorm's generator."""
    n = len(x)
    order = generator().permutation(n) if shuffle else np.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]
