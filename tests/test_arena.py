import numpy as np
import pytest

from hpcdl.arena import ALIGN_ELEMENTS, Arena, Param
from hpcdl.layers.base import Module, Sequential, ones, zeros


class Affine(Module):
    def __init__(self, n):
        self.weight = Param((n, n), lambda rng, s: rng.normal(size=s))
        self.bias = Param((n,), zeros, flags=("bias", "no_decay"))


def test_params_are_views_into_one_buffer():
    model = Sequential(Affine(3), Affine(5))
    params = model.parameters()
    arena = Arena(params, seed=1)
    assert [s.name for s in arena.segments] == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    for seg in arena.segments:
        assert seg.offset % ALIGN_ELEMENTS == 0
    layer = model.layers[1]
    arena.params[arena.segment("layers.1.weight").offset] = 42.0
    assert layer.weight.data[0, 0] == 42.0
    layer.bias.grad += 1.0
    seg = arena.segment("layers.1.bias")
    np.testing.assert_array_equal(arena.grads[seg.offset:seg.end], np.ones(5, np.float32))
    arena.zero_grads()
    assert not layer.bias.grad.any()
    assert np.shares_memory(layer.weight.data, arena.params)


def test_same_seed_same_weights_and_signature():
    a = Arena(Sequential(Affine(4)).parameters(), seed=7)
    b = Arena(Sequential(Affine(4)).parameters(), seed=7)
    np.testing.assert_array_equal(a.params, b.params)
    assert a.signature() == b.signature()
    c = Arena(Sequential(Affine(5)).parameters(), seed=7)
    assert c.signature() != a.signature()


def test_flags_and_tables():
    arena = Arena(Sequential(Affine(2), Affine(2)).parameters())
    np.testing.assert_array_equal(arena.has_flag("no_decay"), [False, True, False, True])
    offsets, sizes = arena.offsets(), arena.sizes()
    assert offsets[-1] == arena.total and len(offsets) == len(sizes) + 1
    with pytest.raises(ValueError):
        Param((1,), ones, flags=("nonsense",))
