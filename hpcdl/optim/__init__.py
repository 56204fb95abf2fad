"""Optimizers: NumPy references, fused Numba/CuPy versions over the arena, LR schedules.

    opt = create("lamb", arena, weight_decay=0.01, mode="nvlamb")
    lr = build_schedule(base_lr=1e-3, total_steps=1000, warmup_steps=100, decay="poly")
    applied = opt.step(lr(step))   # False: gradients were not finite, nothing changed

Numba and CuPy load only when an optimizer is created.
"""
from hpcdl.optim.fused import NAMES, Optimizer, create
from hpcdl.optim.reference import exclusion_masks
from hpcdl.optim.schedule import Schedule, build_schedule

__all__ = ["NAMES", "Optimizer", "Schedule", "build_schedule", "create", "exclusion_masks"]
