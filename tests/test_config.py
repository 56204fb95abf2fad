"""Typed TOML config: validation, overrides, the shipped job configs, the CLI around them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hpcdl import config
from hpcdl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_validate_and_name_real_models(path):
    from hpcdl import models

    cfg = config.load(path)
    assert cfg.model.name in models.names()
    channels = 1 if cfg.data.dataset == "fashion_mnist" else 3
    model = models.build(cfg.model.name, input_shape=(channels, 32, 32), num_classes=10, **cfg.model.options)
    assert model.parameters()  # the options are ones the builder takes


def test_overrides_are_typed_toml_values():
    cfg = config.load(None, ["train.epochs=3", "optim.name=lamb", "optim.betas=[0.9, 0.99]",
                             "model.options.stem='imagenet'", "comm.overlap=false"])
    assert cfg.train.epochs == 3.0 and isinstance(cfg.train.epochs, float)
    assert cfg.optim.name == "lamb"
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.model.options == {"stem": "imagenet"}
    assert cfg.comm.overlap is False


@pytest.mark.parametrize("overrides, message", [
    (["train.epoch=3"], "unknown key train.epoch (did you mean train.epochs?)"),
    (["trian.epochs=3"], "unknown section [trian] (did you mean train?)"),
    (["train.global_batch=1.5"], "train.global_batch: expected an integer, got 1.5"),
    (["train.global_batch=0"], "train.global_batch: 0 must be >= 1"),
    (["schedule.base_lr=-1"], "schedule.base_lr: -1.0 must be > 0.0"),
    (["comm.overlap=1"], "comm.overlap: expected true or false"),
    (["optim.name='lamp'"], "(did you mean lamb?)"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["optim.trust_clamp=[10, 1]"], "optim.trust_clamp"),
    (["train.global_batch=10", "train.accumulate_steps=3"], "not divisible by train.accumulate_steps"),
    (["data.dataset='hdf5'"], "data.path"),
    (["epochs=3"], "expected section.key=value"),
    (["comm.algorithm='shm'", "comm.fault_tolerance='shrink'"], "'shm' cannot be combined with comm.fault_tolerance"),
    (["comm.algorithm='shm'", "runtime.device='gpu'"], "'shm' reduces host memory"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        config.load(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match="missing.toml: config file not found"):
        config.load(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nepochs = 3\n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        config.load(broken)


def test_reference_lists_every_key_with_its_help():
    text = config.reference()
    for section in ("[model]", "[data]", "[train]", "[optim]", "[schedule]", "[comm]", "[checkpoint]", "[runtime]",
                    "[log]"):
        assert section in text
    assert "global_batch = 128" in text and "per-rank batch" in text


def _hpcdl(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "hpcdl", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_help_teaches():
    top = _hpcdl("--help")
    assert top.returncode == 0
    for word in ("train", "bench", "scaling", "data", "info", "mpiexec"):
        assert word in top.stdout
    train = _hpcdl("train", "--help")
    assert "--resume" in train.stdout and "global_batch" in train.stdout
    reference = _hpcdl("train", "--help-config")
    assert reference.returncode == 0 and "[schedule]" in reference.stdout


def test_info_reports_mpi_and_models():
    result = _hpcdl("info")
    assert result.returncode == 0, result.stderr
    assert "mpi_library" in result.stdout and "fmnist_cnn" in result.stdout
    assert "mpi_cuda_aware" in result.stdout and "allreduce_auto" in result.stdout
