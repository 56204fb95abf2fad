"""Channel-major host path: each Numba kernel against its NumPy twin, the gradient pool, and whole
channel-major models against the same models on the NCHW path."""
import numpy as np
import pytest
from gradcheck import check_module

from hpcdl import models
from hpcdl.arena import Arena
from hpcdl.layers import BatchNorm, Conv2d, MaxPool2d, ReLU, Residual, Sequential, memory, softmax_cross_entropy
from hpcdl.kernels import layers_cpu as K

DTYPES = [np.float32, np.float64]


def rng(seed=0):
    return np.random.default_rng(seed)


def close(a, b, dtype):
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


# -- kernels against their twins --------------------------------------------------------------------

WINDOWS = [  # (C, N, H, W, kernel, stride, pad)
    (3, 4, 5, 4, 3, 1, 1), (2, 3, 6, 6, 5, 1, 2), (4, 5, 7, 7, 3, 2, 1), (2, 3, 4, 5, 1, 1, 0),
    (2, 4, 7, 6, 3, 2, 0), (3, 2, 9, 9, 7, 2, 3), (2, 3, 5, 5, 3, 1, 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", WINDOWS, ids=lambda g: "x".join(map(str, g)))
def test_im2col_and_col2im_match_numpy_for_image_ranges_and_strided_inputs(geometry, dtype):
    c, n, h, w, k, s, p = geometry
    out_h, out_w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    x = rng().standard_normal((c, n, h, w)).astype(dtype)
    for first, count in ((0, n), (1, n - 2)):
        want = np.full((c, k, k, count, out_h, out_w), np.nan, dtype)
        K.im2col_numpy(x, want, k, s, p, first)
        for source in (x, np.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)):
            got = np.full_like(want, np.nan)  # every entry must be written
            K.im2col(source, got, k, s, p, first)
            np.testing.assert_array_equal(got, want)
        dcols = rng(1).standard_normal(want.shape).astype(dtype)
        want_dx, got_dx = np.full(x.shape, 7.0, dtype), np.full(x.shape, 7.0, dtype)  # other images untouched
        K.col2im_numpy(dcols, want_dx, k, s, p, first)
        K.col2im(dcols.copy(), got_dx, k, s, p, first)
        close(got_dx, want_dx, dtype)


WINOGRAD = [  # (C, N, H, W, pad): odd and even sizes, tiles cut off at the edge, no padding, wide padding
    (3, 4, 5, 4, 1), (2, 3, 6, 6, 1), (2, 3, 7, 7, 0), (4, 2, 4, 4, 1), (2, 2, 3, 5, 2), (1, 3, 1, 2, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", WINOGRAD, ids=lambda g: "x".join(map(str, g)))
def test_winograd_transforms_match_numpy_and_are_adjoint(geometry, dtype):
    c, n, h, w, p = geometry
    out_h, out_w = h + 2 * p - 2, w + 2 * p - 2
    th, tw = K.winograd_tiles(out_h, out_w)
    x = rng().standard_normal((c, n, h, w)).astype(dtype)
    for first, count in ((0, n), (1, n - 1)):
        t = count * th * tw
        want, got = np.full((16, c, t), np.nan, dtype), np.full((16, c, t), np.nan, dtype)
        K.winograd_input_numpy(x, want, p, first)
        K.winograd_input(x, got, p, first)  # every entry written
        close(got, want, dtype)
        m = rng(1).standard_normal((16, 5, t)).astype(dtype)
        want_y, got_y = np.full((5, n, out_h, out_w), 7.0, dtype), np.full((5, n, out_h, out_w), 7.0, dtype)
        K.winograd_output_numpy(m, want_y, first)
        K.winograd_output(m, got_y, first)
        close(got_y, want_y, dtype)  # the 7s of other images too
        dy = rng(2).standard_normal((5, n, out_h, out_w)).astype(dtype)
        want_dm, got_dm = np.full(m.shape, np.nan, dtype), np.full(m.shape, np.nan, dtype)
        K.winograd_output_adjoint_numpy(dy, want_dm, first)
        K.winograd_output_adjoint(dy, got_dm, first)
        close(got_dm, want_dm, dtype)
        dv = rng(3).standard_normal(want.shape).astype(dtype)
        want_dx, got_dx = np.full(x.shape, 7.0, dtype), np.full(x.shape, 7.0, dtype)
        K.winograd_input_adjoint_numpy(dv, want_dx, p, first)
        K.winograd_input_adjoint(dv, got_dx, p, first)
        close(got_dx, want_dx, dtype)
        part = slice(first, first + count)
        # <T x, y> == <x, T^T y> for both transforms, in float64
        np.testing.assert_allclose(np.vdot(want_y[:, part], dy[:, part]), np.vdot(m, want_dm), rtol=1e-4)
        np.testing.assert_allclose(np.vdot(want, dv), np.vdot(x[:, part], want_dx[:, part]), rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_winograd_convolution_equals_im2col(dtype):
    c, n, h, w, o = 3, 2, 7, 6, 4
    x = rng().standard_normal((c, n, h, w)).astype(dtype)
    g = rng(1).standard_normal((o, c, 3, 3)).astype(dtype)
    for p in (0, 1, 2):
        out_h, out_w = h + 2 * p - 2, w + 2 * p - 2
        th, tw = K.winograd_tiles(out_h, out_w)
        u, v = np.empty((16, o, c), dtype), np.empty((16, c, n * th * tw), dtype)
        K.winograd_weight_numpy(g, u)
        fast_u = np.full_like(u, np.nan)
        K.winograd_weight(g, fast_u)
        close(fast_u, u, dtype)
        K.winograd_input(x, v, p)
        y = np.empty((o, n, out_h, out_w), dtype)
        K.winograd_output(u @ v, y)
        cols = np.empty((c, 3, 3, n, out_h, out_w), dtype)
        K.im2col_numpy(x, cols, 3, 1, p)
        close(y, (g.reshape(o, -1) @ cols.reshape(c * 9, -1)).reshape(y.shape), dtype)
        du = rng(2).standard_normal(u.shape).astype(dtype)  # the filter transform's adjoint
        dg, fast_dg = np.empty_like(g), np.full_like(g, np.nan)
        K.winograd_weight_adjoint_numpy(du, dg)
        K.winograd_weight_adjoint(du, fast_dg)
        close(fast_dg, dg, dtype)
        np.testing.assert_allclose(np.vdot(u, du), np.vdot(g, dg), rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_subsample_and_upsample_match_numpy(dtype):
    x = rng().standard_normal((3, 2, 7, 6)).astype(dtype)
    want, got = np.empty((3, 2, 4, 3), dtype), np.empty((3, 2, 4, 3), dtype)
    K.subsample_numpy(x, want, 2)
    K.subsample(x, got, 2)
    np.testing.assert_array_equal(got, want)
    want_dx, got_dx = np.full(x.shape, np.nan, dtype), np.full(x.shape, np.nan, dtype)
    K.upsample_numpy(want, want_dx, 2)
    K.upsample(want, got_dx, 2)
    np.testing.assert_array_equal(got_dx, want_dx)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pointwise_kernels_match_numpy(dtype):
    y = rng().standard_normal((5, 301)).astype(dtype)
    bias = rng(1).standard_normal(5).astype(dtype)
    for b in (bias, None):
        for relu in (True, False):
            want, got = y.copy(), y.copy()
            K.bias_relu_numpy(want, b, relu)
            K.bias_relu(got, b, relu)
            close(got, want, dtype)
    dy = rng(2).standard_normal(y.shape).astype(dtype)
    want, got = np.empty_like(dy), np.empty_like(dy)
    want_sum, got_sum = np.empty(5), np.empty(5)
    K.relu_mask_numpy(dy, y, want, want_sum)
    K.relu_mask(dy, y, got, got_sum)
    np.testing.assert_array_equal(got, want)
    close(got_sum, want_sum, dtype)
    K.row_sums_numpy(dy, want_sum)
    K.row_sums(dy, got_sum)
    close(got_sum, want_sum, dtype)
    a, b = rng(3).standard_normal((4, 3, 5, 7)).astype(dtype), rng(4).standard_normal((4, 3, 5, 7)).astype(dtype)
    for relu in (True, False):
        want, got = np.empty_like(a), a.copy()
        K.add_relu_numpy(a, b, want, relu)
        K.add_relu(got, b, got, relu)  # in place, as the residual sum runs
        close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_kernels_match_numpy(dtype):
    # an offset mean and a long row: the shifted sums must not lose the variance
    x = (100.0 + rng().standard_normal((6, 1003))).astype(dtype)
    want_mean, want_var, got_mean, got_var = (np.empty(6) for _ in range(4))
    K.bn_stats_numpy(x, want_mean, want_var)
    K.bn_stats(x, got_mean, got_var)
    np.testing.assert_allclose(got_mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(got_var, want_var, rtol=1e-9)
    scale, shift = rng(1).standard_normal(6).astype(dtype), rng(2).standard_normal(6).astype(dtype)
    x = rng(3).standard_normal((6, 1003)).astype(dtype)
    dy = rng(4).standard_normal(x.shape).astype(dtype)
    mean = x.astype(np.float64).mean(axis=1)
    for relu in (True, False):
        want, got = np.empty_like(x), np.empty_like(x)
        K.scale_shift_numpy(x, scale, shift, want, relu)
        K.scale_shift(x, scale, shift, got, relu)
        close(got, want, dtype)
        sums = [np.empty(6) for _ in range(4)]
        K.bn_backward_sums_numpy(dy, x, got, mean, relu, sums[0], sums[1])
        K.bn_backward_sums(dy, x, got, mean, relu, sums[2], sums[3])
        close(sums[2], sums[0], dtype)
        close(sums[3], sums[1], dtype)
        coef = [rng(5 + i).standard_normal(6).astype(dtype) for i in range(3)]
        want_dx, got_dx = np.empty_like(x), np.empty_like(x)
        K.bn_backward_dx_numpy(dy, x, got, relu, mean.astype(dtype), *coef, want_dx)
        K.bn_backward_dx(dy, x, got, relu, mean.astype(dtype), *coef, got_dx)
        close(got_dx, want_dx, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [(2, 2, 0), (3, 2, 1), (2, 1, 0), (3, 1, 1)])
def test_maxpool_kernels_match_numpy_including_ties(window, dtype):
    k, s, p = window
    x = rng().integers(0, 4, (3, 2, 7, 6)).astype(dtype)  # many ties: the first maximum must win
    out = ((7 + 2 * p - k) // s + 1, (6 + 2 * p - k) // s + 1)
    want, got = np.empty((3, 2, *out), dtype), np.empty((3, 2, *out), dtype)
    want_w, got_w = np.empty(want.shape, np.uint8), np.empty(want.shape, np.uint8)
    K.maxpool_numpy(x, want, want_w, k, s, p)
    K.maxpool(x, got, got_w, k, s, p)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_w, want_w)
    values_only = np.full_like(got, np.nan)  # evaluation: no winners recorded
    K.maxpool(x, values_only, None, k, s, p)
    np.testing.assert_array_equal(values_only, want)
    dy = rng(1).standard_normal(want.shape).astype(dtype)
    want_dx, got_dx = np.full(x.shape, np.nan, dtype), np.full(x.shape, np.nan, dtype)
    K.maxpool_backward_numpy(dy, want_w, want_dx, k, s, p)
    K.maxpool_backward(dy, got_w, got_dx, k, s, p)
    close(got_dx, want_dx, dtype)


# -- the gradient pool ---------------------------------------------------------------------------------

def test_pool_reuses_only_what_it_lent_and_never_an_alias_in_use():
    pool = memory.GradientPool()
    a = pool.take((4, 5), np.float32)
    pool.give(a, unless_shared_with=a.reshape(-1))  # a view of it lives on: keep lending it out
    b = pool.take((4, 5), np.float32)
    assert not np.shares_memory(a, b)
    pool.give(np.empty((4, 5), np.float32))  # never lent: ignored
    assert pool.held_bytes() == 0
    pool.give(b)
    assert pool.held_bytes() == b.nbytes
    c = pool.take((20,), np.float32)  # same size, other shape: the same memory
    assert np.shares_memory(b, c)
    pool.give(c)
    pool.give(c)  # a second give is ignored
    assert pool.held_bytes() == c.nbytes


def test_a_training_step_reuses_its_gradient_buffers():
    model = models.build("resnet18", (3, 16, 16), 5, width=0.25)
    arena = Arena(model.parameters(), dtype=np.float32)
    x = rng().standard_normal((4, 3, 16, 16)).astype(np.float32)
    labels = np.arange(4) % 5

    def step():
        arena.zero_grads()
        _, d = softmax_cross_entropy(model.forward(x), labels)
        model.backward(d)

    step()
    held = memory.pool.held_bytes()
    step()
    assert memory.pool.held_bytes() == held > 0


# -- channel-major layers and models -------------------------------------------------------------------

def channel_major(module):
    for m in module.modules():
        m.channel_major = True
    return module


CM_GRADCHECK = {
    "conv3x3": (lambda: Conv2d(2, 3, 3, padding=1), (2, 3, 5, 4)),
    "conv3x3_im2col": (lambda: _im2col_only(Conv2d(2, 3, 3, padding=1)), (2, 3, 5, 4)),
    "conv3x3_p0_winograd": (lambda: Conv2d(2, 3, 3, bias=False), (2, 3, 6, 5)),
    "conv3x3_s2": (lambda: Conv2d(3, 2, 3, stride=2, padding=1, bias=False), (3, 2, 7, 6)),
    "conv1x1_s2": (lambda: Conv2d(3, 2, 1, stride=2), (3, 2, 5, 5)),
    "conv5x5_valid": (lambda: Conv2d(2, 2, 5), (2, 2, 7, 6)),
    "batchnorm": (lambda: BatchNorm(3), (3, 4, 3, 2)),
    "residual": (lambda: Residual(Sequential(Conv2d(2, 2, 3, padding=1, bias=False), BatchNorm(2)),
                                  Sequential(Conv2d(2, 2, 1, bias=False), BatchNorm(2)), ReLU()), (2, 3, 4, 4)),
}


def _im2col_only(layer):
    layer.uses_winograd = lambda: False
    return layer


@pytest.mark.parametrize("case", sorted(CM_GRADCHECK))
def test_channel_major_layer_gradients_match_central_differences(case, monkeypatch):
    from hpcdl.layers import conv

    monkeypatch.setattr(conv, "CHUNK_BYTES", 1)  # one image per im2col chunk
    monkeypatch.setattr(conv, "WINOGRAD_CHUNK_BYTES", 1)  # and per Winograd chunk
    monkeypatch.setattr(conv, "WINOGRAD_CHUNK_BYTES_PER_THREAD", 1)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 1)  # every stride-1 3x3 convolution by Winograd
    make, shape = CM_GRADCHECK[case]
    layer = make()
    if case.startswith("conv3x3") and not case.endswith("s2"):
        assert layer.uses_winograd() == (case != "conv3x3_im2col")
    errors = check_module(channel_major(layer), rng(1).standard_normal(shape))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-6, f"gradient of {worst} off by {errors[worst]:.2e}: {errors}"


def test_fused_relu_gradient_matches_central_differences_away_from_kinks():
    layer = channel_major(BatchNorm(3))
    layer.relu = True
    values = (rng().permutation(3 * 4 * 5) - 30 + 0.5) * 0.05  # no value near the kink at 0 after normalising
    errors = check_module(layer, values.reshape(3, 4, 5, 1))
    assert max(errors.values()) <= 1e-6, errors


def _run(model, dtype, x, labels, steps=2):
    arena = Arena(model.parameters(), dtype=dtype, seed=0)
    results = []
    for _ in range(steps):
        arena.zero_grads()
        logits = model.forward(x)
        _, d = softmax_cross_entropy(logits, labels)
        dx = model.backward(d)
        results.append((logits.copy(), arena.grads.copy(), dx.copy()))
        arena.params -= 0.01 * arena.grads
    model.eval()
    results.append((model.forward(x),))
    return results


@pytest.mark.parametrize("name, shape, options", [
    ("fmnist_cnn", (1, 12, 12), {}),
    ("fmnist_cnn_bn", (1, 12, 12), {}),
    ("resnet18", (3, 12, 12), {"width": 0.25}),
    ("resnet50", (3, 64, 64), {"width": 0.25, "stem": "imagenet"}),
])
@pytest.mark.parametrize("chunk", ["whole_batch", "one_image"])
@pytest.mark.parametrize("conv3x3", ["winograd", "im2col"])
def test_channel_major_model_equals_the_nchw_model(name, shape, options, chunk, conv3x3, monkeypatch):
    from hpcdl.layers import conv

    if chunk == "one_image":
        monkeypatch.setattr(conv, "CHUNK_BYTES", 1)
        monkeypatch.setattr(conv, "WINOGRAD_CHUNK_BYTES", 1)
        monkeypatch.setattr(conv, "WINOGRAD_CHUNK_BYTES_PER_THREAD", 1)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 2 if conv3x3 == "winograd" else 10 ** 9)
    fast = models.build(name, shape, 5, input_grad=True, **options)
    assert fast.layers[0].channel_major and fast.layers[0].takes_nchw
    monkeypatch.setattr(models, "channel_major_trunk", lambda m: m)
    plain = models.build(name, shape, 5, input_grad=True, **options)
    assert not plain.layers[0].channel_major
    winograd = [m for m in fast.modules() if isinstance(m, Conv2d) and m.uses_winograd()]
    assert bool(winograd) == (conv3x3 == "winograd")
    x = rng().standard_normal((3, *shape))
    labels = np.arange(3) % 5
    for got, want in zip(_run(fast, np.float64, x, labels), _run(plain, np.float64, x, labels)):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-7 * np.abs(w).max())


def test_models_without_a_convolution_trunk_keep_the_nchw_path():
    for name in ("mlp", "lenet5", "transformer_encoder"):
        model = models.build(name, (1, 12, 12) if name != "lenet5" else (1, 28, 28), 5)
        assert not any(getattr(m, "channel_major", False) for m in model.modules()), name


def test_relu_fusion_marks_pairs_only_inside_the_trunk():
    model = models.build("fmnist_cnn_bn", (1, 12, 12), 5)
    fused = [type(m).__name__ for m in model.layers if getattr(m, "relu", False) or getattr(m, "fused", False)]
    assert fused == ["BatchNorm", "ReLU", "BatchNorm", "ReLU"]  # the BatchNorm after Flatten stays separate
    conv = models.build("fmnist_cnn", (1, 12, 12), 5).layers[0]
    assert isinstance(conv, Conv2d) and conv.relu


def test_maxpool_channel_major_eval_returns_fresh_arrays():
    layer = channel_major(MaxPool2d(2)).eval()
    x = rng().standard_normal((2, 3, 4, 4)).astype(np.float32)
    first = layer.forward(x)
    second = layer.forward(x + 1)
    assert not np.shares_memory(first, second)
