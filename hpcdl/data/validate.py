"""Checks shared by every image source, and exact per-channel pixel statistics.

Every reader funnels its arrays through `validate_images_labels` so a broken
file fails at load time with a message naming the file and the dataset, not
ten minutes into training with an index error on one rank.
"""
from __future__ import annotations

import numpy as np

from hpcdl.errors import DataError


def validate_images_labels(images, labels, num_classes: int, source: str,
                           images_key: str = "images", labels_key: str = "labels") -> None:
    """Raise DataError unless images are uint8 N×C×H×W and labels are N integers in [0, num_classes).

    `source` names the file (or directory); the keys name the datasets inside it.
    """
    if images.dtype != np.uint8:
        raise DataError(f"{source}: {images_key}: dtype {images.dtype}, expected uint8")
    if images.ndim != 4 or min(images.shape[1:], default=0) < 1:
        raise DataError(f"{source}: {images_key}: shape {tuple(images.shape)}, expected N×C×H×W with C, H, W ≥ 1")
    if labels.ndim != 1:
        raise DataError(f"{source}: {labels_key}: shape {tuple(labels.shape)}, expected one label per image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: {labels_key}: dtype {labels.dtype}, expected an integer type")
    if len(labels) != len(images):
        raise DataError(f"{source}: {labels_key} has {len(labels)} entries but {images_key} has {len(images)}")
    if num_classes < 1:
        raise DataError(f"{source}: {num_classes} classes; need at least one")
    if len(labels):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise DataError(f"{source}: {labels_key}: label {bad} outside [0, {num_classes})")


def channel_histogram(images: np.ndarray) -> np.ndarray:
    """int64 [C, 256]: how often each uint8 value occurs in each channel of an N×C×H×W batch.

    Histograms add up across chunks, so a streaming converter gets the same
    statistics as a whole-array pass, exactly and without float temporaries.
    """
    channels = images.shape[1]
    hist = np.zeros((channels, 256), dtype=np.int64)
    for c in range(channels):
        hist[c] = np.bincount(images[:, c].reshape(-1), minlength=256)
    return hist


def stats_from_histogram(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std in [0, 1] pixel units, as float32."""
    values = np.arange(256, dtype=np.float64) / 255.0
    count = hist.sum(axis=1).astype(np.float64)
    if (count == 0).any():
        raise DataError("cannot compute mean/std of an empty training split")
    mean = hist @ values / count
    var = hist @ (values ** 2) / count - mean ** 2
    return mean.astype(np.float32), np.sqrt(np.maximum(var, 0.0)).astype(np.float32)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 N×C×H×W images, in [0, 1] pixel units."""
    return stats_from_histogram(channel_histogram(images))
