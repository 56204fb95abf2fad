"""Model zoo: shapes, arena wiring, whole-model gradients, parameter counts, errors, benchmark smoke test."""
import json
import subprocess
import sys

import numpy as np
import pytest

from hpcdl import models
from hpcdl.arena import Arena
from hpcdl.errors import ConfigError
from hpcdl.layers import BatchNorm, attach_sync_batchnorm, softmax_cross_entropy

# Small but realistic inputs: every spatial path (padding, pooling, strides) is exercised.
SMALL = {
    "mlp": ((1, 12, 12), {}),
    "fmnist_cnn": ((1, 12, 12), {}),
    "fmnist_cnn_bn": ((1, 12, 12), {}),
    "lenet5": ((1, 28, 28), {}),
    "alexnet_bn": ((3, 16, 16), {"width": 0.25, "hidden": 32}),
    "resnet18": ((3, 16, 16), {"width": 0.25}),
    "resnet50": ((3, 16, 16), {"width": 0.25}),
    "transformer_encoder": ((1, 12, 12), {"dim": 16, "heads": 2}),
    "vit": ((1, 12, 12), {"dim": 16, "heads": 2, "patch": 4}),
}
NUM_CLASSES = 5


def test_zoo_lists_the_required_models():
    assert set(SMALL) == set(models.names())


def built(name, dtype=np.float32, seed=0, **extra):
    shape, options = SMALL[name]
    model = models.build(name, shape, NUM_CLASSES, **options, **extra)
    arena = Arena([p for _, p in model.named_parameters()], dtype=dtype, seed=seed)
    # Jitter moves zero-initialised biases off exact zeros, where ReLU has a kink.
    arena.params += dtype(0.01) * np.random.default_rng(seed).standard_normal(arena.total).astype(dtype)
    x = np.random.default_rng(seed + 1).standard_normal((4, *shape)).astype(dtype)
    labels = np.random.default_rng(seed + 2).integers(0, NUM_CLASSES, 4)
    return model, arena, x, labels


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_backward_shapes_and_finite_gradients(name):
    model, arena, x, labels = built(name)
    arena.zero_grads()
    logits = model.forward(x)
    assert logits.shape == (4, NUM_CLASSES) and logits.dtype == np.float32
    _, dlogits = softmax_cross_entropy(logits, labels)
    assert model.backward(dlogits) is None  # default: the first layer skips dL/d(image)
    assert np.isfinite(arena.grads).all()
    empty = [s.name for s in arena.segments if not arena.grads[s.offset:s.end].any()]
    assert not empty, f"parameters that received no gradient: {empty}"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_parameter_is_read_through_the_arena(name):
    model, arena, x, _ = built(name)
    before = model.forward(x)
    rng = np.random.default_rng(3)
    for seg in arena.segments:
        saved = arena.params[seg.offset:seg.end].copy()
        arena.params[seg.offset:seg.end] += rng.standard_normal(seg.size).astype(np.float32)
        after = model.forward(x)
        arena.params[seg.offset:seg.end] = saved
        assert np.abs(after - before).max() > 1e-6, f"writing {seg.name} through the arena changed nothing"
    np.testing.assert_array_equal(model.forward(x), before)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_whole_model_gradient_matches_central_differences(name):
    """Directional derivatives along one random coordinate per parameter tensor, and a random input direction.

    Layer-level checks (test_layers.py) hold each layer to 1e-6; this catches
    wiring mistakes (a missed shortcut, a skipped child). Steps are small
    (1e-7) so that the perturbation rarely crosses a ReLU kink.
    """
    model, arena, x, labels = built(name, dtype=np.float64, input_grad=True)

    def loss():
        return float(softmax_cross_entropy(model.forward(x), labels)[0])

    arena.zero_grads()
    _, dlogits = softmax_cross_entropy(model.forward(x), labels)
    dx = model.backward(dlogits)
    rng, eps = np.random.default_rng(4), 1e-7
    direction = np.zeros(arena.total)
    for seg in arena.segments:
        direction[seg.offset + rng.integers(seg.size)] = rng.standard_normal()
    base = arena.params.copy()
    arena.params[:] = base + eps * direction
    up = loss()
    arena.params[:] = base - eps * direction
    down = loss()
    arena.params[:] = base
    numeric, analytic = (up - down) / (2 * eps), float(arena.grads @ direction)
    assert abs(numeric - analytic) <= 1e-5 * (abs(numeric) + abs(analytic))

    u = rng.standard_normal(x.shape)
    x0 = x.copy()
    x[...] = x0 + eps * u
    up = loss()
    x[...] = x0 - eps * u
    down = loss()
    x[...] = x0
    numeric, analytic = (up - down) / (2 * eps), float(np.sum(dx * u))
    assert abs(numeric - analytic) <= 1e-5 * (abs(numeric) + abs(analytic))


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("channels", [1, 3])
def test_one_or_three_channels_at_28x28(name, channels):
    options = dict(SMALL[name][1])
    model = models.build(name, (channels, 28, 28), 10, **options)
    Arena([p for _, p in model.named_parameters()])
    model.eval()
    assert model.forward(np.zeros((2, channels, 28, 28), np.float32)).shape == (2, 10)


def test_resnet_imagenet_stem_runs_at_28x28():
    model = models.build("resnet18", (1, 28, 28), 10, stem="imagenet", width=0.25)
    Arena([p for _, p in model.named_parameters()])
    assert model.forward(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)


@pytest.mark.parametrize("name,count", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_imagenet_resnet_parameter_counts_match_torchvision(name, count):
    model = models.build(name, (3, 224, 224), 1000, stem="imagenet")
    assert sum(p.size for p in model.parameters()) == count


def test_zero_init_residual_makes_each_block_start_as_relu_of_its_shortcut():
    model = models.build("resnet18", (3, 16, 16), 10, width=0.25, zero_init_residual=True)
    Arena([p for _, p in model.named_parameters()])
    block = model.layers[3]  # the first residual block: identity shortcut
    assert block.channel_major  # inside the trunk, blocks take (C, N, H, W)
    x = np.abs(np.random.default_rng(0).standard_normal((16, 2, 16, 16))).astype(np.float32)
    np.testing.assert_array_equal(block.forward(x), x)


def test_sync_bn_option_marks_every_batchnorm():
    model = models.build("fmnist_cnn_bn", (1, 28, 28), 10, sync_bn=True)
    norms = [m for m in model.modules() if isinstance(m, BatchNorm)]
    assert len(norms) == 3 and all(m.sync for m in norms)
    assert attach_sync_batchnorm(model, lambda buf: None) == 3


def test_unknown_model_name_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"model\.name.*did you mean 'resnet18'"):
        models.build("resnet19")


def test_unknown_option_and_bad_shape_are_config_errors():
    with pytest.raises(ConfigError, match=r"model\.options\.depth"):
        models.build("fmnist_cnn", depth=3)
    with pytest.raises(ConfigError, match=r"model\.input_shape"):
        models.build("fmnist_cnn", (28, 28))
    with pytest.raises(ConfigError, match=r"model\.options\.stem"):
        models.build("resnet18", (3, 32, 32), stem="tiny")
    with pytest.raises(ConfigError, match=r"width multiplier"):
        models.build("resnet18", (3, 32, 32), width=0)
    with pytest.raises(ConfigError, match=r"alexnet_bn.*\(3, 4, 4\)"):
        models.build("alexnet_bn", (3, 4, 4))


def test_building_models_does_not_import_mpi4py():
    code = ("import sys; from hpcdl import models; models.build('resnet18', (3, 32, 32)); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_layer_benchmark_smoke(tmp_path):
    from hpcdl.bench import layers as bench

    out = tmp_path / "bench.json"
    rc = bench.main(["--models", "fmnist_cnn", "--batch", "4", "--steps", "1", "--repeats", "2", "--warmup", "1",
                     "--no-torch", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["model"] == "fmnist_cnn" and result["framework"] == "hpcdl"
    assert len(result["repeats"]) == 2 and result["min"] <= result["images_per_s"] <= result["max"]


def test_fmnist_cnn_bn_matches_pytorch_when_available():
    """Same weights, same batch: logits, input gradient and every parameter gradient agree with PyTorch."""
    torch = pytest.importorskip("torch")
    from torch import nn

    model = models.build("fmnist_cnn_bn", (1, 28, 28), 10, input_grad=True)
    arena = Arena([p for _, p in model.named_parameters()], dtype=np.float64, seed=0)
    arena.params += 0.1 * np.random.default_rng(0).standard_normal(arena.total)
    reference = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * 49, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10)).double()
    theirs = list(reference.parameters())
    ours = model.parameters()
    assert [tuple(t.shape) for t in theirs] == [p.shape for p in ours]
    with torch.no_grad():
        for t, p in zip(theirs, ours):
            t.copy_(torch.from_numpy(p.data))

    x = np.random.default_rng(1).standard_normal((6, 1, 28, 28))
    labels = np.random.default_rng(2).integers(0, 10, 6)
    arena.zero_grads()
    logits = model.forward(x)
    _, dlogits = softmax_cross_entropy(logits, labels, label_smoothing=0.1)
    dx = model.backward(dlogits)

    tx = torch.from_numpy(x).requires_grad_()
    t_logits = reference(tx)
    nn.functional.cross_entropy(t_logits, torch.from_numpy(labels), label_smoothing=0.1).backward()
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-8, atol=1e-12)
    for t, p in zip(theirs, ours):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-8, atol=1e-12, err_msg=p.name)
    bn = [m for m in reference if isinstance(m, nn.BatchNorm2d)][0]
    np.testing.assert_allclose(model.layers[1].running_var, bn.running_var.numpy(), rtol=1e-10)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FMNIST_LR = 0.05


def _read_idx(path):
    import gzip

    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", ndim, 4).astype(int)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.mark.slow
def test_fmnist_cnn_reaches_91_percent_in_15_epochs_of_momentum_sgd():
    """The job model's accuracy promise, with the simplest optimiser loop (no trainer needed)."""
    import os

    from hpcdl.layers import count_correct

    if not os.path.exists(f"{FASHION_MNIST}/train-images-idx3-ubyte.gz"):
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    x_train = _read_idx(f"{FASHION_MNIST}/train-images-idx3-ubyte.gz")[:, None].astype(np.float32) / 255
    y_train = _read_idx(f"{FASHION_MNIST}/train-labels-idx1-ubyte.gz").astype(np.int64)
    x_test = _read_idx(f"{FASHION_MNIST}/t10k-images-idx3-ubyte.gz")[:, None].astype(np.float32) / 255
    y_test = _read_idx(f"{FASHION_MNIST}/t10k-labels-idx1-ubyte.gz").astype(np.int64)
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    model = models.build("fmnist_cnn", (1, 28, 28), 10)
    arena = Arena([p for _, p in model.named_parameters()], seed=0)
    velocity = np.zeros_like(arena.params)
    rng = np.random.default_rng(0)
    epochs, batch, base_lr, momentum = 15, 128, FMNIST_LR, 0.9
    steps = len(x_train) // batch
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        for s in range(steps):
            lr = base_lr * 0.5 * (1 + np.cos(np.pi * (epoch * steps + s) / (epochs * steps)))
            idx = order[s * batch:(s + 1) * batch]
            arena.zero_grads()
            _, dlogits = softmax_cross_entropy(model.forward(x_train[idx]), y_train[idx])
            model.backward(dlogits)
            velocity *= momentum
            velocity += arena.grads
            arena.params -= np.float32(lr) * velocity
    model.eval()
    correct = sum(count_correct(model.forward(x_test[i:i + 1000]), y_test[i:i + 1000]) for i in range(0, 10000, 1000))
    print(f"fmnist_cnn test accuracy after {epochs} epochs: {correct / len(y_test):.4f}")
    assert correct / len(y_test) >= 0.91


@pytest.mark.parametrize("name", ["fmnist_cnn", "resnet18", "resnet50"])
def test_a_training_step_after_the_first_allocates_no_large_arrays(name):
    """Workspaces, forward outputs, gradients and Winograd's transformed weights are reused between steps."""
    import tracemalloc

    model, arena, x, labels = built(name)
    assert name == "fmnist_cnn" or any(getattr(m, "uses_winograd", lambda: False)() for m in model.modules())

    def step():
        arena.zero_grads()
        _, dlogits = softmax_cross_entropy(model.forward(x), labels)
        model.backward(dlogits)

    tracemalloc.start()
    try:
        peaks = []
        for _ in range(3):
            tracemalloc.reset_peak()
            start = tracemalloc.get_traced_memory()[0]
            step()
            peaks.append(tracemalloc.get_traced_memory()[1] - start)
    finally:
        tracemalloc.stop()
    # Later steps allocate only small temporaries (tens to hundreds of KiB here). The first step's
    # figure depends on what earlier tests left in the shared workspace and pool, so it is not compared.
    # Before U was reused, resnet18 here allocated 3.9 MB a step.
    assert peaks[1] < 1 << 20 and peaks[2] < 1 << 20, (name, peaks)
