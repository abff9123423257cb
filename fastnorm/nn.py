"""Modules with PyTorch's names, constructors and state-dict keys.

A ``Module`` holds parameters (``Parameter``, a ``Tensor`` that requires grad), buffers
(plain ndarrays such as ``running_mean``) and child modules; ``module(x)`` runs
``forward`` through the differentiable ops of ``fastnorm.ops``.  State dicts do not
depend on the layout: a PyTorch model's ``state_dict`` loads into the NCHW or the NHWC
version of the same model.

>>> import numpy as np, fastnorm as fn
>>> _ = fn.manual_seed(0)
>>> model = fn.nn.Sequential(fn.nn.Linear(4, 8), fn.nn.BatchNorm1d(8), fn.nn.ReLU())
>>> list(model.state_dict())  # doctest: +NORMALIZE_WHITESPACE
['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var',
 '1.num_batches_tracked']
>>> model(np.ones((2, 4), np.float32)).shape
(2, 8)
"""
import math
import numbers
from collections import OrderedDict, namedtuple

import numpy as np

from . import _checks, norms, ops
from ._random import generator
from .autograd import Tensor, is_grad_enabled

__all__ = [
    "Parameter", "Module", "Sequential", "Identity", "Linear", "Conv2d", "MaxPool2d",
    "AvgPool2d", "ReLU", "Sigmoid", "Tanh", "GELU", "Dropout", "Flatten",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "RMSNorm", "ChannelAffine", "StateDictError",
]


class Parameter(Tensor):
    """A ``Tensor`` that a ``Module`` registers as a parameter (``requires_grad=True``
    unless told otherwise)."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)

    def __deepcopy__(self, memo):
        p = Parameter(self.data.copy(), requires_grad=self.requires_grad)
        if self.grad is not None:
            p.grad = np.array(self.grad, copy=True)
        memo[id(self)] = p
        return p

    def __repr__(self):
        return f"Parameter containing:\n{self.data!r}"


class StateDictError(ValueError, RuntimeError):
    """``load_state_dict`` rejected a state dict (missing, unexpected or mis-shaped
    entries); nothing was changed.  A ``ValueError``, and a ``RuntimeError`` as in PyTorch."""


IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


# -------------------------------------------------------------------------- helpers ----
def _records(x, w, b):
    """Whether an op on the Tensor x and the parameters w, b (or None) would be recorded
    for backward."""
    return is_grad_enabled() and (x.requires_grad or (w is not None and w.requires_grad)
                                  or (b is not None and b.requires_grad))


def _dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}")
    return dt


def _as_tensor(x):
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return Tensor(x)
    return x


def _pair(v, name):
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return (int(v), int(v))
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}") from None
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in (a, b)):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")
    return (int(a), int(b))


def _real(value, name, low, high=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value < low or (high is not None and value > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected a number {rng}, got {value!r}")
    return float(value)


def _uniform(bound, shape, dtype):
    """PyTorch's ``uniform_(-bound, bound)``, drawn from fastnorm's generator."""
    return generator().uniform(-bound, bound, size=shape).astype(dtype)


def _as_state_value(v):
    """An ndarray from an ndarray, a NumPy scalar, a number or a CPU PyTorch tensor
    (duck-typed: fastnorm never imports torch)."""
    if isinstance(v, Tensor):
        return v.data
    if not isinstance(v, np.ndarray) and hasattr(v, "detach") and hasattr(v, "numpy"):
        v = v.detach().cpu().numpy()
    return np.asarray(v)


# --------------------------------------------------------------------------- Module ----
class Module:
    """Base class of all modules: subclasses call ``super().__init__()`` and assign
    ``Parameter``s, ``Module``s and (through ``register_buffer``) ndarray buffers as
    attributes; ``forward`` takes and returns ``Tensor``s."""

    def __init__(self):
        d = self.__dict__
        d["_parameters"] = OrderedDict()
        d["_buffers"] = OrderedDict()
        d["_non_persistent"] = set()
        d["_modules"] = OrderedDict()
        d["training"] = True

    # -- attributes ------------------------------------------------------------------
    def __setattr__(self, name, value):
        params = self.__dict__.get("_parameters")
        if params is None:
            raise AttributeError(f"cannot assign {name!r} before Module.__init__() call")
        if isinstance(value, Parameter):
            self._forget(name)
            params[name] = value
        elif isinstance(value, Module):
            self._forget(name)
            self._modules[name] = value
        elif name in params:
            if value is not None:
                raise TypeError(f"{name}: expected a Parameter or None for the parameter "
                                f"{name!r}, got {type(value).__name__}")
            params[name] = None
        elif name in self._modules:
            if value is not None:
                raise TypeError(f"{name}: expected a Module or None for the submodule "
                                f"{name!r}, got {type(value).__name__}")
            self._modules[name] = None
        elif name in self._buffers:
            if value is not None and not isinstance(value, np.ndarray):
                raise TypeError(f"{name}: expected an ndarray or None for the buffer "
                                f"{name!r}, got {type(value).__name__}")
            self._buffers[name] = value
            self._state_changed()
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # Only called when ordinary lookup fails: parameters, buffers, submodules.
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            s = d.get(store)
            if s is not None and name in s:
                return s[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __delattr__(self, name):
        for store in (self._parameters, self._buffers, self._modules):
            if name in store:
                del store[name]
                self._non_persistent.discard(name)
                return
        object.__delattr__(self, name)

    def _forget(self, name):
        for store in (self._parameters, self._buffers, self._modules):
            store.pop(name, None)
        self._non_persistent.discard(name)
        self.__dict__.pop(name, None)

    def register_parameter(self, name, param):
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"param: expected a Parameter or None, got {type(param).__name__}")
        self._forget(name)
        self._parameters[name] = param

    def register_buffer(self, name, array, persistent=True):
        """Register an ndarray (or None) saved in the state dict unless ``persistent``
        is False; the array is updated in place by the module."""
        if array is not None and not isinstance(array, np.ndarray):
            raise TypeError(f"array: expected an ndarray or None, got {type(array).__name__}")
        self._forget(name)
        self._buffers[name] = array
        if not persistent:
            self._non_persistent.add(name)

    def add_module(self, name, module):
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"module: expected a Module or None, got {type(module).__name__}")
        self._forget(name)
        self._modules[name] = module

    def _state_changed(self):
        """Called after buffers or parameters were replaced or loaded (caches hook in)."""

    # -- calling ---------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs:  # the common case, without the generator
            out = self.forward(_as_tensor(args[0]))
        else:
            out = self.forward(*[_as_tensor(a) for a in args], **kwargs)
        return Tensor(out) if isinstance(out, np.ndarray) else out

    # -- mode ------------------------------------------------------------------------
    def train(self, mode=True):
        if not isinstance(mode, bool):
            raise TypeError(f"mode: expected a bool, got {mode!r}")
        if mode and self.__dict__.get("_eval_only", False):
            raise ValueError(f"{type(self).__name__}: this model is eval-only (built by "
                             f"fastnorm.fuse); train the original model instead")
        self.training = mode
        for m in self.children():
            m.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def requires_grad_(self, requires_grad=True):
        for p in self.parameters():
            p.requires_grad = requires_grad
        return self

    def zero_grad(self, set_to_none=True):
        for p in self.parameters():
            p.grad = None if set_to_none or p.grad is None else np.zeros_like(p.data)

    # -- traversal -------------------------------------------------------------------
    def named_children(self):
        seen = set()
        for name, m in self._modules.items():
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                yield name, m

    def children(self):
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix="", _seen=None):
        seen = set() if _seen is None else _seen
        if id(self) in seen:
            return
        seen.add(id(self))
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(f"{prefix}.{name}" if prefix else name, seen)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def _named_members(self, store, recurse):
        seen = set()
        mods = self.named_modules() if recurse else [("", self)]
        for mprefix, m in mods:
            for name, v in getattr(m, store).items():
                if v is None or id(v) in seen:
                    continue
                seen.add(id(v))
                yield (f"{mprefix}.{name}" if mprefix else name), v

    def named_parameters(self, prefix="", recurse=True):
        for name, p in self._named_members("_parameters", recurse):
            yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self, recurse=True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix="", recurse=True):
        for name, b in self._named_members("_buffers", recurse):
            yield (f"{prefix}.{name}" if prefix else name), b

    def buffers(self, recurse=True):
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def apply(self, fn):
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # -- state dicts -----------------------------------------------------------------
    def _state_slots(self, prefix=""):
        """(key, owner module, kind, name) for every state-dict entry, in PyTorch's
        order: own parameters, own persistent buffers, then each child's."""
        for name, p in self._parameters.items():
            if p is not None:
                yield prefix + name, self, "param", name
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent:
                yield prefix + name, self, "buffer", name
        for name, m in self._modules.items():
            if m is not None:
                yield from m._state_slots(f"{prefix}{name}.")

    def state_dict(self):
        """``dict[str, ndarray]`` with PyTorch's keys; the arrays are copies, so later
        training does not change a saved state dict."""
        out = OrderedDict()
        for key, owner, kind, name in self._state_slots():
            v = owner._parameters[name].data if kind == "param" else owner._buffers[name]
            out[key] = v.copy()
        return out

    def load_state_dict(self, state_dict, strict=True):
        """Copy ``state_dict`` into the parameters and buffers, each value cast to the
        dtype of what it replaces.

        Everything is checked before anything is written: with ``strict`` a missing or
        unexpected key, and always a shape mismatch or a non-numeric value, raises
        ``StateDictError`` and leaves the module unchanged.  Returns
        ``(missing_keys, unexpected_keys)``.
        """
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(f"state_dict: expected a dict of arrays, got "
                            f"{type(state_dict).__name__}")
        slots = list(self._state_slots())
        expected = {key for key, *_ in slots}
        missing = [key for key, *_ in slots if key not in state_dict]
        unexpected = [k for k in state_dict.keys() if k not in expected]
        errors = []
        if strict and missing:
            errors.append("missing key(s): " + ", ".join(repr(k) for k in missing))
        if strict and unexpected:
            errors.append("unexpected key(s): " + ", ".join(repr(k) for k in unexpected))
        staged = []
        for key, owner, kind, name in slots:
            if key not in state_dict:
                continue
            target = owner._parameters[name].data if kind == "param" else owner._buffers[name]
            try:
                value = _as_state_value(state_dict[key])
            except Exception as e:  # an object NumPy cannot convert
                errors.append(f"{key}: could not convert a {type(state_dict[key]).__name__} "
                              f"to an array ({e})")
                continue
            if value.shape != target.shape:
                errors.append(f"size mismatch for {key}: expected shape {target.shape} "
                              f"(the shape in the current model), got {value.shape}")
                continue
            if value.dtype.kind not in "biuf":
                errors.append(f"{key}: expected a real numeric array, got dtype {value.dtype}")
                continue
            staged.append((owner, kind, name, value.astype(target.dtype, copy=True)))
        if errors:
            raise StateDictError(f"Error(s) in loading state_dict for {type(self).__name__} "
                                 f"(nothing was changed):\n  " + "\n  ".join(errors))
        touched = {}
        for owner, kind, name, value in staged:
            target = owner._parameters[name].data if kind == "param" else owner._buffers[name]
            if target.flags.writeable:
                target[...] = value  # in place: optimizers and views keep working
            elif kind == "param":
                owner._parameters[name].data = value
            else:
                owner._buffers[name] = value
            touched[id(owner)] = owner
        for owner in touched.values():
            owner._state_changed()
        return IncompatibleKeys(missing, unexpected)

    # -- printing --------------------------------------------------------------------
    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = []
        for name, m in self._modules.items():
            body = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n" + "\n".join(lines) + "\n)"

    def _check_dtype(self, x):
        """An input of another dtype than the module's parameters and buffers is a
        TypeError (no silent casts).  Modules without any (a norm with affine=False and no
        running statistics) take float32 and float64 alike."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: input: expected a fastnorm.Tensor or a "
                            f"numpy.ndarray, got {type(x).__name__}")
        if x.dtype != self.dtype and self._has_state():
            raise TypeError(f"{type(self).__name__}: input dtype {x.dtype} does not match "
                            f"the module's dtype {self.dtype} (build the module with "
                            f"dtype=np.{x.dtype} or cast the input to {self.dtype})")

    def _has_state(self):
        return (any(p is not None for p in self._parameters.values())
                or any(b is not None for b in self._buffers.values()))


# ----------------------------------------------------------------------- containers ----
class Sequential(Module):
    """Modules applied in order; children are named ``"0"``, ``"1"``, ... (or by the
    keys of an ``OrderedDict``)."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, m in modules[0].items():
                self.add_module(name, m)
        else:
            for i, m in enumerate(modules):
                if not isinstance(m, Module):
                    raise TypeError(f"modules[{i}]: expected a Module, got {type(m).__name__}")
                self.add_module(str(i), m)

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return Sequential(OrderedDict(list(self._modules.items())[idx]))
        n = len(self)
        if not isinstance(idx, numbers.Integral) or not -n <= idx < n:
            raise IndexError(f"index: expected an int in [{-n}, {n}), got {idx!r}")
        return list(self._modules.values())[idx]

    def append(self, module):
        self.add_module(str(len(self)), module)
        return self

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


class Identity(Module):
    """Returns its input."""

    def forward(self, x):
        return x


# ----------------------------------------------------------------- Linear and conv ----
class Linear(Module):
    """y = x @ weight.T + bias; ``weight`` is ``(out_features, in_features)`` as in PyTorch,
    initialised Kaiming-uniform (a = sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)), and the bias
    U(-1/sqrt(in), 1/sqrt(in))."""

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32):
        super().__init__()
        self.in_features = _checks.positive_int(in_features, "in_features")
        self.out_features = _checks.positive_int(out_features, "out_features")
        self.dtype = _dtype(dtype)
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight = Parameter(_uniform(bound, (self.out_features, self.in_features), self.dtype))
        if bias:
            self.bias = Parameter(_uniform(bound, (self.out_features,), self.dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        self._check_dtype(x)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear: input: expected a last dimension of "
                             f"{self.in_features} (in_features), got shape {x.shape}")
        return ops.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Conv2d(Module):
    """2-D convolution; ``weight`` is ``(out, in, kH, kW)`` in both layouts (PyTorch's
    shape), so state dicts do not depend on ``layout``.  Same initialisation as
    PyTorch (fan_in = in * kH * kW)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 bias=True, layout="NCHW", dtype=np.float32):
        super().__init__()
        self.in_channels = _checks.positive_int(in_channels, "in_channels")
        self.out_channels = _checks.positive_int(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"kernel_size, stride, padding: expected kernel_size >= 1, "
                             f"stride >= 1, padding >= 0, got {self.kernel_size}, "
                             f"{self.stride}, {self.padding}")
        self.layout = _checks.layout(layout)
        self.dtype = _dtype(dtype)
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = Parameter(_uniform(
            bound, (self.out_channels, self.in_channels, *self.kernel_size), self.dtype))
        if bias:
            self.bias = Parameter(_uniform(bound, (self.out_channels,), self.dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        self._check_dtype(x)
        c = None if x.ndim != 4 else (x.shape[1] if self.layout == "NCHW" else x.shape[3])
        if c != self.in_channels:
            form = "(N, C, H, W)" if self.layout == "NCHW" else "(N, H, W, C)"
            raise ValueError(f"Conv2d: input: expected a 4-D {self.layout} array {form} with "
                             f"C = {self.in_channels}, got shape {x.shape}")
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.layout)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.bias is None:
            s += ", bias=False"
        return s + (f", layout='{self.layout}'" if self.layout != "NCHW" else "")


class _Pool2d(Module):
    _op = ""  # the name of the op in fastnorm.ops

    def __init__(self, kernel_size, stride=None, padding=0, layout="NCHW"):
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"kernel_size, stride, padding: expected kernel_size >= 1, "
                             f"stride >= 1, padding >= 0, got {self.kernel_size}, "
                             f"{self.stride}, {self.padding}")
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"padding: expected at most half the kernel size "
                             f"{self.kernel_size}, got {self.padding}")
        self.layout = _checks.layout(layout)

    def forward(self, x):
        return getattr(ops, self._op)(x, self.kernel_size, self.stride, self.padding, self.layout)

    def extra_repr(self):
        s = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        return s + (f", layout='{self.layout}'" if self.layout != "NCHW" else "")


class MaxPool2d(_Pool2d):
    """Max pooling over (kH, kW) windows; ``stride`` defaults to ``kernel_size``."""
    _op = "max_pool2d"


class AvgPool2d(_Pool2d):
    """Average pooling over (kH, kW) windows; ``stride`` defaults to ``kernel_size``."""
    _op = "avg_pool2d"


# ----------------------------------------------------------------------- activations ----
class ReLU(Module):
    def forward(self, x):
        return ops.relu(x)


class Sigmoid(Module):
    def forward(self, x):
        return ops.sigmoid(x)


class Tanh(Module):
    def forward(self, x):
        return ops.tanh(x)


class GELU(Module):
    """GELU: the exact erf form (``approximate='none'``, PyTorch's default) or the tanh
    approximation (``approximate='tanh'``)."""

    def __init__(self, approximate="none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        return ops.gelu(x, self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


class Dropout(Module):
    """Zeroes each element with probability ``p`` in training and scales the rest by
    1/(1-p); the identity in eval mode.  Draws from fastnorm's generator."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = _real(p, "p", 0.0, 1.0)

    def forward(self, x):
        return ops.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class Flatten(Module):
    """Flattens dimensions ``start_dim..end_dim``.  The second positional argument is
    ``layout`` (fastnorm's API), so ``end_dim`` is best passed by keyword.  With ``layout="NHWC"`` a
    channels-last input is flattened in PyTorch's (C, H, W) order, so the Linear after
    it takes a PyTorch (NCHW) model's weights unchanged."""

    def __init__(self, start_dim=1, layout="NCHW", end_dim=-1):
        super().__init__()
        for name, v in (("start_dim", start_dim), ("end_dim", end_dim)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name}: expected an int, got {v!r}")
        self.start_dim = int(start_dim)
        self.end_dim = int(end_dim)
        self.layout = _checks.layout(layout)

    def forward(self, x):
        return ops.flatten(x, self.start_dim, self.end_dim, self.layout)

    def extra_repr(self):
        s = f"start_dim={self.start_dim}, end_dim={self.end_dim}"
        return s + (f", layout='{self.layout}'" if self.layout != "NCHW" else "")


# ----------------------------------------------------------------------------- norms ----
def _channels(x, layout):
    return x.shape[1] if layout == "NCHW" else x.shape[-1]


class _NormBase(Module):
    """Shared construction of BatchNorm and InstanceNorm: per-channel affine parameters
    and, with ``track_running_stats``, running buffers and ``num_batches_tracked``."""

    _ranks = ()
    _rank_text = ""

    def __init__(self, num_features, eps, momentum, affine, track_running_stats, layout,
                 dtype):
        super().__init__()
        self.num_features = _checks.positive_int(num_features, "num_features")
        self.eps = _checks.eps(eps)
        self.momentum = None if momentum is None else _checks.momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.layout = _checks.layout(layout)
        self.dtype = _dtype(dtype)
        C = self.num_features
        if self.affine:
            self.weight = Parameter(np.ones(C, self.dtype))
            self.bias = Parameter(np.zeros(C, self.dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", np.zeros(C, self.dtype))
            self.register_buffer("running_var", np.ones(C, self.dtype))
            self.register_buffer("num_batches_tracked", np.array(0, np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0
            self._state_changed()

    def _check_input(self, x):
        self._check_dtype(x)
        if x.ndim not in self._ranks:
            raise ValueError(f"{type(self).__name__}: input: expected {self._rank_text}, got "
                             f"{x.ndim}D input of shape {x.shape}")
        C = _channels(x, self.layout)
        if C != self.num_features:
            raise ValueError(f"{type(self).__name__}: input: expected {self.num_features} "
                             f"channels (num_features, layout {self.layout}), got {C} for "
                             f"shape {x.shape}")

    def extra_repr(self):
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
             f"affine={self.affine}, track_running_stats={self.track_running_stats}")
        return s + (f", layout='{self.layout}'" if self.layout != "NCHW" else "")


class _BatchNorm(_NormBase):
    """BatchNorm over every axis but the channel axis.

    Training normalizes with the batch statistics and moves the running statistics by
    ``momentum`` (``None``: cumulative average, factor 1/num_batches_tracked); eval uses
    the running statistics through a cached float64 (mean, invstd), rebuilt only when a
    training step, ``load_state_dict``, a buffer assignment or a change of ``eps`` has
    touched them.  After editing ``running_mean``/``running_var`` in place by hand, call
    ``reset_running_stats()`` or assign the arrays back to invalidate the cache.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, layout="NCHW", dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, layout,
                         dtype)
        self._stats_version = 0
        self._fold = None  # ((version, eps), mean float64, invstd float64)

    def _state_changed(self):
        d = self.__dict__
        d["_stats_version"] = d.get("_stats_version", 0) + 1
        if not d.get("training", True) and "_fold" in d:
            self._prefold()

    def train(self, mode=True):
        super().train(mode)
        if not mode:
            self._prefold()
        return self

    def _prefold(self):
        """Fold the running statistics now (eval mode), so that eval forwards only read
        the cache: a model shared by threads is not written by its predictions."""
        if self._buffers.get("running_mean") is not None:
            try:
                self._folded()
            except (ValueError, TypeError, AttributeError):
                pass  # a bad eps or buffer: the forward reports it

    def _folded(self):
        key = (self._stats_version, self.eps)
        fold = self._fold
        if fold is None or fold[0] != key:
            eps = _checks.eps(self.eps)
            mean = self.running_mean.astype(np.float64)
            invstd = 1.0 / np.sqrt(self.running_var.astype(np.float64) + eps)
            fold = self._fold = (key, mean, invstd)
        return fold[1], fold[2]

    def forward(self, x):
        self._check_input(x)
        w, b = self._parameters["weight"], self._parameters["bias"]
        if self.training and self.track_running_stats:
            buffers = self._buffers  # (not through __getattr__: ~0.6 us per lookup)
            nbt = buffers["num_batches_tracked"]
            factor = 1.0 / float(nbt + 1) if self.momentum is None else self.momentum
            y = ops.batch_norm(x, buffers["running_mean"], buffers["running_var"], w, b, True,
                               factor, self.eps, self.layout)
            # Only after the op succeeded: a rejected call changes nothing.
            nbt[...] = nbt + 1
            self._state_changed()
            return y
        if self.training or self._buffers["running_mean"] is None:
            # No running statistics (track_running_stats=False): batch statistics, as torch.
            return ops.batch_norm(x, None, None, w, b, True, 0.0, self.eps, self.layout)
        mean, invstd = self._folded()
        if not _records(x, w, b):  # nothing to record: the kernel directly, no op machinery
            y = norms.batch_norm_eval_fast(x.data, mean, invstd, None if w is None else w.data,
                                           None if b is None else b.data, self.layout)
            if y is not None:
                return Tensor(y)
        return ops.BatchNormEval.apply(x, w, b, mean=mean, invstd=invstd, layout=self.layout)


class BatchNorm1d(_BatchNorm):
    """BatchNorm over (N, C) or (N, C, L) (NHWC: (N, L, C))."""
    _ranks = (2, 3)
    _rank_text = "2D or 3D input"


class BatchNorm2d(_BatchNorm):
    """BatchNorm over (N, C, H, W) (NHWC: (N, H, W, C))."""
    _ranks = (4,)
    _rank_text = "4D input"


class BatchNorm3d(_BatchNorm):
    """BatchNorm over (N, C, D, H, W) (NHWC: (N, D, H, W, C))."""
    _ranks = (5,)
    _rank_text = "5D input"


class _InstanceNorm(_NormBase):
    """InstanceNorm: statistics per (sample, channel); with ``track_running_stats`` the
    running buffers follow their batch average in training and are used in eval (as
    PyTorch; ``num_batches_tracked`` is kept for state-dict compatibility only).
    Unbatched input (one rank lower) is accepted as in PyTorch."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, layout="NCHW", dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, layout,
                         dtype)

    def forward(self, x):
        unbatched = x.ndim == self._ranks[0]
        if unbatched:
            x = x.reshape(1, *x.shape)
        self._check_input(x)
        use_input_stats = self.training or not self.track_running_stats
        y = ops.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                              use_input_stats,
                              0.0 if self.momentum is None else self.momentum,
                              self.eps, self.layout)
        return y.reshape(*y.shape[1:]) if unbatched else y


class InstanceNorm1d(_InstanceNorm):
    """InstanceNorm over (N, C, L) (NHWC: (N, L, C)), or unbatched (C, L)."""
    _ranks = (2, 3)
    _rank_text = "2D (unbatched) or 3D input"


class InstanceNorm2d(_InstanceNorm):
    """InstanceNorm over (N, C, H, W) (NHWC: (N, H, W, C)), or unbatched (C, H, W)."""
    _ranks = (3, 4)
    _rank_text = "3D (unbatched) or 4D input"


def _normalized_shape(shape):
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"normalized_shape: expected an int or a tuple of ints, got "
                        f"{shape!r}") from None
    if not shape or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                            and s > 0 for s in shape):
        raise ValueError(f"normalized_shape: expected a non-empty tuple of positive ints, "
                         f"got {shape!r}")
    return tuple(int(s) for s in shape)


class LayerNorm(Module):
    """LayerNorm over the trailing ``normalized_shape``, with elementwise weight (ones)
    and bias (zeros) of that shape."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 dtype=np.float32):
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = _checks.eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self.dtype = _dtype(dtype)
        if self.elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape, self.dtype))
        else:
            self.register_parameter("weight", None)
        if self.elementwise_affine and bias:
            self.bias = Parameter(np.zeros(self.normalized_shape, self.dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        self._check_dtype(x)
        return ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class RMSNorm(Module):
    """RMSNorm over the trailing ``normalized_shape`` (eps=None: the dtype's machine
    epsilon, as PyTorch), with an elementwise weight (ones)."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, dtype=np.float32):
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = None if eps is None else _checks.eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self.dtype = _dtype(dtype)
        if self.elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape, self.dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x):
        self._check_dtype(x)
        return ops.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class GroupNorm(Module):
    """GroupNorm: statistics per (sample, group of num_channels/num_groups channels),
    per-channel weight (ones) and bias (zeros)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, layout="NCHW",
                 dtype=np.float32):
        super().__init__()
        self.num_groups = _checks.positive_int(num_groups, "num_groups")
        self.num_channels = _checks.positive_int(num_channels, "num_channels")
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_channels: expected a multiple of num_groups "
                             f"({self.num_groups}), got {self.num_channels}")
        self.eps = _checks.eps(eps)
        self.affine = bool(affine)
        self.layout = _checks.layout(layout)
        self.dtype = _dtype(dtype)
        if self.affine:
            self.weight = Parameter(np.ones(self.num_channels, self.dtype))
            self.bias = Parameter(np.zeros(self.num_channels, self.dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        self._check_dtype(x)
        if x.ndim < 2 or _channels(x, self.layout) != self.num_channels:
            raise ValueError(f"GroupNorm: input: expected at least 2 dimensions with "
                             f"{self.num_channels} channels (layout {self.layout}), got "
                             f"shape {x.shape}")
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                              self.layout)

    def extra_repr(self):
        s = f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
        return s + (f", layout='{self.layout}'" if self.layout != "NCHW" else "")


# ------------------------------------------------------------------------ inference ----
class ChannelAffine(Module):
    """y = x * scale + shift per channel (what an eval-mode BatchNorm is); ``fuse``
    puts one where a BatchNorm has no Linear/Conv2d before it to fold into.  ``scale``
    and ``shift`` are buffers."""

    def __init__(self, scale, shift, layout="NCHW", dtype=np.float32):
        super().__init__()
        self.dtype = _dtype(dtype)
        self.layout = _checks.layout(layout)
        scale = np.asarray(scale, self.dtype).reshape(-1)
        shift = np.asarray(shift, self.dtype).reshape(-1)
        if scale.shape != shift.shape:
            raise ValueError(f"shift: expected shape {scale.shape} (the shape of scale), "
                             f"got {shift.shape}")
        self.num_features = scale.size
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self._zeros = np.zeros(scale.size)
        self._ones = np.ones(scale.size)

    def forward(self, x):
        self._check_dtype(x)
        if x.ndim < 2 or _channels(x, self.layout) != self.num_features:
            raise ValueError(f"ChannelAffine: input: expected at least 2 dimensions with "
                             f"{self.num_features} channels (layout {self.layout}), got "
                             f"shape {x.shape}")
        buffers = self._buffers
        if not _records(x, None, None):  # nothing to record: the kernel directly
            y = norms.batch_norm_eval_fast(x.data, self._zeros, self._ones, buffers["scale"],
                                           buffers["shift"], self.layout)
            if y is not None:
                return Tensor(y)
        return ops.BatchNormEval.apply(x, buffers["scale"], buffers["shift"],
                                       mean=self._zeros, invstd=self._ones, layout=self.layout)

    def extra_repr(self):
        s = f"{self.num_features}"
        return s + (f", layout='{self.layout}'" if self.layout != "NCHW" else "")


def __getattr__(name):
    # SyncBatchNorm lives in fastnorm.distributed (MPI is an optional extra); importing it
    # on first use also avoids a cycle, since it subclasses _BatchNorm.
    if name == "SyncBatchNorm":
        from .distributed import SyncBatchNorm
        return SyncBatchNorm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
