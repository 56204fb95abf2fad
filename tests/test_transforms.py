"""Resize kernel against its NumPy reference and Pillow; RandomResizedCrop geometry against torchvision's."""
from __future__ import annotations

import numpy as np
import pytest

from hpcdl.data.augment import (CentreCrop, Normalize, PadCropFlip, RandomResizedCrop, build_transforms,
                                centre_box, random_resized_crop_boxes)
from hpcdl.data.resize import filter_weights, resize_crops, resize_crops_reference
from hpcdl.errors import ConfigError

MEAN, STD = (0.45, 0.5, 0.55), (0.22, 0.25, 0.2)


def _random_boxes(rng, n, h, w):
    heights = rng.integers(1, h + 1, n)
    widths = rng.integers(1, w + 1, n)
    tops = rng.integers(0, h - heights + 1)
    lefts = rng.integers(0, w - widths + 1)
    return np.stack([tops, lefts, heights, widths], axis=1)


@pytest.mark.parametrize("shape, out_hw", [((12, 3, 40, 36), (24, 24)),   # mostly downscaling
                                           ((12, 3, 20, 18), (32, 40)),   # upscaling, non-square out
                                           ((6, 1, 9, 7), (9, 7))])       # one channel, equal sizes
def test_kernel_matches_the_numpy_reference(shape, out_hw):
    rng = np.random.default_rng(sum(shape))
    src = rng.integers(0, 256, shape, dtype=np.uint8)
    boxes = _random_boxes(rng, shape[0], *shape[2:])
    boxes[0] = (0, 0, shape[2], shape[3])  # the whole image
    flips = rng.integers(0, 2, shape[0]).astype(bool)
    flips[:2] = (False, True)
    mean, std = MEAN[:shape[1]], STD[:shape[1]]
    out = np.full((shape[0], shape[1], *out_hw), np.nan, np.float32)
    resize_crops(src, boxes, flips, out, mean, std)
    np.testing.assert_allclose(out, resize_crops_reference(src, boxes, flips, out_hw, mean, std), rtol=0, atol=2e-5)


def test_equal_size_is_an_exact_copy_and_weights_sum_to_one():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    out = np.empty((2, 3, 12, 12), np.float32)
    resize_crops(src, [(2, 3, 12, 12), (4, 4, 12, 12)], [False, True], out, [0.0] * 3, [1 / 255] * 3)
    np.testing.assert_array_equal(out[0], src[0, :, 2:14, 3:15])
    np.testing.assert_array_equal(out[1], src[1, :, 4:16, 4:16][:, :, ::-1])
    for n_in, n_out in ((7, 3), (3, 7), (224, 224), (256, 224)):
        np.testing.assert_allclose(filter_weights(n_in, n_out).sum(axis=1), 1.0)


@pytest.mark.parametrize("box, out_hw", [((0, 0, 64, 80), (32, 32)), ((5, 9, 30, 21), (48, 40)),
                                         ((0, 0, 64, 80), (64, 80))])
def test_resize_agrees_with_pillow_bilinear(box, out_hw):
    """Pillow rounds to uint8 between its two passes; we do not: at most ~1 grey level apart."""
    from PIL import Image

    rng = np.random.default_rng(3)
    smooth = rng.integers(0, 256, (3, 9, 11)).astype(np.float64)
    image = np.asarray(Image.fromarray(smooth.transpose(1, 2, 0).astype(np.uint8)).resize((80, 64), Image.BICUBIC))
    src = np.ascontiguousarray(image.transpose(2, 0, 1)[None])
    out = np.empty((1, 3, *out_hw), np.float32)
    resize_crops(src, [box], [False], out, [0.0] * 3, [1 / 255] * 3)
    top, left, h, w = box
    crop = Image.fromarray(image[top:top + h, left:left + w])
    expected = np.asarray(crop.resize(out_hw[::-1], Image.BILINEAR)).transpose(2, 0, 1).astype(np.float64)
    diff = np.abs(out[0] - expected)
    assert diff.max() <= 1.5 and diff.mean() < 0.3, (diff.max(), diff.mean())


def test_bad_boxes_and_buffers_are_refused():
    src = np.zeros((2, 3, 8, 8), np.uint8)
    out = np.empty((2, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="outside"):
        resize_crops(src, [(0, 0, 8, 8), (4, 4, 5, 4)], [False, False], out, MEAN, STD)
    with pytest.raises(ValueError, match="float32"):
        resize_crops(src, [(0, 0, 8, 8)] * 2, [False] * 2, out.astype(np.float64), MEAN, STD)


# -- RandomResizedCrop geometry ----------------------------------------------------------------

def _stats(boxes, area):
    h, w = boxes[:, 2].astype(float), boxes[:, 3].astype(float)
    return h * w / area, np.log(w / h)


def test_boxes_stay_inside_with_the_reference_scale_and_ratio():
    boxes, flips = random_resized_crop_boxes(7, 1, 2, np.arange(20000), 256, 256)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 256).all() and (left + w <= 256).all()
    share, log_ratio = _stats(boxes, 256 * 256)
    # rounding w and h to integers moves the realised area and ratio slightly past the nominal ranges
    assert share.min() >= 0.075 and share.max() <= 1.0
    assert log_ratio.min() >= np.log(3 / 4) - 0.02 and log_ratio.max() <= np.log(4 / 3) + 0.02
    # E[U(0.08, 1)] = 0.54, but large tries with a skewed ratio do not fit and are redrawn: 0.48 (torchvision too)
    assert 0.46 < share.mean() < 0.50
    assert 0.48 < flips.mean() < 0.52
    # offsets are uniform over the free range: the box centre is spread evenly
    assert abs((top + h / 2).mean() - 128) < 2 and abs((left + w / 2).mean() - 128) < 2


def test_a_very_wide_image_falls_back_to_the_clamped_centre_crop():
    boxes, _ = random_resized_crop_boxes(0, 0, 0, np.arange(4000), 20, 400)
    fallback = boxes[(boxes[:, 2] == 20) & (boxes[:, 3] == round(20 * 4 / 3))]
    assert len(fallback) > 1000  # most tries of a 20×400 image cannot fit
    assert (fallback[:, 0] == 0).all() and (fallback[:, 1] == (400 - 27) // 2).all()


def test_boxes_depend_on_the_global_position_only():
    positions = np.arange(64)
    whole = random_resized_crop_boxes(3, 2, 9, positions, 100, 120)
    for part in (positions[5:9], positions[::7], positions[::-1]):
        piece = random_resized_crop_boxes(3, 2, 9, part, 100, 120)
        np.testing.assert_array_equal(piece[0], whole[0][part])
        np.testing.assert_array_equal(piece[1], whole[1][part])
    other_step = random_resized_crop_boxes(3, 2, 10, positions, 100, 120)[0]
    assert (other_step != whole[0]).any(axis=1).mean() > 0.9


def test_geometry_is_distributed_like_torchvision():
    torch = pytest.importorskip("torch")
    transforms = pytest.importorskip("torchvision.transforms")

    torch.manual_seed(0)
    for height, width in ((256, 256), (200, 320)):
        image = torch.zeros(3, height, width)
        theirs = np.array([transforms.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                           for _ in range(3000)])  # (top, left, h, w) like ours
        ours = random_resized_crop_boxes(0, 0, 0, np.arange(3000), height, width)[0]
        for a, b in zip(_stats(ours, height * width), _stats(theirs, height * width)):
            assert abs(a.mean() - b.mean()) < 0.02 and abs(a.std() - b.std()) < 0.02
            assert abs(np.median(a) - np.median(b)) < 0.03


def test_centre_box_is_the_reference_evaluation_crop():
    assert centre_box(256, 256, 0.875) == (16, 16, 224, 224)  # Resize(256) + CenterCrop(224)
    assert centre_box(160, 200, 1.0) == (0, 20, 160, 160)


# -- choosing the transforms ---------------------------------------------------------------------

def test_build_transforms_picks_each_recipe():
    stats = dict(mean=MEAN, std=STD, seed=1)
    train, evaluation = build_transforms((3, 256, 256), image_size=224, short_side=256, random_resized_crop=True,
                                         flip=True, **stats)
    assert isinstance(train, RandomResizedCrop) and train.size == (224, 224) and train.flip
    assert isinstance(evaluation, CentreCrop) and evaluation.fraction == 0.875
    assert train.output_shape((3, 256, 256)) == evaluation.output_shape((3, 256, 256)) == (3, 224, 224)
    train, evaluation = build_transforms((1, 28, 28), pad=2, flip=True, **stats)
    assert isinstance(train, PadCropFlip) and isinstance(evaluation, Normalize)
    train, evaluation = build_transforms((3, 256, 256), image_size=128, **stats)  # files at final size: resize only
    assert isinstance(train, CentreCrop) and train.fraction == 1.0 and evaluation.fraction == 1.0
    with pytest.raises(ConfigError, match="data.random_crop_pad"):
        build_transforms((3, 256, 256), image_size=224, pad=4, **stats)


def test_centre_crop_evaluation_of_a_256_square_is_the_224_centre():
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 256, (2, 3, 256, 256), dtype=np.uint8)
    _, evaluation = build_transforms((3, 256, 256), mean=[0.0] * 3, std=[1 / 255] * 3, seed=0, image_size=224,
                                     short_side=256, random_resized_crop=True)
    out = np.empty((2, 3, 224, 224), np.float32)
    evaluation(rows, 0, 0, np.arange(2), out)
    np.testing.assert_array_equal(out, rows[:, :, 16:240, 16:240])
