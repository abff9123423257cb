"""fastnorm: CPU normalization kernels (BatchNorm, LayerNorm, GroupNorm, InstanceNorm,
RMSNorm) in Cython and Numba over NCHW and NHWC, with a NumPy reference and a small
tape-based autograd.

>>> import numpy as np, fastnorm as fn, fastnorm.functional as F
>>> x = np.random.default_rng(0).standard_normal((8, 4, 5, 5)).astype(np.float32)
>>> y, mean, invstd = F.batch_norm_train(x)
>>> bool(abs(y.mean()) < 1e-5)
True
"""
import importlib

from ._backend import backends, get_backend, set_backend, use_backend
from ._config import get_num_threads, set_num_threads
from ._random import manual_seed
from . import functional

__version__ = "0.1.0"

# Loaded on first use, so that ``import fastnorm`` stays cheap for services.
_LAZY = {
    "Tensor": ("fastnorm.autograd", "Tensor"),
    "tensor": ("fastnorm.autograd", "tensor"),
    "no_grad": ("fastnorm.autograd", "no_grad"),
    "enable_grad": ("fastnorm.autograd", "enable_grad"),
    "inference_mode": ("fastnorm.autograd", "inference_mode"),
    "is_grad_enabled": ("fastnorm.autograd", "is_grad_enabled"),
    "save": ("fastnorm.serialization", "save"),
    "load_into": ("fastnorm.serialization", "load_into"),
    "load_metadata": ("fastnorm.serialization", "load_metadata"),
    "fuse": ("fastnorm.fuse", "fuse"),
    "nn": ("fastnorm.nn", None),
    "optim": ("fastnorm.optim", None),
    "testing": ("fastnorm.testing", None),
}

__all__ = ["backends", "get_backend", "set_backend", "use_backend", "get_num_threads",
           "set_num_threads", "manual_seed", "functional", "__version__", *_LAZY]


def __getattr__(name):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'fastnorm' has no attribute {name!r}") from None
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value
