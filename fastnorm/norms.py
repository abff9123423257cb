"""The five normalizations on NumPy arrays: validation, the canonical view, dispatch.

Each norm is a *view* of its input as ``(P, M, G, Kc, Ks)`` (see ``fastnorm.kernels``) and
the shared forward/apply/backward of the current backend; adding a normalization means
adding a view here.  Functions named ``*_train`` return the saved statistics that the
matching ``*_backward`` consumes, so backward never recomputes them.
"""
import math

import numpy as np

from . import _checks, _config
from ._backend import get_kernels

__all__ = [
    "batch_norm", "batch_norm_train", "batch_norm_backward", "batch_norm_eval",
    "layer_norm", "layer_norm_train", "layer_norm_backward",
    "group_norm", "group_norm_train", "group_norm_backward",
    "instance_norm", "instance_norm_train", "instance_norm_backward",
    "rms_norm", "rms_norm_train", "rms_norm_backward",
]


# ---------------------------------------------------------------------------- views ----
def _spatial(shape, start, stop):
    return math.prod(shape[start:stop])


def channel_view(x, layout):
    """(C, view) with statistics per channel over everything else (BatchNorm)."""
    shape = x.shape
    if layout == "NCHW":
        N, C = shape[0], shape[1]
        return C, (1, N, C, 1, x.size // (N * C) if N * C else _spatial(shape, 2, x.ndim))
    C = shape[-1]
    return C, (1, x.size // C, C, 1, 1)


def group_view(x, layout, G):
    """(C, view) with statistics per (sample, group of C/G channels) (GroupNorm,
    InstanceNorm with G = C)."""
    N = x.shape[0]
    if layout == "NCHW":
        C = x.shape[1]
        return C, (N, 1, G, C // G, _spatial(x.shape, 2, x.ndim))
    C = x.shape[-1]
    return C, (N, _spatial(x.shape, 1, x.ndim - 1), G, C // G, 1)


def row_view(x, normalized_shape):
    """view with statistics per row over the trailing ``normalized_shape`` (LayerNorm,
    RMSNorm); one parameter per value of the row."""
    K = math.prod(normalized_shape)
    return (x.size // K, 1, 1, K, 1)


def channels(x, layout):
    return x.shape[1] if layout == "NCHW" else x.shape[-1]


# ----------------------------------------------------------------------- shared core ----
def _invstd(var, eps):
    return 1.0 / np.sqrt(var + eps)


def _train(x, dims, weight, bias, eps, center, out, running_mean=None, running_var=None,
           momentum=0.1):
    """The training forward: ``(y, mean, invstd)`` with the statistics flat (P*G values)
    in x's dtype (mean None without ``center``); running buffers, when given, move
    towards the statistics averaged over P, the variance unbiased.  The backend's
    ``train_fused`` (one kernel call, no NumPy steps) serves when it has one."""
    y = _checks.out(out, x.shape, x.dtype, apart=(x,))
    P, M, G, Kc, Ks = dims
    k = get_kernels()
    fused = getattr(k, "train_fused", None)
    if fused is not None:
        mean = np.empty(P * G, x.dtype) if center else None
        invstd = np.empty(P * G, x.dtype)
        rm, rv = _contiguous(running_mean), _contiguous(running_var)
        if fused(x, dims, weight, bias, eps, center, y, mean, invstd, rm, rv, momentum):
            if rm is not running_mean:  # a strided view: updated through a copy
                running_mean[...] = rm
            if rv is not running_var:
                running_var[...] = rv
            return y, mean, invstd
    mean, var = k.forward(x, dims, weight, bias, eps, center, y)
    if running_mean is not None or running_var is not None:
        shape = (G,) if P == 1 else (P, G)
        _update_running(running_mean, running_var, mean.reshape(shape), var.reshape(shape),
                        M * Kc * Ks, momentum)
    return y, (mean.astype(x.dtype) if center else None), _invstd(var, eps).astype(x.dtype)


def _apply(x, dims, mean, invstd, weight, bias, out):
    """y with given statistics (P*G values of either float dtype; the backend's
    ``apply_fused`` reads them as they are, ``apply`` takes float64)."""
    y = _checks.out(out, x.shape, x.dtype, apart=(x,))
    k = get_kernels()
    fused = getattr(k, "apply_fused", None)  # one call (compiled backends)
    if fused is not None:
        fused(x, dims, mean, invstd, weight, bias, y)
    else:
        k.apply(x, dims, _stat64(mean), _stat64(invstd), weight, bias, y)
    return y


def _backward(dy, x, dims, mean, invstd, weight, center, out, param_grads):
    dy = _checks.array(dy, "grad_output", 1)
    _checks.same_shape(dy, "grad_output", x)
    if dy.dtype != x.dtype:
        dy = dy.astype(x.dtype)
    dx = _checks.out(out, x.shape, x.dtype, apart=(dy, x))
    k = get_kernels()
    fused = getattr(k, "backward_fused", None)
    if fused is not None:
        nw = dims[2] * dims[3]
        dw = np.empty(nw, x.dtype) if param_grads else None
        db = np.empty(nw, x.dtype) if param_grads else None
        if fused(dy, x, dims, mean, invstd, weight, center, dx, dw, db):
            return dx, dw, db
    mean = np.zeros(invstd.size) if mean is None else _stat64(mean)
    invstd = _stat64(invstd)
    dw, db = k.backward(dy, x, dims, mean, invstd, weight, center, dx, param_grads)
    if not param_grads:
        return dx, None, None
    return dx, dw.astype(x.dtype), db.astype(x.dtype)


def _saved(a, name, n):
    """A saved statistic (mean/invstd) of n values: returned as is when it is a
    C-contiguous float array (the kernels read either dtype), else as float64."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(a).__name__}")
    if a.size != n:
        raise ValueError(f"{name}: expected {n} values, got shape {a.shape}")
    if a.dtype not in _checks.FLOAT_DTYPES or not a.flags.c_contiguous:
        return np.ascontiguousarray(a, np.float64)
    return a


def _contiguous(buffer):
    """A running buffer the kernels can update in place: itself when None or
    C-contiguous, else a contiguous copy."""
    if buffer is None or buffer.flags.c_contiguous:
        return buffer
    return np.ascontiguousarray(buffer)


def _stat64(a):
    return np.ascontiguousarray(a, np.float64).reshape(-1)


def _check_running(running_mean, running_var, C, momentum):
    """Validate optional running buffers (before anything is computed or written)."""
    if running_mean is not None:
        _checks.buffer(running_mean, "running_mean", (C,))
    if running_var is not None:
        _checks.buffer(running_var, "running_var", (C,))
    if running_mean is not None or running_var is not None:
        return _checks.momentum(momentum)
    return momentum


def _update_running(running_mean, running_var, mean, var, n, momentum):
    """running = (1 - momentum) * running + momentum * batch, with the variance unbiased
    by n/(n-1).  ``mean``/``var`` are float64, (C,) or (P, C): rows of per-sample
    statistics (InstanceNorm) are averaged, as PyTorch does."""
    with np.errstate(divide="ignore", invalid="ignore"):
        unbiased = var * (n / (n - 1)) if n > 1 else np.full_like(var, np.nan)
    if mean.ndim == 2:
        mean, unbiased = mean.mean(axis=0), unbiased.mean(axis=0)
    if running_mean is not None:
        running_mean[...] = (1.0 - momentum) * running_mean + momentum * mean
    if running_var is not None:
        running_var[...] = (1.0 - momentum) * running_var + momentum * unbiased


def _check_running_pair(running_mean, running_var, C, mode):
    """Both running buffers, validated, for normalizing with fixed statistics (``mode``
    names the call in the error)."""
    if running_mean is not None:
        _checks.buffer(running_mean, "running_mean", (C,))
    if running_var is not None:
        _checks.buffer(running_var, "running_var", (C,))
    if running_mean is None or running_var is None:
        raise ValueError(f"running_mean, running_var: expected both running buffers when "
                         f"{mode}, got "
                         f"running_mean={'None' if running_mean is None else 'an array'}, "
                         f"running_var={'None' if running_var is None else 'an array'}")


def running_stats(running_mean, running_var, C, eps, mode="training=False"):
    """Validated running buffers as float64 ``(mean, invstd)`` for normalizing with fixed
    statistics; both buffers are required (``mode`` names the call in the error)."""
    _check_running_pair(running_mean, running_var, C, mode)
    return _fixed_stats(running_mean, running_var, eps)


def _fixed_stats(running_mean, running_var, eps):
    """float64 ``(mean, invstd)`` of validated running buffers."""
    return (running_mean.astype(np.float64),
            _invstd(running_var.astype(np.float64), eps))


def _eval(x, dims, C, running_mean, running_var, weight, bias, eps, out, mode):
    """Normalization with the running statistics per channel (BatchNorm in eval,
    InstanceNorm without input statistics): the backend's ``eval_fused`` (one call from
    the buffers) when it has one, else the float64 statistics and ``apply``."""
    _check_running_pair(running_mean, running_var, C, mode)
    y = _checks.out(out, x.shape, x.dtype, apart=(x,))
    fused = getattr(get_kernels(), "eval_fused", None)
    if fused is not None and fused(x, dims, _contiguous(running_mean),
                                   _contiguous(running_var), eps, weight, bias, y):
        return y
    mean, invstd = _fixed_stats(running_mean, running_var, eps)
    return _apply(x, dims, mean, invstd, weight, bias, y)


def _one_value_error(x):
    return ValueError(f"Expected more than 1 value per channel when training, "
                      f"got input size {x.shape}")


# ------------------------------------------------------------------------ BatchNorm ----
def _bn_prepare(x, weight, bias, layout, name="input"):
    layout = _checks.layout(layout)
    x = _checks.array(x, name)
    C = channels(x, layout)
    weight = _checks.param(weight, "weight", (C,), x.dtype)
    bias = _checks.param(bias, "bias", (C,), x.dtype)
    return x, weight, bias, layout, C


_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)


def _as_is(p, dtype, C):
    """A parameter the kernels take as it is: None or a C-contiguous (C,) array of dtype."""
    return p is None or (type(p) is np.ndarray and p.dtype is dtype and p.shape == (C,)
                         and p.flags.c_contiguous)


def _bn_args(x, weight, bias, layout):
    """``(x, weight, bias, layout, C, dims)``: BatchNorm's validated arguments and view.
    Arguments the kernels take as they are (a C-contiguous float32/float64 ndarray with
    values and 2+ dimensions, ``layout`` spelled 'NCHW' or 'NHWC', parameters None or
    C-contiguous ``(C,)`` arrays of x's dtype) are recognised with a few attribute reads
    (~0.4 us instead of ~1.3 us); anything else takes ``_bn_prepare``, which converts or
    raises with the messages naming the argument."""
    if type(x) is np.ndarray and type(layout) is str and x.flags.c_contiguous:
        dt = x.dtype
        shape = x.shape
        size = x.size
        if (dt is _FLOAT32 or dt is _FLOAT64) and len(shape) >= 2 and size:
            if layout == "NCHW":  # channel_view, inlined (calling it costs 0.1-0.4 us here)
                C = shape[1]
                dims = (1, shape[0], C, 1, size // (shape[0] * C))
            elif layout == "NHWC":
                C = shape[-1]
                dims = (1, size // C, C, 1, 1)
            else:
                C = 0
            if C and _as_is(weight, dt, C) and _as_is(bias, dt, C):
                return x, weight, bias, layout, C, dims
    x, weight, bias, layout, C = _bn_prepare(x, weight, bias, layout)
    return (x, weight, bias, layout) + channel_view(x, layout)


def _bn_front(name, *args):
    """The current backend's one-call entry ``name`` (``bn_train``, ``bn_eval``,
    ``bn_backward``, ``row_*``, ``group_*``: Cython, see the end of
    fastnorm/_ext/_kernels.pxi) called with ``args`` and the thread count: its result,
    or None where there is no such entry or it does not take the arguments as they are
    (the validated path then runs)."""
    if not _config.FUSED_PASSES:
        return None
    front = getattr(get_kernels(), name, None)
    return None if front is None else front(*args, _config.get_num_threads())


def batch_norm_train(x, weight=None, bias=None, eps=1e-5, layout="NCHW", out=None, *,
                     running_mean=None, running_var=None, momentum=0.1):
    """BatchNorm with batch statistics; returns ``(y, mean, invstd)``.

    mean = E[x], var = E[(x - mean)^2] (biased) per channel over N and the spatial axes,
    invstd = 1 / sqrt(var + eps), y = (x - mean) * invstd * weight + bias.  Running
    buffers, when given, are updated in place as in ``batch_norm``.
    """
    r = _bn_front("bn_train", x, weight, bias, eps, layout, out, running_mean, running_var,
                  momentum)
    if r is not None:
        return r
    x, weight, bias, layout, C, dims = _bn_args(x, weight, bias, layout)
    eps = _checks.eps(eps)
    momentum = _check_running(running_mean, running_var, C, momentum)
    if x.size == C:
        raise _one_value_error(x)
    return _train(x, dims, weight, bias, eps, True, out, running_mean, running_var, momentum)


def batch_norm_backward(dy, x, mean, invstd, weight=None, layout="NCHW", out=None, *,
                        param_grads=None):
    """Gradients of ``batch_norm_train``; returns ``(dx, dweight, dbias)``.

    With g = dy * weight and m values per channel:
    dx = invstd * (g - sum(g)/m - (x - mean) * invstd^2 * sum(g * (x - mean))/m),
    dweight = sum(dy * (x - mean) * invstd), dbias = sum(dy); both None unless
    ``param_grads`` (default: ``weight is not None``).
    """
    r = _bn_front("bn_backward", dy, x, mean, invstd, weight, layout, out, param_grads)
    if r is not None:
        return r
    x, weight, _, layout, C, dims = _bn_args(x, weight, None, layout)
    if param_grads is None:
        param_grads = weight is not None
    return _backward(dy, x, dims, _saved(mean, "mean", C),
                     _saved(invstd, "invstd", C), weight, True, out, param_grads)


def batch_norm_eval(x, mean, invstd, weight=None, bias=None, layout="NCHW", out=None):
    """y = (x - mean) * invstd * weight + bias with given per-channel statistics
    (the folded inference transform y = a*x + b, a = weight*invstd, b = bias - mean*a)."""
    x, weight, bias, layout, C, dims = _bn_args(x, weight, bias, layout)
    return _apply(x, dims, _saved(mean, "mean", C), _saved(invstd, "invstd", C), weight,
                  bias, out)


def batch_norm_eval_fast(x, mean, invstd, weight, bias, layout):
    """``batch_norm_eval`` for a caller that has validated its arguments (the modules'
    eval path under ``no_grad``/``inference_mode``): ``x`` a float ndarray with ``C``
    channels on the axis that ``layout`` (already 'NCHW' or 'NHWC') names, ``mean`` and
    ``invstd`` float64 ``(C,)``, ``weight``/``bias`` None or ``(C,)`` arrays.  Only the
    cheap checks the kernels rely on are repeated; it returns None when one fails (an
    empty batch, a parameter of another dtype or not contiguous), for the caller to take
    the validated path and its error messages.  Small inputs take the backend's
    ``apply_fused`` (one call, no memoryview arguments) when it has one."""
    dt = x.dtype
    size = x.size
    if size == 0:
        return None
    # parameters the kernels do not take as is: another dtype, or not contiguous
    if weight is not None and ((weight.dtype is not dt and weight.dtype != dt)
                               or not weight.flags.c_contiguous):
        return None
    if bias is not None and ((bias.dtype is not dt and bias.dtype != dt)
                             or not bias.flags.c_contiguous):
        return None
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    shape = x.shape
    if layout == "NCHW":  # channel_view, inlined
        N, C = shape[0], shape[1]
        dims = (1, N, C, 1, size // (N * C))
    else:
        C = shape[-1]
        dims = (1, size // C, C, 1, 1)
    y = np.empty(shape, dt)
    k = get_kernels()
    getattr(k, "apply_fused", k.apply)(x, dims, mean, invstd, weight, bias, y)
    return y


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, layout="NCHW", out=None):
    """``torch.nn.functional.batch_norm`` on NumPy arrays.

    training=True normalizes with batch statistics and, when given, updates the running
    buffers in place (``running = (1 - momentum) * running + momentum * batch``, variance
    unbiased by m/(m-1)); training=False uses the running buffers (both required).
    """
    if training:
        return batch_norm_train(x, weight, bias, eps, layout, out, running_mean=running_mean,
                                running_var=running_var, momentum=momentum)[0]
    y = _bn_front("bn_eval", x, running_mean, running_var, weight, bias, eps, layout, out)
    if y is not None:
        return y
    x, weight, bias, layout, C, dims = _bn_args(x, weight, bias, layout)
    eps = _checks.eps(eps)
    return _eval(x, dims, C, running_mean, running_var, weight, bias, eps, out,
                 "training=False")


# ------------------------------------------------------------------------ LayerNorm ----
def _row_prepare(x, normalized_shape, weight, bias):
    x = _checks.array(x, "input", 1)
    shape = _checks.normalized_shape(normalized_shape, x)
    weight = _checks.param(weight, "weight", shape, x.dtype)
    bias = _checks.param(bias, "bias", shape, x.dtype)
    return x, shape, row_view(x, shape), weight, bias


def layer_norm_train(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the trailing ``normalized_shape``; returns ``(y, mean, invstd)`` with
    one statistic per row (shape ``x.shape[:-len(normalized_shape)]``)."""
    r = _bn_front("row_train", x, normalized_shape, weight, bias, eps, True)
    if r is not None:
        return r
    x, shape, dims, weight, bias = _row_prepare(x, normalized_shape, weight, bias)
    eps = _checks.eps(eps)
    y, mean, invstd = _train(x, dims, _flat(weight), _flat(bias), eps, True, None)
    lead = x.shape[:x.ndim - len(shape)]
    return y, mean.reshape(lead), invstd.reshape(lead)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm`` on NumPy arrays."""
    return layer_norm_train(x, normalized_shape, weight, bias, eps)[0]


def layer_norm_backward(dy, x, mean, invstd, normalized_shape, weight=None, param_grads=None):
    """Gradients of ``layer_norm_train``: ``(dx, dweight, dbias)`` (shaped like the
    normalized shape; None unless ``param_grads``, which defaults to ``weight is not None``)."""
    r = _bn_front("row_backward", dy, x, mean, invstd, normalized_shape, weight, param_grads)
    if r is not None:
        return r
    x, shape, dims, weight, _ = _row_prepare(x, normalized_shape, weight, None)
    if param_grads is None:
        param_grads = weight is not None
    R = dims[0]
    dx, dw, db = _backward(dy, x, dims, _saved(mean, "mean", R),
                           _saved(invstd, "invstd", R), _flat(weight), True, None,
                           param_grads)
    if param_grads:
        dw, db = dw.reshape(shape), db.reshape(shape)
    return dx, dw, db


def _flat(p):
    return None if p is None else p.reshape(-1)


# -------------------------------------------------------------------------- RMSNorm ----
_RMS_EPS = {np.dtype(t): float(np.finfo(t).eps) for t in (np.float32, np.float64)}


def _rms_eps(eps, dtype):
    return float(np.finfo(dtype).eps) if eps is None else _checks.eps(eps)


def rms_norm_train(x, normalized_shape, weight=None, eps=None):
    """RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight over the trailing
    ``normalized_shape`` (eps=None: ``np.finfo(dtype).eps``); returns ``(y, invrms)``."""
    r = _bn_front("row_train", x, normalized_shape, weight, None,
                  _RMS_EPS.get(getattr(x, "dtype", None)) if eps is None else eps, False)
    if r is not None:
        return r
    x, shape, dims, weight, _ = _row_prepare(x, normalized_shape, weight, None)
    eps = _rms_eps(eps, x.dtype)
    y, _, invrms = _train(x, dims, _flat(weight), None, eps, False, None)
    return y, invrms.reshape(x.shape[:x.ndim - len(shape)])


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm`` on NumPy arrays."""
    return rms_norm_train(x, normalized_shape, weight, eps)[0]


def rms_norm_backward(dy, x, invrms, normalized_shape, weight=None):
    """Gradients of ``rms_norm_train``: ``(dx, dweight)``, dweight None without weight.
    dx = invrms * (g - x * invrms^2 * sum(g * x)/K), g = dy * weight."""
    r = _bn_front("row_backward", dy, x, None, invrms, normalized_shape, weight,
                  weight is not None)
    if r is not None:
        return r
    x, shape, dims, weight, _ = _row_prepare(x, normalized_shape, weight, None)
    R = dims[0]
    dx, dw, _ = _backward(dy, x, dims, None, _saved(invrms, "invrms", R),
                          _flat(weight), False, None, weight is not None)
    return dx, (None if dw is None else dw.reshape(shape))


# ------------------------------------------------------------------------ GroupNorm ----
def _group_prepare(x, num_groups, weight, bias, layout, min_ndim=2):
    layout = _checks.layout(layout)
    x = _checks.array(x, "input", min_ndim)
    G = _checks.positive_int(num_groups, "num_groups")
    C = channels(x, layout)
    if C % G:
        raise ValueError(f"num_groups: expected a divisor of the number of channels "
                         f"({C}), got {G}")
    weight = _checks.param(weight, "weight", (C,), x.dtype)
    bias = _checks.param(bias, "bias", (C,), x.dtype)
    return x, layout, G, group_view(x, layout, G)[1], weight, bias


def group_norm_train(x, num_groups, weight=None, bias=None, eps=1e-5, layout="NCHW"):
    """GroupNorm: statistics per (sample, group of C/num_groups channels), per-channel
    affine; returns ``(y, mean, invstd)`` with statistics of shape (N, num_groups)."""
    if type(num_groups) is int:  # (None is InstanceNorm's to the entry)
        r = _bn_front("group_train", x, num_groups, weight, bias, eps, layout, None, None,
                      0.1)
        if r is not None:
            return r
    x, layout, G, dims, weight, bias = _group_prepare(x, num_groups, weight, bias, layout)
    eps = _checks.eps(eps)
    y, mean, invstd = _train(x, dims, weight, bias, eps, True, None)
    N = x.shape[0]
    return y, mean.reshape(N, G), invstd.reshape(N, G)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, layout="NCHW"):
    """``torch.nn.functional.group_norm`` on NumPy arrays, in either layout."""
    return group_norm_train(x, num_groups, weight, bias, eps, layout)[0]


def group_norm_backward(dy, x, mean, invstd, num_groups, weight=None, layout="NCHW",
                        param_grads=None):
    """Gradients of ``group_norm_train``: ``(dx, dweight, dbias)``."""
    if type(num_groups) is int:
        r = _bn_front("group_backward", dy, x, mean, invstd, num_groups, weight, layout,
                      param_grads)
        if r is not None:
            return r
    x, layout, G, dims, weight, _ = _group_prepare(x, num_groups, weight, None, layout)
    if param_grads is None:
        param_grads = weight is not None
    n = x.shape[0] * G
    return _backward(dy, x, dims, _saved(mean, "mean", n),
                     _saved(invstd, "invstd", n), weight, True, None, param_grads)


# --------------------------------------------------------------------- InstanceNorm ----
def _instance_prepare(x, weight, bias, layout):
    layout = _checks.layout(layout)
    x = _checks.array(x, "input", 3)
    C = channels(x, layout)
    weight = _checks.param(weight, "weight", (C,), x.dtype)
    bias = _checks.param(bias, "bias", (C,), x.dtype)
    return x, layout, C, weight, bias


def instance_norm_train(x, weight=None, bias=None, eps=1e-5, layout="NCHW", *,
                        running_mean=None, running_var=None, momentum=0.1):
    """InstanceNorm with the input's statistics (GroupNorm with one channel per group);
    returns ``(y, mean, invstd)`` with statistics of shape (N, C).  Running buffers, when
    given, move towards the batch average of the per-sample statistics (as PyTorch)."""
    r = _bn_front("group_train", x, None, weight, bias, eps, layout, running_mean,
                  running_var, momentum)
    if r is not None:
        return r
    x, layout, C, weight, bias = _instance_prepare(x, weight, bias, layout)
    eps = _checks.eps(eps)
    momentum = _check_running(running_mean, running_var, C, momentum)
    _check_spatial(x, layout)
    y, mean, invstd = _train(x, group_view(x, layout, C)[1], weight, bias, eps, True, None,
                             running_mean, running_var, momentum)
    N = x.shape[0]
    return y, mean.reshape(N, C), invstd.reshape(N, C)


def _check_spatial(x, layout):
    if x.size // (x.shape[0] * channels(x, layout)) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, "
                         f"got input size {x.shape}")


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, layout="NCHW"):
    """``torch.nn.functional.instance_norm`` on NumPy arrays.

    With ``use_input_stats`` each (sample, channel) is normalized with its own statistics
    and the running buffers, when given, move towards their average over the batch
    (variance unbiased); otherwise the running buffers are used (both required).
    """
    if use_input_stats:
        return instance_norm_train(x, weight, bias, eps, layout, running_mean=running_mean,
                                   running_var=running_var, momentum=momentum)[0]
    x, layout, C, weight, bias = _instance_prepare(x, weight, bias, layout)
    eps = _checks.eps(eps)
    # Fixed statistics per channel: the same transform as BatchNorm in eval mode.
    return _eval(x, channel_view(x, layout)[1], C, running_mean, running_var, weight, bias,
                 eps, None, "use_input_stats=False")


def instance_norm_backward(dy, x, mean, invstd, weight=None, layout="NCHW", param_grads=None):
    """Gradients of ``instance_norm_train``: ``(dx, dweight, dbias)``."""
    r = _bn_front("group_backward", dy, x, mean, invstd, None, weight, layout, param_grads)
    if r is not None:
        return r
    x, layout, C, weight, _ = _instance_prepare(x, weight, None, layout)
    if param_grads is None:
        param_grads = weight is not None
    n = x.shape[0] * C
    return _backward(dy, x, group_view(x, layout, C)[1], _saved(mean, "mean", n),
                     _saved(invstd, "invstd", n), weight, True, None, param_grads)
