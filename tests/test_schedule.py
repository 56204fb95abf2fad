"""LR schedules hit their documented values at warmup end, decay midpoints and the last step."""
import dataclasses
import math

import pytest

from hpcdl.errors import ConfigError
from hpcdl.optim import build_schedule


def test_linear_scaling_zero_warmup_poly2():
    # Goyal et al.: 0.1 per 256 at batch 1024 is 0.4; MLPerf LARS: warmup from 0, then poly(2)
    s = build_schedule(base_lr=0.1, base_batch=256, global_batch=1024, scaling="linear",
                       warmup_steps=10, decay="poly", power=2, total_steps=110)
    assert s.peak_lr == pytest.approx(0.4)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.2)                       # half way up
    assert s(10) == pytest.approx(0.4)                      # warmup end = peak
    assert s(60) == pytest.approx(0.4 * 0.5**2)             # decay midpoint: (1 - 50/100)^2
    assert s(109) == pytest.approx(0.4 * (1 / 100) ** 2)    # last step
    assert s(110) == 0.0 and s(10_000) == 0.0
    assert s.describe() == ("batch 1024 = 4×256 → lr 0.1×4 = 0.4, warmup 10 steps from 0, "
                            "poly(2) decay to 0 over 100 steps")


def test_sqrt_scaling_scales_warmup_and_starts_from_base():
    # LAMB rule: k = 16 gives lr × 4 and warmup × 16
    s = build_schedule(base_lr=1e-3, base_batch=512, global_batch=8192, scaling="sqrt",
                       warmup_steps=10, warmup_from="base", decay="poly", power=1.0, end_lr=1e-4,
                       total_steps=360)
    assert s.peak_lr == pytest.approx(4e-3)
    assert s.warmup_steps == 160
    assert s(0) == pytest.approx(1e-3)
    assert s(80) == pytest.approx(1e-3 + 0.5 * 3e-3)
    assert s(160) == pytest.approx(4e-3)
    assert s(260) == pytest.approx(1e-4 + 0.5 * (4e-3 - 1e-4))   # linear decay midpoint
    assert s(359) == pytest.approx(1e-4 + (4e-3 - 1e-4) / 200)
    assert "√16" in s.describe() and "160 steps (×16) from 0.001" in s.describe()


def test_warmup_in_epochs_and_cosine_decay():
    s = build_schedule(base_lr=0.05, base_batch=128, global_batch=16384, scaling="linear",
                       warmup_epochs=5, steps_per_epoch=4, decay="cosine", end_lr=0.4, total_steps=220)
    assert s.peak_lr == pytest.approx(6.4)
    assert s.warmup_steps == 20
    assert s(20) == pytest.approx(6.4)
    assert s(120) == pytest.approx(0.4 + (6.4 - 0.4) / 2)          # cos(π/2) = 0
    assert s(219) == pytest.approx(0.4 + 3.0 * (1 + math.cos(math.pi * 199 / 200)))
    assert s.describe().startswith("batch 16384 = 128×128 → lr 0.05×128 = 6.4, warmup 5 epochs = 20 steps")


def test_sqrt_scaling_with_epoch_warmup_scales_the_epochs():
    s = build_schedule(base_lr=0.01, base_batch=100, global_batch=400, scaling="sqrt",
                       warmup_epochs=0.5, steps_per_epoch=10, total_steps=100)
    assert s.warmup_steps == 20          # 0.5 epochs × 4 = 2 epochs
    assert s(20) == pytest.approx(0.02) and s(99) == pytest.approx(0.02)


def test_step_decay_at_epoch_milestones():
    s = build_schedule(base_lr=0.1, total_steps=900, decay="step", milestones=[30, 60], milestone_unit="epochs",
                       steps_per_epoch=10, gamma=0.1)
    assert s(0) == pytest.approx(0.1)                # no warmup: peak from the start
    assert s(299) == pytest.approx(0.1)
    assert s(300) == pytest.approx(0.01)
    assert s(599) == pytest.approx(0.01)
    assert s(600) == pytest.approx(0.001)
    assert s(899) == pytest.approx(0.001)
    assert "steps 300, 600" in s.describe()


def test_constant_after_warmup():
    s = build_schedule(base_lr=0.3, warmup_steps=4, total_steps=10)
    assert [s(i) for i in range(4)] == pytest.approx([0.0, 0.075, 0.15, 0.225])
    assert s(4) == s(9) == s(50) == pytest.approx(0.3)


def test_settings_object_with_keyword_overrides():
    @dataclasses.dataclass
    class ScheduleTable:   # the shape of a config's [schedule] table
        base_lr: float = 0.05
        base_batch: int = 128
        scaling: str = "linear"
        warmup_epochs: float = 2.0
        warmup_from: str = "zero"
        decay: str = "step"
        milestones: list = dataclasses.field(default_factory=lambda: [3])
        gamma: float = 0.5

    s = build_schedule(ScheduleTable(), global_batch=512, steps_per_epoch=10, total_steps=100)
    assert s.peak_lr == pytest.approx(0.2) and s.warmup_steps == 20
    assert s(29) == pytest.approx(0.2) and s(30) == pytest.approx(0.1)
    assert build_schedule({"base_lr": 1.0, "decay": "poly"}, decay="constant", total_steps=5)(4) == 1.0
    with pytest.raises(ConfigError, match="schedule.warmup_step: not a schedule setting; did you mean 'warmup_steps'"):
        build_schedule({"base_lr": 1.0, "warmup_step": 3}, total_steps=5)


@pytest.mark.parametrize("kwargs,key", [
    (dict(base_lr=-0.1, total_steps=10), "schedule.base_lr"),
    (dict(base_lr=float("nan"), total_steps=10), "schedule.base_lr"),
    (dict(base_lr=0.1, total_steps=0), "schedule.total_steps"),
    (dict(base_lr=0.1, total_steps=10, decay="cosin"), "did you mean 'cosine'"),
    (dict(base_lr=0.1, total_steps=10, scaling="linear"), "schedule.base_batch"),
    (dict(base_lr=0.1, total_steps=10, scaling="linear", base_batch=0, global_batch=8), "schedule.base_batch"),
    (dict(base_lr=0.1, total_steps=10, warmup_steps=2, warmup_epochs=1, steps_per_epoch=2), "schedule.warmup_epochs"),
    (dict(base_lr=0.1, total_steps=10, warmup_epochs=1), "schedule.steps_per_epoch"),
    (dict(base_lr=0.1, total_steps=10, warmup_steps=10, decay="poly"), "schedule.warmup_steps: 10 warmup steps leave no room"),
    (dict(base_lr=0.1, total_steps=10, warmup_steps=-1), "schedule.warmup_steps"),
    (dict(base_lr=0.1, total_steps=10, decay="step"), "schedule.milestones"),
    (dict(base_lr=0.1, total_steps=10, decay="step", milestones=[5, 3], milestone_unit="steps"),
     "schedule.milestones"),
    (dict(base_lr=0.1, total_steps=10, decay="step", milestones=[5]), "schedule.steps_per_epoch"),
    (dict(base_lr=0.1, total_steps=10, decay="poly", end_lr=1.0), "schedule.end_lr"),
    (dict(base_lr=0.1, total_steps=10, decay="poly", power=0), "schedule.power"),
    (dict(base_lr=0.1, total_steps=10, warmup_from="one"), "schedule.warmup_from"),
    (dict(total_steps=10), "schedule.base_lr"),
])
def test_invalid_parameters_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        build_schedule(**kwargs)
