"""The reference optimizers against steps worked out by hand (small vectors, scalar arithmetic)."""
import math

import numpy as np
import pytest

from hpcdl.arena import Arena, Param
from hpcdl.errors import ConfigError
from hpcdl.optim import reference as ref
from hpcdl.optim.reference import exclusion_masks


def arr(*values):
    return np.array(values, dtype=np.float64)


def run(opt, params, grads_per_step, lrs):
    params = [arr(*p) for p in params]
    state = opt.init(params)
    stats = None
    for grads, lr in zip(grads_per_step, lrs):
        params, state, stats = opt.update([arr(*g) for g in grads], state, params, lr)
    return params, state, stats


def close(actual, expected, rel=1e-12):
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=1e-15)


# -- SGD ---------------------------------------------------------------------------------------


def test_sgd_momentum_and_weight_decay_two_steps():
    opt = ref.Sgd(momentum=0.9, weight_decay=0.1)
    (w,), state, _ = run(opt, [[1.0, -2.0]], [[[0.5, 0.25]], [[0.1, -0.2]]], [0.1, 0.2])
    # step 1: d = g + 0.1 w = [0.6, 0.05]; v = d; w = w - 0.1 v = [0.94, -2.005]
    # step 2: d = [0.1 + 0.094, -0.2 - 0.2005] = [0.194, -0.4005]
    #         v = 0.9 [0.6, 0.05] + d = [0.734, -0.3555]; w = w - 0.2 v
    close(state["momentum"][0], [0.734, -0.3555])
    close(w, [0.94 - 0.2 * 0.734, -2.005 + 0.2 * 0.3555])
    assert state["step"] == 2


def test_nesterov_looks_ahead_along_the_momentum():
    opt = ref.Sgd(momentum=0.9, weight_decay=0.1, nesterov=True)
    (w,), state, _ = run(opt, [[1.0, -2.0]], [[[0.5, 0.25]]], [0.1])
    # d = [0.6, 0.05] = v; direction = d + 0.9 v = 1.9 d
    close(w, [1.0 - 0.1 * 1.9 * 0.6, -2.0 - 0.1 * 1.9 * 0.05])
    close(state["momentum"][0], [0.6, 0.05])


def test_sgd_skips_decay_where_masked():
    opt = ref.Sgd(momentum=0.0, weight_decay=0.5, decay=[False])
    (w,), _, _ = run(opt, [[2.0]], [[[1.0]]], [0.1])
    close(w, [2.0 - 0.1 * 1.0])


# -- AdamW -------------------------------------------------------------------------------------


def test_adamw_two_steps_with_bias_correction_and_decoupled_decay():
    opt = ref.AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    (w1,), s1, _ = run(opt, [[1.0, -1.0]], [[[0.5, -2.0]]], [0.01])
    # step 1: m^ = g and v^ = g^2, so the update is g/(|g| + eps)
    close(w1, [1.0 * (1 - 0.01 * 0.1) - 0.01 * 0.5 / (0.5 + 1e-8),
               -1.0 * (1 - 0.01 * 0.1) - 0.01 * -2.0 / (2.0 + 1e-8)])
    close(s1["exp_avg"][0], [0.05, -0.2])
    close(s1["exp_avg_sq"][0], [0.001 * 0.25, 0.001 * 4.0])

    (w2,), _, _ = run(opt, [[1.0, -1.0]], [[[0.5, -2.0]], [[0.5, 0.0]]], [0.01, 0.02])
    # step 2: bc1 = 1 - 0.81 = 0.19, bc2 = 1 - 0.998001 = 0.001999
    m = [0.9 * 0.05 + 0.1 * 0.5, 0.9 * -0.2 + 0.0]                  # [0.095, -0.18]
    v = [0.999 * 0.00025 + 0.001 * 0.25, 0.999 * 0.004 + 0.0]       # [0.00049975, 0.003996]
    expected = [w1[i] * (1 - 0.02 * 0.1) - 0.02 * (m[i] / 0.19) / (math.sqrt(v[i] / 0.001999) + 1e-8)
                for i in range(2)]
    close(w2, expected, rel=1e-10)


# -- LARS --------------------------------------------------------------------------------------


def test_lars_trust_ratio_and_lr_inside_momentum_with_changing_lr():
    opt = ref.Lars(momentum=0.9, weight_decay=0.01, trust_coefficient=0.001, eps=0.0)
    (w1,), s1, st1 = run(opt, [[3.0, 4.0]], [[[0.6, 0.8]]], [1.0])
    # ||w|| = 5, ||g|| = 1: trust = 0.001*5 / (1 + 0.01*5) = 0.005/1.05
    # g + wd w = [0.63, 0.84]; v = -1.0 * trust * [0.63, 0.84] = [-0.003, -0.004]
    close(st1["trust"], [0.005 / 1.05])
    close(st1["w_norm"], [5.0])
    close(st1["g_norm"], [1.0])
    close(s1["momentum"][0], [-0.003, -0.004])
    close(w1, [2.997, 3.996])

    (w2,), s2, st2 = run(opt, [[3.0, 4.0]], [[[0.6, 0.8]], [[0.6, 0.8]]], [1.0, 2.0])
    # step 2: w = 0.999 [3, 4], ||w|| = 4.995; trust = 0.004995 / (1 + 0.04995)
    trust = 0.001 * 4.995 / (1.0 + 0.01 * 4.995)
    v = [0.9 * -0.003 - 2.0 * trust * (0.6 + 0.01 * 2.997),
         0.9 * -0.004 - 2.0 * trust * (0.8 + 0.01 * 3.996)]
    close(st2["trust"], [trust])
    close(s2["momentum"][0], v)
    close(w2, [2.997 + v[0], 3.996 + v[1]])


def test_lars_lr_inside_momentum_differs_from_lr_outside():
    """The pitfall the MLPerf file avoids: v carries the old LR when the LR changes."""
    opt = ref.Lars(momentum=0.9, weight_decay=0.0, trust_coefficient=1.0, eps=0.0, adapt=[False])
    (w,), _, _ = run(opt, [[0.0]], [[[1.0]], [[1.0]]], [1.0, 10.0])
    # inside: v1 = -1, v2 = 0.9*(-1) - 10 = -10.9, w = -1 - 10.9
    close(w, [-11.9])
    # outside would give v2 = 1.9 and w = -1 - 10*1.9 = -20: clearly different
    assert abs(w[0] - (-20.0)) > 1


def test_lars_nesterov_step():
    opt = ref.Lars(momentum=0.9, weight_decay=0.01, trust_coefficient=0.001, eps=0.0, nesterov=True)
    (w,), s, _ = run(opt, [[3.0, 4.0]], [[[0.6, 0.8]]], [1.0])
    # v = [-0.003, -0.004]; w = w + 0.9 v - trust*(g + wd w) = w + 1.9 v
    close(s["momentum"][0], [-0.003, -0.004])
    close(w, [3.0 - 1.9 * 0.003, 4.0 - 1.9 * 0.004])


def test_lars_excluded_tensor_takes_plain_momentum_step_at_global_lr():
    opt = ref.Lars(momentum=0.9, weight_decay=0.01, adapt=[True, False], decay=[True, False])
    (_, b), s, st = run(opt, [[3.0, 4.0], [0.5]], [[[0.6, 0.8], [0.2]]] * 2, [0.5, 0.5])
    # bias: v1 = -0.5*0.2 = -0.1; v2 = 0.9*(-0.1) - 0.1 = -0.19; b = 0.5 - 0.1 - 0.19
    close(s["momentum"][1], [-0.19])
    close(b, [0.21])
    assert st["trust"][1] == 1.0


def test_lars_zero_norm_falls_back_to_trust_one():
    opt = ref.Lars(momentum=0.9, weight_decay=0.01)
    (w, u), _, st = run(opt, [[0.0, 0.0], [2.0]], [[[0.1, -0.1], [0.0]]], [1.0])
    # zero weights: trust 1, decay term 0: w = -[0.1, -0.1]
    close(w, [-0.1, 0.1])
    # zero gradient: trust 1, only decay: u = 2 - 1.0 * 0.01 * 2
    close(u, [1.98])
    np.testing.assert_array_equal(st["trust"], [1.0, 1.0])


# -- LAMB --------------------------------------------------------------------------------------


def _lamb_first_step(w, g, lr, wd, eps, scale=1.0):
    """One LAMB step from zero moments, element by element: m^ = s g, v^ = (s g)^2."""
    u = [(scale * gi) / (abs(scale * gi) + eps) + wd * wi for wi, gi in zip(w, g)]
    w_norm = math.sqrt(sum(x * x for x in w))
    u_norm = math.sqrt(sum(x * x for x in u))
    trust = w_norm / u_norm
    return [wi - lr * trust * ui for wi, ui in zip(w, u)], trust, u_norm


def test_lamb_paper_two_steps():
    opt = ref.Lamb(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    (w1,), s1, st1 = run(opt, [[3.0, 4.0]], [[[0.6, -0.8]]], [0.1])
    # u = [0.6/0.600001 + 0.03, -0.8/0.800001 + 0.04]
    u = [0.6 / 0.600001 + 0.03, -0.8 / 0.800001 + 0.04]
    u_norm = math.sqrt(u[0] ** 2 + u[1] ** 2)
    close(st1["u_norm"], [u_norm])
    close(st1["trust"], [5.0 / u_norm])
    close(w1, [3.0 - 0.1 * (5.0 / u_norm) * u[0], 4.0 - 0.1 * (5.0 / u_norm) * u[1]])

    (w2,), _, st2 = run(opt, [[3.0, 4.0]], [[[0.6, -0.8]], [[0.3, 0.0]]], [0.1, 0.05])
    # step 2: bc1 = 0.19, bc2 = 0.001999
    m = [0.9 * 0.06 + 0.1 * 0.3, 0.9 * -0.08]
    v = [0.999 * 0.001 * 0.36 + 0.001 * 0.09, 0.999 * 0.001 * 0.64]
    u2 = [(m[i] / 0.19) / (math.sqrt(v[i] / 0.001999) + 1e-6) + 0.01 * w1[i] for i in range(2)]
    trust2 = math.hypot(*w1) / math.hypot(*u2)
    close(st2["trust"], [trust2], rel=1e-10)
    close(w2, [w1[i] - 0.05 * trust2 * u2[i] for i in range(2)], rel=1e-10)


def test_lamb_nvlamb_clips_by_global_norm_first():
    grads = [[0.6, -0.8], [3.0]]   # ||G|| = sqrt(1 + 9) = sqrt(10) > max_grad_norm = 1
    params = [[3.0, 4.0], [1.0]]
    # eps = 0.1 makes the clip visible: the update is s g / (s |g| + eps)
    paper = ref.Lamb(eps=0.1, weight_decay=0.01, mode="paper")
    nvlamb = ref.Lamb(eps=0.1, weight_decay=0.01, mode="nvlamb", max_grad_norm=1.0)
    (a, b), _, st = run(nvlamb, params, [grads], [0.1])
    s = 1.0 / math.sqrt(10.0)
    expected_a, trust_a, _ = _lamb_first_step([3.0, 4.0], [0.6, -0.8], 0.1, 0.01, 0.1, scale=s)
    expected_b, _, _ = _lamb_first_step([1.0], [3.0], 0.1, 0.01, 0.1, scale=s)
    close(a, expected_a)
    close(b, expected_b)
    close(st["trust"][0], trust_a)
    close(st["global_grad_norm"], math.sqrt(10.0))
    (pa, _), _, _ = run(paper, params, [grads], [0.1])
    close(pa, _lamb_first_step([3.0, 4.0], [0.6, -0.8], 0.1, 0.01, 0.1)[0])
    assert np.max(np.abs(pa - a)) > 1e-3


def test_nvlamb_equals_paper_below_the_clip():
    grads = [[[0.06, -0.08]]]      # ||G|| = 0.1 < 1
    a, _, _ = run(ref.Lamb(mode="nvlamb"), [[3.0, 4.0]], grads, [0.1])
    b, _, _ = run(ref.Lamb(mode="paper"), [[3.0, 4.0]], grads, [0.1])
    np.testing.assert_array_equal(a[0], b[0])


def test_lamb_exclusion_zero_weights_and_clamp():
    opt = ref.Lamb(eps=1e-6, weight_decay=0.01, adapt=[True, False, True], decay=[True, False, True],
                   trust_clamp=(0.01, 10.0))
    params = [[0.0, 0.0], [0.5], [300.0, 400.0]]
    grads = [[[0.5, -0.5], [0.2], [0.6, 0.8]]]
    (z, b, big), _, st = run(opt, params, grads, [0.1])
    r = 0.5 / (0.5 + 1e-6)
    # zero weights: trust 1, decay adds 0
    close(z, [-0.1 * r, 0.1 * r])
    # excluded: no decay, trust 1
    close(b, [0.5 - 0.1 * 0.2 / (0.2 + 1e-6)])
    # ||w|| = 500, u ~ [1 + 3, 1 + 4]: trust ~ 78 is clamped to 10
    u = [0.6 / (0.6 + 1e-6) + 3.0, 0.8 / (0.8 + 1e-6) + 4.0]
    close(big, [300.0 - 0.1 * 10.0 * u[0], 400.0 - 0.1 * 10.0 * u[1]])
    np.testing.assert_array_equal(st["trust"], [1.0, 1.0, 10.0])


# -- exclusion masks ---------------------------------------------------------------------------


def _arena():
    specs = [("embed.weight", ()), ("fc.weight", ()), ("fc.bias", ("bias",)), ("bn.gamma", ("norm",)),
             ("head.weight", ("no_decay",)), ("head.scale", ("no_adapt",))]
    params = []
    for name, flags in specs:
        p = Param((2,), lambda rng, s: np.ones(s), flags)
        p.name = name
        params.append(p)
    return Arena(params)


def test_exclusion_masks_by_flag_and_pattern():
    arena = _arena()
    adapt, decay = exclusion_masks(arena.segments)
    # defaults: bias and norm leave both; no_decay / no_adapt leave one each
    np.testing.assert_array_equal(adapt, [True, True, False, False, True, False])
    np.testing.assert_array_equal(decay, [True, True, False, False, False, True])
    adapt, decay = exclusion_masks(arena.segments, no_adapt=["embed.*"], no_decay=["*.weight", "bias"])
    np.testing.assert_array_equal(adapt, [False, True, True, True, True, True])
    np.testing.assert_array_equal(decay, [False, False, False, True, False, True])
    adapt, decay = exclusion_masks(arena.segments, no_adapt=[], no_decay=["bn.gamma", "*.nothing*"])
    assert adapt.all()
    np.testing.assert_array_equal(decay, [True, True, True, False, True, True])


def test_exclusion_masks_reject_typos_and_strings():
    with pytest.raises(ConfigError, match="optim.no_decay: 'biases' is neither a flag.*did you mean 'bias'"):
        exclusion_masks(_arena().segments, no_decay=["biases"])
    with pytest.raises(ConfigError, match="optim.no_adapt: .*did you mean 'fc.weight'"):
        exclusion_masks(_arena().segments, no_adapt=["fc.weigth"])
    with pytest.raises(ConfigError, match="optim.no_adapt: expected a list"):
        exclusion_masks(_arena().segments, no_adapt="bias")
