"""A small tape-based reverse-mode autograd over NumPy arrays.

The pieces, in the order a training step meets them:

- ``Tensor`` wraps an ndarray (``.data``) and, when it ``requires_grad``, the record of the
  op that produced it.  Operators and methods call the ops of ``fastnorm.ops``, the one
  registry where each op's forward and backward sit side by side; this file never changes
  when an op is added.
- Recording: an op whose inputs include a Tensor that requires grad, run while grad mode
  is on, appends a *record* to the tape: the op, its saved values (``ctx``), where each
  input's gradient goes, and a sequence number.  Records are numbered in execution order,
  so "the tape" is the records sorted by that number.  A record is kept alive only by the
  tensors that depend on it (not by a global list), so a graph nobody calls backward on is
  freed together with its tensors, and threads never share a tape.
- ``backward()`` collects the records reachable from the output (an explicit stack, no
  recursion: a 10,000-op chain is fine), walks them in reverse execution order (every
  consumer of a value runs before its producer) and accumulates gradients; a value used
  twice receives both contributions.  Only leaf tensors that require grad keep ``.grad``.
  Each record's saved values are released as soon as it has run, unless
  ``retain_graph=True``; walking a released record again is a ``RuntimeError``.
- Grad mode (``no_grad``, ``enable_grad``, ``inference_mode``) is thread-local.
"""
import contextlib
import itertools
import threading

import numpy as np

__all__ = ["Tensor", "tensor", "no_grad", "enable_grad", "inference_mode",
           "is_grad_enabled", "set_grad_enabled", "unbroadcast"]


# ------------------------------------------------------------------------ grad mode ----
class _Mode(threading.local):
    enabled = True  # every thread starts with grad enabled

    def __init__(self):
        self.saved = []  # the modes that enclosing ``with`` blocks will restore


_mode = _Mode()


def is_grad_enabled():
    """True when ops record for backward in this thread (the default)."""
    return _mode.enabled


class _GradMode(contextlib.ContextDecorator):
    """Sets grad mode for a ``with`` block or a decorated function, in this thread only.
    The mode to restore is kept per thread, so one instance can be shared by threads and
    nested.  ``new_mode()`` is the mode inside (None: leave it)."""

    def new_mode(self):
        raise NotImplementedError

    def __enter__(self):
        _mode.saved.append(_mode.enabled)
        mode = self.new_mode()
        if mode is not None:
            _mode.enabled = mode
        return self

    def __exit__(self, *exc):
        _mode.enabled = _mode.saved.pop()
        return False


class _NoArgGradMode(_GradMode):
    """Usable as ``with m():``, ``@m()`` and ``@m`` (like PyTorch)."""

    def __new__(cls, func=None):
        self = super().__new__(cls)
        return self(func) if callable(func) else self

    def __init__(self, func=None):
        pass


class no_grad(_NoArgGradMode):
    """Nothing inside is recorded: results do not require grad (like ``torch.no_grad``)."""

    def new_mode(self):
        return False


class enable_grad(_NoArgGradMode):
    """Turn recording back on inside a ``no_grad`` block."""

    def new_mode(self):
        return True


class inference_mode(_GradMode):
    """Like ``no_grad``: nothing is recorded (``torch.inference_mode``); ``mode=False``
    leaves grad mode as it is.  Also a decorator, with or without parentheses."""

    def __new__(cls, mode=True):
        self = super().__new__(cls)
        self.mode = True if callable(mode) else bool(mode)
        return self(mode) if callable(mode) else self

    def __init__(self, mode=True):
        pass

    def new_mode(self):
        return False if self.mode else None


class set_grad_enabled(_GradMode):
    """Set grad mode to ``mode`` for a block (like ``torch.set_grad_enabled``)."""

    def __init__(self, mode):
        self.mode = bool(mode)

    def new_mode(self):
        return self.mode


# ---------------------------------------------------------------------------- tape ----
_sequence = itertools.count()  # next() is atomic in CPython: safe across threads
_SECOND_BACKWARD = (
    "Trying to backward through the graph a second time (or to use values it saved after "
    "they were freed): the values an op saves for backward are freed by .backward(). "
    "Pass retain_graph=True to the first backward() to walk the graph again.")


class Context:
    """What an op's forward leaves for its backward: ``save_for_backward(*values)`` /
    ``saved``, any attribute it sets, and ``needs_input_grad`` (one bool per input)."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad
        self.saved = ()

    def save_for_backward(self, *values):
        self.saved = values


class _Record:
    """One entry of the tape.  ``targets[i]`` is where input i's gradient goes: the
    record that produced it, the leaf Tensor itself, or None (a constant, or a tensor
    that does not require grad).  Intermediate tensors are not referenced, so their data
    is freed as soon as nothing else holds it."""
    __slots__ = ("op", "ctx", "targets", "seq", "shape", "dtype", "__weakref__")

    def __init__(self, op, ctx, targets, shape, dtype):
        self.op, self.ctx, self.targets = op, ctx, targets
        self.seq = next(_sequence)
        self.shape, self.dtype = shape, dtype

    @property
    def name(self):
        return getattr(self.op, "name", getattr(self.op, "__name__", "op"))


_new_tensor = object.__new__


def record(op, ctx, inputs, out):
    """Wrap an op's output array in a Tensor and, if ``ctx.needs_input_grad`` has a True,
    append the op to the tape.  Called by ``fastnorm.ops.Function.apply``."""
    if type(out) is np.ndarray:  # Tensor(out) without __init__'s conversions
        t = _new_tensor(Tensor)
        t.data, t.grad, t._record, t.requires_grad = out, None, None, False
    else:
        t = Tensor(out)
    if True in ctx.needs_input_grad:
        targets = tuple([(a._record if a._record is not None else a) if needs else None
                         for a, needs in zip(inputs, ctx.needs_input_grad)])
        t._record = _Record(op, ctx, targets, t.data.shape, t.data.dtype)
        t.requires_grad = True
    return t


def _graph(root):
    """The records reachable from ``root``, latest first (reverse execution order)."""
    seen = {root}
    stack = [root]
    while stack:
        r = stack.pop()
        for target in r.targets:
            if type(target) is _Record and target not in seen:
                seen.add(target)
                stack.append(target)
    return sorted(seen, key=lambda r: r.seq, reverse=True)


def _checked(grad, shape, dtype, record, i):
    """Input ``i``'s gradient from ``record``'s backward as an ndarray of ``shape`` and
    ``dtype`` (cast if needed); an error names the op and the input."""
    grad = np.asarray(grad)
    if grad.shape != shape:
        raise RuntimeError(f"{record.name}.backward, input {i}: gradient of shape "
                           f"{grad.shape} for a tensor of shape {shape}")
    return grad if grad.dtype == dtype else grad.astype(dtype)


def _accumulate_leaf(leaf, grad):
    if leaf.grad is None:
        leaf.grad = np.array(grad, dtype=leaf.data.dtype, copy=True)  # own it: no aliasing
    else:
        leaf.grad = leaf.grad + grad


def run_backward(root, grad, retain_graph=False):
    """Reverse pass from ``root`` (a Tensor) seeded with ``grad`` (checked by the caller)."""
    start = root._record
    if start is None:  # a leaf: its gradient is the seed
        _accumulate_leaf(root, grad)
        return
    order = _graph(start)
    if any(r.ctx is None for r in order):
        raise RuntimeError(_SECOND_BACKWARD)
    pending = {start: grad}
    for r in order:
        g = pending.pop(r, None)
        ctx = r.ctx
        if not retain_graph:
            r.ctx = None  # release the saved values as soon as possible
        if g is None:  # nothing flowed here (every path to it gave no gradient)
            continue
        grads = r.op.backward(ctx, g)
        if not isinstance(grads, tuple):
            grads = (grads,)
        if len(grads) != len(r.targets):
            raise RuntimeError(f"{r.name}.backward returned {len(grads)} gradients for "
                               f"{len(r.targets)} inputs")
        for i, (target, gi) in enumerate(zip(r.targets, grads)):
            if target is None or gi is None:
                continue
            if type(target) is _Record:
                shape, dtype = target.shape, target.dtype
            else:
                shape, dtype = target.data.shape, target.data.dtype
            if type(gi) is not np.ndarray or gi.shape != shape or gi.dtype != dtype:
                gi = _checked(gi, shape, dtype, r, i)
            if type(target) is _Record:
                prev = pending.get(target)
                pending[target] = gi if prev is None else prev + gi
            else:
                _accumulate_leaf(target, gi)


# -------------------------------------------------------------------------- Tensor ----
def _plain(x):
    return x.data if isinstance(x, Tensor) else x


class Tensor:
    """An ndarray with an optional gradient.

    ``Tensor(data, requires_grad=False, dtype=None)`` wraps ``data`` without copying when
    it already is an ndarray of the dtype (like ``torch.as_tensor``).  Only floating
    point tensors can require grad.  Operators ``+ - * / @ **`` and unary ``-`` work with
    Tensors, ndarrays and Python scalars on either side (non-Tensors are constants); a
    Python scalar never changes the dtype (float32 stays float32).
    """
    __slots__ = ("data", "grad", "requires_grad", "_record", "__weakref__")
    __array_ufunc__ = None  # ndarray (op) Tensor defers to the Tensor's reflected method

    def __init__(self, data, requires_grad=False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        self.data = np.asarray(data, dtype=dtype)
        self.grad = None
        self._record = None
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    # -- basic attributes ----------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)

    @property
    def is_leaf(self):
        return self._record is None

    @property
    def grad_fn(self):
        """Name of the op that produced this tensor (None for a leaf)."""
        return None if self._record is None else self._record.name

    def __len__(self):
        if self.data.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return len(self.data)

    def __array__(self, dtype=None, copy=None):
        """``np.asarray(t)`` gives the data (outside the graph)."""
        if copy:
            return np.array(self.data, dtype=dtype, copy=True)
        return self.data if dtype is None else self.data.astype(dtype, copy=False)

    def __bool__(self):
        if self.data.size != 1:
            raise ValueError(f"the truth value of a tensor of shape {self.data.shape} is "
                             f"ambiguous; use .data.any() or .data.all()")
        return bool(self.data)

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    # Comparisons give boolean tensors outside the graph (as in PyTorch).
    def __eq__(self, other): return Tensor(self.data == _plain(other))
    def __ne__(self, other): return Tensor(self.data != _plain(other))
    def __lt__(self, other): return Tensor(self.data < _plain(other))
    def __le__(self, other): return Tensor(self.data <= _plain(other))
    def __gt__(self, other): return Tensor(self.data > _plain(other))
    def __ge__(self, other): return Tensor(self.data >= _plain(other))
    __hash__ = object.__hash__  # identity, so tensors can key dicts and sets

    def __repr__(self):
        extra = ""
        if self._record is not None:
            extra = f", grad_fn={self.grad_fn}"
        elif self.requires_grad:
            extra = ", requires_grad=True"
        return f"Tensor({self.data!r}{extra})"

    def requires_grad_(self, requires_grad=True):
        """Make this leaf record (or stop recording) the ops that use it; returns self."""
        requires_grad = bool(requires_grad)
        if self._record is not None:
            if not requires_grad:
                raise RuntimeError("requires_grad_(False) on a non-leaf tensor: use "
                                   "detach() to get a tensor outside the graph")
            return self
        if requires_grad and self.data.dtype.kind not in "fc":
            raise TypeError(f"only floating point tensors can require gradients, got "
                            f"dtype {self.data.dtype}")
        self.requires_grad = requires_grad
        return self

    def detach(self):
        """The same data (shared, not copied) as a new tensor outside the graph."""
        return Tensor(self.data)

    def numpy(self):
        """The underlying ndarray (shared, not copied)."""
        return self.data

    def item(self):
        """The value of a one-element tensor as a Python number."""
        if self.data.size != 1:
            raise ValueError(f"item(): expected a tensor with one element, got shape "
                             f"{self.data.shape}")
        return self.data.item()

    def zero_grad(self):
        self.grad = None

    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) . grad into the ``.grad`` of every leaf that requires
        grad.  ``grad`` (an array of this tensor's shape) may be omitted only for a
        one-element tensor, where it is 1."""
        if not self.requires_grad:
            raise RuntimeError("backward(): this tensor does not require grad and has no "
                               "recorded op (was it computed under no_grad, or from "
                               "tensors without requires_grad=True?)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward(): grad can be implicitly created only for "
                                   f"scalar outputs; pass grad= for a tensor of shape "
                                   f"{self.data.shape}")
            grad = np.ones(self.data.shape, self.data.dtype)
        else:
            if isinstance(grad, Tensor):
                grad = grad.data
            grad = np.asarray(grad)
            if grad.shape != self.data.shape:
                raise ValueError(f"backward(): grad must have the shape of the tensor "
                                 f"{self.data.shape}, got {grad.shape}")
            if grad.dtype.kind not in "fc":
                raise TypeError(f"backward(): grad must be a floating point array, got "
                                f"dtype {grad.dtype}")
            grad = grad.astype(self.data.dtype, copy=False)
        run_backward(self, grad, retain_graph)

    # -- operators -----------------------------------------------------------------------
    def __add__(self, other): return _op.add(self, other)
    def __radd__(self, other): return _op.add(other, self)
    def __sub__(self, other): return _op.sub(self, other)
    def __rsub__(self, other): return _op.sub(other, self)
    def __mul__(self, other): return _op.mul(self, other)
    def __rmul__(self, other): return _op.mul(other, self)
    def __truediv__(self, other): return _op.div(self, other)
    def __rtruediv__(self, other): return _op.div(other, self)
    def __matmul__(self, other): return _op.matmul(self, other)
    def __rmatmul__(self, other): return _op.matmul(other, self)
    def __pow__(self, exponent): return _op.pow(self, exponent)
    def __rpow__(self, base): return _op.pow(base, self)
    def __neg__(self): return _op.neg(self)
    def __pos__(self): return self
    def __getitem__(self, index): return _op.getitem(self, index)

    # -- methods -------------------------------------------------------------------------
    def sum(self, axis=None, keepdims=False):
        return _op.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return _op.mean(self, axis, keepdims)

    def reshape(self, *shape):
        return _op.reshape(self, *shape)

    def flatten(self, start_dim=0, end_dim=-1):
        return _op.flatten(self, start_dim, end_dim)

    def transpose(self, *axes):
        """NumPy's transpose: ``axes`` is a permutation of all axes (none: reversed).
        ``swapaxes(a, b)`` is PyTorch's two-axis ``transpose``."""
        return _op.transpose(self, *axes)

    def permute(self, *axes):
        return _op.transpose(self, *axes)

    def swapaxes(self, axis1, axis2):
        perm = list(range(self.ndim))
        perm[axis1], perm[axis2] = perm[axis2], perm[axis1]
        return _op.transpose(self, perm)

    @property
    def T(self):
        return _op.transpose(self)

    def exp(self): return _op.exp(self)
    def log(self): return _op.log(self)
    def relu(self): return _op.relu(self)
    def sigmoid(self): return _op.sigmoid(self)
    def tanh(self): return _op.tanh(self)

    def softmax(self, axis=-1):
        return _op.softmax(self, axis)

    def log_softmax(self, axis=-1):
        return _op.log_softmax(self, axis)


def tensor(data, requires_grad=False, dtype=None):
    """Same as ``Tensor(data, requires_grad, dtype)``."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


# ------------------------------------------------------------------------- helpers ----
def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``: the adjoint of broadcasting an array of ``shape``.
    Leading axes that broadcasting added are summed away, axes of length 1 in ``shape``
    are summed with keepdims."""
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


# The ops registry imports this module, so it is bound last, for the Tensor methods.
from . import ops as _op  # noqa: E402
