"""Crop, resize (antialiased bilinear), flip and normalize a batch of uint8 images in one pass.

`resize_crops(src, boxes, flips, out, mean, std)` writes, for every image k,
the box (top, left, height, width) of src[k] resized to out's H×W,
mirrored left-right where flips[k], as float32 (x/255 − mean)/std.

The filter is Pillow's BILINEAR resampling (`ImagingResample`, and the
antialiased bilinear of torchvision's resize): a triangle of support
max(1, in/out) around each output pixel's centre in input coordinates,
weights normalised to 1, one separable pass per axis. Downscaling thus
averages every input pixel (no aliasing); upscaling is plain bilinear
interpolation; at equal sizes it is an exact copy. Taps stop at the box
edges, as when torchvision crops first and resizes the crop. Because
resizing is linear and the weights sum to 1, normalization folds into one
multiply-add at the end. Unlike Pillow, nothing is rounded to uint8
between the passes.

`resize_crops` is a Numba kernel that releases the GIL, so worker threads
run it in parallel; `resize_crops_reference` is the dense NumPy
formulation (one weight matrix per axis) it is tested against.
"""
from __future__ import annotations

import math

import numpy as np

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a hard dependency; this keeps imports working without it
    njit = None


def filter_weights(in_size: int, out_size: int) -> np.ndarray:
    """float64 [out_size, in_size]: the bilinear (triangle) resampling weights, rows summing to 1."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    centres = (np.arange(out_size) + 0.5) * scale
    taps = np.arange(in_size) + 0.5
    weights = np.clip(1.0 - np.abs(taps[None, :] - centres[:, None]) / support, 0.0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def _affine(mean, std, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(x/255 − mean)/std as x·scale + shift, folded in float64 then rounded to float32."""
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    std = np.asarray(std, dtype=np.float64).reshape(-1)
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ValueError(f"mean/std need {channels} per-channel values, got {mean.shape} and {std.shape}")
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def resize_crops_reference(src: np.ndarray, boxes, flips, out_hw: tuple[int, int], mean, std) -> np.ndarray:
    """The readable oracle: out = Wy · crop · Wxᵀ per channel, then flip, then normalize."""
    n, c = src.shape[:2]
    out_h, out_w = out_hw
    out = np.empty((n, c, out_h, out_w), dtype=np.float32)
    scale, shift = _affine(mean, std, c)
    for k in range(n):
        top, left, height, width = (int(v) for v in boxes[k])
        crop = src[k, :, top:top + height, left:left + width].astype(np.float64)
        resized = np.einsum("ih,chw,jw->cij", filter_weights(height, out_h), crop, filter_weights(width, out_w))
        if flips[k]:
            resized = resized[:, :, ::-1]
        out[k] = resized * scale[:, None, None] + shift[:, None, None]
    return out


def _check(src, boxes, flips, out):
    if src.dtype != np.uint8 or src.ndim != 4 or not src.flags.c_contiguous:
        raise ValueError(f"src must be C-contiguous uint8 N×C×H×W, got {src.dtype} {src.shape}")
    n, c, h, w = src.shape
    if out.dtype != np.float32 or out.ndim != 4 or out.shape[:2] != (n, c) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {n}×{c}×H×W, got {out.dtype} {out.shape}")
    if boxes.shape != (n, 4) or flips.shape != (n,):
        raise ValueError(f"need {n} boxes (top, left, height, width) and {n} flips, got {boxes.shape}, {flips.shape}")
    if n and ((boxes[:, 2] < 1).any() or (boxes[:, 3] < 1).any() or (boxes[:, 0] < 0).any()
              or (boxes[:, 1] < 0).any() or (boxes[:, 0] + boxes[:, 2] > h).any()
              or (boxes[:, 1] + boxes[:, 3] > w).any()):
        raise ValueError(f"a crop box lies outside the {h}×{w} images")


def resize_crops(src: np.ndarray, boxes, flips, out: np.ndarray, mean, std) -> np.ndarray:
    """Fill `out` (float32 N×C×OH×OW) from the boxes of `src` (uint8 N×C×H×W); see the module docstring."""
    boxes = np.ascontiguousarray(boxes, dtype=np.int64).reshape(-1, 4)
    flips = np.ascontiguousarray(flips, dtype=np.bool_).reshape(-1)
    _check(src, boxes, flips, out)
    scale, shift = _affine(mean, std, src.shape[1])
    if len(src):
        _resize_kernel(src, boxes, flips, out, scale, shift)
    return out


def _taps(start: int, length: int, out_size: int, max_taps: int):
    """Per output pixel: first input index, tap count, and float32 weights (Pillow's precompute_coeffs)."""
    first = np.empty(out_size, np.int64)
    count = np.empty(out_size, np.int64)
    weights = np.zeros((out_size, max_taps), np.float32)
    scale = length / out_size
    support = max(scale, 1.0)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo = max(int(math.floor(centre - support + 0.5)), 0)
        hi = min(int(math.floor(centre + support + 0.5)), length)
        total = 0.0
        for t in range(hi - lo):
            wt = 1.0 - abs(lo + t + 0.5 - centre) / support
            wt = wt if wt > 0.0 else 0.0
            weights[i, t] = wt
            total += wt
        for t in range(hi - lo):
            weights[i, t] = weights[i, t] / total
        first[i] = start + lo
        count[i] = hi - lo
    return first, count, weights


def _resize_one(src, k, top, left, height, width, flip, out, scale, shift, line):
    c_count = src.shape[1]
    out_h, out_w = out.shape[2], out.shape[3]
    max_x = int(math.ceil(2.0 * max(width / out_w, 1.0))) + 2
    max_y = int(math.ceil(2.0 * max(height / out_h, 1.0))) + 2
    x_first, x_count, x_weights = _taps(0, width, out_w, max_x)
    y_first, y_count, y_weights = _taps(top, height, out_h, max_y)
    for c in range(c_count):
        sc, sh = scale[c], shift[c]
        for i in range(out_h):
            # vertical pass first: contiguous input rows, so the inner loop vectorizes
            for x in range(width):
                line[x] = np.float32(0.0)
            y0 = y_first[i]
            for t in range(y_count[i]):
                wt = y_weights[i, t]
                row = src[k, c, y0 + t]
                for x in range(width):
                    line[x] += wt * np.float32(row[left + x])
            # horizontal pass, with the flip and the normalization on the way out
            dest = out[k, c, i]
            for j in range(out_w):
                acc = np.float32(0.0)
                x0 = x_first[j]
                for t in range(x_count[j]):
                    acc += x_weights[j, t] * line[x0 + t]
                dest[out_w - 1 - j if flip else j] = acc * sc + sh


def _resize_all(src, boxes, flips, out, scale, shift):
    line = np.empty(src.shape[3], np.float32)
    for k in range(src.shape[0]):
        _resize_one(src, k, boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3], flips[k], out, scale, shift,
                    line)


if njit is not None:
    _taps = njit(nogil=True, cache=True)(_taps)
    _resize_one = njit(nogil=True, cache=True)(_resize_one)
    _resize_kernel = njit(nogil=True, cache=True)(_resize_all)
else:  # pragma: no cover
    _resize_kernel = _resize_all
