"""Batch augmentation: random crop with zero padding, horizontal flip, normalization.

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

import numpy as np

from hpcdl.backend import array_module

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (a bijection on uint64; wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def random_bits(seed: int, epoch: int, step: int, positions) -> np.ndarray:
    """uint64 per position: output number `position` of a SplitMix64 stream keyed by (seed, epoch, step)."""
    key = np.zeros(1, dtype=np.uint64)  # arrays, not scalars: NumPy wraps array overflow silently
    for part in (seed, epoch, step):
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
