"""Layers: float64 gradient checks, naive references, BatchNorm statistics and synchronisation."""
import dataclasses
import math
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from gradcheck import arena_for, check_module, numeric_grad, rel_error

from hpcdl.arena import Arena
from hpcdl.layers.windows import WindowPlan, col2im
from hpcdl.layers import (
    GELU, AvgPool2d, BatchNorm, Conv2d, Dropout, Embedding, Flatten, GlobalAvgPool, ImageToTokens, LayerNorm,
    Linear, MaxPool2d, MultiHeadSelfAttention, PositionalEmbedding, ReLU, Residual, Sequential, TokenMeanPool,
    attach_sync_batchnorm, count_correct, softmax_cross_entropy,
)

TOL = 1e-6


def rng(seed=0):
    return np.random.default_rng(seed)


def distinct(shape, seed=0):
    """Values that are pairwise at least 0.01 apart: no ties for max-pooling, no ReLU kinks near 0."""
    values = (rng(seed).permutation(int(np.prod(shape))) - np.prod(shape) / 2 + 0.5) * 0.01
    return values.reshape(shape)


def assert_gradients(errors):
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"gradient of {worst} off by {errors[worst]:.2e}: {errors}"


# -- gradient checks ------------------------------------------------------------------------

GRADCHECK_CASES = {
    "linear": (lambda: Linear(4, 3), (5, 4)),
    "linear_tokens": (lambda: Linear(4, 3), (2, 3, 4)),
    "conv_s1_p1": (lambda: Conv2d(2, 3, 3, stride=1, padding=1), (2, 2, 5, 4)),
    "conv_s2_p1": (lambda: Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 6)),
    "conv_s2_p0": (lambda: Conv2d(2, 3, 3, stride=2, padding=0, bias=False), (2, 2, 6, 7)),
    "conv_1x1_s2": (lambda: Conv2d(3, 2, 1, stride=2), (2, 3, 5, 5)),
    "conv_5x5_p2": (lambda: Conv2d(1, 2, 5, padding=2), (2, 1, 6, 6)),
    "batchnorm_2d": (lambda: BatchNorm(3), (6, 3)),
    "batchnorm_4d": (lambda: BatchNorm(3), (3, 3, 4, 5)),
    "layernorm": (lambda: LayerNorm(5), (2, 3, 5)),
    "gelu": (lambda: GELU(), (3, 7)),
    "global_avg_pool": (lambda: GlobalAvgPool(), (2, 3, 4, 5)),
    "token_mean_pool": (lambda: TokenMeanPool(), (2, 3, 4)),
    "avgpool": (lambda: AvgPool2d(2), (2, 2, 5, 6)),
    "avgpool_overlap": (lambda: AvgPool2d(3, 2), (2, 2, 7, 7)),
    "flatten": (lambda: Flatten(), (2, 3, 2, 2)),
    "tokens_rows": (lambda: ImageToTokens(), (2, 3, 4, 5)),
    "tokens_patches": (lambda: ImageToTokens(2), (2, 3, 4, 6)),
    "positional": (lambda: PositionalEmbedding(6, 4), (2, 5, 4)),
    "attention": (lambda: MultiHeadSelfAttention(8, 2), (2, 5, 8)),
    "attention_causal": (lambda: MultiHeadSelfAttention(8, 2, causal=True), (2, 5, 8)),
    "residual_projection": (
        lambda: Residual(
            Sequential(Conv2d(2, 4, 3, 2, 1, bias=False), BatchNorm(4), ReLU(), Conv2d(4, 4, 3, 1, 1, bias=False),
                       BatchNorm(4)),
            Sequential(Conv2d(2, 4, 1, 2, bias=False), BatchNorm(4)),
            ReLU()),
        (3, 2, 6, 6)),
    "residual_identity": (lambda: Residual(Sequential(LayerNorm(4), Linear(4, 4))), (2, 3, 4)),
}


@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradients_match_central_differences(case):
    make, shape = GRADCHECK_CASES[case]
    assert_gradients(check_module(make(), rng(1).standard_normal(shape)))


@pytest.mark.parametrize("layer", [ReLU(), MaxPool2d(2), MaxPool2d(3, 2, 1), MaxPool2d(2, 1)],
                         ids=["relu", "maxpool", "maxpool_pad_overlap", "maxpool_stride1"])
def test_gradients_of_piecewise_layers_away_from_kinks_and_ties(layer):
    assert_gradients(check_module(layer, distinct((2, 2, 5, 5))))


def test_dropout_gradient_with_fixed_mask():
    layer = Dropout(0.4, seed=3)
    errors = check_module(layer, rng().standard_normal((4, 6)),
                          before_forward=lambda: layer.set_keys(9, 0, 0, np.arange(4)))
    assert_gradients(errors)


def test_embedding_parameter_gradient_with_repeated_indices():
    layer = Embedding(5, 3)
    indices = np.array([[0, 2, 2], [4, 2, 0]])
    arena = arena_for(layer)
    r = rng().standard_normal((2, 3, 3))
    arena.zero_grads()
    layer.forward(indices)
    assert layer.backward(r) is None
    numeric = numeric_grad(lambda: float(np.sum(layer.forward(indices) * r)), layer.weight.data)
    assert rel_error(layer.weight.grad, numeric) <= TOL
    assert not layer.weight.grad[[1, 3]].any()  # rows never looked up get nothing


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_gradient(smoothing):
    logits = rng().standard_normal((5, 4)) * 3
    labels = np.array([0, 3, 1, 1, 2])
    loss, dlogits = softmax_cross_entropy(logits, labels, label_smoothing=smoothing, normalizer=7)
    numeric = numeric_grad(lambda: float(softmax_cross_entropy(logits, labels, smoothing, 7)[0]), logits)
    assert rel_error(dlogits, numeric) <= TOL


# -- forward against naive references ------------------------------------------------------

def naive_conv(x, w, b, stride, pad):
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    y = np.zeros((n, o, ho, wo))
    for ni in range(n):
        for oi in range(o):
            for i in range(ho):
                for j in range(wo):
                    patch = xp[ni, :, i * stride:i * stride + k, j * stride:j * stride + k]
                    y[ni, oi, i, j] = np.sum(patch * w[oi]) + (b[oi] if b is not None else 0.0)
    return y


def naive_pool(x, k, s, pad, reduce):
    n, c, h, w = x.shape
    fill = -np.inf if reduce is np.max else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    y = np.zeros((n, c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            y[:, :, i, j] = reduce(xp[:, :, i * s:i * s + k, j * s:j * s + k], axis=(2, 3))
    return y


@pytest.mark.parametrize("stride,pad,kernel,shape", [(1, 1, 3, (2, 3, 5, 6)), (2, 1, 3, (2, 3, 7, 8)),
                                                     (2, 0, 3, (1, 2, 8, 7)), (1, 0, 1, (2, 4, 3, 3)),
                                                     (2, 3, 7, (1, 3, 11, 9))])
def test_conv_forward_matches_direct_loop(stride, pad, kernel, shape):
    layer = Conv2d(shape[1], 3, kernel, stride=stride, padding=pad)
    arena_for(layer)
    x = rng(2).standard_normal(shape)
    expected = naive_conv(x, layer.weight.data, layer.bias.data, stride, pad)
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-10, atol=1e-12)


def test_conv_column_buffer_is_safe_across_input_shapes():
    # H = 7 and H = 8 give the same output size at stride 2, with different padding cells.
    layer = Conv2d(2, 3, 3, stride=2, padding=1)
    arena_for(layer)
    for h in (8, 7, 8, 6):
        x = rng(h).standard_normal((2, 2, h, h))
        np.testing.assert_allclose(layer.forward(x), naive_conv(x, layer.weight.data, layer.bias.data, 2, 1),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel,pad,shape", [(3, 1, (2, 3, 5, 7)), (5, 2, (1, 2, 6, 4)), (1, 0, (2, 2, 3, 3)),
                                              (3, 1, (3, 2, 1, 6)), (5, 2, (1, 1, 2, 2))])
def test_flat_col2im_matches_offset_loop(kernel, pad, shape):
    plan = WindowPlan.build(shape[2], shape[3], kernel, 1, pad)
    assert plan.flat is not None
    dcols = rng().standard_normal((shape[1], kernel, kernel, shape[0], plan.out_h, plan.out_w))
    fast, reference = np.zeros(shape), np.zeros(shape)
    col2im(dcols.copy(), fast, plan)
    col2im(dcols, reference, dataclasses.replace(plan, flat=None))
    np.testing.assert_allclose(fast, reference, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kernel,stride,pad", [(2, None, 0), (3, 2, 1), (2, 1, 0), (3, 3, 0)])
def test_maxpool_forward_matches_loop(kernel, stride, pad):
    x = rng().standard_normal((2, 3, 7, 8))
    expected = naive_pool(x, kernel, stride or kernel, pad, np.max)
    layer = MaxPool2d(kernel, stride, pad)
    np.testing.assert_array_equal(layer.forward(x), expected)
    np.testing.assert_array_equal(layer.eval().forward(x), expected)


@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 2), (3, 1)])
def test_avgpool_forward_matches_loop(kernel, stride):
    x = rng().standard_normal((2, 3, 7, 8))
    expected = naive_pool(x, kernel, stride or kernel, 0, np.mean)
    np.testing.assert_allclose(AvgPool2d(kernel, stride).forward(x), expected, rtol=1e-12)


def test_maxpool_tie_sends_gradient_to_one_input():
    layer = MaxPool2d(2)
    x = np.ones((1, 1, 2, 2))
    layer.forward(x)
    dx = layer.backward(np.full((1, 1, 1, 1), 3.0))
    assert dx.sum() == 3.0 and np.count_nonzero(dx) == 1


def test_linear_and_layernorm_match_formulas():
    lin = Linear(4, 3)
    arena_for(lin)
    x = rng().standard_normal((2, 5, 4))
    np.testing.assert_allclose(lin.forward(x), np.einsum("nti,oi->nto", x, lin.weight.data) + lin.bias.data)
    ln = LayerNorm(4)
    arena_for(ln)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(ln.forward(x), (x - mu) / np.sqrt(var + 1e-5) * ln.gamma.data + ln.beta.data)


def test_gelu_is_within_documented_distance_of_exact_erf_form():
    x = np.linspace(-6, 6, 1001)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    assert np.max(np.abs(GELU().forward(x) - exact)) < 1e-3


def test_attention_matches_per_head_loop():
    dim, heads, t = 8, 2, 4
    layer = MultiHeadSelfAttention(dim, heads, causal=True)
    arena_for(layer)
    x = rng().standard_normal((2, t, dim))
    qkv = x @ layer.qkv.weight.data.T + layer.qkv.bias.data
    dh = dim // heads
    out = np.zeros((2, t, dim))
    for n in range(2):
        for h in range(heads):
            q, k, v = (qkv[n, :, part * dim + h * dh: part * dim + (h + 1) * dh] for part in range(3))
            for i in range(t):
                scores = np.array([q[i] @ k[j] / math.sqrt(dh) for j in range(i + 1)])
                p = np.exp(scores - scores.max())
                out[n, i, h * dh:(h + 1) * dh] = (p / p.sum()) @ v[:i + 1]
    expected = out @ layer.proj.weight.data.T + layer.proj.bias.data
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-10, atol=1e-12)


def test_cross_entropy_matches_per_sample_formula_and_counts_correct():
    logits = rng().standard_normal((6, 5)) * 4 + 100.0  # large offset: needs the stable form
    labels = np.array([0, 4, 2, 2, 1, 3])
    s, k = 0.2, 5
    loss, _ = softmax_cross_entropy(logits, labels, label_smoothing=s, normalizer=12)
    expected = 0.0
    for row, y in zip(logits, labels):
        logp = row - row.max() - math.log(np.exp(row - row.max()).sum())
        target = np.full(k, s / k)
        target[y] += 1 - s
        expected -= float(target @ logp)
    assert float(loss) == pytest.approx(expected / 12, rel=1e-12)
    assert count_correct(logits, labels) == int((logits.argmax(1) == labels).sum())


# -- contract: accumulation, dtypes, hooks, input_grad ---------------------------------------

def test_backward_adds_into_parameter_gradients():
    layer = Conv2d(2, 3, 3, padding=1)
    arena = arena_for(layer)
    x, dy = rng().standard_normal((2, 2, 4, 4)), rng(1).standard_normal((2, 3, 4, 4))
    arena.zero_grads()
    layer.forward(x)
    layer.backward(dy)
    once = arena.grads.copy()
    layer.forward(x)
    layer.backward(dy)
    np.testing.assert_allclose(arena.grads, 2 * once)


@pytest.mark.parametrize("make,shape", [
    (lambda: Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5)), (lambda: BatchNorm(2), (3, 2, 4, 4)),
    (lambda: MaxPool2d(2), (2, 2, 4, 4)), (lambda: AvgPool2d(2), (2, 2, 4, 4)), (lambda: GELU(), (3, 4)),
    (lambda: LayerNorm(4), (2, 3, 4)), (lambda: MultiHeadSelfAttention(4, 2), (2, 3, 4)),
    (lambda: Linear(4, 2), (3, 4)), (lambda: Dropout(0.5), (3, 4)), (lambda: GlobalAvgPool(), (2, 3, 2, 2)),
])
def test_float32_stays_float32(make, shape):
    layer = make()
    Arena([p for _, p in layer.named_parameters()], dtype=np.float32)
    x = rng().standard_normal(shape).astype(np.float32)
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == np.float32 and dx.dtype == np.float32


def test_grad_ready_hook_fires_once_per_leaf_in_reverse_arena_order():
    model = Sequential(
        Conv2d(2, 4, 3, padding=1), BatchNorm(4), ReLU(),
        Residual(Sequential(Conv2d(4, 4, 3, padding=1), BatchNorm(4)),
                 Sequential(Conv2d(4, 4, 1), BatchNorm(4)), ReLU()),
        Flatten(), Linear(4 * 9, 3))
    arena = arena_for(model)
    fired = []  # one list of parameter names per leaf
    model.set_grad_ready_hook(lambda params: fired.append([p.name for p in params]))
    y = model.forward(rng().standard_normal((2, 2, 3, 3)))
    model.backward(np.ones_like(y))
    assert [name for leaf in reversed(fired) for name in leaf] == [s.name for s in arena.segments]


def test_input_grad_false_skips_only_the_input_gradient():
    full, first = Conv2d(2, 3, 3, padding=1), Conv2d(2, 3, 3, padding=1, input_grad=False)
    a, b = arena_for(full, seed=4), arena_for(first, seed=4)
    x, dy = rng().standard_normal((2, 2, 4, 4)), rng(1).standard_normal((2, 3, 4, 4))
    full.forward(x)
    assert full.backward(dy) is not None
    first.forward(x)
    assert first.backward(dy) is None
    np.testing.assert_array_equal(a.grads, b.grads)


# -- BatchNorm statistics -------------------------------------------------------------------------

def test_batchnorm_running_statistics_use_unbiased_variance():
    layer = BatchNorm(3, momentum=0.25)
    arena_for(layer)
    x = rng().standard_normal((4, 3, 2, 2)) * 2 + 1
    layer.forward(x)
    flat = x.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(layer.running_mean, 0.25 * flat.mean(1))
    np.testing.assert_allclose(layer.running_var, 0.75 + 0.25 * flat.var(1, ddof=1))
    assert layer.running_mean.dtype == np.float64  # follows float64 parameters


def test_batchnorm_eval_uses_running_statistics():
    layer = BatchNorm(3)
    arena_for(layer)
    layer.set_buffer("running_mean", np.array([0.5, -1.0, 2.0]))
    layer.set_buffer("running_var", np.array([4.0, 0.25, 1.0]))
    x = rng().standard_normal((5, 3))
    layer.eval()
    expected = (x - layer.running_mean) / np.sqrt(layer.running_var + 1e-5) * layer.gamma.data + layer.beta.data
    np.testing.assert_allclose(layer.forward(x), expected)
    before = layer.running_mean.copy()
    layer.forward(x)
    np.testing.assert_array_equal(layer.running_mean, before)


def _thread_allreduce(world: int):
    """An in-place sum across `world` threads, each playing one rank."""
    barrier = threading.Barrier(world)
    slots = [None] * world

    def make(rank):
        def allreduce(buf):
            slots[rank] = buf.copy()
            barrier.wait()
            total = np.sum(slots, axis=0)
            barrier.wait()
            buf[...] = total
        return allreduce
    return make


@pytest.mark.parametrize("shape", [(8, 3), (6, 3, 4, 4)])
def test_sync_batchnorm_matches_one_process_with_the_whole_batch(shape):
    x = rng().standard_normal(shape) * 3 + 1
    dy = rng(1).standard_normal(shape)
    reference = BatchNorm(3, sync=True)  # no allreduce attached: plain BN
    ref_arena = arena_for(reference, seed=5)
    y_full = reference.forward(x)
    dx_full = reference.backward(dy)

    world = 2
    halves = [slice(0, shape[0] // 2 + 1), slice(shape[0] // 2 + 1, None)]  # uneven on purpose
    make_allreduce = _thread_allreduce(world)
    layers = [BatchNorm(3, sync=True) for _ in range(world)]
    arenas = [arena_for(layer, seed=5) for layer in layers]
    outputs = [None] * world

    def rank_main(rank):
        layer = layers[rank]
        attach_sync_batchnorm(layer, make_allreduce(rank))
        y = layer.forward(x[halves[rank]])
        outputs[rank] = (y, layer.backward(dy[halves[rank]]))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    np.testing.assert_allclose(np.concatenate([o[0] for o in outputs]), y_full, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([o[1] for o in outputs]), dx_full, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(arenas[0].grads + arenas[1].grads, ref_arena.grads, rtol=1e-10, atol=1e-12)
    for layer in layers:
        np.testing.assert_allclose(layer.running_mean, reference.running_mean, rtol=1e-12)
        np.testing.assert_allclose(layer.running_var, reference.running_var, rtol=1e-12)


def test_attach_sync_batchnorm_only_touches_sync_layers():
    model = Sequential(BatchNorm(2, sync=True), BatchNorm(2), Residual(Sequential(BatchNorm(2, sync=True))))
    assert attach_sync_batchnorm(model, lambda buf: None) == 2
    assert model.layers[1].allreduce is None
    assert attach_sync_batchnorm(model, None) == 2 and not model.layers[0].synchronized


SYNC_BN_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from mpi4py import MPI
    sys.path.insert(0, {tests_dir!r})
    from gradcheck import arena_for
    from hpcdl.layers import BatchNorm, attach_sync_batchnorm

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    x = np.random.default_rng(0).standard_normal((10, 3, 3, 3)) * 2 + 0.5
    dy = np.random.default_rng(1).standard_normal(x.shape)
    mine = np.array_split(np.arange(10), size)[rank]

    full = BatchNorm(3)
    full_arena = arena_for(full, seed=3)
    y_full, dx_full = full.forward(x), None
    dx_full = full.backward(dy)

    layer = BatchNorm(3, sync=True)
    arena = arena_for(layer, seed=3)
    attach_sync_batchnorm(layer, lambda buf: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
    y = layer.forward(x[mine])
    dx = layer.backward(dy[mine])
    grads = arena.grads.copy()
    comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)
    errors = [np.abs(y - y_full[mine]).max(), np.abs(dx - dx_full[mine]).max(),
              np.abs(grads - full_arena.grads).max(), np.abs(layer.running_var - full.running_var).max()]
    worst = comm.allreduce(max(errors), op=MPI.MAX)
    if rank == 0:
        print("max error", worst)
    sys.exit(0 if worst < 1e-10 else 1)
""")


@pytest.mark.mpi
def test_sync_batchnorm_under_mpiexec(tmp_path):
    pytest.importorskip("mpi4py")
    script = tmp_path / "sync_bn.py"
    script.write_text(SYNC_BN_SCRIPT.format(tests_dir=str(__import__("pathlib").Path(__file__).parent)))
    proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max error" in proc.stdout


# -- GPU ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", ["conv_s2_p1", "batchnorm_4d", "attention_causal", "residual_projection"])
def test_cupy_matches_numpy(case, cupy):
    make, shape = GRADCHECK_CASES[case]
    x = rng(1).standard_normal(shape)
    results = []
    for xp in (np, cupy):
        layer = make()
        arena = Arena([p for _, p in layer.named_parameters()], dtype=np.float64, xp=xp, seed=2)
        y = layer.forward(xp.asarray(x))
        dx = layer.backward(xp.ones_like(y))
        results.append([cupy.asnumpy(a) if xp is cupy else a for a in (y, dx, arena.grads)])
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(theirs, ours, rtol=1e-9, atol=1e-11)
