"""Layers with explicit forward/backward whose parameters live in the arena (see base.py)."""
from __future__ import annotations

from typing import Callable

from hpcdl.layers.activations import GELU, ReLU
from hpcdl.layers.attention import MultiHeadSelfAttention
from hpcdl.layers.base import Module, Sequential
from hpcdl.layers.conv import Conv2d
from hpcdl.layers.dropout import Dropout
from hpcdl.layers.embedding import Embedding, PositionalEmbedding
from hpcdl.layers.linear import Linear
from hpcdl.layers.loss import accuracy, count_correct, log_softmax, softmax_cross_entropy
from hpcdl.layers.normalization import BatchNorm, LayerNorm
from hpcdl.layers.pooling import AvgPool2d, GlobalAvgPool, MaxPool2d, TokenMeanPool
from hpcdl.layers.reshape import Flatten, ImageToTokens
from hpcdl.layers.residual import Residual


def attach_sync_batchnorm(model: Module, allreduce: Callable | None) -> int:
    """Give every BatchNorm built with sync=True the in-place sum `allreduce(buf)`; None detaches.

    Returns how many layers were attached, so a caller can warn when a
    sync_bn config meets a model without synchronisable BatchNorm.
    """
    attached = 0
    for module in model.modules():
        if isinstance(module, BatchNorm) and module.sync:
            module.allreduce = allreduce
            attached += 1
    return attached


__all__ = [
    "AvgPool2d", "BatchNorm", "Conv2d", "Dropout", "Embedding", "Flatten", "GELU", "GlobalAvgPool",
    "ImageToTokens", "LayerNorm", "Linear", "MaxPool2d", "Module", "MultiHeadSelfAttention",
    "PositionalEmbedding", "ReLU", "Residual", "Sequential", "TokenMeanPool", "accuracy",
    "attach_sync_batchnorm", "count_correct", "log_softmax", "softmax_cross_entropy",
]
