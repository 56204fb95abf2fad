"""The tiny ViT and dropout keyed by global sample position: gradients, masks, rank-count invariance."""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import check_module
from hpcdl import models
from hpcdl.arena import Arena
from hpcdl.errors import ConfigError
from hpcdl.layers.dropout import Dropout, keep_mask, keep_mask_reference, key_dropout
from hpcdl.layers.embedding import ClassToken, ClassTokenPool
from trainer_runs import TINY, launch, relative_difference


def _rng(seed=0):
    return np.random.default_rng(seed)


# -- gradients -------------------------------------------------------------------------------

@pytest.mark.parametrize("pool,dropout", [("cls", 0.2), ("mean", 0.0)])
def test_vit_every_parameter_and_the_input_match_central_differences(pool, dropout):
    """Every parameter of a whole (small) ViT, element by element, in float64, dropout on with a fixed key."""
    model = models.build("vit", (1, 8, 8), 3, patch=4, dim=8, depth=1, heads=2, pool=pool, dropout=dropout,
                         input_grad=True)
    x = _rng(1).standard_normal((3, 1, 8, 8))
    errors = check_module(model, x, before_forward=lambda: key_dropout(model, 5, 1, 2, np.array([7, 3, 11])))
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-6, (worst, errors[worst])
    n_tensors = len([p for p in model.parameters()])
    assert len(errors) == n_tensors + 1  # every tensor was checked, plus the input


def test_class_token_and_its_pool_gradients():
    x = _rng(2).standard_normal((2, 3, 4))
    assert max(check_module(ClassToken(4), x).values()) < 1e-7
    assert max(check_module(ClassTokenPool(), x).values()) < 1e-7


def test_vit_structure_and_options():
    model = models.build("vit", (1, 28, 28), 10, patch=7, dim=32, depth=3, heads=4)
    Arena(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    flags = {n: p.flags for n, p in model.named_parameters()}
    assert "no_decay" in flags[next(n for n in names if n.endswith("token"))]
    positions = next(p for n, p in model.named_parameters() if "table" in n)
    assert positions.shape == (17, 32)  # 16 patches and the class token
    assert sum(n.endswith("qkv.weight") for n in names) == 3
    mean = models.build("vit", (1, 28, 28), 10, patch=4, pool="mean")
    assert next(p for n, p in mean.named_parameters() if "table" in n).shape == (49, 64)
    with pytest.raises(ConfigError, match="pool"):
        models.build("vit", pool="max")
    with pytest.raises(ConfigError, match="patch"):
        models.build("vit", patch=5)


# -- dropout masks keyed by position ------------------------------------------------------------

def test_vectorized_mask_matches_the_per_unit_loop():
    positions = np.array([0, 5, 1023, 16000])
    for units, p in ((1, 0.5), (7, 0.1), (13, 0.9)):
        np.testing.assert_array_equal(keep_mask(3, 11, 2, 9, positions, units, p),
                                      keep_mask_reference(3, 11, 2, 9, positions, units, p))


def test_a_sample_gets_the_same_mask_wherever_it_sits():
    """Positions 0..7 on one rank = positions 0..3 on a first rank and 4..7 on a second. Fails on masks
    drawn from a per-layer generator, which gives the second rank the first rank's masks."""
    x = np.ones((8, 5, 6))

    def masked(positions):
        layer = Dropout(0.5, seed=2)
        layer.set_keys(1, 0, 3, positions)
        return layer.forward(x[:len(positions)])

    whole, first, second = masked(np.arange(8)), masked(np.arange(4)), masked(np.arange(4, 8))
    np.testing.assert_array_equal(whole[:4], first)
    np.testing.assert_array_equal(whole[4:], second)
    assert not np.array_equal(first, second)


def test_masks_differ_by_step_seed_and_layer_and_drop_at_rate_p():
    x = np.ones((64, 100))

    def mask(layer_seed=0, run_seed=0, step=0):
        layer = Dropout(0.3, seed=layer_seed)
        layer.set_keys(run_seed, 0, step, np.arange(64))
        return layer.forward(x) > 0

    base = mask()
    for other in (mask(layer_seed=1), mask(run_seed=1), mask(step=1)):
        assert 0.3 < np.mean(base != other) < 0.5  # independent draws disagree on 2p(1-p) = 42% of units
    assert abs(1 - base.mean() - 0.3) < 0.01
    layer = Dropout(0.3)
    layer.set_keys(0, 0, 0, np.arange(64))
    np.testing.assert_allclose(layer.forward(x)[base], 1 / 0.7)  # inverted dropout keeps the expectation
    layer.eval()
    np.testing.assert_array_equal(layer.forward(x), x)


def test_keys_must_match_the_batch():
    layer = Dropout(0.5)
    layer.set_keys(0, 0, 0, np.arange(3))
    with pytest.raises(ValueError, match="keyed for 3 samples"):
        layer.forward(np.ones((4, 2)))


def test_standalone_use_draws_a_fresh_mask_per_call():
    layer = Dropout(0.5)
    x = np.ones((16, 16))
    assert not np.array_equal(layer.forward(x), layer.forward(x))


# -- the trainer: 1 rank and 2 ranks train the same model, dropout on ------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("model_args", [
    pytest.param(["--set", "model.name='mlp'", "--set", "model.options={dropout = 0.3}"], id="mlp"),
    pytest.param(["--set", "model.name='vit'",
                  "--set", "model.options={dim = 16, depth = 1, heads = 2, dropout = 0.1}",
                  "--set", "optim.name='adamw'", "--set", "schedule.base_lr=0.003"], id="vit"),
])
def test_two_ranks_follow_one_rank_with_dropout(tmp_path, model_args):
    args = [*TINY, *model_args, "--set", "train.max_steps=8", "--set", "schedule.warmup_epochs=0.1",
            "--set", "checkpoint.at_end=false"]
    one = launch([*args, "--out", str(tmp_path / "one")])
    two = launch([*args, "--out", str(tmp_path / "two")], ranks=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = one.summary, two.summary
    assert (a["world_size"], b["world_size"], a["steps"], b["steps"]) == (1, 2, 8, 8)
    assert relative_difference(a["param_norm"], b["param_norm"]) <= 1e-5
    assert relative_difference(a["final_loss"], b["final_loss"]) <= 1e-5
