"""The one registry of differentiable ops: each op's forward and backward side by side.

An op is a ``Function`` subclass registered under a name::

    @register("exp")
    class Exp(Function):
        @staticmethod
        def forward(ctx, x):            # ndarrays in (Tensors already unwrapped)
            out = np.exp(x)
            ctx.save_for_backward(out)  # only what backward needs
            return out                  # one ndarray out
        @staticmethod
        def backward(ctx, grad):        # d(loss)/d(out), the shape of out
            out, = ctx.saved
            return grad * out,          # one gradient (or None) per positional input

    exp = Exp.apply

``Function.apply(*inputs, **params)`` unwraps Tensors, runs ``forward`` and records the op
on the tape (``fastnorm.autograd``) when grad mode is on and an input requires grad.
Positional arguments are the inputs: Tensors, or constants (ndarrays, Python scalars,
None) that get no gradient; keyword arguments are plain parameters.
``ctx.needs_input_grad`` says which gradients backward must produce; the engine checks
each one against its input's shape.  A few public functions (``flatten``, ``dropout``,
``permute``) are compositions of registered ops and need no backward of their own.

The normalizations wrap the fused kernels of ``fastnorm.norms``: forward keeps the
``mean``/``invstd`` the kernel returns, backward hands them to the matching
``*_backward`` kernel, so no statistic is recomputed.
"""
import math
import numbers
import os

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view

from . import _backend, _checks, _config, norms
from ._random import generator
from .autograd import Context, Tensor, is_grad_enabled, record, unbroadcast

try:  # single-pass im2col and max pooling (Cython); the NumPy code below without them
    _infer = _backend.infer_module()
except ImportError:
    _infer = None
_HELPER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

REGISTRY = {}


def register(name):
    """Class decorator: add a Function to the registry under ``name``."""
    def decorate(cls):
        if name in REGISTRY:
            raise ValueError(f"register: an op named {name!r} exists already")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return decorate


def _value(a):
    if isinstance(a, Tensor):
        return a.data
    if isinstance(a, np.generic):  # a NumPy scalar acts like a Python scalar (no upcast)
        return a.item()
    return a


class Function:
    """Base class of the ops: ``forward(ctx, *arrays, **params)`` and
    ``backward(ctx, grad)``, both static; ``apply`` runs and records."""
    name = "function"

    @staticmethod
    def forward(ctx, *args, **params):
        raise NotImplementedError

    @classmethod
    def backward(cls, ctx, grad):
        raise NotImplementedError(f"op {cls.name!r} has no backward")

    @classmethod
    def apply(cls, *args, **params):
        if is_grad_enabled():
            ctx = Context(tuple([isinstance(a, Tensor) and a.requires_grad for a in args]))
        else:
            ctx = Context((False,) * len(args))
        out = cls.forward(ctx, *[a.data if type(a) is Tensor else _value(a) for a in args],
                          **params)
        return record(cls, ctx, args, out)


def _shape(a):
    return np.shape(a)


def _as_tensor(x):
    return x if isinstance(x, Tensor) else Tensor(x)


# ------------------------------------------------------------------ arithmetic ----
@register("add")
class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = _shape(a), _shape(b)
        return np.add(a, b)

    @staticmethod
    def backward(ctx, grad):
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (unbroadcast(grad, sa) if na else None,
                unbroadcast(grad, sb) if nb else None)


@register("sub")
class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = _shape(a), _shape(b)
        return np.subtract(a, b)

    @staticmethod
    def backward(ctx, grad):
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (unbroadcast(grad, sa) if na else None,
                unbroadcast(-grad, sb) if nb else None)


@register("mul")
class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return np.multiply(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        na, nb = ctx.needs_input_grad
        return (unbroadcast(grad * b, _shape(a)) if na else None,
                unbroadcast(grad * a, _shape(b)) if nb else None)


@register("div")
class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return np.divide(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        na, nb = ctx.needs_input_grad
        ga = gb = None
        if na:
            ga = unbroadcast(grad / b, _shape(a))
        if nb:
            gb = unbroadcast(-grad * a / (b * b), _shape(b))
        return ga, gb


@register("neg")
class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        return np.negative(a)

    @staticmethod
    def backward(ctx, grad):
        return -grad,


@register("pow")
class Pow(Function):
    """a ** b; usually b is a Python scalar (then only a gets a gradient)."""

    @staticmethod
    def forward(ctx, a, b):
        out = np.power(a, b)
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, out = ctx.saved
        na, nb = ctx.needs_input_grad
        ga = gb = None
        if na:
            if np.ndim(b) == 0 and b == 0:
                ga = np.zeros_like(grad)
            else:
                ga = unbroadcast(grad * b * np.power(a, b - 1), _shape(a))
        if nb:
            # d(a^b)/db = a^b log a; defined as 0 where a == 0 and b >= 0 (as PyTorch)
            with np.errstate(divide="ignore", invalid="ignore"):
                d = out * np.log(a)
            d = np.where((np.asarray(a) == 0) & (np.asarray(b) >= 0), 0, d)
            gb = unbroadcast(grad * d, _shape(b))
        return ga, gb


def _matmul_shapes(sa, sb):
    if len(sa) == 0 or len(sb) == 0:
        raise ValueError(f"matmul: both operands need at least 1 dimension, got shapes "
                         f"{sa} and {sb}")
    ka = sa[-1]
    kb = sb[-2] if len(sb) >= 2 else sb[0]
    if ka != kb:
        raise ValueError(f"matmul: shapes {sa} and {sb} are not aligned: {ka} (last "
                         f"dimension of the first) != {kb} (the second's "
                         f"{'second to last' if len(sb) >= 2 else 'only'} dimension)")


@register("matmul")
class MatMul(Function):
    """NumPy's matmul: 1-D operands, batched and broadcast stacks."""

    @staticmethod
    def forward(ctx, a, b):
        a, b = np.asarray(a), np.asarray(b)
        _matmul_shapes(a.shape, b.shape)
        try:
            out = np.matmul(a, b)
        except ValueError:
            raise ValueError(f"matmul: the batch dimensions of shapes {a.shape} and "
                             f"{b.shape} do not broadcast") from None
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        na, nb = ctx.needs_input_grad
        # Work with matrices: a 1-D a is a row (1, n), a 1-D b a column (n, 1).
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        g = grad
        if b.ndim == 1:
            g = g[..., None]
        if a.ndim == 1:
            g = g[..., None, :]
        ga = gb = None
        if na:
            ga = unbroadcast(np.matmul(g, np.swapaxes(b2, -1, -2)), a2.shape).reshape(a.shape)
        if nb:
            gb = unbroadcast(np.matmul(np.swapaxes(a2, -1, -2), g), b2.shape).reshape(b.shape)
        return ga, gb


def add(a, b): return Add.apply(a, b)
def sub(a, b): return Sub.apply(a, b)
def mul(a, b): return Mul.apply(a, b)
def div(a, b): return Div.apply(a, b)
def neg(a): return Neg.apply(a)
def pow(a, b): return Pow.apply(a, b)  # noqa: A001 (the op's name)
def matmul(a, b): return MatMul.apply(a, b)


# ------------------------------------------------------------------ reductions ----
def _norm_axes(axis, ndim):
    """A tuple of non-negative axes (all axes for None)."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    out = []
    for ax in axes:
        if not -ndim <= ax < max(ndim, 1):
            raise ValueError(f"axis: {ax} is out of range for a tensor of {ndim} "
                             f"dimensions")
        out.append(ax % ndim if ndim else 0)
    return tuple(sorted(set(out)))


def _expand(grad, shape, axes, keepdims):
    """Broadcast a reduction's gradient back to the input's shape."""
    if not keepdims and shape:
        grad = np.expand_dims(grad, axes)
    return np.broadcast_to(grad, shape)


@register("sum")
class Sum(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        a = np.asarray(a)
        ctx.shape, ctx.axes, ctx.keepdims = a.shape, _norm_axes(axis, a.ndim), keepdims
        return np.sum(a, axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        return _expand(grad, ctx.shape, ctx.axes, ctx.keepdims),


@register("mean")
class Mean(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        a = np.asarray(a)
        ctx.shape, ctx.axes, ctx.keepdims = a.shape, _norm_axes(axis, a.ndim), keepdims
        ctx.count = math.prod(a.shape[i] for i in ctx.axes)
        return np.mean(a, axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        return _expand(grad / ctx.count, ctx.shape, ctx.axes, ctx.keepdims),


def sum(x, axis=None, keepdims=False):  # noqa: A001
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return Mean.apply(x, axis=axis, keepdims=keepdims)


# --------------------------------------------------------------- shape and views ----
def _shape_args(shape):
    if len(shape) == 1 and not isinstance(shape[0], numbers.Integral):
        shape = tuple(shape[0])
    return tuple(int(s) for s in shape)


@register("reshape")
class Reshape(Function):
    @staticmethod
    def forward(ctx, a, shape):
        a = np.asarray(a)
        ctx.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape a tensor of shape {a.shape} "
                             f"({a.size} elements) into shape {shape}") from None

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape),


@register("transpose")
class Transpose(Function):
    @staticmethod
    def forward(ctx, a, axes):
        a = np.asarray(a)
        axes = tuple(reversed(range(a.ndim))) if axes is None else axes
        if sorted(ax % a.ndim if a.ndim else ax for ax in axes) != list(range(a.ndim)):
            raise ValueError(f"transpose: axes {axes} are not a permutation of the "
                             f"{a.ndim} axes of a tensor of shape {a.shape}")
        ctx.axes = axes
        return np.transpose(a, axes)

    @staticmethod
    def backward(ctx, grad):
        return np.transpose(grad, np.argsort(ctx.axes)),


def reshape(x, *shape):
    """``x.reshape(2, 3)`` or ``reshape(x, (2, 3))``; one -1 is inferred."""
    return Reshape.apply(x, shape=_shape_args(shape))


def transpose(x, *axes):
    """NumPy's transpose: ``axes`` permutes all axes (none given: reversed)."""
    axes = _shape_args(axes) if axes else None
    return Transpose.apply(x, axes=axes)


permute = transpose


def _is_basic_index(index):
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (slice, type(None), type(Ellipsis)))
               or (isinstance(i, numbers.Integral) and not isinstance(i, (bool, np.bool_)))
               for i in items)


@register("getitem")
class GetItem(Function):
    """``x[index]``: basic indexing (ints, slices, Ellipsis, None) returns a view; integer
    arrays and boolean masks also work (their gradient is scattered with ``add.at``)."""

    @staticmethod
    def forward(ctx, a, index):
        a = np.asarray(a)
        ctx.shape, ctx.dtype, ctx.index = a.shape, a.dtype, index
        return np.asarray(a[index])

    @staticmethod
    def backward(ctx, grad):
        out = np.zeros(ctx.shape, grad.dtype)
        if _is_basic_index(ctx.index):
            out[ctx.index] = grad
        else:
            np.add.at(out, ctx.index, grad)
        return out,


def getitem(x, index):
    if isinstance(index, tuple):
        index = tuple(_value(i) for i in index)
    else:
        index = _value(index)
    return GetItem.apply(x, index=index)


@register("concatenate")
class Concatenate(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        arrays = [np.asarray(a) for a in arrays]
        out = np.concatenate(arrays, axis=axis)
        ctx.axis = axis % out.ndim
        ctx.sizes = [a.shape[ctx.axis] for a in arrays]
        return out

    @staticmethod
    def backward(ctx, grad):
        return tuple(np.split(grad, np.cumsum(ctx.sizes)[:-1], axis=ctx.axis))


def concatenate(tensors, axis=0):
    """Join Tensors (or arrays) along an existing axis (``np.concatenate``, ``torch.cat``)."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concatenate: expected at least one tensor, got none")
    return Concatenate.apply(*tensors, axis=axis)


@register("flatten_channels_first")
class FlattenChannelsFirst(Function):
    """(N, *spatial, C) -> (N, C * prod(spatial)) in channels-first order: the flatten
    of a channels-last tensor as one copy each way, the gradient returned contiguous in
    the input's layout (a transpose then a reshape, as two ops, cost ~40 us per step of
    the digits CNN against ~20, the next op's copy of the strided gradient included).
    Each sample is one matrix transpose; for C-contiguous float arrays the Cython helper
    (``sample_transpose``) does it: (32,4,4,32) forward 7.5 -> 1.9 us, backward 6.5 -> 1.8
    us against NumPy's strided copy, in a loop (15 and 9.5 us inside a training step)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        out = np.empty((x.shape[0], math.prod(x.shape[1:])), x.dtype)
        if _contiguous_float(x):
            _infer.sample_transpose(x, out, math.prod(x.shape[1:-1]), x.shape[-1])
        else:
            order = (0, x.ndim - 1, *range(1, x.ndim - 1))
            np.copyto(out.reshape([x.shape[i] for i in order]), np.transpose(x, order))
        return out

    @staticmethod
    def backward(ctx, grad):
        shape = ctx.shape
        gx = np.empty(shape, grad.dtype)
        if _contiguous_float(grad):
            _infer.sample_transpose(grad, gx, shape[-1], math.prod(shape[1:-1]))
        else:
            order = (0, *range(2, len(shape)), 1)  # channels-first back to channels-last
            np.copyto(gx, np.transpose(grad.reshape((shape[0], shape[-1], *shape[1:-1])),
                                       order))
        return gx,


def flatten(x, start_dim=0, end_dim=-1, layout="NCHW"):
    """Merge axes ``start_dim..end_dim`` into one (``torch.flatten``).

    ``layout="NHWC"`` reads ``x`` as channels-last and flattens in PyTorch's channels-first
    order: the channel axis moves to position 1 first, so ``(N, H, W, C)`` flattens to the
    ``C, H, W`` order of the same model in NCHW (and a PyTorch Linear after it loads as is).
    """
    x = _as_tensor(x)
    layout = _checks.layout(layout)
    if layout == "NHWC" and x.ndim > 2:
        if start_dim % x.ndim == 1 and end_dim % x.ndim == x.ndim - 1:  # nn.Flatten's
            return FlattenChannelsFirst.apply(x)
        x = transpose(x, (0, x.ndim - 1, *range(1, x.ndim - 1)))
    if x.ndim == 0:
        return reshape(x, (1,))
    start, end = start_dim % x.ndim, end_dim % x.ndim
    if start > end:
        raise ValueError(f"flatten: start_dim ({start_dim}) comes after end_dim "
                         f"({end_dim}) for a tensor of shape {x.shape}")
    shape = x.shape[:start] + (math.prod(x.shape[start:end + 1]),) + x.shape[end + 1:]
    return reshape(x, shape)


# ----------------------------------------------------------------- elementwise ----
@register("exp")
class Exp(Function):
    @staticmethod
    def forward(ctx, x):
        out = np.exp(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, = ctx.saved
        return grad * out,


@register("log")
class Log(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return np.log(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved
        return grad / x,


def _contiguous_float(*arrays):
    """True when the Cython helpers can take these arrays as they are: C-contiguous
    ndarrays of one float dtype."""
    dtype = arrays[0].dtype if isinstance(arrays[0], np.ndarray) else None
    return _infer is not None and dtype in _HELPER_DTYPES and all(
        isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous
        for a in arrays)


@register("relu")
class ReLU(Function):
    """``torch.relu``: 0 where x < 0, else x (NaN and -0.0 stay); the gradient passes
    where the output is not <= 0 (so also at a NaN), as PyTorch's threshold_backward.
    One pass of the Cython helper (on the threads from PARALLEL_MIN_ELEMENTS values) for
    C-contiguous float arrays: (32,32,8,8) forward 25 -> 7 us, backward 20 -> 6 us against
    ``np.maximum(x, 0)`` and ``grad * (out > 0)``."""

    @staticmethod
    def forward(ctx, x):
        if _contiguous_float(x):
            out = _checks.empty_apart(x.shape, x.dtype, (x,))
            _infer.relu(x, out, _helper_threads(x.size))
        else:
            x = np.asarray(x)
            out = np.where(x < 0, x.dtype.type(0), x) if x.dtype.kind == "f" \
                else np.maximum(x, 0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, = ctx.saved
        if _contiguous_float(grad, out):
            gx = _checks.empty_apart(grad.shape, grad.dtype, (grad, out))
            _infer.relu_backward(grad, out, gx, _helper_threads(grad.size))
            return gx,
        return np.where(out <= 0, np.zeros((), np.result_type(grad)), grad),


@register("sigmoid")
class Sigmoid(Function):
    @staticmethod
    def forward(ctx, x):
        x = np.asarray(x)
        e = np.exp(-np.abs(x))  # never overflows; exact in both tails
        out = np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, = ctx.saved
        return grad * out * (1 - out),


@register("tanh")
class Tanh(Function):
    @staticmethod
    def forward(ctx, x):
        out = np.tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, = ctx.saved
        return grad * (1 - out * out),


def exp(x): return Exp.apply(x)
def log(x): return Log.apply(x)
def relu(x): return ReLU.apply(x)
def sigmoid(x): return Sigmoid.apply(x)
def tanh(x): return Tanh.apply(x)


# -- GELU and the normal CDF ----------------------------------------------------------
# erfc(z) for z >= 0 in three pieces, each a Chebyshev series evaluated by Clenshaw:
#   z < 1:       erfc = 1 - z * A(u),               u = 2 z^2 - 1,   A = erf(z)/z
#   1 <= z < 3:  erfc = exp(-z^2) * B(u),           u = z - 2,       B = erfcx(z)
#   z >= 3:      erfc = exp(-z^2) / z * C(u),       u = 18/z^2 - 1,  C = z erfcx(z)
# The coefficients are Chebyshev interpolants at first-kind nodes, computed with mpmath
# at 40 digits; the max relative error of each series is below 4e-16 (tested against
# math.erf/math.erfc).  NumPy has no erf, and math.erf through np.frompyfunc is ~20x
# slower than these ~20 in-place array passes.
_ERF_A = (0.9754769393826541, -0.14226120510371365, 0.010035582187599796,
          -0.0005768764699767485, 2.741993125219606e-05, -1.1043175507344507e-06,
          3.8488755420345036e-08, -1.1808582533875466e-09, 3.2334215826050907e-11,
          -7.991015947004549e-13, 1.799072511396137e-14, -3.7186354877527125e-16,
          7.103598527027531e-18)
_ERFCX_B = (0.2785389365977923, -0.11964641832736307, 0.02392588774648554,
            -0.004503974067265867, 0.0008045451692536015, -0.00013720361484011932,
            2.244458275373349e-05, -3.535572865202117e-06, 5.380083091307861e-07,
            -7.92969488788695e-08, 1.1346142347924916e-08, -1.579118251021591e-09,
            2.1413966089607892e-10, -2.8336608279151752e-11, 3.663915449263601e-12,
            -4.634539763842976e-13, 5.741110562810474e-14, -6.971613079108963e-15,
            8.306159263442624e-16, -9.7172719436628e-17, 1.1169214862990471e-17,
            -1.2473786561520602e-18)
_ZERFCX_C = (0.5501319107464505, -0.013568417501041386, 0.00046289060810315435,
             -2.4502363267825265e-05, 1.7029763750931283e-06, -1.4357119601213566e-07,
             1.4024823838325175e-08, -1.5412080438577578e-09, 1.8666055976384716e-10,
             -2.4545344734643102e-11, 3.464809288557915e-12, -5.203911397289984e-13,
             8.25728957055683e-14, -1.3762149552114184e-14, 2.3976693297311238e-15,
             -4.3490065765350544e-16, 8.183948275536074e-17, -1.5903432094519447e-17,
             3.060158780320101e-18)


def _chebyshev(coefs, u):
    """sum_k coefs[k] T_k(u) by Clenshaw's recurrence (three buffers, no temporaries)."""
    u2 = 2.0 * u
    b1 = np.full_like(u, coefs[-1])
    b2 = np.zeros_like(u)
    t = np.empty_like(u)
    for c in coefs[-2:0:-1]:
        np.multiply(u2, b1, out=t)
        t -= b2
        t += c
        b2, b1, t = b1, t, b2
    return u * b1 - b2 + coefs[0]


def _exp_minus_square(z):
    """exp(-z*z) without the rounding error of z*z (which exp would amplify by z^2):
    z = hi + lo with hi on a 2^-16 grid, so hi*hi is exact for z < 2^10."""
    hi = np.floor(z * 65536.0) / 65536.0
    lo = z - hi
    return np.exp(-hi * hi) * np.exp(-(2.0 * hi + lo) * lo)


def _erfc_nonnegative(z):
    """erfc(z) for a float64 array z >= 0 (NaN propagates), relative error < 1e-15."""
    out = np.empty_like(z)
    small = ~(z >= 1.0)  # NaN goes here
    large = z >= 3.0
    middle = ~small & ~large
    if small.any():
        zs = z[small]
        out[small] = 1.0 - zs * _chebyshev(_ERF_A, 2.0 * zs * zs - 1.0)
    if middle.any():
        zm = z[middle]
        out[middle] = _exp_minus_square(zm) * _chebyshev(_ERFCX_B, zm - 2.0)
    if large.any():
        zl = z[large]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            val = _exp_minus_square(zl) / zl * _chebyshev(_ZERFCX_C, 18.0 / (zl * zl) - 1.0)
        out[large] = np.where(np.isinf(zl), 0.0, val)
    return out


def erf(x):
    """The error function of an array, in float64 (accurate to a few ulp)."""
    x = np.asarray(x, np.float64)
    z = np.abs(x)
    out = np.sign(x) * (1.0 - _erfc_nonnegative(z))
    small = z < 1.0  # erf = z * A directly: 1 - erfc would lose relative accuracy
    if small.any():
        xs = x[small]
        out[small] = xs * _chebyshev(_ERF_A, 2.0 * xs * xs - 1.0)
    return out


def erfc(x):
    """The complementary error function of an array, in float64 (relative error < 1e-15,
    no cancellation for large x)."""
    x = np.asarray(x, np.float64)
    e = _erfc_nonnegative(np.abs(x))
    return np.where(x < 0, 2.0 - e, e)


_BLOCK = 65536  # elements per block: the ~60 array passes of a block stay in cache (2x)


def normal_cdf(x):
    """Phi(x) = P(N(0, 1) <= x) = erfc(-x / sqrt 2) / 2, in float64; the lower tail keeps
    its relative accuracy."""
    x = np.asarray(x, np.float64)
    if x.size <= _BLOCK:
        return _normal_cdf(x)
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    for start in range(0, flat.size, _BLOCK):
        out[start:start + _BLOCK] = _normal_cdf(flat[start:start + _BLOCK])
    return out.reshape(x.shape)


def _normal_cdf(x):
    half = 0.5 * _erfc_nonnegative(np.abs(x) * math.sqrt(0.5))
    return np.where(x < 0, half, 1.0 - half)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@register("gelu")
class GELU(Function):
    """x * Phi(x) (``approximate="none"``, PyTorch's default) or its tanh approximation
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).  Computed in float64."""

    @staticmethod
    def forward(ctx, x, approximate="none"):
        x = np.asarray(x)
        x64 = x.astype(np.float64, copy=False)
        if approximate == "none":
            cdf = normal_cdf(x64)
            ctx.save_for_backward(x, cdf)
            out = x64 * cdf
        elif approximate == "tanh":
            th = np.tanh(_SQRT_2_OVER_PI * (x64 + 0.044715 * (x64 * x64 * x64)))
            ctx.save_for_backward(x, th)
            out = 0.5 * x64 * (1.0 + th)
        else:
            raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
        ctx.approximate = approximate
        return out.astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved
        x64 = x.astype(np.float64, copy=False)
        if ctx.approximate == "none":
            d = s + x64 * _INV_SQRT_2PI * np.exp(-0.5 * x64 * x64)
        else:
            inner = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x64 * x64)
            d = 0.5 * (1.0 + s) + 0.5 * x64 * (1.0 - s * s) * inner
        return (grad * d).astype(x.dtype, copy=False),


def gelu(x, approximate="none"):
    return GELU.apply(x, approximate=approximate)


# --------------------------------------------------------------------- softmax ----
def _axis_arg(axis, dim):
    return axis if dim is None else dim


@register("softmax")
class Softmax(Function):
    @staticmethod
    def forward(ctx, x, axis=-1):
        x = np.asarray(x)
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        out = e / np.sum(e, axis=axis, keepdims=True)
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, grad):
        out, = ctx.saved
        return out * (grad - np.sum(grad * out, axis=ctx.axis, keepdims=True)),


def _log_softmax(x, axis):
    """x - max - log(sum(exp(x - max))) along ``axis``: NumPy's reductions called directly
    and the last two steps in place (the same values as np.max/np.sum, 2x faster on the
    (32, 10) logits of a training step)."""
    shifted = x - np.maximum.reduce(x, axis=axis, keepdims=True)
    lse = np.add.reduce(np.exp(shifted), axis=axis, keepdims=True)
    if shifted.dtype != lse.dtype:  # integer input: a float result, as NumPy promotes
        return shifted - np.log(lse)
    np.log(lse, out=lse)
    shifted -= lse
    return shifted


@register("log_softmax")
class LogSoftmax(Function):
    @staticmethod
    def forward(ctx, x, axis=-1):
        out = _log_softmax(np.asarray(x), axis)
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, grad):
        out, = ctx.saved
        return grad - np.exp(out) * np.sum(grad, axis=ctx.axis, keepdims=True),


def softmax(x, axis=-1, *, dim=None):
    """exp(x) / sum(exp(x)) along ``axis`` (``dim`` is PyTorch's name for it); stable."""
    return Softmax.apply(x, axis=_axis_arg(axis, dim))


def log_softmax(x, axis=-1, *, dim=None):
    """x - logsumexp(x) along ``axis``; stable."""
    return LogSoftmax.apply(x, axis=_axis_arg(axis, dim))


# ---------------------------------------------------------------------- linear ----
@register("linear")
class Linear(Function):
    """y = x @ weight.T + bias, weight of shape (out_features, in_features)."""

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        x, weight = np.asarray(x), np.asarray(weight)
        if weight.ndim != 2:
            raise ValueError(f"linear: weight must be 2-D (out_features, in_features), "
                             f"got shape {weight.shape}")
        if x.ndim == 0 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: input shape {x.shape} does not match weight shape "
                             f"{weight.shape}: the input's last dimension must be "
                             f"in_features = {weight.shape[1]}")
        if bias is not None and np.shape(bias) != (weight.shape[0],):
            raise ValueError(f"linear: bias must have shape ({weight.shape[0]},) for weight "
                             f"shape {weight.shape}, got {np.shape(bias)}")
        out = np.matmul(x, weight.T)
        if bias is not None:
            out += bias
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved
        nx, nw, nb = ctx.needs_input_grad
        g2 = grad.reshape(-1, weight.shape[0])
        gx = np.matmul(grad, weight) if nx else None
        gw = g2.T @ x.reshape(-1, weight.shape[1]) if nw else None
        gb = g2.sum(axis=0) if nb else None
        return gx, gw, gb


def linear(x, weight, bias=None):
    """``x @ weight.T + bias`` (``torch.nn.functional.linear``)."""
    return Linear.apply(x, weight, bias)


# -------------------------------------------------------- convolution and pooling ----
def _pair(value, name):
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int \
            and type(value[1]) is int:  # the modules' own (already checked) pairs
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value), int(value))
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}") from None
    return a, b


def _spatial_axes(layout):
    return (2, 3) if layout == "NCHW" else (1, 2)


def _pad(x, padding, layout, value=0.0):
    """x with ``padding`` values of ``value`` around the spatial axes (C-contiguous).
    A filled array and one slice assignment: np.pad costs ~20 us of Python per call,
    most of a batch-1 convolution."""
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    ah, aw = _spatial_axes(layout)
    shape = list(x.shape)
    shape[ah] += 2 * ph
    shape[aw] += 2 * pw
    xp = np.zeros(shape, x.dtype) if value == 0 else np.full(shape, value, x.dtype)
    index = [slice(None)] * 4
    index[ah] = slice(ph, ph + x.shape[ah])
    index[aw] = slice(pw, pw + x.shape[aw])
    xp[tuple(index)] = x
    return xp


def _out_size(size, k, s, p, what, name):
    out = (size + 2 * p - k) // s + 1
    if out < 1:
        raise ValueError(f"{name}: {what} {k} with padding {p} does not fit an input of "
                         f"spatial size {size}")
    return out


def _windows(xp, kernel, stride, layout):
    """A read-only strided view of xp with every (kH, kW) window: the layout's axes with
    the spatial ones reduced to (Ho, Wo), then (kH, kW) (``sliding_window_view`` with a
    stride, built directly: 0.7 us instead of ~10 us for a small input)."""
    ah, aw = _spatial_axes(layout)
    (kH, kW), (sh, sw) = kernel, stride
    shape = list(xp.shape)
    shape[ah] = (xp.shape[ah] - kH) // sh + 1
    shape[aw] = (xp.shape[aw] - kW) // sw + 1
    strides = list(xp.strides)
    strides[ah] *= sh
    strides[aw] *= sw
    shape += [kH, kW]
    strides += [xp.strides[ah], xp.strides[aw]]
    if xp.flags.c_contiguous:
        win = np.ndarray(shape, xp.dtype, xp, 0, strides)
        win.flags.writeable = False
        return win
    return as_strided(xp, shape, strides, writeable=False)


def _window_slice(i, j, stride, out_hw, layout):
    """The positions of xp that offset (i, j) of every window reads."""
    index = [slice(None)] * 4
    ah, aw = _spatial_axes(layout)
    index[ah] = slice(i, i + stride[0] * (out_hw[0] - 1) + 1, stride[0])
    index[aw] = slice(j, j + stride[1] * (out_hw[1] - 1) + 1, stride[1])
    return tuple(index)


def _unpad(gxp, padding, layout):
    ph, pw = padding
    if ph == 0 and pw == 0:
        return gxp
    index = [slice(None)] * 4
    ah, aw = _spatial_axes(layout)
    index[ah] = slice(ph, gxp.shape[ah] - ph)
    index[aw] = slice(pw, gxp.shape[aw] - pw)
    return np.ascontiguousarray(gxp[tuple(index)])


def _require_4d(shape, name, layout):
    if len(shape) != 4:
        axes = "N, C, H, W" if layout == "NCHW" else "N, H, W, C"
        raise ValueError(f"{name}: expected a 4-D input ({axes}), got shape {shape}")


def _helper_threads(size):
    """Threads for a Cython helper pass over ``size`` values (im2col, col2im, the batched
    products, max pooling), as the kernels decide theirs: one below
    ``_config.PARALLEL_MIN_ELEMENTS``."""
    return 1 if size < _config.PARALLEL_MIN_ELEMENTS else _config.get_num_threads()


_gemm = None  # batched products on the kernels' threads: None until first tried
_gemm_threads = None  # threadpoolctl's control of the BLAS those products call, if found


def _gemm_ready():
    """True when ``_infer.batched_matmul`` can run: the Cython helpers are built and
    SciPy, imported here on first use, gives BLAS's sgemm/dgemm (scipy.linalg.cython_blas,
    as Numba takes them)."""
    global _gemm, _gemm_threads
    if _gemm is None:
        _gemm = False
        if _infer is not None:
            try:
                from scipy.linalg import cython_blas
                caps = cython_blas.__pyx_capi__
                _infer.set_gemm(caps["sgemm"], caps["dgemm"])
                _gemm = True
            except (ImportError, KeyError, AttributeError):
                pass
            else:
                _gemm_threads = _scipy_blas_controller()
    return _gemm and _infer is not None


def _scipy_blas_controller():
    """threadpoolctl's controller of the BLAS library shipped inside SciPy (the one
    scipy.linalg.cython_blas calls), or None (no threadpoolctl, or a BLAS shared with
    NumPy, whose thread count is then left alone)."""
    try:
        import scipy
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    root = os.path.dirname(os.path.abspath(scipy.__file__))  # its libraries: root + ".libs"
    for lib in ThreadpoolController().lib_controllers:
        if lib.user_api == "blas" and os.path.abspath(lib.filepath).startswith(root):
            return lib
    return None


WGRAD_GROUPS = 4  # partial sums of a convolution's weight gradient (see _bmm)


def _bmm(a, b, ta=False, tb=False, summed=False):
    """op(a) @ op(b) per sample, op transposing the last two axes when asked; 3-D
    operands, or a 2-D one shared by the batch.  With C-contiguous float operands of one
    dtype and SciPy's BLAS, one BLAS call per sample on the kernels' threads
    (``_infer.batched_matmul``): NumPy's matmul makes the same calls one after another on
    one thread, and at (32,16,8,8) -> 32 channels the three products of a convolution
    took 165+233+173 us that way, 83+117+87 us on 2 threads.  Else ``np.matmul``.

    ``summed``: the sum over the samples is wanted (a weight gradient).  The result then
    has fewer matrices to sum: with BLAS, WGRAD_GROUPS partial sums, each over a fixed
    run of samples added by BLAS in order, the same for any thread count ((32,16,8,8) ->
    32 channels: product and sum 138 -> 105 us); else one per sample."""
    A = a.swapaxes(-1, -2) if ta else a
    B = b.swapaxes(-1, -2) if tb else b
    if a.dtype == b.dtype and a.dtype in _HELPER_DTYPES and a.flags.c_contiguous \
            and b.flags.c_contiguous and (a.ndim == 3 or b.ndim == 3) and _gemm_ready():
        n = a.shape[0] if a.ndim == 3 else b.shape[0]
        groups = min(n, WGRAD_GROUPS) if summed else n
        out = np.empty((groups, A.shape[-2], B.shape[-1]), a.dtype)
        _on_threads(_infer.batched_matmul, _helper_threads(out.size * (n // max(groups, 1))),
                    a, b, out, ta, tb, samples=n)
        return out
    return np.matmul(A, B)


def _on_threads(helper, nt, *args, **kwargs):
    """``helper(*args, nthreads=nt, **kwargs)``, a Cython helper making BLAS calls on
    ``nt`` of the kernels' threads.  BLAS's own threads inside ours (OpenBLAS threads a
    product from m*n*k = 256K, the size of one sample's product at (32,16,8,8) -> 32
    channels) would put two threads per core, so SciPy's BLAS runs on one thread around
    the call."""
    ctl = _gemm_threads if nt > 1 else None
    before = ctl.get_num_threads() if ctl is not None else None
    if before is not None and before > 1:
        ctl.set_num_threads(1)
    try:
        return helper(*args, nthreads=nt, **kwargs)
    finally:
        if before is not None and before > 1:
            ctl.set_num_threads(before)


def _im2col(x, kernel, stride, padding, layout, shape):
    """The column matrix of a convolution: NCHW (N, C*kH*kW, Ho*Wo), NHWC
    (N*Ho*Wo, kH*kW*C).  The Cython helper (fastnorm/_ext/_infer.pxi) writes the same
    values in one pass from the unpadded input, 1.1-3.5x faster than padding and copying
    the window view (measured (1,16,8,8) to (8,64,56,56)), its samples on the kernels'
    threads from PARALLEL_MIN_ELEMENTS values; NumPy when it is not built."""
    if _infer is not None and x.dtype in _HELPER_DTYPES:
        cols = np.empty(shape, x.dtype)
        _infer.im2col(x, cols, kernel, stride, padding, layout == "NHWC",
                      _helper_threads(cols.size))
        return cols
    win = _windows(_pad(x, padding, layout), kernel, stride, layout)
    axes = (0, 1, 4, 5, 2, 3) if layout == "NCHW" else (0, 1, 2, 4, 5, 3)
    return win.transpose(axes).reshape(shape)


@register("conv2d")
class Conv2d(Function):
    """2-D cross-correlation (``torch.nn.functional.conv2d``), weight (out, in, kH, kW) in
    both layouts.

    im2col: the column matrix (``_im2col``: one pass of the Cython helper, or a copy of
    the window view of the padded input), one BLAS product per sample.  NCHW: cols (N,
    C*kH*kW, Ho*Wo) and ``W2 @ cols`` batched over N gives (N, O, Ho*Wo), already NCHW;
    NHWC: cols (N*Ho*Wo, kH*kW*C), each sample's (Ho*Wo, kH*kW*C) @ (kH*kW*C, O).  Per
    sample, OpenBLAS (one thread) was 1.2x faster than one product over the batch, and
    for the NCHW weight gradient cols @ g^T with g transposed once was 2x faster than
    g @ cols^T ((32,16,8,8) -> 32 channels: 210 vs 440 us).
    Measured (float32, one BLAS thread, 6 shapes from (32,1,8,8) to (8,64,56,56)): 1.3-2x
    faster than ``np.tensordot``/``einsum`` over the window view, and faster than filling
    the columns with kH*kW slice copies or a single (O, K) @ (K, N*Ho*Wo) product plus a
    transpose.  The columns are kept for the weight gradient (kH*kW times the input's
    memory) rather than rebuilt in backward (10-20% of the backward).  Input gradient:
    the column gradient (W2.T @ g, or g @ W2 per sample in NHWC) scattered back by
    ``col2im`` (Cython); without it, kH*kW strided adds (NCHW) or one product
    g @ W[:, :, i, j] per kernel offset added in place (NHWC).
    """

    @staticmethod
    def forward(ctx, x, weight, bias=None, stride=(1, 1), padding=(0, 0), layout="NCHW"):
        N = x.shape[0]
        O, C, kH, kW = weight.shape
        ah, aw = _spatial_axes(layout)
        H, W = x.shape[ah], x.shape[aw]
        Ho = _out_size(H, kH, stride[0], padding[0], "kernel height", "conv2d")
        Wo = _out_size(W, kW, stride[1], padding[1], "kernel width", "conv2d")
        pointwise = kH == kW == 1 and stride == (1, 1) and padding == (0, 0)
        nx, nw, _ = ctx.needs_input_grad
        if _winograd(weight.shape, stride, padding, (Ho, Wo), nx or nw) \
                and _conv_helpers(x, weight):
            out = Conv2d._forward_winograd(ctx, x, weight, bias, layout, (Ho, Wo))
            if out is not None:
                return out
        if not pointwise and _conv_helpers(x, weight):  # columns and products in one pass
            K, P = C * kH * kW, Ho * Wo
            nhwc = layout == "NHWC"
            cols = np.empty((N * P, K) if nhwc else (N, K, P), x.dtype)
            out = np.empty((N, Ho, Wo, O) if nhwc else (N, O, Ho, Wo), x.dtype)
            w2 = weight.transpose(2, 3, 1, 0).reshape(K, O) if nhwc else weight.reshape(O, K)
            _on_threads(_infer.conv_forward, _helper_threads(max(cols.size, out.size)), x,
                        np.ascontiguousarray(w2), cols, out, (kH, kW), stride, padding, nhwc)
            _add_bias(out, bias, layout)
        elif layout == "NCHW":
            if pointwise:
                cols = x.reshape(N, C, H * W)
            else:
                cols = _im2col(x, (kH, kW), stride, padding, layout, (N, C * kH * kW, Ho * Wo))
            out = _bmm(weight.reshape(O, C * kH * kW), cols).reshape(N, O, Ho, Wo)
            _add_bias(out, bias, layout)
        else:
            if pointwise:
                cols = x.reshape(N * H * W, C)
            else:
                cols = _im2col(x, (kH, kW), stride, padding, layout, (N * Ho * Wo, kH * kW * C))
            w2 = weight.transpose(2, 3, 1, 0).reshape(kH * kW * C, O)
            # one product per sample: 1.2x faster than one (N*Ho*Wo, K) @ (K, O) product
            # here (OpenBLAS, one thread; (32,8,8,16) -> 32 channels: 167 vs 208 us)
            out = _bmm(cols.reshape(N, Ho * Wo, kH * kW * C), w2).reshape(N, Ho, Wo, O)
            _add_bias(out, bias, layout)
        ctx.save_for_backward(cols if nw else None, weight if nx else None)
        ctx.geometry = x.shape, weight.shape, stride, padding, layout, (Ho, Wo)
        ctx.winograd = None
        return out

    @staticmethod
    def _forward_winograd(ctx, x, weight, bias, layout, out_hw):
        """A 3x3 convolution of stride 1 and padding 1 with an even output by Winograd
        F(2x2, 3x3) (``wino_forward``): 16 multiplications per 2x2 output tile and
        channel pair instead of 36.  None when x holds a value that is not finite: the
        transforms would make NaNs of an inf where the direct sum gives inf."""
        N, O = x.shape[0], weight.shape[0]
        nhwc = layout == "NHWC"
        U = _wino_kernels(weight)
        out = np.empty((N, *out_hw, O) if nhwc else (N, O, *out_hw), x.dtype)
        V = _on_threads(_infer.wino_forward, _helper_threads(max(x.size * 4, out.size)), x, U,
                        out, nhwc)
        if V is None:
            return None
        _add_bias(out, bias, layout)
        nx, nw, _ = ctx.needs_input_grad
        ctx.save_for_backward(V if nw else None, U if nx else None)
        ctx.geometry = x.shape, weight.shape, (1, 1), (1, 1), layout, out_hw
        ctx.winograd = x, weight  # for a gradient that is not finite: im2col
        return out

    @staticmethod
    def backward(ctx, grad):
        cols, weight = ctx.saved
        xshape, wshape, stride, padding, layout, out_hw = ctx.geometry
        nx, nw, nb = ctx.needs_input_grad
        O, C, kH, kW = wshape
        N = xshape[0]
        gx = gw = gb = None
        if ctx.winograd is not None:
            return Conv2d._backward_winograd(ctx, grad, nx, nw, nb)
        pointwise = kH == kW == 1 and stride == (1, 1) and padding == (0, 0)
        if nx and not pointwise and _conv_helpers(grad, weight):
            return Conv2d._backward_helpers(ctx, grad, nw, nb)
        if layout == "NCHW":
            g3 = grad.reshape(N, O, out_hw[0] * out_hw[1])
            if nw:  # per sample cols @ g^T: with NumPy, g @ cols^T (a transposed
                # second operand) took twice as long ((32,16,8,8) -> 32: 440 us)
                gw = _kernel_grad(_bmm(cols, g3, tb=True, summed=True).sum(axis=0), wshape,
                                  layout)
            if nb:
                gb = _bias_grad(grad, O, layout)
            if nx and _infer is not None and grad.dtype in _HELPER_DTYPES \
                    and weight.dtype == grad.dtype:  # col2im in C: ~10x the slice adds
                dcols = _bmm(weight.reshape(O, -1), g3, ta=True)  # (N, C*kH*kW, Ho*Wo)
                gx = np.empty(xshape, grad.dtype)
                _infer.col2im(np.ascontiguousarray(dcols), gx, (kH, kW), stride, padding,
                              False, _helper_threads(dcols.size))
            elif nx:
                dcols = np.matmul(weight.reshape(O, -1).T, g3)  # (N, C*kH*kW, Ho*Wo)
                dcols = dcols.reshape(N, C, kH, kW, *out_hw)
                gxp = np.zeros(_padded(xshape, padding, layout), dcols.dtype)
                for i in range(kH):
                    for j in range(kW):
                        gxp[_window_slice(i, j, stride, out_hw, layout)] += dcols[:, :, i, j]
                gx = _unpad(gxp, padding, layout)
        else:
            g2 = grad.reshape(-1, O)
            P = out_hw[0] * out_hw[1]
            g3 = grad.reshape(N, P, O)  # per sample, as in forward
            if nw:
                gw = _bmm(cols.reshape(N, P, kH * kW * C), g3, ta=True, summed=True)
                gw = _kernel_grad(gw.sum(axis=0), wshape, layout)
            if nb:
                gb = _bias_grad(grad, O, layout)
            if nx and _infer is not None and grad.dtype in _HELPER_DTYPES \
                    and weight.dtype == grad.dtype:  # products per sample, col2im in C
                w2 = np.ascontiguousarray(weight.transpose(0, 2, 3, 1))
                w2 = w2.reshape(O, kH * kW * C)
                gx = np.empty(xshape, grad.dtype)
                dcols = _bmm(g3, w2)
                _infer.col2im(dcols, gx, (kH, kW), stride, padding, True,
                              _helper_threads(dcols.size))
            elif nx:
                # One product per kernel offset, added where that offset reads: avoids
                # the (N*Ho*Wo, kH*kW*C) column gradient (faster here, less memory).
                gxp = np.zeros(_padded(xshape, padding, layout), np.result_type(grad, weight))
                for i in range(kH):
                    for j in range(kW):
                        gxp[_window_slice(i, j, stride, out_hw, layout)] += \
                            (g2 @ weight[:, :, i, j]).reshape(N, *out_hw, C)
                gx = _unpad(gxp, padding, layout)
        return gx, gw, gb

    @staticmethod
    def _backward_winograd(ctx, grad, nx, nw, nb):
        V, U = ctx.saved
        xshape, wshape, _, _, layout, out_hw = ctx.geometry
        O, C = wshape[:2]
        N = xshape[0]
        nhwc = layout == "NHWC"
        g = np.ascontiguousarray(grad)
        dU = np.empty((_infer.wino_groups(N, *out_hw), 16, C, O), g.dtype) if nw else None
        gx = np.empty(xshape, g.dtype) if nx else None
        # threads as for the forward: by the transformed values (4x the input's and the
        # output gradient's)
        if not _on_threads(_infer.wino_backward,
                           _helper_threads(4 * N * out_hw[0] * out_hw[1] * (C + O)),
                           g, U, V, gx, dU, nhwc):  # g not finite: im2col's backward
            x, weight = ctx.winograd
            K, P = C * 9, out_hw[0] * out_hw[1]
            cols = _im2col(x, (3, 3), (1, 1), (1, 1), layout,
                           (N * P, K) if nhwc else (N, K, P)) if nw else None
            ctx.save_for_backward(cols, weight)
            ctx.winograd = None
            return Conv2d.backward(ctx, grad)
        gw = _wino_kernel_grad(dU, wshape) if nw else None
        return gx, gw, _bias_grad(g, O, layout) if nb else None

    @staticmethod
    def _backward_helpers(ctx, grad, nw, nb):
        """The input gradient and, when wanted, the weight gradient's partial sums in one
        pass of the Cython helper (``conv_backward``): the same products as the separate
        passes above, so the same values."""
        cols, weight = ctx.saved
        xshape, wshape, stride, padding, layout, out_hw = ctx.geometry
        O, C, kH, kW = wshape
        N, K, P = xshape[0], C * kH * kW, out_hw[0] * out_hw[1]
        nhwc = layout == "NHWC"
        g3 = np.ascontiguousarray(grad).reshape((N, P, O) if nhwc else (N, O, P))
        w2 = weight.transpose(0, 2, 3, 1) if nhwc else weight
        gwp = np.empty((min(N, WGRAD_GROUPS), K, O), grad.dtype) if nw else None
        gx = np.empty(xshape, grad.dtype)
        _on_threads(_infer.conv_backward, _helper_threads(N * K * max(P, O if nw else 0)),
                    g3, cols, np.ascontiguousarray(w2).reshape(O, K), gwp, gx, (kH, kW),
                    stride, padding, nhwc)
        gw = _kernel_grad(gwp.sum(axis=0), wshape, layout) if nw else None
        return gx, gw, _bias_grad(g3, O, layout) if nb else None


def _add_bias(out, bias, layout):
    """out += bias per channel, in place (None: nothing)."""
    if bias is not None:
        out += bias if layout == "NHWC" else bias.reshape(-1, 1, 1)


def _bias_grad(grad, O, layout):
    """A convolution's bias gradient: grad summed over all but its channel axis."""
    if layout == "NHWC":
        return grad.reshape(-1, O).sum(axis=0)
    return grad.reshape(grad.shape[0], O, -1).sum(axis=(0, 2))


def _kernel_grad(gw, wshape, layout):
    """The weight gradient (O, C, kH, kW) from the (K, O) product of the columns and the
    output gradient, K ordered (C, kH, kW) in NCHW, (kH, kW, C) in NHWC."""
    O, C, kH, kW = wshape
    gw = gw.T
    if layout == "NHWC":
        gw = gw.reshape(O, kH, kW, C).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(gw).reshape(wshape)


def _winograd(wshape, stride, padding, out_hw, grad):
    """True for the convolutions ``wino_forward`` computes, 3x3 with stride 1, padding 1
    and an even output height and width (the digits and MNIST nets' layers), where it
    was measured faster than im2col: from 8 input channels, and without gradients on
    images of 100 values and more.  (2 threads, forward + backward, NCHW: (32,16,28,28)
    -> 32 channels 2.0 + 3.8 -> 1.2 + 2.4 ms, (32,32,14,14) -> 64 1.7 + 3.3 -> 0.9 +
    2.6 ms, (32,16,8,8) -> 32 backward 262-322 -> 216-243 us; 1 and 4 channels slower,
    8 even; the forward alone of (8,64,8,8) -> 64 316 -> 430 us.)"""
    return _WINOGRAD and wshape[2] == wshape[3] == 3 and stride == (1, 1) \
        and padding == (1, 1) and out_hw[0] % 2 == 0 and out_hw[1] % 2 == 0 \
        and wshape[1] >= 8 and (grad or out_hw[0] * out_hw[1] >= 100)


_WINOGRAD = True  # False: im2col for every convolution (comparisons, tests)


def _wino_kernels(weight):
    """U (16, C, O), C-contiguous: U[xi, c, o] = (G g[o, c] G^T)[xi] (the Cython helper:
    5.7 us for 32x16 kernels, against 9.1 us for one product with G (x) G in NumPy)."""
    O, C = weight.shape[:2]
    U = np.empty((16, C, O), weight.dtype)
    _infer.wino_kernels(np.ascontiguousarray(weight), U)
    return U


def _wino_kernel_grad(dU, wshape):
    """The kernels' gradient G^T dU G from ``wino_backward``'s per-group partial sums dU
    (groups, 16, C, O), the groups added in order."""
    dw = np.empty(wshape, dU.dtype)
    _infer.wino_kernel_grad(dU, dw)
    return dw


def _conv_helpers(x, weight):
    """True when a convolution's passes can run in the Cython helpers ``conv_forward``
    and ``conv_backward``: columns and products sample by sample in one parallel region
    ((32,16,8,8) -> 32 channels, 2 threads, the passes alternated in one process: NCHW
    forward 141 -> 133 us, backward 281 -> 262 us; NHWC 118 -> 114 and 229 -> 221 us;
    the digits CNN's epoch 34.5-36.3 -> 33.0-34.1 ms NCHW, 32.2-33.1 -> 30.2-31.2 ms
    NHWC).  A schedule handing the items out one by one (static, chunk 1) made the
    parallel regions after it ~190 us slower; the groups are spread among the samples
    instead."""
    return _infer is not None and x.dtype in _HELPER_DTYPES and weight.dtype == x.dtype \
        and _gemm_ready()


def _padded(shape, padding, layout):
    shape = list(shape)
    ah, aw = _spatial_axes(layout)
    shape[ah] += 2 * padding[0]
    shape[aw] += 2 * padding[1]
    return tuple(shape)


def conv2d(x, weight, bias=None, stride=1, padding=0, layout="NCHW"):
    """``torch.nn.functional.conv2d`` (no dilation, groups=1) in either layout; weight is
    (out_channels, in_channels, kH, kW) in both."""
    layout = _checks.layout(layout)
    xs, ws = _shape(_value(x)), _shape(_value(weight))
    _require_4d(xs, "conv2d", layout)
    if len(ws) != 4:
        raise ValueError(f"conv2d: expected a 4-D weight (out_channels, in_channels, kH, kW), "
                         f"got shape {ws}")
    C = xs[1] if layout == "NCHW" else xs[3]
    if C != ws[1]:
        raise ValueError(f"conv2d: input shape {xs} ({layout}, {C} channels) does not match "
                         f"weight shape {ws} ({ws[1]} input channels)")
    if bias is not None and _shape(_value(bias)) != (ws[0],):
        raise ValueError(f"conv2d: bias must have shape ({ws[0]},) for weight shape {ws}, "
                         f"got {_shape(_value(bias))}")
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"conv2d: expected stride >= 1 and padding >= 0, got stride "
                         f"{stride}, padding {padding}")
    return Conv2d.apply(x, weight, bias, stride=stride, padding=padding, layout=layout)


def _pool_args(x, kernel_size, stride, padding, layout, name):
    layout = _checks.layout(layout)
    kernel = _pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else _pair(stride, "stride")
    padding = _pair(padding, "padding")
    if min(kernel) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"{name}: expected kernel_size >= 1, stride >= 1, padding >= 0, got "
                         f"{kernel}, {stride}, {padding}")
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"{name}: padding {padding} should be at most half of the kernel "
                         f"size {kernel}")
    _require_4d(_shape(_value(x)), name, layout)
    return kernel, stride, padding, layout


def _max_of_offsets(xp, kernel, stride, out_hw, layout):
    """Max pooling without the argmax: the elementwise maximum of the kH*kW strided slices
    (offset (i, j) of every window), in window order, so ties keep the first value and a
    NaN anywhere in a window gives NaN, as the argmax path does.  For inference: 5 us
    instead of ~40 us on a (1, 32, 8, 8) input."""
    out = None
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            v = xp[_window_slice(i, j, stride, out_hw, layout)]
            out = np.array(v, order="C") if out is None else np.maximum(out, v, out=out)
    return out


@register("max_pool2d")
class MaxPool2d(Function):
    @staticmethod
    def forward(ctx, x, kernel=(2, 2), stride=(2, 2), padding=(0, 0), layout="NCHW"):
        ah, aw = _spatial_axes(layout)
        out_hw = (_out_size(x.shape[ah], kernel[0], stride[0], padding[0], "kernel height",
                            "max_pool2d"),
                  _out_size(x.shape[aw], kernel[1], stride[1], padding[1], "kernel width",
                            "max_pool2d"))
        ctx.geometry = x.shape, kernel, stride, padding, layout, out_hw
        if not ctx.needs_input_grad[0]:  # no argmax to keep: a running maximum
            if _infer is not None and x.dtype in _HELPER_DTYPES:
                shape = list(x.shape)
                shape[ah], shape[aw] = out_hw
                out = np.empty(shape, x.dtype)
                _infer.max_pool(x, out, kernel, stride, padding, layout == "NHWC")
                return out
            return _max_of_offsets(_pad(x, padding, layout, -np.inf), kernel, stride,
                                   out_hw, layout)
        if _infer is not None and x.dtype in _HELPER_DTYPES:  # C loops: ~10x faster
            shape = list(x.shape)
            shape[ah], shape[aw] = out_hw
            out = np.empty(shape, x.dtype)
            index = np.empty(shape, np.int32)
            _infer.max_pool_argmax(x, out, index, kernel, stride, padding, layout == "NHWC",
                                   _helper_threads(x.size))
            ctx.save_for_backward(index)
            ctx.dtype = x.dtype
            return out
        win = _windows(_pad(x, padding, layout, -np.inf), kernel, stride, layout)
        flat = win.reshape(*win.shape[:4], kernel[0] * kernel[1])
        index = flat.argmax(axis=-1)  # the first maximum, or the first NaN ...
        nan = np.isnan(flat)
        last_nan = flat.shape[-1] - 1 - nan[..., ::-1].argmax(axis=-1)
        index = np.where(nan.any(axis=-1), last_nan, index)  # ... but PyTorch takes the last
        out = np.take_along_axis(flat, index[..., None], axis=-1)[..., 0]
        ctx.save_for_backward(index.astype(np.int32))
        return out

    @staticmethod
    def backward(ctx, grad):
        index, = ctx.saved
        xshape, (kH, kW), stride, padding, layout, out_hw = ctx.geometry
        if index.flags.c_contiguous and getattr(ctx, "dtype", None) is not None:
            gx = np.empty(xshape, ctx.dtype)  # index from max_pool_argmax; zeroed there
            _infer.max_pool_backward(np.ascontiguousarray(grad, ctx.dtype), index, gx,
                                     (kH, kW), stride, padding, layout == "NHWC",
                                     _helper_threads(gx.size))
            return gx,
        gxp = np.zeros(_padded(xshape, padding, layout), grad.dtype)
        for i in range(kH):
            for j in range(kW):
                gxp[_window_slice(i, j, stride, out_hw, layout)] += \
                    np.where(index == i * kW + j, grad, 0)
        return _unpad(gxp, padding, layout),


@register("avg_pool2d")
class AvgPool2d(Function):
    @staticmethod
    def forward(ctx, x, kernel=(2, 2), stride=(2, 2), padding=(0, 0), layout="NCHW",
                count_include_pad=True):
        ah, aw = _spatial_axes(layout)
        H, W = x.shape[ah], x.shape[aw]
        out_hw = (_out_size(H, kernel[0], stride[0], padding[0], "kernel height",
                            "avg_pool2d"),
                  _out_size(W, kernel[1], stride[1], padding[1], "kernel width",
                            "avg_pool2d"))
        win = _windows(_pad(x, padding, layout), kernel, stride, layout)
        if count_include_pad or padding == (0, 0):
            divisor = kernel[0] * kernel[1]
        else:  # how many real (not padding) values each window holds
            ones = np.pad(np.ones((H, W)), ((padding[0],) * 2, (padding[1],) * 2))
            count = sliding_window_view(ones, kernel)[::stride[0], ::stride[1]].sum((-2, -1))
            divisor = (count[None, None] if layout == "NCHW" else count[None, :, :, None])
            divisor = divisor.astype(x.dtype)
        out = win.sum(axis=(-2, -1)) / divisor
        ctx.divisor = divisor
        ctx.geometry = x.shape, kernel, stride, padding, layout, out_hw
        return out.astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx, grad):
        xshape, (kH, kW), stride, padding, layout, out_hw = ctx.geometry
        share = grad / ctx.divisor
        gxp = np.zeros(_padded(xshape, padding, layout), grad.dtype)
        for i in range(kH):
            for j in range(kW):
                gxp[_window_slice(i, j, stride, out_hw, layout)] += share
        return _unpad(gxp, padding, layout),


def max_pool2d(x, kernel_size, stride=None, padding=0, layout="NCHW"):
    """``torch.nn.functional.max_pool2d`` (stride defaults to kernel_size; padding counts
    as -inf) in either layout."""
    kernel, stride, padding, layout = _pool_args(x, kernel_size, stride, padding, layout,
                                                 "max_pool2d")
    return MaxPool2d.apply(x, kernel=kernel, stride=stride, padding=padding, layout=layout)


def avg_pool2d(x, kernel_size, stride=None, padding=0, layout="NCHW", count_include_pad=True):
    """``torch.nn.functional.avg_pool2d`` (stride defaults to kernel_size; padding zeros
    count in the average unless ``count_include_pad=False``) in either layout."""
    kernel, stride, padding, layout = _pool_args(x, kernel_size, stride, padding, layout,
                                                 "avg_pool2d")
    return AvgPool2d.apply(x, kernel=kernel, stride=stride, padding=padding, layout=layout,
                           count_include_pad=bool(count_include_pad))


# --------------------------------------------------------------------- dropout ----
def dropout(x, p=0.5, training=True):
    """Zero each value with probability ``p`` and scale the rest by 1/(1-p) (inverted
    dropout, as PyTorch); the identity when not training or p == 0.  Uses fastnorm's
    generator (``fastnorm.manual_seed``)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be a probability in [0, 1], got {p!r}")
    x = _as_tensor(x)
    if not training or p == 0:
        return x
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
    if p == 1:
        return mul(x, np.zeros(x.shape, dtype))
    keep = generator().random(x.shape, dtype=np.float32 if dtype == np.float32 else np.float64) >= p
    return mul(x, keep.astype(dtype) * dtype.type(1.0 / (1.0 - p)))


# ---------------------------------------------------------------------- losses ----
def _reduction(reduction, name):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{name}: reduction must be 'mean', 'sum' or 'none', got "
                         f"{reduction!r}")
    return reduction


@register("cross_entropy")
class CrossEntropy(Function):
    """Softmax cross-entropy with class indices; the class axis is 1 (or 0 for one
    sample of shape (C,)), as in PyTorch.  With label smoothing e the target
    distribution is (1 - e) * onehot + e / C."""

    @staticmethod
    def forward(ctx, logits, target, reduction="mean", label_smoothing=0.0):
        logits = np.asarray(logits)
        axis = 1 if logits.ndim >= 2 else 0
        lg = logits if logits.ndim <= 2 else \
            np.ascontiguousarray(np.moveaxis(logits, axis, -1))  # classes last, rows
        C = lg.shape[-1]
        if lg.ndim == 2 and _contiguous_float(lg):  # one pass of the Cython helper
            logp = np.empty(lg.shape, lg.dtype)
            loss = np.empty(lg.shape[0], lg.dtype)
            _infer.log_softmax_nll(lg, np.ascontiguousarray(target, np.intp), logp, loss)
        else:
            logp = _log_softmax(lg, -1)
            if logp.ndim == 2:
                picked = logp[np.arange(logp.shape[0]), target]
            else:
                picked = np.take_along_axis(logp, target[..., None].astype(np.intp),
                                            axis=-1)[..., 0]
            loss = -picked
        if label_smoothing:
            loss = (1.0 - label_smoothing) * loss - label_smoothing / C * logp.sum(axis=-1)
        ctx.save_for_backward(logp, target)
        ctx.params = axis, reduction, label_smoothing, loss.size
        if reduction == "mean":
            if loss.dtype in _HELPER_DTYPES and loss.size:  # np.mean's sum and division
                return np.asarray(np.add.reduce(loss, axis=None) / loss.size)
            return np.asarray(loss.mean())
        if reduction == "sum":
            return np.asarray(loss.sum())
        return np.asarray(loss)

    @staticmethod
    def backward(ctx, grad):
        logp, target = ctx.saved
        axis, reduction, eps, count = ctx.params
        C = logp.shape[-1]
        if logp.ndim == 2 and not eps and reduction != "none" and _contiguous_float(logp) \
                and np.ndim(grad) == 0:  # one pass of the Cython helper
            d = np.empty(logp.shape, logp.dtype)
            scale = float(grad) / count if reduction == "mean" else float(grad)
            _infer.softmax_nll_backward(logp, np.ascontiguousarray(target, np.intp), scale, d)
            return d, None
        d = np.exp(logp)  # softmax
        if eps:
            d -= eps / C
        d.reshape(-1, C)[np.arange(target.size), target.reshape(-1)] -= 1.0 - eps
        if reduction == "none":
            d *= grad[..., None]
        else:
            d *= grad / count if reduction == "mean" else grad
        return (d if d.ndim <= 2 else np.moveaxis(d, -1, axis)), None


def cross_entropy(logits, target, reduction="mean", label_smoothing=0.0):
    """``torch.nn.functional.cross_entropy`` with integer class indices: logits (N, C),
    (C,) or (N, C, d1, ...), target of the logits' shape without the class axis."""
    _reduction(reduction, "cross_entropy")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got "
                         f"{label_smoothing!r}")
    ls = _shape(_value(logits))
    t = np.asarray(_value(target))
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must hold integer class indices, got dtype "
                        f"{t.dtype}")
    if len(ls) == 0:
        raise ValueError("cross_entropy: logits must have at least 1 dimension (the "
                         "classes), got a scalar")
    axis = 1 if len(ls) >= 2 else 0
    expected = ls[:axis] + ls[axis + 1:]
    if t.shape != expected:
        raise ValueError(f"cross_entropy: target shape {t.shape} does not match logits shape "
                         f"{ls}: expected {expected} (the logits' shape without the class "
                         f"axis {axis})")
    C = ls[axis]
    if t.size and (t.min() < 0 or t.max() >= C):
        bad = t.min() if t.min() < 0 else t.max()
        raise ValueError(f"cross_entropy: target holds class index {bad}, expected indices "
                         f"in [0, {C}) for {C} classes")
    return CrossEntropy.apply(logits, t, reduction=reduction,
                              label_smoothing=float(label_smoothing))


@register("mse_loss")
class MSELoss(Function):
    @staticmethod
    def forward(ctx, pred, target, reduction="mean"):
        diff = np.subtract(pred, target)
        ctx.save_for_backward(diff)
        ctx.reduction = reduction
        sq = diff * diff
        if reduction == "mean":
            return np.asarray(sq.mean())
        if reduction == "sum":
            return np.asarray(sq.sum())
        return sq

    @staticmethod
    def backward(ctx, grad):
        diff, = ctx.saved
        if ctx.reduction == "none":
            g = 2 * diff * grad
        else:
            g = diff * ((2 / diff.size) * grad if ctx.reduction == "mean" else 2 * grad)
        np_, nt = ctx.needs_input_grad
        return (g if np_ else None), (-g if nt else None)


def mse_loss(pred, target, reduction="mean"):
    """Mean (or sum, or elementwise) squared error; pred and target of the same shape."""
    _reduction(reduction, "mse_loss")
    ps, ts = _shape(_value(pred)), _shape(_value(target))
    if ps != ts:
        raise ValueError(f"mse_loss: pred shape {ps} and target shape {ts} differ")
    return MSELoss.apply(pred, target, reduction=reduction)


# --------------------------------------------------------------- normalizations ----
def _param_grads(ctx):
    """Whether weight or bias (inputs 1 and 2) need a gradient."""
    return any(ctx.needs_input_grad[1:])


def _channel_shape(ndim, layout):
    """Shape that broadcasts a per-channel (C,) vector against x."""
    return (-1,) + (1,) * (ndim - 2) if layout == "NCHW" else (-1,)


def _channel_sum(a, layout):
    axes = tuple(i for i in range(a.ndim) if i != (1 if layout == "NCHW" else a.ndim - 1))
    return a.sum(axis=axes, dtype=np.float64)


def _grads_or_none(ctx, dx, dw, db):
    nx, nw, nb = ctx.needs_input_grad[:3]
    return (dx if nx else None), (dw if nw else None), (db if nb else None)


class _StatisticsNorm(Function):
    """BatchNorm/InstanceNorm with batch statistics: ``_train`` (``norms.*_train``, which
    also updates the running buffers when given) and its fused ``_grad``."""

    @classmethod
    def forward(cls, ctx, x, weight, bias, running_mean=None, running_var=None, momentum=0.1,
                eps=1e-5, layout="NCHW"):
        y, mean, invstd = cls._train(x, weight, bias, eps, layout, running_mean=running_mean,
                                     running_var=running_var, momentum=momentum)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.layout = layout
        return y

    @classmethod
    def backward(cls, ctx, grad):
        x, weight, mean, invstd = ctx.saved
        dx, dw, db = cls._grad(grad, x, mean, invstd, weight, ctx.layout,
                               param_grads=_param_grads(ctx))
        return _grads_or_none(ctx, dx, dw, db)


@register("batch_norm_train")
class BatchNormTrain(_StatisticsNorm):
    """BatchNorm with batch statistics per channel (``norms.batch_norm_train``)."""
    _train = staticmethod(norms.batch_norm_train)
    _grad = staticmethod(norms.batch_norm_backward)


@register("batch_norm_eval")
class BatchNormEval(Function):
    """y = (x - mean) * invstd * weight + bias with fixed per-channel statistics (BatchNorm
    in eval mode, InstanceNorm without input statistics): ``norms.batch_norm_eval``."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean=None, invstd=None, layout="NCHW"):
        y = norms.batch_norm_eval(x, mean, invstd, weight, bias, layout)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.layout = layout
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved
        nx, nw, nb = ctx.needs_input_grad
        shape = _channel_shape(x.ndim, ctx.layout)
        dx = dw = db = None
        if nx:
            scale = invstd if weight is None else invstd * weight
            dx = (grad * scale.reshape(shape)).astype(x.dtype, copy=False)
        if nw:
            xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
            dw = _channel_sum(grad * xhat, ctx.layout).astype(x.dtype)
        if nb:
            db = _channel_sum(grad, ctx.layout).astype(x.dtype)
        return dx, dw, db


def _buffer(b, name, C):
    if b is None:
        return None
    return _checks.buffer(_value(b), name, (C,))


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, layout="NCHW"):
    """``torch.nn.functional.batch_norm`` on Tensors (weight/bias Tensors or None).

    training: batch statistics through the fused kernel; the running buffers (ndarrays,
    optional) move by ``momentum`` towards the batch mean and unbiased variance.  Eval:
    the running statistics (both required).  Gradients for x, weight and bias in both.
    """
    layout = _checks.layout(layout)
    xv = _checks.array(_value(x), "input")
    C = norms.channels(xv, layout)
    rm = _buffer(running_mean, "running_mean", C)
    rv = _buffer(running_var, "running_var", C)
    eps = _checks.eps(eps)
    if training:
        if rm is not None or rv is not None:
            momentum = _checks.momentum(momentum)
        return BatchNormTrain.apply(x, weight, bias, running_mean=rm, running_var=rv,
                                    momentum=momentum, eps=eps, layout=layout)
    mean, invstd = norms.running_stats(rm, rv, C, eps)
    return BatchNormEval.apply(x, weight, bias, mean=mean, invstd=invstd, layout=layout)


@register("layer_norm")
class LayerNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape=None, eps=1e-5):
        y, mean, invstd = norms.layer_norm_train(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.normalized_shape = normalized_shape
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved
        dx, dw, db = norms.layer_norm_backward(grad, x, mean, invstd, ctx.normalized_shape,
                                               weight, param_grads=_param_grads(ctx))
        return _grads_or_none(ctx, dx, dw, db)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm`` on Tensors."""
    return LayerNorm.apply(x, weight, bias, normalized_shape=normalized_shape, eps=eps)


@register("group_norm")
class GroupNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups=1, eps=1e-5, layout="NCHW"):
        y, mean, invstd = norms.group_norm_train(x, num_groups, weight, bias, eps, layout)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.params = num_groups, layout
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved
        num_groups, layout = ctx.params
        dx, dw, db = norms.group_norm_backward(grad, x, mean, invstd, num_groups, weight,
                                               layout, param_grads=_param_grads(ctx))
        return _grads_or_none(ctx, dx, dw, db)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, layout="NCHW"):
    """``torch.nn.functional.group_norm`` on Tensors, in either layout."""
    return GroupNorm.apply(x, weight, bias, num_groups=num_groups, eps=eps, layout=layout)


@register("instance_norm_train")
class InstanceNormTrain(_StatisticsNorm):
    """InstanceNorm with each (sample, channel)'s own statistics; the running buffers,
    when given, move towards the batch average of those statistics (as PyTorch)."""
    _train = staticmethod(norms.instance_norm_train)
    _grad = staticmethod(norms.instance_norm_backward)


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, layout="NCHW"):
    """``torch.nn.functional.instance_norm`` on Tensors: with ``use_input_stats`` each
    (sample, channel) is normalized by its own statistics, otherwise by the running
    buffers (both required)."""
    layout = _checks.layout(layout)
    xv = _checks.array(_value(x), "input", 3)
    C = norms.channels(xv, layout)
    rm = _buffer(running_mean, "running_mean", C)
    rv = _buffer(running_var, "running_var", C)
    eps = _checks.eps(eps)
    if use_input_stats:
        if rm is not None or rv is not None:
            momentum = _checks.momentum(momentum)
        return InstanceNormTrain.apply(x, weight, bias, running_mean=rm, running_var=rv,
                                       momentum=momentum, eps=eps, layout=layout)
    mean, invstd = norms.running_stats(rm, rv, C, eps, "use_input_stats=False")
    return BatchNormEval.apply(x, weight, bias, mean=mean, invstd=invstd, layout=layout)


@register("rms_norm")
class RMSNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, normalized_shape=None, eps=None):
        y, invrms = norms.rms_norm_train(x, normalized_shape, weight, eps)
        ctx.save_for_backward(x, weight, invrms)
        ctx.normalized_shape = normalized_shape
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, invrms = ctx.saved
        dx, dw = norms.rms_norm_backward(grad, x, invrms, ctx.normalized_shape, weight)
        return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None)


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm`` on Tensors (eps=None: the dtype's machine eps)."""
    return RMSNorm.apply(x, weight, normalized_shape=normalized_shape, eps=eps)


__all__ = [
    "REGISTRY", "register", "Function",
    "add", "sub", "mul", "div", "neg", "pow", "matmul", "sum", "mean", "reshape",
    "transpose", "permute", "getitem", "concatenate", "flatten", "exp", "log", "relu",
    "sigmoid", "tanh", "gelu", "softmax", "log_softmax", "linear", "conv2d", "max_pool2d",
    "avg_pool2d", "dropout", "cross_entropy", "mse_loss",
    "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
    "erf", "erfc", "normal_cdf",
]
