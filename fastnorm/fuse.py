"""Folding eval-mode BatchNorm into the layer before it, for inference.

In eval mode a BatchNorm is a fixed per-channel affine map, y = x * s + (beta - mean * s)
with s = gamma / sqrt(running_var + eps).  After a Linear or Conv2d whose output channel
is the BatchNorm's channel it folds into that layer::

    w' = w * s   (per output channel)        b' = (b - mean) * s + beta

so the fused model does one pass less over the activations.  Any other BatchNorm (first
in its Sequential, after a pooling or an activation, or inside a custom module) becomes a
``ChannelAffine`` with that scale and shift.  The folding is computed in float64 and
rounded once to the layer's dtype.
"""
import copy
from collections import Counter, OrderedDict

import numpy as np

from . import nn

__all__ = ["fuse"]


def fuse(model):
    """A new eval-only model computing what ``model`` computes in eval mode, with every
    BatchNorm folded into the Linear/Conv2d before it (within a ``Sequential``) or
    replaced by a per-channel scale and shift.

    ``model`` is not changed.  It must be in eval mode (``ValueError`` otherwise: in
    training mode BatchNorm uses batch statistics, which cannot be folded).  The result
    refuses ``.train()``; its parameters do not require grad.

    A BatchNorm1d after a Linear is folded over the Linear's output features, which is
    its channel axis for 2-D input (N, features) and, with ``layout="NHWC"``, for any rank.
    BatchNorms with ``track_running_stats=False`` use batch statistics even in eval mode
    (as in PyTorch), so they are kept as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a fastnorm.nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"model: expected a model in eval mode (call model.eval() before "
                         f"fuse), got training mode in {', '.join(training[:5])}"
                         f"{' ...' if len(training) > 5 else ''}")
    fused = copy.deepcopy(model)
    uses = Counter(id(c) for m in fused.modules() for c in m._modules.values() if c is not None)
    fused = _fuse(fused, uses)
    for m in fused.modules():
        m.__dict__["training"] = False
        m.__dict__["_eval_only"] = True
    for p in fused.parameters():
        p.grad = None
        p.requires_grad = False
    return fused


def _fuse(module, uses):
    if isinstance(module, nn._BatchNorm):
        return _to_affine(module)
    items = list(module._modules.items())
    new = OrderedDict()
    for i, (name, child) in enumerate(items):
        if child is None:
            new[name] = None
            continue
        prev = items[i - 1][1] if i > 0 else None
        if (isinstance(module, nn.Sequential) and _foldable(prev, child)
                and uses[id(prev)] == 1 and uses[id(child)] == 1):
            _fold_into(prev, child)
            new[name] = nn.Identity()
        else:
            new[name] = _fuse(child, uses)
    for name, child in new.items():
        module._modules[name] = child
    return module


def _foldable(prev, bn):
    if not isinstance(bn, nn._BatchNorm) or bn.running_mean is None:
        return False
    if isinstance(prev, nn.Linear):
        return isinstance(bn, nn.BatchNorm1d) and bn.num_features == prev.out_features
    if isinstance(prev, nn.Conv2d):
        return (isinstance(bn, nn.BatchNorm2d) and bn.layout == prev.layout
                and bn.num_features == prev.out_channels)
    return False


def _scale_shift(bn):
    """(s, t) in float64 with bn(x) = x * s + t per channel in eval mode."""
    mean, invstd = bn._folded()
    gamma = 1.0 if bn.weight is None else bn.weight.data.astype(np.float64)
    beta = 0.0 if bn.bias is None else bn.bias.data.astype(np.float64)
    s = gamma * invstd
    return s, beta - mean * s, mean


def _fold_into(layer, bn):
    s, _, mean = _scale_shift(bn)
    beta = 0.0 if bn.bias is None else bn.bias.data.astype(np.float64)
    w = layer.weight.data.astype(np.float64)
    w = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    b = 0.0 if layer.bias is None else layer.bias.data.astype(np.float64)
    b = (b - mean) * s + beta
    layer.weight = nn.Parameter(w.astype(layer.dtype))
    layer.bias = nn.Parameter(np.ascontiguousarray(b, dtype=layer.dtype))


def _to_affine(bn):
    if bn.running_mean is None:
        return bn
    s, t, _ = _scale_shift(bn)
    return nn.ChannelAffine(s, t, layout=bn.layout, dtype=bn.dtype)
