"""Fused optimizers (Numba, and CuPy when a GPU is present) against the float64 reference."""
import functools
import subprocess
import sys

import numpy as np
import pytest

from hpcdl.arena import Arena, Param
from hpcdl.errors import ConfigError, UserError
from hpcdl.optim import NAMES, create

STEPS = 7


def _normal(std):
    return lambda rng, shape: rng.normal(0.0, std, size=shape)


def _zeros(rng, shape):
    return np.zeros(shape)


# (name, shape, init, flags): the big, the tiny, odd sizes, zero-initialised and excluded tensors.
LAYOUT = [
    ("big.weight", (4096, 1024), _normal(0.02), ()),
    ("big.bias", (4096,), _zeros, ("bias",)),
    ("scalar", (1,), _normal(1.0), ()),
    ("odd.weight", (3, 5, 7), _normal(0.5), ()),
    ("odd.vector", (1000,), _normal(0.1), ()),
    ("zero.weight", (257, 3), _zeros, ()),
    ("bn.gamma", (17,), lambda rng, s: np.ones(s), ("norm",)),
    ("head.weight", (33, 65), _normal(0.05), ()),
]


def make_arena(xp=np, layout=LAYOUT, dtype=np.float32):
    params = []
    for name, shape, init, flags in layout:
        p = Param(shape, init, flags)
        p.name = name
        params.append(p)
    return Arena(params, xp=xp, seed=3, dtype=dtype)


def gradients(arena, step):
    """Per-step float32 gradients with per-segment scales; ||G|| is about 2, so nvlamb clips."""
    return _gradients(tuple((s.offset, s.size) for s in arena.segments), arena.total, step).copy()


@functools.lru_cache(maxsize=32)
def _gradients(layout, total, step):
    rng = np.random.default_rng(100 + step)
    g = np.zeros(total, dtype=np.float32)
    for i, (offset, size) in enumerate(layout):
        g[offset:offset + size] = rng.standard_normal(size, dtype=np.float32) * np.float32(1e-3 * (1 + i % 3))
    return g


def segment_list(flat, arena):
    return [np.array(flat[s.offset:s.end], dtype=np.float64).reshape(s.shape) for s in arena.segments]


def to_host(x):
    return x if isinstance(x, np.ndarray) else x.get()


def run_both(arena, opt, steps=STEPS, base_lr=0.05):
    """Step the fused optimizer and its float64 reference with a warmup LR; return both."""
    ref = opt.to_reference()
    params = segment_list(to_host(arena.params), arena)
    state = ref.init(params)
    stats = None
    for step in range(steps):
        lr = base_lr * (step + 1) / steps
        g = gradients(arena, step)
        arena.grads[...] = arena.xp.asarray(g)
        assert opt.step(lr)
        params, state, stats = ref.update(segment_list(g, arena), state, params, lr)
    return params, state, stats


def assert_flat_matches(flat, arena, expected, what="params", rtol=1e-5):
    """rtol 1e-5 element-wise; entries that cancel to near zero are held to 1e-6 of the tensor's scale."""
    host = to_host(flat)
    for seg, want in zip(arena.segments, expected):
        got = host[seg.offset:seg.end].reshape(seg.shape)
        atol = 1e-6 * float(np.max(np.abs(want))) if want.size else 0.0
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{what} of {seg.name}")


def assert_params_match(arena, expected):
    assert_flat_matches(arena.params, arena, expected)


def assert_stats_match(got, want, rtol=1e-5):
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, err_msg=key)


CONFIGS = [
    ("sgd", {"weight_decay": 0.0}),
    ("sgd", {"weight_decay": 1e-2}),
    ("nesterov", {"weight_decay": 1e-2}),
    ("adamw", {"weight_decay": 0.0}),
    ("adamw", {"weight_decay": 0.1}),
    ("lars", {"weight_decay": 0.0}),
    ("lars", {"weight_decay": 5e-4}),
    ("lars", {"weight_decay": 5e-4, "nesterov": True}),
    ("lars", {"weight_decay": 5e-4, "no_adapt": ["odd.*", "bias"], "no_decay": ["head.weight"]}),
    ("lamb", {"mode": "paper", "weight_decay": 0.0}),
    ("lamb", {"mode": "paper", "weight_decay": 0.01}),
    ("lamb", {"mode": "nvlamb", "weight_decay": 0.01}),
    ("lamb", {"mode": "nvlamb", "weight_decay": 0.01, "trust_clamp": (0.5, 2.0)}),
]


@pytest.mark.parametrize("name,hyper", CONFIGS, ids=[f"{n}-{h}" for n, h in CONFIGS])
def test_numba_matches_reference_over_a_warmup(name, hyper):
    arena = make_arena()
    opt = create(name, arena, **hyper)
    expected, state, stats = run_both(arena, opt)
    assert_params_match(arena, expected)
    for key in opt.state_names:
        assert_flat_matches(opt.state[key], arena, state[key], what=key)
    assert_stats_match(opt.last_stats, stats)
    assert opt.steps == STEPS


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_float64_arena_matches_reference_to_roundoff(name):
    arena = make_arena(layout=LAYOUT[2:], dtype=np.float64)
    opt = create(name, arena, **({"mode": "nvlamb"} if name == "lamb" else {}))
    expected, _, stats = run_both(arena, opt)
    assert_flat_matches(arena.params, arena, expected, rtol=1e-12)
    assert_stats_match(opt.last_stats, stats, rtol=1e-12)


def test_trust_fallback_and_exclusions_are_visible_in_stats():
    arena = make_arena()
    opt = create("lamb", arena, mode="nvlamb")
    run_both(arena, opt, steps=1)
    names = [s.name for s in arena.segments]
    trust = opt.last_stats["trust"]
    assert trust[names.index("zero.weight")] == 1.0    # ||w|| = 0 at step 1
    assert trust[names.index("big.bias")] == 1.0       # excluded by flag
    assert trust[names.index("bn.gamma")] == 1.0
    assert trust[names.index("big.weight")] != 1.0
    assert opt.global_grad_norm > 1.0                  # so the nvlamb clip was engaged


def test_many_chunks_per_segment_and_ragged_rows():
    """A chunk size that is no multiple of the reduction width, so every kernel sees partial rows."""
    arena = make_arena(layout=LAYOUT[1:])
    for name in ("lars", "lamb"):
        fresh = make_arena(layout=LAYOUT[1:])
        opt = create(name, fresh, chunk=777)
        assert opt.table.start.size > 2 * len(fresh.segments)
        expected, _, stats = run_both(fresh, opt, steps=3)
        assert_params_match(fresh, expected)
        assert_stats_match(opt.last_stats, stats)
    assert arena.num_parameters > 0


def test_padding_between_segments_is_never_touched():
    arena = make_arena(layout=LAYOUT[2:])
    arena.grads[...] = 1.0   # padding too: a kernel that strayed would move it
    opt = create("lamb", arena, weight_decay=0.1)
    for _ in range(2):
        assert opt.step(0.1)
    covered = np.zeros(arena.total, dtype=bool)
    for s in arena.segments:
        covered[s.offset:s.end] = True
    assert not covered.all()
    assert not arena.params[~covered].any()
    for buf in opt.state.values():
        assert not buf[~covered].any()


def test_result_does_not_depend_on_thread_count():
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two Numba threads")
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            arena = make_arena()
            opt = create("lamb", arena, mode="nvlamb")
            run_both(arena, opt, steps=2)
            results.append((arena.params.copy(), opt.last_stats["u_norm"].copy()))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


# -- each Numba kernel against its NumPy twin --------------------------------------------------


def _kernel_inputs(seed=0):
    from hpcdl.optim.fused import ChunkTable

    rng = np.random.default_rng(seed)
    sizes = np.array([1, 63, 64, 65, 1000, 4099, 0, 7], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(-(-sizes // 16) * 16)]).astype(np.int64)
    table = ChunkTable.build(offsets, sizes, 500)
    n = int(offsets[-1])
    arrays = {k: rng.normal(size=n).astype(np.float32) for k in ("w", "g", "m")}
    arrays["v"] = np.abs(rng.normal(size=n)).astype(np.float32) * 1e-3
    seg = {k: rng.uniform(0.0, 0.1, sizes.size).astype(np.float32) for k in ("decay", "lr")}
    return table, arrays, seg


def test_numba_kernels_match_their_numpy_twins():
    from hpcdl.kernels import optim_cpu as k

    table, a, seg = _kernel_inputs()
    t = (table.start, table.stop)
    n_chunks = table.start.size

    out_x, out_y = np.zeros(n_chunks), np.zeros(n_chunks)
    k.sumsq_chunks(a["g"], *t, out_x)
    np.testing.assert_allclose(out_x, k.sumsq_chunks_numpy(a["g"], *t), rtol=1e-12)
    k.sumsq2_chunks(a["w"], a["g"], *t, out_x, out_y)
    np.testing.assert_allclose(out_x, k.sumsq_chunks_numpy(a["w"], *t), rtol=1e-12)
    np.testing.assert_allclose(out_y, k.sumsq_chunks_numpy(a["g"], *t), rtol=1e-12)

    def both(fast, twin, names, *args, **kw):
        x, y = ({n: a[n].copy() for n in names} for _ in range(2))
        fast(*(x[n] for n in names), *t, table.segment, *args, **kw)
        twin_out = twin(*(y[n] for n in names), *t, table.segment, *args, **kw)
        for n in names:
            np.testing.assert_allclose(x[n], y[n], rtol=2e-6, atol=1e-7, err_msg=f"{fast.__name__}: {n}")
        return twin_out

    both(k.sgd_update, k.sgd_update_numpy, ("w", "g", "v"), seg["decay"], lr=0.1, momentum=0.9, nesterov=True)
    both(k.lars_update, k.lars_update_numpy, ("w", "g", "v"), seg["decay"], seg["lr"], momentum=0.9, nesterov=False)
    both(k.lars_update, k.lars_update_numpy, ("w", "g", "v"), seg["decay"], seg["lr"], momentum=0.9, nesterov=True)
    bias = dict(inv_bc1=1 / 0.19, inv_bc2=1 / 0.002, eps=1e-6)
    both(k.adamw_update, k.adamw_update_numpy, ("w", "g", "m", "v"), 1 - seg["lr"], lr=0.01, beta1=0.9, beta2=0.999,
         **bias)
    both(k.lamb_stage2, k.lamb_stage2_numpy, ("w", "m", "v"), seg["decay"], seg["lr"], **bias)

    x = {n: a[n].copy() for n in "wgmv"}
    w_sumsq, u_sumsq = np.zeros(n_chunks), np.zeros(n_chunks)
    k.lamb_stage1(x["w"], x["g"], x["m"], x["v"], *t, table.segment, seg["decay"], w_sumsq, u_sumsq,
                  beta1=0.9, beta2=0.999, grad_scale=0.5, **bias)
    y = {n: a[n].copy() for n in "wgmv"}
    want_w, want_u = k.lamb_stage1_numpy(y["w"], y["g"], y["m"], y["v"], *t, table.segment, seg["decay"],
                                         beta1=0.9, beta2=0.999, grad_scale=0.5, **bias)
    np.testing.assert_allclose(x["m"], y["m"], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(x["v"], y["v"], rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(w_sumsq, want_w, rtol=1e-12)
    np.testing.assert_allclose(u_sumsq, want_u, rtol=1e-6)


# -- protocol: non-finite gradients, state_dict, errors -------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_skips_the_step(name, bad):
    arena = make_arena(layout=LAYOUT[2:])
    opt = create(name, arena)
    arena.grads[...] = gradients(arena, 0)
    assert opt.step(0.01)
    params, state = arena.params.copy(), opt.state_dict()
    arena.grads[...] = gradients(arena, 1)
    arena.grads[arena.segment("odd.vector").offset + 5] = bad
    assert opt.step(0.01) is False
    assert not np.isfinite(opt.global_grad_norm)
    assert not np.isfinite(opt.grad_norm())
    np.testing.assert_array_equal(arena.params, params)
    after = opt.state_dict()
    assert after["step"] == state["step"] == 1
    for key in opt.state_names:
        np.testing.assert_array_equal(after[key], state[key])


def test_grad_norm_is_the_global_l2_norm():
    arena = make_arena(layout=LAYOUT[2:])
    arena.grads[...] = gradients(arena, 0)
    opt = create("sgd", arena)
    expected = np.sqrt(np.sum(arena.grads.astype(np.float64) ** 2))
    assert opt.grad_norm() == pytest.approx(expected, rel=1e-12)
    opt.step(0.1)
    assert opt.global_grad_norm == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars", "lamb"])
def test_state_dict_round_trip_continues_bit_for_bit(name):
    a = make_arena(layout=LAYOUT[2:])
    opt_a = create(name, a)
    for step in range(3):
        a.grads[...] = gradients(a, step)
        opt_a.step(0.01)
    saved = opt_a.state_dict()
    assert saved["step"] == 3 and all(saved[k].shape == (a.total,) for k in opt_a.state_names)

    b = make_arena(layout=LAYOUT[2:])
    b.params[...] = a.params
    opt_b = create(name, b)
    opt_b.load_state_dict(saved)
    for arena, opt in ((a, opt_a), (b, opt_b)):
        arena.grads[...] = gradients(arena, 3)
        opt.step(0.02)
    np.testing.assert_array_equal(a.params, b.params)
    assert opt_b.steps == 4

    with pytest.raises(UserError, match="shape"):
        create(name, make_arena(layout=LAYOUT[3:])).load_state_dict(saved)


def test_create_reports_config_errors_with_the_key():
    arena = make_arena(layout=LAYOUT[2:])
    with pytest.raises(ConfigError, match=r"optim.name.*'lamp'.*did you mean 'lamb'"):
        create("lamp", arena)
    with pytest.raises(ConfigError, match=r"optim.betas.*not a setting of 'sgd'"):
        create("sgd", arena, betas=(0.9, 0.99))
    with pytest.raises(ConfigError, match=r"optim.weight_decay"):
        create("lars", arena, weight_decay=-1.0)
    with pytest.raises(ConfigError, match=r"optim.betas"):
        create("adamw", arena, betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match=r"optim.mode.*did you mean 'nvlamb'"):
        create("lamb", arena, mode="nvlam")
    with pytest.raises(ConfigError, match=r"optim.trust_clamp"):
        create("lamb", arena, trust_clamp=(10.0, 0.01))
    with pytest.raises(ConfigError, match=r"optim.momentum"):
        create("sgd", arena, momentum="fast")
    with pytest.raises(ConfigError, match=r"optim.no_decay.*did you mean 'norm'"):
        create("lamb", arena, no_decay=["bias", "nrom"])


def test_importing_hpcdl_optim_does_not_load_numba():
    code = "import sys, hpcdl.optim; assert 'numba' not in sys.modules and 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- benchmark ------------------------------------------------------------------------------------


def test_benchmark_arena_is_resnet50_and_counts_bytes(tmp_path, capsys):
    import json

    from hpcdl.bench import optimizer as bench

    full = bench.resnet50_shapes()
    assert len(full) == 161 and sum(np.prod(s) for _, s, _ in full) == 25_557_032   # torchvision's count
    assert bench.parse_size("25M") == 25_000_000 and bench.parse_size("250k") == 250_000

    out = tmp_path / "bench.json"
    assert bench.main(["--sizes", "40K", "--optimizers", "lamb,sgd", "--threads", "1", "--repeats", "1",
                       "--json", str(out)]) == 0
    assert "a+=b" in capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    n = rows[0]["size"]
    assert abs(n - 40_000) < 0.05 * 40_000
    passes = {r["optimizer"]: r["passes"] for r in rows}
    assert passes == {"lamb": 11, "sgd": 6, "a+=b": 3}
    for r in rows:
        assert r["bytes"] == r["passes"] * n * 4 and r["median_ms"] > 0
    assert {(r["optimizer"], r["variant"]) for r in rows} >= {("lamb", "numpy"), ("lamb", "numba"), ("a+=b", "numba")}


# -- CuPy ----------------------------------------------------------------------------------------


def test_cuda_source_ships_every_kernel_the_cpu_module_has():
    import importlib.resources
    import re

    from hpcdl.kernels import optim_cpu, optim_gpu

    source = (importlib.resources.files("hpcdl.kernels") / "optim_cuda.cu").read_text()
    in_source = set(re.findall(r"__global__ void (\w+)", source))
    assert in_source == set(optim_gpu.KERNELS)
    for name in optim_gpu.KERNELS:
        assert callable(getattr(optim_cpu, name)) and callable(getattr(optim_gpu, name))


def test_cuda_source_compiles_with_nvcc(tmp_path):
    """Device code compiles to PTX for float and double (no GPU needed, only nvcc)."""
    import shutil

    from hpcdl.kernels import optim_gpu

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    uses = "".join(f"(void)&{k}<{t}>;" for k in optim_gpu.KERNELS for t in ("float", "double"))
    wrapper = tmp_path / "instantiate.cu"
    wrapper.write_text(f'#include "{optim_gpu.SOURCE}"\nvoid instantiate() {{ {uses} }}\n')
    ptx = tmp_path / "optim.ptx"
    subprocess.run([nvcc, "-std=c++14", "-arch=compute_80", "-ptx", str(wrapper), "-o", str(ptx)],
                   check=True, timeout=120, capture_output=True)
    assert ptx.read_text().count(".entry") == 2 * len(optim_gpu.KERNELS)


@pytest.mark.gpu
def test_cuda_kernels_compile(cupy):
    from hpcdl.kernels import optim_gpu

    optim_gpu.compile_all(np.float32)
    optim_gpu.compile_all(np.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("name,hyper", CONFIGS, ids=[f"{n}-{h}" for n, h in CONFIGS])
def test_cupy_matches_reference_over_a_warmup(name, hyper, cupy):
    arena = make_arena(xp=cupy)
    opt = create(name, arena, **hyper)
    expected, _, stats = run_both(arena, opt)
    assert_params_match(arena, expected)
    assert_stats_match(opt.last_stats, stats)


@pytest.mark.gpu
def test_cupy_skips_non_finite_step(cupy):
    arena = make_arena(xp=cupy, layout=LAYOUT[2:])
    opt = create("lamb", arena)
    arena.grads[...] = cupy.asarray(gradients(arena, 0))
    params = arena.params.copy()
    arena.grads[3] = cupy.nan
    assert opt.step(0.01) is False
    cupy.testing.assert_array_equal(arena.params, params)
