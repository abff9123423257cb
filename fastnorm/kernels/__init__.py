"""Normalization kernels, one module per backend, all with the same three functions.

Every normalization in fastnorm is the same computation on a *canonical view* of the
input: a C-contiguous array read as five axes ``(P, M, G, Kc, Ks)``

- statistics are taken per ``(p, g)`` over the axes ``M, Kc, Ks``;
- the affine parameters are indexed by ``(g, kc)`` (``C = G * Kc`` channels).

=========================  ===================================
norm and layout            canonical view (P, M, G, Kc, Ks)
=========================  ===================================
BatchNorm NCHW             (1, N, C, 1, H*W)
BatchNorm NHWC             (1, N*H*W, C, 1, 1)
LayerNorm / RMSNorm        (rows, 1, 1, K, 1)
GroupNorm NCHW             (N, 1, G, C/G, H*W)
GroupNorm NHWC             (N, H*W, G, C/G, 1)
InstanceNorm NCHW          (N, 1, C, 1, H*W)
InstanceNorm NHWC          (N, H*W, C, 1, 1)
=========================  ===================================

Each backend module provides (``dims`` is that tuple, ``center=False`` is RMSNorm:
no mean is subtracted and ``var`` is the mean square)::

    forward(x, dims, weight, bias, eps, center, y) -> (mean, var)
        y = (x - mean) / sqrt(var + eps) * weight + bias, with the biased batch
        statistics; mean and var are float64 arrays of P*G values.
    apply(x, dims, mean, invstd, weight, bias, y)
        y = (x - mean) * invstd * weight + bias with given float64 statistics.
    backward(dy, x, dims, mean, invstd, weight, center, dx, param_grads) -> (dweight, dbias)
        dx = invstd * (g - sum(g)/m - (x - mean) * invstd**2 * sum(g * (x - mean))/m),
        g = dy * weight (m values per group; no sum(g) term when center=False);
        dweight = sum(dy * (x - mean) * invstd), dbias = sum(dy) over all but the
        channel, as float64 arrays of G*Kc values (None unless param_grads).

and the steps that the fused passes combine (SyncBatchNorm needs them apart, to reduce
the sums across processes in between)::

    moments(x, dims, center) -> (mean, var)
    grad_sums(dy, x, dims, mean) -> (sum dy, sum dy * (x - mean)) per (p, g, kc)
    apply_backward(dy, x, dims, mean, invstd, weight, sum_g, sum_gxc, n, center, dx)
        dx from given per-group sums of g and g * (x - mean) over n values.

A backend may also offer whole passes in one call, which ``fastnorm.norms`` prefers when
present (the Cython one does; each returns False where it does not serve)::

    train_fused(x, dims, weight, bias, eps, center, y, mean, invstd, running_mean,
                running_var, momentum) -> bool
    backward_fused(dy, x, dims, mean, invstd, weight, center, dx, dweight, dbias) -> bool
    eval_fused(x, dims, mean, var, eps, weight, bias, y) -> bool
    apply_fused(x, dims, mean, invstd, weight, bias, y)

``weight``/``bias`` are ``None`` or contiguous arrays of ``G*Kc`` values of x's dtype.
``numpy`` (reference.py) is the readable reference; ``numba`` and ``cython`` share the
driver in compiled.py, which picks one of two kernel shapes for a view.
"""
