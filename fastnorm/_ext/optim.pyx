# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""One-pass optimizer updates for ``fastnorm.optim``.

An Adam step written with NumPy is about ten array operations per parameter, each ~1-2 us
on the small tensors of the models fastnorm trains (a (128, 64) weight is 8K values):
~20 us per parameter, 10 parameters per step for the MLP of ``fastnorm train``.  Here one
loop reads and writes each value once.  The arithmetic is PyTorch's (and the NumPy
path's), operation for operation, in the parameter's dtype; results agree with both to
rounding (the compiler may regroup the float operations: -fassociative-math).
"""
cimport numpy as cnp
from libc.math cimport sqrt

cnp.import_array()

ctypedef fused real:
    float
    double


cdef void _adam(real* p, const real* g, real* m, real* v, Py_ssize_t n, real c1, real b2,
                real c2, real bc2, real eps, real step_size, real wd, real decay,
                bint decoupled) noexcept nogil:
    cdef Py_ssize_t i
    cdef real gi, pi, denom
    for i in range(n):
        pi = p[i]
        gi = g[i]
        if decoupled:
            pi = pi * decay
        elif wd != 0:
            gi = gi + pi * wd
        m[i] = m[i] + (gi - m[i]) * c1
        v[i] = v[i] * b2 + gi * gi * c2
        denom = <real>sqrt(v[i]) / bc2 + eps
        p[i] = pi - m[i] / denom * step_size


cdef inline void _check(cnp.ndarray a, str name, int t, Py_ssize_t n, bint writable) except *:
    if cnp.PyArray_TYPE(a) != t:
        raise TypeError(f"{name}: expected dtype {cnp.PyArray_DescrFromType(t)}, got {a.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a) or (writable and not cnp.PyArray_ISWRITEABLE(a)):
        raise ValueError(f"{name}: expected a {'writable ' if writable else ''}C-contiguous "
                         f"array")
    if cnp.PyArray_SIZE(a) != n:
        raise ValueError(f"{name}: expected {n} values, got {cnp.PyArray_SIZE(a)}")


def adam(cnp.ndarray param, cnp.ndarray grad, cnp.ndarray exp_avg, cnp.ndarray exp_avg_sq,
         double lr, double beta1, double beta2, double eps, double weight_decay, long step,
         bint decoupled):
    """One Adam step in place (``step`` counted from 1): param, exp_avg, exp_avg_sq and
    grad C-contiguous arrays of one float dtype and size.  ``decoupled``: AdamW's decay
    ``param *= 1 - lr * weight_decay``, else L2 ``grad + weight_decay * param``."""
    cdef int t = cnp.PyArray_TYPE(param)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        raise TypeError(f"param: expected dtype float32 or float64, got {param.dtype}")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(param)
    _check(param, "param", t, n, True)
    _check(grad, "grad", t, n, False)
    _check(exp_avg, "exp_avg", t, n, True)
    _check(exp_avg_sq, "exp_avg_sq", t, n, True)
    if step < 1:
        raise ValueError(f"step: expected a count >= 1, got {step}")
    cdef double step_size = lr / (1.0 - beta1 ** step)
    cdef double bc2 = sqrt(1.0 - beta2 ** step)
    cdef double decay = 1.0 - lr * weight_decay
    cdef void* pp = cnp.PyArray_DATA(param)
    cdef void* gp = cnp.PyArray_DATA(grad)
    cdef void* mp = cnp.PyArray_DATA(exp_avg)
    cdef void* vp = cnp.PyArray_DATA(exp_avg_sq)
    with nogil:
        if t == cnp.NPY_FLOAT32:
            _adam(<float*>pp, <const float*>gp, <float*>mp, <float*>vp, n,
                  <float>(1.0 - beta1), <float>beta2, <float>(1.0 - beta2), <float>bc2,
                  <float>eps, <float>step_size, <float>weight_decay, <float>decay, decoupled)
        else:
            _adam(<double*>pp, <const double*>gp, <double*>mp, <double*>vp, n, 1.0 - beta1,
                  beta2, 1.0 - beta2, bc2, eps, step_size, weight_decay, decay, decoupled)
