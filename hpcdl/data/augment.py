"""Batch transforms: random crops (zero-padded, or RandomResizedCrop), flips, centre crops, normalization.

Training transforms (each a small picklable object, `transform(rows, epoch, step, positions, out)`):

* `PadCropFlip`: random crop of the zero-padded image and a horizontal flip,
  at the stored size (Fashion-MNIST, CIFAR).
* `RandomResizedCrop`: a box of U(scale)·area and log-uniform aspect ratio,
  resized to the model's input, then a flip (the ImageNet recipe; geometry
  as torchvision's `RandomResizedCrop.get_params`: 10 tries, then a centre
  fallback).
* `CentreCrop`: the evaluation transform (a centred square keeping
  `fraction` of the short side, resized), optionally flipped for training.
* `Normalize`: nothing but (x/255 − mean)/std.

Rank-count invariance. A sample's crop offset and flip depend only on
(seed, epoch, step) and on its *position in the global batch*, never on which
rank or micro-step holds it. The draws come from a counter-based stream:
position p takes the p-th output of a SplitMix64 generator (Steele, Lea and
Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014) whose
seed is mixed from (seed, epoch, step). SplitMix64's state advances by a
constant, so any output can be computed directly, vectorized, for whatever
positions a rank holds (the counter-based idea of Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011).

Speed. Crop and flip are one gather from a strided "all windows" view of the
padded batch (shape n × C × (2p+1) × (2p+1) × H × W, no copy): no Python loop
over samples. `augment_reference` is the per-sample loop it is tested against.
Works on NumPy and CuPy arrays alike; the offsets are drawn on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcdl.backend import array_module
from hpcdl.data.resize import resize_crops
from hpcdl.errors import ConfigError

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (a bijection on uint64; wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def random_bits(seed: int, epoch: int, step: int, positions, stream: int = 0) -> np.ndarray:
    """uint64 per position: output number `position` of a SplitMix64 stream keyed by (seed, epoch, step).

    `stream` > 0 keys an independent stream for another transform; stream 0
    is the key the pad-crop transform has always used.
    """
    key = np.zeros(1, dtype=np.uint64)  # arrays, not scalars: NumPy wraps array overflow silently
    for part in (seed, epoch, step) + ((stream,) if stream else ()):
        key = _mix64(key ^ (np.array([part], dtype=np.uint64) + _GOLDEN_GAMMA))
    counters = np.asarray(positions, dtype=np.uint64) + np.uint64(1)
    return _mix64(key + counters * _GOLDEN_GAMMA)


def draw_offsets(seed: int, epoch: int, step: int, positions, pad: int, flip: bool):
    """(dy, dx, flipped) per position: crop offsets in [0, 2·pad] and the flip decision."""
    bits = random_bits(seed, epoch, step, positions)
    span = np.uint64(2 * pad + 1)
    # 16-bit fields: the modulo bias is < span / 65536, far below anything training can notice
    dy = ((bits & np.uint64(0xFFFF)) % span).astype(np.int64)
    dx = (((bits >> np.uint64(16)) & np.uint64(0xFFFF)) % span).astype(np.int64)
    flipped = ((bits >> np.uint64(32)) & np.uint64(1)).astype(bool) if flip else np.zeros(len(bits), bool)
    return dy, dx, flipped


def normalize(images_uint8, mean, std):
    """float32 (x / 255 − mean) / std per channel, for N×C×H×W uint8 images (NumPy or CuPy)."""
    xp = array_module(images_uint8)
    scale, shift = _affine(xp, mean, std, images_uint8.shape[1])
    out = images_uint8.astype(np.float32)
    out *= scale
    out += shift
    return out


def _affine(xp, mean, std, channels: int):
    """(x/255 − mean)/std as x·scale + shift, folded once in float64 then rounded to float32."""
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    std = np.asarray(std, dtype=np.float64).reshape(-1)
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ValueError(f"mean/std need {channels} per-channel values, got {mean.shape} and {std.shape}")
    scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(channels, 1, 1)
    shift = (-mean / std).astype(np.float32).reshape(channels, 1, 1)
    return xp.asarray(scale), xp.asarray(shift)


def crop_flip(images_uint8, dy, dx, flipped, pad: int):
    """Per-sample crop at (dy, dx) of the zero-padded batch, mirrored where `flipped`; stays uint8."""
    xp = array_module(images_uint8)
    n, c, h, w = images_uint8.shape
    span = 2 * pad + 1
    # a zeroed canvas plus one slice assignment: several times faster than np.pad
    padded = xp.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=images_uint8.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = images_uint8
    s_n, s_c, s_h, s_w = padded.strides
    windows = xp.lib.stride_tricks.as_strided(
        padded, shape=(n, c, span, span, h, w), strides=(s_n, s_c, s_h, s_w, s_h, s_w))
    out = windows[xp.arange(n), :, xp.asarray(dy), xp.asarray(dx)]
    mirror = np.flatnonzero(flipped)
    if mirror.size:
        m = xp.asarray(mirror)
        out[m] = out[m][..., ::-1]
    return out


class Augmenter:
    """Random crop (zero padding `pad`) + horizontal flip + normalization, keyed by global-batch position.

    `augmenter(images, epoch, step, positions)` returns float32 N×C×H×W; the
    same (seed, epoch, step, position) always gets the same crop and flip.
    """

    def __init__(self, *, mean, std, pad: int = 4, flip: bool = True, seed: int = 0):
        if pad < 0:
            raise ValueError(f"pad must be ≥ 0, got {pad}")
        self.mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        self.std = np.asarray(std, dtype=np.float64).reshape(-1)
        self.pad = int(pad)
        self.flip = bool(flip)
        self.seed = int(seed)

    def __call__(self, images_uint8, epoch: int, step: int, positions):
        positions = np.asarray(positions)
        if len(positions) != len(images_uint8):
            raise ValueError(f"{len(images_uint8)} images but {len(positions)} positions")
        if self.pad or self.flip:
            dy, dx, flipped = draw_offsets(self.seed, epoch, step, positions, self.pad, self.flip)
            images_uint8 = crop_flip(images_uint8, dy, dx, flipped, self.pad)
        return normalize(images_uint8, self.mean, self.std)


def augment_reference(images_uint8: np.ndarray, dy, dx, flipped, pad: int, mean, std) -> np.ndarray:
    """Readable per-sample loop that `crop_flip` + `normalize` must match exactly (the test oracle)."""
    n, c, h, w = images_uint8.shape
    out = np.empty((n, c, h, w), dtype=np.float32)
    mean = np.asarray(mean, dtype=np.float64).reshape(c, 1, 1)
    std = np.asarray(std, dtype=np.float64).reshape(c, 1, 1)
    for i in range(n):
        canvas = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=np.uint8)
        canvas[:, pad:pad + h, pad:pad + w] = images_uint8[i]
        crop = canvas[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        if flipped[i]:
            crop = crop[:, :, ::-1]
        out[i] = (crop / 255.0 - mean) / std
    return out


# -- RandomResizedCrop and centre crops -------------------------------------------------------

# Stream tags and the words each position draws from its stream: counter
# position·WORDS + k for k < WORDS, so positions never share a word.
_RRC_STREAM = 1
_CENTRE_FLIP_STREAM = 2
_RRC_TRIES = 10
_RRC_WORDS = 2 * _RRC_TRIES + 3  # (area, ratio) per try, then top, left, flip


def _unit(bits: np.ndarray) -> np.ndarray:
    """float64 in [0, 1) from the top 53 bits."""
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _position_words(seed: int, epoch: int, step: int, positions, stream: int, words: int) -> np.ndarray:
    """uint64 [n, words]: word k of each position's private block in `stream`."""
    positions = np.asarray(positions, dtype=np.uint64).reshape(-1, 1)
    counters = positions * np.uint64(words) + np.arange(words, dtype=np.uint64)[None, :]
    return random_bits(seed, epoch, step, counters.reshape(-1), stream).reshape(-1, words)


def random_resized_crop_boxes(seed: int, epoch: int, step: int, positions, height: int, width: int,
                              scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[np.ndarray, np.ndarray]:
    """(boxes int64 [n, 4] as (top, left, height, width), flips bool [n]) per global-batch position.

    Vectorized transcription of torchvision's `RandomResizedCrop.get_params`:
    up to 10 tries of area ~ U(scale)·H·W and aspect ~ exp(U(log ratio)),
    w = round(√(area·aspect)), h = round(√(area/aspect)); the first try that
    fits gives the box, at a uniform offset; if none fits, the centre crop of
    the whole image clamped to the ratio range. Python's `round` and `np.rint`
    both round half to even.
    """
    words = _position_words(seed, epoch, step, positions, _RRC_STREAM, _RRC_WORDS)
    n = len(words)
    u = _unit(words)
    area = float(height * width)
    target = area * (scale[0] + u[:, 0:2 * _RRC_TRIES:2] * (scale[1] - scale[0]))
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    aspect = np.exp(log_lo + u[:, 1:2 * _RRC_TRIES:2] * (log_hi - log_lo))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(fits, axis=1)
    found = fits[np.arange(n), first]
    bw, bh = w[np.arange(n), first], h[np.arange(n), first]
    top = np.floor(u[:, 2 * _RRC_TRIES] * (height - bh + 1)).astype(np.int64)
    left = np.floor(u[:, 2 * _RRC_TRIES + 1] * (width - bw + 1)).astype(np.int64)
    if not found.all():
        fh, fw = _fallback_size(height, width, ratio)
        bh, bw = np.where(found, bh, fh), np.where(found, bw, fw)
        top = np.where(found, top, (height - fh) // 2)
        left = np.where(found, left, (width - fw) // 2)
    flips = (words[:, 2 * _RRC_TRIES + 2] >> np.uint64(63)).astype(bool)
    return np.stack([top, left, bh, bw], axis=1), flips


def _fallback_size(height: int, width: int, ratio) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def centre_box(height: int, width: int, fraction: float) -> tuple[int, int, int, int]:
    """(top, left, side, side): the centred square keeping `fraction` of the short side (≥ 1 pixel)."""
    side = max(1, min(height, width, int(round(min(height, width) * fraction))))
    return (height - side) // 2, (width - side) // 2, side, side


def centre_flips(seed: int, epoch: int, step: int, positions) -> np.ndarray:
    words = _position_words(seed, epoch, step, positions, _CENTRE_FLIP_STREAM, 1)
    return (words[:, 0] >> np.uint64(63)).astype(bool)


# -- transforms: rows uint8 [n, C, H, W] -> out float32 [n, C, OH, OW] --------------------------

@dataclass(frozen=True)
class Normalize:
    """(x/255 − mean)/std and nothing else."""

    mean: tuple
    std: tuple

    def output_shape(self, shape):
        return tuple(shape)

    def describe(self) -> str:
        return "normalize"

    def __call__(self, rows, epoch, step, positions, out) -> None:
        out[...] = normalize(rows, self.mean, self.std)


@dataclass(frozen=True)
class PadCropFlip:
    """`Augmenter`'s random crop with zero padding `pad` and flip, at the stored size."""

    mean: tuple
    std: tuple
    pad: int
    flip: bool
    seed: int

    def output_shape(self, shape):
        return tuple(shape)

    def describe(self) -> str:
        parts = ([f"random crop (pad {self.pad})"] if self.pad else []) + (["flip"] if self.flip else [])
        return " + ".join(parts) or "normalize"

    def __call__(self, rows, epoch, step, positions, out) -> None:
        augment = Augmenter(mean=self.mean, std=self.std, pad=self.pad, flip=self.flip, seed=self.seed)
        out[...] = augment(rows, epoch, step, positions)


@dataclass(frozen=True)
class RandomResizedCrop:
    """torchvision's RandomResizedCrop(size, scale, ratio), bilinear, then RandomHorizontalFlip when `flip`."""

    mean: tuple
    std: tuple
    size: tuple  # (height, width) of the output
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip: bool = True
    seed: int = 0

    def output_shape(self, shape):
        return (shape[0], *self.size)

    def describe(self) -> str:
        return (f"RandomResizedCrop {self.size[0]}×{self.size[1]} (scale {self.scale[0]:g}–{self.scale[1]:g}, "
                f"ratio {self.ratio[0]:.3g}–{self.ratio[1]:.3g})" + (" + flip" if self.flip else ""))

    def boxes(self, epoch, step, positions, height: int, width: int):
        boxes, flips = random_resized_crop_boxes(self.seed, epoch, step, positions, height, width,
                                                 self.scale, self.ratio)
        return boxes, flips & self.flip

    def __call__(self, rows, epoch, step, positions, out) -> None:
        boxes, flips = self.boxes(epoch, step, positions, rows.shape[2], rows.shape[3])
        resize_crops(rows, boxes, flips, out, self.mean, self.std)


@dataclass(frozen=True)
class CentreCrop:
    """The centred square keeping `fraction` of the short side, resized to `size`; random flips when `flip`."""

    mean: tuple
    std: tuple
    size: tuple
    fraction: float = 1.0
    flip: bool = False
    seed: int = 0

    def output_shape(self, shape):
        return (shape[0], *self.size)

    def describe(self) -> str:
        crop = f"centre crop {self.fraction:g} of the short side" if self.fraction < 1 else "short-side square"
        return f"{crop}, resized to {self.size[0]}×{self.size[1]}" + (" + flip" if self.flip else "")

    def __call__(self, rows, epoch, step, positions, out) -> None:
        n = len(rows)
        box = centre_box(rows.shape[2], rows.shape[3], self.fraction)
        flips = centre_flips(self.seed, epoch, step, positions) if self.flip else np.zeros(n, bool)
        resize_crops(rows, np.tile(np.asarray(box, np.int64), (n, 1)), flips, out, self.mean, self.std)


def build_transforms(stored_shape, *, mean, std, seed: int, image_size: int = 0, short_side: int = 0,
                     random_resized_crop: bool = False, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                     pad: int = 0, flip: bool = False, eval_crop_fraction: float = 0.875):
    """(training transform, evaluation transform) for images stored at `stored_shape` (C, H, W).

    The output is image_size × image_size (0: the stored H × W). Evaluation
    crops the centre `eval_crop_fraction` of files stored at a short side
    (short_side > 0: squares kept for train-time crops, e.g. 224 of 256) and
    resizes; files already at their final size are only resized, or only
    normalized when the size is already right.
    """
    c, h, w = (int(d) for d in stored_shape)
    mean = tuple(float(m) for m in np.asarray(mean).reshape(-1))
    std = tuple(float(s) for s in np.asarray(std).reshape(-1))
    size = (int(image_size), int(image_size)) if image_size else (h, w)
    resized = size != (h, w)
    if random_resized_crop:
        if pad:
            raise ConfigError("data.random_crop_pad: choose either random_crop_pad or random_resized_crop")
        train = RandomResizedCrop(mean, std, size, tuple(map(float, scale)), tuple(map(float, ratio)), bool(flip),
                                  int(seed))
    elif resized:
        if pad:
            raise ConfigError(f"data.random_crop_pad: padded crops work at the stored size {h}×{w}; "
                              f"data.image_size = {image_size} resizes (use data.random_resized_crop)")
        fraction = eval_crop_fraction if short_side else 1.0
        train = CentreCrop(mean, std, size, float(fraction), bool(flip), int(seed))
    elif pad or flip:
        train = PadCropFlip(mean, std, int(pad), bool(flip), int(seed))
    else:
        train = Normalize(mean, std)
    if short_side:
        evaluation = CentreCrop(mean, std, size, float(eval_crop_fraction))
    elif resized:
        evaluation = CentreCrop(mean, std, size, 1.0)
    else:
        evaluation = Normalize(mean, std)
    return train, evaluation
