"""NumPy reference backend: the formulas of the BatchNorm notes, written to be read.

Statistics are computed in float64 with two passes (mean first, then the mean of the
squared deviations), so this backend is the accuracy yardstick for the others.
See ``fastnorm.kernels`` for the canonical view ``(P, M, G, Kc, Ks)``.
"""
import numpy as np

_REDUCE = (1, 3, 4)  # statistics of group (p, g) run over M, Kc and Ks


def _stats_shape(dims):
    P, M, G, Kc, Ks = dims
    return (P, 1, G, 1, 1)


def _param_shape(dims):
    P, M, G, Kc, Ks = dims
    return (1, 1, G, Kc, 1)


def moments(x, dims, center):
    """mean = E[x], var = E[(x - mean)^2] per group (mean 0 without ``center``)."""
    x5 = x.reshape(dims).astype(np.float64)
    if center:
        mean = x5.mean(axis=_REDUCE, keepdims=True)
    else:
        mean = np.zeros(_stats_shape(dims))
    var = ((x5 - mean) ** 2).mean(axis=_REDUCE, keepdims=True)
    return mean.reshape(-1), var.reshape(-1)


def forward(x, dims, weight, bias, eps, center, y):
    """Batch statistics, then y = (x - mean) / sqrt(var + eps) * weight + bias."""
    mean, var = moments(x, dims, center)
    apply(x, dims, mean, 1.0 / np.sqrt(var + eps), weight, bias, y)
    return mean, var


def apply(x, dims, mean, invstd, weight, bias, y):
    """y = (x - mean) * invstd * weight + bias with the given statistics."""
    x5 = x.reshape(dims).astype(np.float64)
    _affine(x5, mean.reshape(_stats_shape(dims)), invstd.reshape(_stats_shape(dims)),
            weight, bias, dims, y)


def _affine(x5, mean, invstd, weight, bias, dims, y):
    out = (x5 - mean) * invstd
    if weight is not None:
        out = out * weight.astype(np.float64).reshape(_param_shape(dims))
    if bias is not None:
        out = out + bias.astype(np.float64).reshape(_param_shape(dims))
    y.reshape(dims)[...] = out


def grad_sums(dy, x, dims, mean):
    """Per-channel sums of dy and dy * (x - mean), one value per (p, g, kc)."""
    x5 = x.reshape(dims).astype(np.float64)
    dy5 = dy.reshape(dims).astype(np.float64)
    xc = x5 - mean.reshape(_stats_shape(dims))
    return dy5.sum(axis=(1, 4)).reshape(-1), (dy5 * xc).sum(axis=(1, 4)).reshape(-1)


def apply_backward(dy, x, dims, mean, invstd, weight, sum_g, sum_gxc, n, center, dx):
    """dx = invstd * (g - sum_g/n - (x - mean) * invstd^2 * sum_gxc/n), g = dy * weight,
    with given per-group sums over n values."""
    x5 = x.reshape(dims).astype(np.float64)
    dy5 = dy.reshape(dims).astype(np.float64)
    shape = _stats_shape(dims)
    invstd = np.asarray(invstd, np.float64).reshape(shape)
    xc = x5 - np.asarray(mean, np.float64).reshape(shape)
    g = dy5 if weight is None else dy5 * weight.astype(np.float64).reshape(_param_shape(dims))
    grad = g - xc * invstd ** 2 * np.asarray(sum_gxc, np.float64).reshape(shape) / n
    if center:
        grad = grad - np.asarray(sum_g, np.float64).reshape(shape) / n
    dx.reshape(dims)[...] = invstd * grad


def backward(dy, x, dims, mean, invstd, weight, center, dx, param_grads):
    """Closed-form backward of the normalization (see fastnorm.kernels): the per-channel
    sums of ``grad_sums``, weighted into per-group sums of g = dy * weight, then
    ``apply_backward``; dweight = sum(dy * (x - mean) * invstd), dbias = sum(dy)."""
    P, M, G, Kc, Ks = dims
    sdy, sdyxc = (s.reshape(P, G, Kc) for s in grad_sums(dy, x, dims, mean))
    if dx is not None:
        w = 1.0 if weight is None else weight.astype(np.float64).reshape(1, G, Kc)
        apply_backward(dy, x, dims, mean, invstd, weight, (sdy * w).sum(axis=2),
                       (sdyxc * w).sum(axis=2), M * Kc * Ks, center, dx)
    if not param_grads:
        return None, None
    invstd = np.asarray(invstd, np.float64).reshape(P, G, 1)
    return (sdyxc * invstd).sum(axis=0).reshape(-1), sdy.sum(axis=0).reshape(-1)

name = "numpy"
