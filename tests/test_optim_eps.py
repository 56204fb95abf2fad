"""optim.eps: the config's default and `optim.create`'s agree for every optimizer; an explicit value wins."""
from __future__ import annotations

import numpy as np
import pytest

from hpcdl import optim, train
from hpcdl.arena import Arena, Param
from hpcdl.config import from_dict
from hpcdl.layers.base import ones
from hpcdl.optim.fused import DEFAULTS


def _created(name: str, extra: dict):
    config = from_dict({"optim": {"name": name, **extra}})
    param = Param((3,), ones)
    param.name = "w"
    arena = Arena([param], dtype=np.float64)
    return optim.create(name, arena, **train._optimizer_options(config))


@pytest.mark.parametrize("name", ["adamw", "lamb", "lars"])
def test_config_default_eps_is_the_optimizers_own(name):
    assert _created(name, {}).hyper["eps"] == DEFAULTS[name]["eps"]


def test_explicit_eps_reaches_the_optimizer():
    assert _created("adamw", {"eps": 1e-6}).hyper["eps"] == 1e-6
    assert _created("lamb", {"eps": 1e-8}).hyper["eps"] == 1e-8
