"""Data for the demo: scikit-learn's bundled digits by default, Fashion-MNIST from local files.

Nothing is downloaded. Images come back as float32 (N, C, H, W) tensors standardized with the
training set's mean and std (one scalar each, so every pixel keeps its relative scale); labels
as int64.
"""

from __future__ import annotations

import gzip
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# IDX type codes (the MNIST file format): code -> numpy big-endian dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# key sets seen in the wild for (x_train, y_train, x_test, y_test) in one .npz
_NPZ_KEYS = (
    ("x_train", "y_train", "x_test", "y_test"),
    ("train_images", "train_labels", "test_images", "test_labels"),
    ("X_train", "y_train", "X_test", "y_test"),
)
DIGITS_TEST_SIZE = 500


@dataclass
class Split:
    """A train/test split ready for the model.

    Attributes:
        name: what the data is, for the report.
        x_train, x_test: float32 (N, C, H, W), standardized with the training mean/std.
        y_train, y_test: int64 (N,) class labels.
        num_classes: number of classes.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or raw.

    Args:
        path: the file; gzip is recognised by its magic bytes, whatever the name.
    Returns:
        The array with the shape and dtype the header declares.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {header} declared)")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header declares shape {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(directory: str, stem: str) -> str:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"--data {directory}: no {stem} or {stem}.gz in that directory")


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            for keys in _NPZ_KEYS:
                if all(k in z.files for k in keys):
                    return dict(zip(("x_train", "y_train", "x_test", "y_test"),
                                    (z[k] for k in keys)))
            found = ", ".join(sorted(z.files))
    except (ValueError, zipfile.BadZipFile, EOFError) as e:  # not an archive, truncated, ...
        raise ValueError(f"--data {path}: not a readable .npz file ({e})") from e
    wanted = " or ".join("/".join(k) for k in _NPZ_KEYS)
    raise KeyError(f"--data {path}: expected arrays {wanted}; found {found}")


def _as_nchw(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return x.transpose(0, 3, 1, 2)  # channels-last files
    if x.ndim == 4:
        return x
    raise ValueError(f"--data: {what} must have shape (N, H, W) or (N, C, H, W), got {x.shape}")


def _make_split(name: str, arrays: dict[str, np.ndarray]) -> Split:
    x_tr = _as_nchw(np.asarray(arrays["x_train"]), "x_train").astype(np.float32)
    x_te = _as_nchw(np.asarray(arrays["x_test"]), "x_test").astype(np.float32)
    y_tr = np.asarray(arrays["y_train"]).astype(np.int64).reshape(-1)
    y_te = np.asarray(arrays["y_test"]).astype(np.int64).reshape(-1)
    for x, y, part in ((x_tr, y_tr, "train"), (x_te, y_te, "test")):
        if len(x) != len(y):
            raise ValueError(f"--data: {len(x)} {part} images but {len(y)} {part} labels")
        if len(x) < 2:
            raise ValueError(f"--data: the {part} set needs at least 2 images, got {len(x)}")
    for x, part in ((x_tr, "train"), (x_te, "test")):
        if not np.isfinite(x).all():
            raise ValueError(f"--data: the {part} images hold non-finite values (NaN/Inf)")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(f"--data: train images {x_tr.shape[1:]} and test images "
                         f"{x_te.shape[1:]} differ in shape")
    if min(y_tr.min(), y_te.min()) < 0:
        raise ValueError("--data: labels must be non-negative class indices")
    # one scalar mean/std from the training set: inputs centred near 0 with unit spread, so
    # the pixel range of the file (0-16, 0-255, 0-1) does not matter
    mean, std = float(x_tr.mean()), float(x_tr.std()) or 1.0
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return Split(
        name=name,
        x_train=t((x_tr - mean) / std), y_train=t(y_tr),
        x_test=t((x_te - mean) / std), y_test=t(y_te),
        num_classes=int(max(y_tr.max(), y_te.max())) + 1,
    )


def load_digits_split(seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 digits (1797 images), a stratified, seeded split with
    ``DIGITS_TEST_SIZE`` test images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        d.images, d.target, test_size=DIGITS_TEST_SIZE, stratify=d.target, random_state=seed
    )
    arrays = {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
    return _make_split("scikit-learn digits (8x8)", arrays)


def load_path(path: str) -> Split:
    """Fashion-MNIST (or any MNIST-format set) from local files.

    Args:
        path: a ``.npz`` file with ``x_train, y_train, x_test, y_test`` (or
            ``train_images, train_labels, test_images, test_labels``), or a directory holding the
            four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each raw or ``.gz``).
    Returns:
        The split, standardized.
    """
    if os.path.isdir(path):
        arrays = {k: read_idx(_find_idx(path, stem)) for k, stem in _IDX_FILES.items()}
        kind = "IDX"
    elif os.path.isfile(path):
        if not path.endswith(".npz"):
            raise ValueError(f"--data {path}: expected a .npz file or a directory of IDX files")
        arrays, kind = _load_npz(path), "npz"
    else:
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    hw = "x".join(map(str, np.shape(arrays["x_train"])[-2:]))
    return _make_split(f"{os.path.basename(os.path.normpath(path))} ({kind}, {hw})", arrays)


def subset(split: Split, max_train: int | None, max_test: int | None, seed: int = 0) -> Split:
    """A seeded random subset (for quick runs); None keeps everything."""
    g = torch.Generator().manual_seed(seed)

    def take(x: Tensor, y: Tensor, k: int | None) -> tuple[Tensor, Tensor]:
        if k is None or k >= len(x):
            return x, y
        idx = torch.randperm(len(x), generator=g)[:k]
        return x[idx], y[idx]

    x_tr, y_tr = take(split.x_train, split.y_train, max_train)
    x_te, y_te = take(split.x_test, split.y_test, max_test)
    return Split(split.name, x_tr, y_tr, x_te, y_te, split.num_classes)
