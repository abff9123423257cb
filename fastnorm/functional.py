"""Functional API: the normalizations on NumPy arrays (no autograd), and the Tensor
functions of the autograd (activations, linear, conv2d, pools, dropout, losses).

``batch_norm``, ``layer_norm`` etc. here are the NumPy versions of ``fastnorm.norms``; the
differentiable Tensor normalizations are ``fastnorm.ops.batch_norm`` etc.
"""
import importlib

from .norms import *  # noqa: F401,F403
from .norms import __all__ as _norm_names

# Tensor functions from fastnorm.ops, imported on first use so that ``import fastnorm``
# does not load the autograd.
_TENSOR_FUNCTIONS = ("relu", "sigmoid", "tanh", "gelu", "softmax", "log_softmax", "dropout",
                     "linear", "conv2d", "max_pool2d", "avg_pool2d", "flatten", "concatenate",
                     "cross_entropy", "mse_loss")

__all__ = list(_norm_names) + list(_TENSOR_FUNCTIONS)


def __getattr__(name):
    if name in _TENSOR_FUNCTIONS:
        value = getattr(importlib.import_module("fastnorm.ops"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastnorm.functional' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_TENSOR_FUNCTIONS))
