"""Folding eval-mode BatchNorm into the layer before it, for inference.

In eval mode a BatchNorm is a fixed per-channel affine map, y = x * s + (beta - mean * s)
with s = gamma / sqrt(running_var + eps).  After a Linear or Conv2d whose output channel
is the BatchNorm's channel it folds into that layer::

    w' = w * s   (per output channel)        b' = (b - mean) * s + beta

so the fused model does one pass less over the activations.  Any other BatchNorm (first
in its Sequential, after a pooling or an activation, or inside a custom module) becomes a
``ChannelAffine`` with that scale and shift.  The folding is computed in float64 and
rounded once to the layer's dtype.  With ``relu=True`` a ReLU right after a Linear or
Conv2d (with only a folded BatchNorm between them) is fused into that layer as well
(``LinearReLU``, ``Conv2dReLU``): applied in place on the layer's fresh output.

Execution plan.  Each ``Sequential`` of the fused model also gets a *plan*: one small
callable per layer working on ndarrays, with the argument checks of ``fastnorm.ops``
done once, at fuse time.  When nothing is to be recorded (an input that does not
require grad; the fused parameters never do) ``forward`` runs the plan: no Tensor, no
tape, no saved values, so a request holds its activations and nothing else.  A
convolution is the im2col of ``ops.conv2d`` and one BLAS product, with the column
matrix, the bias + ReLU and max pooling done by the small single-pass helpers of
``fastnorm/_ext/_infer.pxi`` (NumPy, as in ``ops``, when that extension is not built); a
standalone BatchNorm runs the backend kernel through ``norms.batch_norm_eval_fast``.
The plan keeps no state between calls, so one fused model serves any number of
threads.  Input it does not expect (another dtype, rank or channel count, an empty
batch) goes through the modules instead, which raise their usual errors.
"""
import copy
import sys
import types
from collections import Counter, OrderedDict

import numpy as np

from . import _backend, nn, norms, ops
from .autograd import Context, Tensor, is_grad_enabled

try:  # the inference helpers of the Cython build; NumPy does the same without them
    _infer = _backend.infer_module()
except ImportError:
    _infer = None

__all__ = ["fuse", "Conv2dReLU", "LinearReLU", "FusedSequential"]


def fuse(model, relu=False):
    """A new eval-only model computing what ``model`` computes in eval mode, with every
    BatchNorm folded into the Linear/Conv2d before it (within a ``Sequential``) or
    replaced by a per-channel scale and shift; with ``relu=True`` a following ReLU is
    fused into the layer too.

    ``model`` is not changed.  It must be in eval mode (``ValueError`` otherwise: in
    training mode BatchNorm uses batch statistics, which cannot be folded).  The result
    refuses ``.train()``; its parameters do not require grad and are read-only (fuse
    the original again after changing it).  Every ``Sequential`` in it runs an execution
    plan on ndarrays when nothing is recorded (see the module docstring).

    A BatchNorm1d after a Linear is folded over the Linear's output features, which is
    its channel axis for 2-D input (N, features) and, with ``layout="NHWC"``, for any rank.
    BatchNorms with ``track_running_stats=False`` use batch statistics even in eval mode
    (as in PyTorch), so they are kept as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a fastnorm.nn.Module, got {type(model).__name__}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu: expected a bool, got {relu!r}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"model: expected a model in eval mode (call model.eval() before "
                         f"fuse), got training mode in {', '.join(training[:5])}"
                         f"{' ...' if len(training) > 5 else ''}")
    fused = copy.deepcopy(model)
    uses = Counter(id(c) for m in fused.modules() for c in m._modules.values() if c is not None)
    fused = _fuse(fused, uses, relu)
    for m in fused.modules():
        m.__dict__["training"] = False
        m.__dict__["_eval_only"] = True
    for p in fused.parameters():
        p.grad = None
        p.requires_grad = False
        p.data.flags.writeable = False
    for m in fused.modules():
        if type(m) is nn.Sequential:
            m.__class__ = FusedSequential
            m._replan()
    return fused


def _fuse(module, uses, relu):
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
            new[name] = _fuse(child, uses, relu)
    if relu and isinstance(module, nn.Sequential):
        _fuse_relus(new, uses)
    for name, child in new.items():
        module._modules[name] = child
    return module


def _fuse_relus(children, uses):
    """In a Sequential's (already folded) children: Linear/Conv2d, any Identities, ReLU
    -> LinearReLU/Conv2dReLU, Identities, Identity."""
    layer = None
    for name, child in list(children.items()):
        if type(child) is nn.Identity:
            continue
        if type(child) is nn.ReLU and layer is not None and uses[id(layer)] == 1:
            layer.__class__ = _WITH_RELU[type(layer)]
            children[name] = nn.Identity()
            layer = None
            continue
        layer = child if type(child) in _WITH_RELU else None


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


# ---------------------------------------------------------------- fused modules ----
class LinearReLU(nn.Linear):
    """relu(x @ weight.T + bias): a Linear with the ReLU after it fused (built by
    ``fuse(model, relu=True)``; eval-only)."""

    def forward(self, x):
        return ops.relu(nn.Linear.forward(self, x))


class Conv2dReLU(nn.Conv2d):
    """relu(conv2d(x)): a Conv2d with the ReLU after it fused (built by
    ``fuse(model, relu=True)``; eval-only)."""

    def forward(self, x):
        return ops.relu(nn.Conv2d.forward(self, x))


_WITH_RELU = {nn.Linear: LinearReLU, nn.Conv2d: Conv2dReLU}


class FusedSequential(nn.Sequential):
    """The ``Sequential`` of a fused model: runs its execution plan on ndarrays when
    nothing is recorded, the modules otherwise (see the module docstring)."""

    def forward(self, x):
        plan = self.__dict__.get("_plan")
        if plan is not None and not (x.requires_grad and is_grad_enabled()):
            a = x.data
            try:
                for step in plan:
                    a = step(a)
            except _Unsupported:
                pass  # input the plan does not take: the modules check and report it
            else:
                return Tensor(np.ascontiguousarray(a))
        return nn.Sequential.forward(self, x)

    def _replan(self):
        self.__dict__["_plan"] = [s for s in map(_step, self._modules.values())
                                  if s is not None]

    # A change of the children rebuilds the plan.
    def add_module(self, name, module):
        super().add_module(name, module)
        self._replan()

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if isinstance(value, nn.Module) or name in self._modules:
            self._replan()

    def __delattr__(self, name):
        super().__delattr__(name)
        self._replan()


# ---------------------------------------------------------------- plan steps ----
class _Unsupported(Exception):
    """A plan step cannot take this input; the modules run instead."""


def _ctx(n):
    return Context((False,) * n)


def _step(m):
    """The plan step of one child module (None: nothing to do in eval)."""
    if m is None or type(m) is nn.Identity or type(m) is nn.Dropout:
        return None
    t = type(m)
    if t in (nn.Conv2d, Conv2dReLU):
        return _ConvStep(m, t is Conv2dReLU)
    if t in (nn.Linear, LinearReLU):
        return _LinearStep(m, t is LinearReLU)
    if t is nn.ReLU:
        return _relu
    if t is nn.MaxPool2d:
        return _MaxPoolStep(m)
    if t is nn.Flatten:
        return _FlattenStep(m)
    if t is nn.ChannelAffine:
        return _AffineStep(m)
    return _ModuleStep(m)


def _relu(a):
    return np.maximum(a, 0)


class _ModuleStep:
    """Any other module: called as usual (its input does not require grad and the fused
    parameters do not either, so nothing is recorded)."""
    __slots__ = ("module",)

    def __init__(self, m):
        self.module = m

    def __call__(self, a):
        return self.module(Tensor(a)).data


class _ConvStep:
    __slots__ = ("params", "C", "O", "kernel", "stride", "padding", "nchw", "layout",
                 "dtype", "relu", "cache")

    def __init__(self, m, relu):
        self.params = m._parameters
        self.C, self.O = m.in_channels, m.out_channels
        self.kernel, self.stride, self.padding = m.kernel_size, m.stride, m.padding
        self.layout, self.nchw = m.layout, m.layout == "NCHW"
        self.dtype, self.relu = m.dtype, relu
        self.cache = (None, None)
        self._matrix()

    def _matrix(self):
        """The weight as the matrix of the product in this layout, rebuilt only when the
        weight array was replaced (it is read-only in a fused model)."""
        w = self.params["weight"].data
        c = self.cache
        if c[0] is not w:
            if self.nchw:  # (O, C*kH*kW) @ cols (C*kH*kW, Ho*Wo)
                c = (w, w.reshape(self.O, -1))
            else:  # cols (Ho*Wo, kH*kW*C) @ (kH*kW*C, O)
                c = (w, np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, self.O)))
            self.cache = c
        return c[1]

    def __call__(self, a):
        if a.ndim != 4 or a.dtype != self.dtype or a.shape[0] == 0:
            raise _Unsupported
        if self.nchw:
            N, C, H, W = a.shape
        else:
            N, H, W, C = a.shape
        (kH, kW), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        Ho, Wo = (H + 2 * ph - kH) // sh + 1, (W + 2 * pw - kW) // sw + 1
        if C != self.C or Ho < 1 or Wo < 1:
            raise _Unsupported
        bias = self.params["bias"]
        if _infer is None:  # extension not built: ops' im2col
            out = ops.Conv2d.forward(_ctx(3), a, self.params["weight"].data,
                                     None if bias is None else bias.data, self.stride,
                                     self.padding, self.layout)
            return np.maximum(out, 0, out=out) if self.relu else out
        w2 = self._matrix()
        if self.nchw:
            cols = np.empty((N, C * kH * kW, Ho * Wo), a.dtype)
            _infer.im2col(a, cols, self.kernel, self.stride, self.padding, False)
            out = np.matmul(w2, cols)  # (N, O, Ho*Wo): NCHW
            inner = Ho * Wo
        else:
            cols = np.empty((N * Ho * Wo, kH * kW * C), a.dtype)
            _infer.im2col(a, cols, self.kernel, self.stride, self.padding, True)
            out = cols @ w2  # (N*Ho*Wo, O): NHWC
            inner = 1
        if bias is not None or self.relu:
            _infer.bias_relu(out, None if bias is None else bias.data, inner, self.relu)
        return out.reshape((N, self.O, Ho, Wo) if self.nchw else (N, Ho, Wo, self.O))


class _LinearStep:
    __slots__ = ("params", "n_in", "dtype", "relu")

    def __init__(self, m, relu):
        self.params, self.n_in, self.dtype, self.relu = m._parameters, m.in_features, m.dtype, relu

    def __call__(self, a):
        if a.ndim < 1 or a.shape[-1] != self.n_in or a.dtype != self.dtype:
            raise _Unsupported
        p = self.params
        out = np.matmul(a, p["weight"].data.T)
        b = p["bias"]
        if _infer is not None and out.ndim:
            if b is not None or self.relu:
                _infer.bias_relu(out, None if b is None else b.data, 1, self.relu)
            return out
        if b is not None:
            out += b.data
        if self.relu:
            np.maximum(out, 0, out=out)
        return out


class _MaxPoolStep:
    __slots__ = ("kernel", "stride", "padding", "layout", "nhwc")

    def __init__(self, m):
        self.kernel, self.stride, self.padding, self.layout = (m.kernel_size, m.stride,
                                                               m.padding, m.layout)
        self.nhwc = m.layout == "NHWC"

    def __call__(self, a):
        if a.ndim != 4 or a.size == 0 or a.dtype.kind != "f":
            raise _Unsupported
        ah, aw = (1, 2) if self.nhwc else (2, 3)
        (kH, kW), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        Ho, Wo = (a.shape[ah] + 2 * ph - kH) // sh + 1, (a.shape[aw] + 2 * pw - kW) // sw + 1
        if Ho < 1 or Wo < 1:
            raise _Unsupported
        if _infer is None or a.dtype.itemsize not in (4, 8):
            return ops._max_of_offsets(ops._pad(a, self.padding, self.layout, -np.inf),
                                       self.kernel, self.stride, (Ho, Wo), self.layout)
        N = a.shape[0]
        shape = (N, Ho, Wo, a.shape[3]) if self.nhwc else (N, a.shape[1], Ho, Wo)
        out = np.empty(shape, a.dtype)
        _infer.max_pool(a, out, self.kernel, self.stride, self.padding, self.nhwc)
        return out


class _FlattenStep:
    __slots__ = ("start", "end", "nhwc")

    def __init__(self, m):
        self.start, self.end, self.nhwc = m.start_dim, m.end_dim, m.layout == "NHWC"

    def __call__(self, a):
        nd = a.ndim
        if nd == 0:
            raise _Unsupported
        if self.nhwc and nd > 2:  # PyTorch's (C, H, W) order, as ops.flatten
            a = a.transpose(0, nd - 1, *range(1, nd - 1))
        start, end = self.start % nd, self.end % nd
        if start > end:
            raise _Unsupported
        shape = a.shape
        size = 1
        for n in shape[start:end + 1]:
            size *= n
        return a.reshape(shape[:start] + (size,) + shape[end + 1:])


class _AffineStep:
    __slots__ = ("buffers", "C", "layout", "dtype", "zeros", "ones")

    def __init__(self, m):
        self.buffers, self.C, self.layout, self.dtype = m._buffers, m.num_features, m.layout, m.dtype
        self.zeros, self.ones = np.zeros(self.C), np.ones(self.C)

    def __call__(self, a):
        if a.ndim < 2 or a.dtype != self.dtype or a.size == 0 \
                or a.shape[1 if self.layout == "NCHW" else -1] != self.C:
            raise _Unsupported
        b = self.buffers
        y = norms.batch_norm_eval_fast(a, self.zeros, self.ones, b["scale"], b["shift"],
                                       self.layout)
        if y is None:
            raise _Unsupported
        return y


class _CallableModule(types.ModuleType):
    """``import fastnorm.fuse`` makes the package attribute ``fastnorm.fuse`` this module
    (the import system sets it), where ``fastnorm.fuse(model)`` means the function: the
    module is callable, so both spellings keep working in any import order."""

    def __call__(self, model, relu=False):
        return fuse(model, relu=relu)


sys.modules[__name__].__class__ = _CallableModule
