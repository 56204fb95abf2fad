"""Softmax cross-entropy with label smoothing, and accuracy counting."""
from __future__ import annotations

from hpcdl.backend import array_module


def log_softmax(logits):
    """Numerically stable log-softmax over the last axis."""
    xp = array_module(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0, normalizer: float | None = None):
    """Loss and its gradient for (N, K) logits and (N,) integer labels.

    The target is (1 - s) * onehot + s / K (Szegedy et al. 2016).
    loss = sum over samples of the cross-entropy / normalizer, where the
    normalizer defaults to N. A data-parallel trainer passes the *global*
    batch size, so summing every rank's gradient gives exactly the gradient
    of the global mean loss.

    Returns (loss, dlogits); loss is a 0-d array on the logits' device
    (call float() when the host needs it; on a GPU that synchronises).
    """
    xp = array_module(logits)
    labels = xp.asarray(labels)
    n, k = logits.shape
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    norm = float(n if normalizer is None else normalizer)
    log_probs = log_softmax(logits)
    rows = xp.arange(n)
    picked = log_probs[rows, labels]
    per_sample = -(1.0 - label_smoothing) * picked
    if label_smoothing:
        per_sample -= (label_smoothing / k) * log_probs.sum(axis=-1)
    loss = per_sample.sum() / norm

    dlogits = xp.exp(log_probs)
    if label_smoothing:
        dlogits -= label_smoothing / k
    dlogits[rows, labels] -= 1.0 - label_smoothing
    dlogits *= 1.0 / norm
    return loss, dlogits


def count_correct(logits, labels) -> int:
    """Number of rows whose arg-max equals the label."""
    xp = array_module(logits)
    return int((logits.argmax(axis=-1) == xp.asarray(labels)).sum())


def accuracy(logits, labels) -> float:
    return count_correct(logits, labels) / max(len(labels), 1)
