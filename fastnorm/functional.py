"""Functional API: the normalizations on NumPy arrays (no autograd)."""
from .norms import *  # noqa: F401,F403
from .norms import __all__ as _norm_names

__all__ = list(_norm_names)
