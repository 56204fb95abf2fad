"""Learning-rate rules: batch scaling, warmup, decay; one LR per step.

`build_schedule(settings, **keywords)` turns plain parameters (what the
config's [schedule] table holds, plus the batch and step counts the trainer
knows) into a `Schedule`, a callable step -> lr with a `describe()` that
states the effective rule in one line.

* Scaling with k = global_batch / base_batch:
  `linear` (Goyal et al. 2017): peak = base_lr·k, warmup as given;
  `sqrt` (You et al. 2019, the LAMB rule): peak = base_lr·√k and the warmup
  (in the unit it was given, steps or epochs) times k.
* Warmup over W steps (warmup_steps, or warmup_epochs × steps_per_epoch),
  linear from 0 (warmup_from = `zero`, as in the MLPerf LARS reference) or
  from the unscaled base_lr (`base`, Goyal et al.):
  lr(s) = start + (peak − start)·s/W for s < W, so lr(W) = peak.
* Decay after warmup, t = s − W over T = total_steps − W steps:
  `constant`; `poly`: end + (peak − end)·(1 − t/T)^power (power 2 for LARS);
  `cosine`: end + (peak − end)·(1 + cos(πt/T))/2; `step`: peak·gamma^j
  with j the number of milestones ≤ s (milestones count from step 0, in
  epochs unless milestone_unit = "steps"). lr(s) = end_lr for s ≥ total_steps
  (poly, cosine).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Sequence

from hpcdl.errors import ConfigError

SCALINGS = ("none", "linear", "sqrt")
WARMUP_FROM = ("zero", "base")
DECAYS = ("constant", "poly", "cosine", "step")
_DECAY_ALIASES = {"multistep": "step", "polynomial": "poly"}


@dataclass(frozen=True)
class Schedule:
    peak_lr: float
    start_lr: float
    warmup_steps: int
    total_steps: int
    decay: str
    end_lr: float = 0.0
    power: float = 2.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    summary: str = ""

    def __call__(self, step: int) -> float:
        s, w = int(step), self.warmup_steps
        if s < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if s < w:
            return self.start_lr + (self.peak_lr - self.start_lr) * s / w
        if self.decay == "constant":
            return self.peak_lr
        if self.decay == "step":
            return self.peak_lr * self.gamma ** sum(1 for m in self.milestones if m <= s)
        if s >= self.total_steps:
            return self.end_lr
        fraction = (s - w) / (self.total_steps - w)
        if self.decay == "poly":
            return self.end_lr + (self.peak_lr - self.end_lr) * (1.0 - fraction) ** self.power
        return self.end_lr + (self.peak_lr - self.end_lr) * 0.5 * (1.0 + math.cos(math.pi * fraction))

    def describe(self) -> str:
        return self.summary


def _choice(key: str, value, choices) -> str:
    value = _DECAY_ALIASES.get(value, value) if key == "decay" else value
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"schedule.{key}: unknown value {value!r}; expected one of {list(choices)}{hint}")
    return value


def _real(key: str, value, *, positive: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"schedule.{key}: expected a number, got {value!r}") from None
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ConfigError(f"schedule.{key} = {value!r} must be {'> 0' if positive else '>= 0'}")
    return x


def _count(key: str, value, *, positive: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ConfigError(f"schedule.{key}: expected a whole number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"schedule.{key} = {value!r} must be {'> 0' if positive else '>= 0'}")
    return int(value)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _fields(settings) -> dict:
    """Keyword arguments from a mapping or an object with attributes (a dataclass, a namespace)."""
    if isinstance(settings, Mapping):
        items = dict(settings)
    elif dataclasses.is_dataclass(settings):
        items = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    else:
        items = {k: v for k, v in vars(settings).items() if not k.startswith("_")}
    known = inspect.signature(schedule_parameters).parameters
    unknown = sorted(set(items) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"schedule.{unknown[0]}: not a schedule setting{hint}")
    return items


def build_schedule(settings=None, /, **keywords) -> Schedule:
    """Validate the parameters (ConfigError naming `schedule.<key>`) and build the schedule.

    Keywords are those of `schedule_parameters` below. `settings` (optional)
    is a mapping or an object (a dataclass such as the config's [schedule]
    table) whose fields are such keywords; explicit keywords override it.
    """
    if settings is not None:
        keywords = {**_fields(settings), **keywords}
    return schedule_parameters(**keywords)


def schedule_parameters(
    *,
    base_lr: float | None = None,
    total_steps: int | None = None,
    base_batch: int | None = None,
    global_batch: int | None = None,
    scaling: str = "none",
    warmup_steps: int | None = None,
    warmup_epochs: float | None = None,
    steps_per_epoch: int | None = None,
    warmup_from: str = "zero",
    decay: str = "constant",
    power: float = 2.0,
    end_lr: float = 0.0,
    milestones: Sequence[float] = (),
    milestone_unit: str = "epochs",
    gamma: float = 0.1,
) -> Schedule:
    """The schedule from plain keyword parameters (what `build_schedule` forwards to)."""
    if base_lr is None:
        raise ConfigError("schedule.base_lr: missing")
    if total_steps is None:
        raise ConfigError("schedule.total_steps: missing")
    base_lr = _real("base_lr", base_lr)
    total_steps = _count("total_steps", total_steps, positive=True)
    scaling = _choice("scaling", scaling, SCALINGS)
    warmup_from = _choice("warmup_from", warmup_from, WARMUP_FROM)
    decay = _choice("decay", decay, DECAYS)
    milestone_unit = _choice("milestone_unit", milestone_unit, ("steps", "epochs"))
    if steps_per_epoch is not None:
        steps_per_epoch = _count("steps_per_epoch", steps_per_epoch, positive=True)

    # Batch scaling.
    k, batch_text = 1.0, ""
    if scaling != "none":
        if base_batch is None or global_batch is None:
            raise ConfigError(f"schedule.base_batch: scaling = {scaling!r} needs base_batch and global_batch")
        base_batch = _count("base_batch", base_batch, positive=True)
        global_batch = _count("global_batch", global_batch, positive=True)
        k = global_batch / base_batch
        batch_text = f"batch {global_batch} = {_fmt(k)}×{base_batch} → "
    lr_factor = math.sqrt(k) if scaling == "sqrt" else k
    peak = base_lr * lr_factor
    if scaling == "none":
        lr_text = f"lr {_fmt(peak)}"
    else:
        factor_text = f"√{_fmt(k)}" if scaling == "sqrt" else _fmt(k)
        lr_text = f"lr {_fmt(base_lr)}×{factor_text} = {_fmt(peak)}"

    # Warmup, in steps.
    warmup_factor = k if scaling == "sqrt" else 1.0
    if warmup_steps is not None and warmup_epochs is not None:
        raise ConfigError("schedule.warmup_epochs: give warmup_steps or warmup_epochs, not both")
    if warmup_epochs is not None:
        if steps_per_epoch is None:
            raise ConfigError("schedule.steps_per_epoch: needed to turn warmup_epochs into steps")
        epochs = _real("warmup_epochs", warmup_epochs) * warmup_factor
        warmup = int(round(epochs * steps_per_epoch))
        warmup_text = f"warmup {_fmt(epochs)} epochs = {warmup} steps"
    else:
        warmup = round(_count("warmup_steps", warmup_steps or 0) * warmup_factor)
        warmup_text = f"warmup {warmup} steps"
    if scaling == "sqrt" and warmup:
        warmup_text += f" (×{_fmt(k)})"
    start = 0.0 if warmup_from == "zero" else base_lr
    if warmup:
        warmup_text += f" from {_fmt(start)}"
    if decay in ("poly", "cosine") and warmup >= total_steps:
        key = "warmup_epochs" if warmup_epochs is not None else "warmup_steps"
        raise ConfigError(f"schedule.{key}: {warmup} warmup steps leave no room to decay within the run's "
                          f"{total_steps} steps (train.epochs / train.max_steps); shorten the warmup")

    # Decay.
    power = _real("power", power, positive=True)
    end_lr = _real("end_lr", end_lr)
    gamma = _real("gamma", gamma, positive=True)
    if decay in ("poly", "cosine") and end_lr > peak:
        raise ConfigError(f"schedule.end_lr = {end_lr} is above the peak lr {_fmt(peak)}")
    steps_of_milestones: tuple[int, ...] = ()
    if decay == "step":
        if not milestones:
            raise ConfigError("schedule.milestones: decay = 'step' needs at least one milestone")
        if milestone_unit == "epochs" and steps_per_epoch is None:
            raise ConfigError("schedule.steps_per_epoch: needed for milestones in epochs")
        per_unit = steps_per_epoch if milestone_unit == "epochs" else 1
        steps_of_milestones = tuple(int(round(_real("milestones", m) * per_unit)) for m in milestones)
        if list(steps_of_milestones) != sorted(set(steps_of_milestones)):
            raise ConfigError(f"schedule.milestones: must increase, got {list(milestones)}")

    decay_steps = total_steps - warmup
    decay_text = {
        "constant": f"constant for {total_steps} steps",
        "poly": f"poly({_fmt(power)}) decay to {_fmt(end_lr)} over {decay_steps} steps",
        "cosine": f"cosine decay to {_fmt(end_lr)} over {decay_steps} steps",
        "step": f"×{_fmt(gamma)} at {'epochs' if milestone_unit == 'epochs' else 'steps'} "
                f"{', '.join(_fmt(float(m)) for m in milestones)}"
                + (f" (steps {', '.join(map(str, steps_of_milestones))})" if milestone_unit == "epochs" else ""),
    }[decay]
    summary = ", ".join(t for t in (batch_text + lr_text, warmup_text if warmup else "no warmup", decay_text))
    return Schedule(peak_lr=peak, start_lr=start, warmup_steps=warmup, total_steps=total_steps, decay=decay,
                    end_lr=end_lr, power=power, milestones=steps_of_milestones, gamma=gamma, summary=summary)

