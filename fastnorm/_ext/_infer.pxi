# The helpers of fastnorm._ext.infer (infer.pyx: the portable build; infer_avx2.pyx:
# the same code built with -mavx2 -mfma, loaded by fastnorm._backend.infer_module).
cimport numpy as cnp
import numpy as np
from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree, PyMem_RawMalloc
from cython.parallel cimport prange, threadid
from libc.math cimport exp, expf, log, logf
from libc.stdlib cimport free, malloc

cnp.import_array()


cdef inline int _kind(cnp.ndarray a) except -1:
    """0 for float32, 1 for float64; TypeError otherwise."""
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_FLOAT32:
        return 0
    if t == cnp.NPY_FLOAT64:
        return 1
    raise TypeError(f"expected a float32 or float64 array, got dtype {a.dtype}")


cdef inline Py_ssize_t _stride(cnp.ndarray a, int axis) except -1:
    """Stride of ``axis`` in elements (ndarrays of floats always have whole ones)."""
    cdef Py_ssize_t s = cnp.PyArray_STRIDE(a, axis)
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(a)
    if s % item:
        raise ValueError("expected strides that are multiples of the item size")
    return s // item


cdef inline void _check_out(cnp.ndarray out, cnp.ndarray x, Py_ssize_t size, str name) except *:
    if cnp.PyArray_TYPE(out) != cnp.PyArray_TYPE(x):
        raise TypeError(f"{name}: expected dtype {x.dtype}, got {out.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(out) or not cnp.PyArray_ISWRITEABLE(out):
        raise ValueError(f"{name}: expected a writable C-contiguous array")
    if cnp.PyArray_SIZE(out) != size:
        raise ValueError(f"{name}: expected {size} values, got {cnp.PyArray_SIZE(out)}")


ctypedef fused real:
    float
    double


# ---------------------------------------------------------------------------- im2col ----
cdef void _im2col_nchw(const real* x, real* cols, Py_ssize_t C,
                       Py_ssize_t H, Py_ssize_t W, Py_ssize_t s1,
                       Py_ssize_t s2, Py_ssize_t s3, Py_ssize_t kH, Py_ssize_t kW,
                       Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                       Py_ssize_t Ho, Py_ssize_t Wo, real* plane) noexcept nogil:
    """One sample: each channel's plane is first copied into ``plane`` with its zero
    padding (Hp x Wp), so the rows of the column matrix are gathered without bounds
    checks."""
    cdef Py_ssize_t c, i, j, oh, ow, h, w
    cdef Py_ssize_t Hp = H + 2 * ph, Wp = W + 2 * pw
    cdef const real* src
    cdef const real* row
    cdef real* dst = cols
    for h in range(Hp * Wp):
        plane[h] = 0
    for c in range(C):
        src = x + c * s1
        for h in range(H):
            if s3 == 1:
                for w in range(W):
                    plane[(h + ph) * Wp + pw + w] = src[h * s2 + w]
            else:
                for w in range(W):
                    plane[(h + ph) * Wp + pw + w] = src[h * s2 + w * s3]
        for i in range(kH):
            for j in range(kW):
                for oh in range(Ho):
                    row = plane + (oh * sh + i) * Wp + j
                    if sw == 1:
                        for ow in range(Wo):
                            dst[ow] = row[ow]
                    else:
                        for ow in range(Wo):
                            dst[ow] = row[ow * sw]
                    dst += Wo


cdef void _im2col_nhwc(const real* x, real* cols, Py_ssize_t C,
                       Py_ssize_t H, Py_ssize_t W, Py_ssize_t s1,
                       Py_ssize_t s2, Py_ssize_t s3, Py_ssize_t kH, Py_ssize_t kW,
                       Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                       Py_ssize_t Ho, Py_ssize_t Wo, real* plane) noexcept nogil:
    """One sample: the sample is copied into ``plane`` (Hp x Wp x C, its zero padding
    written by the caller once), so that each window row is kW*C contiguous values,
    copied without bounds checks (one value per copy with C = 1 took 49 us at
    (32,8,8,1); 3x3, padding 1)."""
    cdef Py_ssize_t c, i, t, oh, ow, h, w
    cdef Py_ssize_t Wp = W + 2 * pw, L = kW * C
    cdef const real* src
    cdef real* row
    cdef real* dst = cols
    for h in range(H):
        row = plane + ((h + ph) * Wp + pw) * C
        if s3 == 1 and s2 == C:
            for t in range(W * C):
                row[t] = x[h * s1 + t]
        else:
            for w in range(W):
                for c in range(C):
                    row[w * C + c] = x[h * s1 + w * s2 + c * s3]
    for oh in range(Ho):
        for ow in range(Wo):
            for i in range(kH):
                src = plane + ((oh * sh + i) * Wp + ow * sw) * C
                for t in range(L):
                    dst[t] = src[t]
                dst += L


cdef inline void _im2col_sample(int kind, bint nhwc, char* x, char* cols, Py_ssize_t C,
                                Py_ssize_t H, Py_ssize_t W, Py_ssize_t s1, Py_ssize_t s2,
                                Py_ssize_t s3, Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sh,
                                Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t Ho,
                                Py_ssize_t Wo, char* plane) noexcept nogil:
    if kind == 0 and nhwc:
        _im2col_nhwc(<const float*>x, <float*>cols, C, H, W, s1, s2, s3, kH, kW, sh, sw,
                     ph, pw, Ho, Wo, <float*>plane)
    elif kind == 0:
        _im2col_nchw(<const float*>x, <float*>cols, C, H, W, s1, s2, s3, kH, kW, sh, sw,
                     ph, pw, Ho, Wo, <float*>plane)
    elif nhwc:
        _im2col_nhwc(<const double*>x, <double*>cols, C, H, W, s1, s2, s3, kH, kW, sh, sw,
                     ph, pw, Ho, Wo, <double*>plane)
    else:
        _im2col_nchw(<const double*>x, <double*>cols, C, H, W, s1, s2, s3, kH, kW, sh, sw,
                     ph, pw, Ho, Wo, <double*>plane)


def im2col(cnp.ndarray x, cnp.ndarray cols, kernel, stride, padding, bint nhwc,
           int nthreads=1):
    """Write the column matrix of a convolution of ``x`` (4-D, NCHW or NHWC, any
    strides) into ``cols`` (C-contiguous, ``N*C*kH*kW*Ho*Wo`` values of x's dtype), the
    samples on up to ``nthreads`` threads (the same values for any count)."""
    cdef int kind = _kind(x)
    cdef Py_ssize_t N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo
    N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo = _geometry(x, kernel, stride, padding, nhwc)
    cdef Py_ssize_t s0 = _stride(x, 0), s1 = _stride(x, 1), s2 = _stride(x, 2)
    cdef Py_ssize_t s3 = _stride(x, 3)
    _check_out(cols, x, N * C * kH * kW * Ho * Wo, "cols")
    cdef Py_ssize_t per = C * kH * kW * Ho * Wo  # column values per sample
    cdef Py_ssize_t psize = (H + 2 * ph) * (W + 2 * pw)
    cdef int nt = max(1, min(nthreads, N))
    cdef char* xp = <char*>cnp.PyArray_DATA(x)
    cdef char* cp = <char*>cnp.PyArray_DATA(cols)
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(x)
    cdef char* planes = NULL
    cdef Py_ssize_t n
    if nhwc:  # a padded image per thread (HWC), its padding zeroed here once
        psize = psize * C
        planes = <char*>PyMem_RawCalloc(nt * psize, isz)
    else:  # a padded plane per thread
        planes = <char*>PyMem_RawMalloc(nt * psize * isz)
    if planes == NULL:
        raise MemoryError()
    for n in prange(N, nogil=True, schedule='static', num_threads=nt):
        _im2col_sample(kind, nhwc, xp + n * s0 * isz, cp + n * per * isz, C, H, W, s1, s2,
                       s3, kH, kW, sh, sw, ph, pw, Ho, Wo, planes + threadid() * psize * isz)
    PyMem_RawFree(planes)


# ------------------------------------------------------------------------------ relu ----
cdef void _relu(const real* x, real* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef real v
    for i in range(n):
        v = x[i]
        out[i] = 0 if v < 0 else v  # NaN and -0.0 stay, as torch.relu


cdef void _relu_backward(const real* grad, const real* out, real* gx,
                         Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef real g
    for i in range(n):
        g = grad[i]  # loaded first: the select below has no jump, and vectorizes
        gx[i] = 0 if out[i] <= 0 else g  # PyTorch's threshold_backward


cdef inline Py_ssize_t _same_size(cnp.ndarray a, cnp.ndarray ref, str name) except -1:
    """a is C-contiguous with ref's dtype and size; its size."""
    if cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(ref) or not cnp.PyArray_IS_C_CONTIGUOUS(a) \
            or cnp.PyArray_SIZE(a) != cnp.PyArray_SIZE(ref):
        raise ValueError(f"{name}: expected a C-contiguous {ref.dtype} array of "
                         f"{cnp.PyArray_SIZE(ref)} values")
    return cnp.PyArray_SIZE(a)


def relu(cnp.ndarray x, cnp.ndarray out, int nthreads=1):
    """out = 0 where x < 0, else x: ``torch.relu`` (NaN and -0.0 stay); C-contiguous arrays
    of one float dtype and size, in parts on up to ``nthreads`` threads."""
    cdef int kind = _kind(x)
    cdef Py_ssize_t n = _same_size(x, x, "x")
    _same_size(out, x, "out")
    if not cnp.PyArray_ISWRITEABLE(out):
        raise ValueError("out: expected a writable array")
    cdef char* xp = <char*>cnp.PyArray_DATA(x)
    cdef char* op = <char*>cnp.PyArray_DATA(out)
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(x), t, lo, hi
    cdef int nt = max(1, min(nthreads, n // 4096))
    for t in prange(nt, nogil=True, schedule='static', num_threads=nt):
        lo = n * t // nt
        hi = n * (t + 1) // nt
        if kind == 0:
            _relu(<const float*>(xp + lo * isz), <float*>(op + lo * isz), hi - lo)
        else:
            _relu(<const double*>(xp + lo * isz), <double*>(op + lo * isz), hi - lo)


def relu_backward(cnp.ndarray grad, cnp.ndarray out, cnp.ndarray gx, int nthreads=1):
    """gx = 0 where out <= 0, else grad (PyTorch's ``threshold_backward``: a NaN output
    passes the gradient, a zero output stops even an inf or NaN one), ``out`` being
    relu's output; C-contiguous arrays of one float dtype and size, in parts on up to
    ``nthreads`` threads."""
    cdef int kind = _kind(grad)
    cdef Py_ssize_t n = _same_size(grad, grad, "grad")
    _same_size(out, grad, "out")
    _same_size(gx, grad, "gx")
    if not cnp.PyArray_ISWRITEABLE(gx):
        raise ValueError("gx: expected a writable array")
    cdef char* gp = <char*>cnp.PyArray_DATA(grad)
    cdef char* op = <char*>cnp.PyArray_DATA(out)
    cdef char* xp = <char*>cnp.PyArray_DATA(gx)
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(grad), t, lo, hi
    cdef int nt = max(1, min(nthreads, n // 4096))
    for t in prange(nt, nogil=True, schedule='static', num_threads=nt):
        lo = n * t // nt
        hi = n * (t + 1) // nt
        if kind == 0:
            _relu_backward(<const float*>(gp + lo * isz), <const float*>(op + lo * isz),
                           <float*>(xp + lo * isz), hi - lo)
        else:
            _relu_backward(<const double*>(gp + lo * isz), <const double*>(op + lo * isz),
                           <double*>(xp + lo * isz), hi - lo)


# ---------------------------------------------------------------------- cross-entropy ----
cdef void _log_softmax_nll(const real* x, const Py_ssize_t* target, real* logp, real* loss,
                           Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t n, c
    cdef real m, v, s, lse
    for n in range(N):
        m = x[0]
        for c in range(1, C):  # the maximum; a NaN propagates (as np.maximum.reduce)
            v = x[c]
            if v > m or v != v:
                m = v
        s = 0
        for c in range(C):
            logp[c] = x[c] - m
            if real is float:
                s += expf(logp[c])
            else:
                s += exp(logp[c])
        lse = logf(s) if real is float else log(s)
        for c in range(C):
            logp[c] = logp[c] - lse
        loss[n] = -logp[target[n]]
        x += C
        logp += C


cdef inline int _check_classes(const Py_ssize_t* tp, Py_ssize_t N, Py_ssize_t C) except -1:
    """Every target in [0, C): the loops index rows with them."""
    cdef Py_ssize_t n
    for n in range(N):
        if tp[n] < 0 or tp[n] >= C:
            raise ValueError(f"target: expected class indices in [0, {C}), got {tp[n]}")
    return 0


def log_softmax_nll(cnp.ndarray logits, cnp.ndarray target, cnp.ndarray logp,
                    cnp.ndarray loss):
    """Rows of (N, C) logits: logp = x - max - log(sum(exp(x - max))) and loss[n] =
    -logp[n, target[n]], in the logits' float dtype (C's exp and log: within an ulp or
    two of NumPy's, not bitwise).  C-contiguous logits, logp (N, C) and loss (N,) of one
    dtype; target intp (N,), each in [0, C).  One call for what
    took NumPy eight (the (32, 10) logits of a training step: 11 -> ~2 us)."""
    cdef int kind = _kind(logits)
    if cnp.PyArray_NDIM(logits) != 2:
        raise ValueError("logits: expected a 2-D array")
    cdef Py_ssize_t N = cnp.PyArray_DIMS(logits)[0], C = cnp.PyArray_DIMS(logits)[1]
    _same_size(logits, logits, "logits")
    _same_size(logp, logits, "logp")
    if not cnp.PyArray_ISWRITEABLE(logp) or not cnp.PyArray_ISWRITEABLE(loss):
        raise ValueError("logp, loss: expected writable arrays")
    if cnp.PyArray_TYPE(loss) != cnp.PyArray_TYPE(logits) \
            or not cnp.PyArray_IS_C_CONTIGUOUS(loss) or cnp.PyArray_SIZE(loss) != N:
        raise ValueError(f"loss: expected a C-contiguous {logits.dtype} array of {N} values")
    if cnp.PyArray_TYPE(target) != cnp.NPY_INTP or not cnp.PyArray_IS_C_CONTIGUOUS(target) \
            or cnp.PyArray_SIZE(target) != N:
        raise ValueError(f"target: expected a C-contiguous intp array of {N} values")
    if N == 0 or C == 0:
        return
    cdef void* xp = cnp.PyArray_DATA(logits)
    cdef const Py_ssize_t* tp = <const Py_ssize_t*>cnp.PyArray_DATA(target)
    cdef void* lp = cnp.PyArray_DATA(logp)
    cdef void* op = cnp.PyArray_DATA(loss)
    _check_classes(tp, N, C)
    with nogil:
        if kind == 0:
            _log_softmax_nll(<const float*>xp, tp, <float*>lp, <float*>op, N, C)
        else:
            _log_softmax_nll(<const double*>xp, tp, <double*>lp, <double*>op, N, C)


cdef void _softmax_nll_backward(const real* logp, const Py_ssize_t* target, real* d,
                                Py_ssize_t N, Py_ssize_t C, real scale) noexcept nogil:
    cdef Py_ssize_t n, c
    cdef real v
    for n in range(N):
        for c in range(C):
            v = expf(logp[c]) if real is float else exp(logp[c])
            if c == target[n]:
                v = v - 1
            d[c] = v * scale
        logp += C
        d += C


def softmax_nll_backward(cnp.ndarray logp, cnp.ndarray target, double scale,
                         cnp.ndarray d):
    """d = (softmax - onehot(target)) * scale with softmax = exp(logp), the gradient of
    log_softmax_nll's mean (scale 1/N) or sum (scale 1) times the incoming gradient;
    arrays as there, d like logp."""
    cdef int kind = _kind(logp)
    if cnp.PyArray_NDIM(logp) != 2:
        raise ValueError("logp: expected a 2-D array")
    cdef Py_ssize_t N = cnp.PyArray_DIMS(logp)[0], C = cnp.PyArray_DIMS(logp)[1]
    _same_size(logp, logp, "logp")
    _same_size(d, logp, "d")
    if not cnp.PyArray_ISWRITEABLE(d):
        raise ValueError("d: expected a writable array")
    if cnp.PyArray_TYPE(target) != cnp.NPY_INTP or not cnp.PyArray_IS_C_CONTIGUOUS(target) \
            or cnp.PyArray_SIZE(target) != N:
        raise ValueError(f"target: expected a C-contiguous intp array of {N} values")
    if N == 0 or C == 0:
        return
    cdef const void* lp = cnp.PyArray_DATA(logp)
    cdef const Py_ssize_t* tp = <const Py_ssize_t*>cnp.PyArray_DATA(target)
    cdef void* dp = cnp.PyArray_DATA(d)
    _check_classes(tp, N, C)
    with nogil:
        if kind == 0:
            _softmax_nll_backward(<const float*>lp, tp, <float*>dp, N, C, <float>scale)
        else:
            _softmax_nll_backward(<const double*>lp, tp, <double*>dp, N, C, scale)


# ------------------------------------------------------------------------- bias_relu ----
cdef void _bias_relu(real* y, const real* bias, Py_ssize_t outer, Py_ssize_t C,
                     Py_ssize_t inner, bint relu) noexcept nogil:
    cdef Py_ssize_t o, c, k
    cdef real b, v
    if inner == 1 and bias != NULL:  # channels last: the bias vector along each row
        for o in range(outer):
            if relu:
                for c in range(C):
                    v = y[c] + bias[c]
                    y[c] = 0 if v < 0 else v  # NaN stays NaN, as np.maximum(v, 0)
            else:
                for c in range(C):
                    y[c] = y[c] + bias[c]
            y += C
        return
    for o in range(outer):
        for c in range(C):
            b = bias[c] if bias != NULL else 0
            if relu:
                for k in range(inner):
                    v = y[k] + b
                    y[k] = 0 if v < 0 else v
            elif bias != NULL:
                for k in range(inner):
                    y[k] = y[k] + b
            y += inner


def bias_relu(cnp.ndarray y, cnp.ndarray bias, Py_ssize_t inner, bint relu):
    """In place: ``y += bias[c]`` (``bias`` None: nothing added), then ReLU if ``relu``,
    for a writable C-contiguous ``y`` read as ``(outer, C, inner)`` with ``C`` the size
    of ``bias`` (or 1)."""
    cdef int kind = _kind(y)
    if not cnp.PyArray_IS_C_CONTIGUOUS(y) or not cnp.PyArray_ISWRITEABLE(y):
        raise ValueError("y: expected a writable C-contiguous array")
    cdef Py_ssize_t C = 1
    cdef void* bp = NULL
    if bias is not None:
        if cnp.PyArray_TYPE(bias) != cnp.PyArray_TYPE(y) or not cnp.PyArray_IS_C_CONTIGUOUS(bias):
            raise TypeError(f"bias: expected a C-contiguous array of dtype {y.dtype}")
        C = cnp.PyArray_SIZE(bias)
        bp = cnp.PyArray_DATA(bias)
    cdef Py_ssize_t size = cnp.PyArray_SIZE(y)
    if inner < 1 or C < 1 or size % (C * inner):
        raise ValueError(f"y: {size} values do not split into (outer, {C}, {inner})")
    cdef Py_ssize_t outer = size // (C * inner)
    cdef void* yp = cnp.PyArray_DATA(y)
    with nogil:
        if kind == 0:
            _bias_relu(<float*>yp, <const float*>bp, outer, C, inner, relu)
        else:
            _bias_relu(<double*>yp, <const double*>bp, outer, C, inner, relu)


# -------------------------------------------------------------------------- max_pool ----
cdef inline real _window_max(const real* x, Py_ssize_t sa, Py_ssize_t sb, Py_ssize_t a0,
                             Py_ssize_t a1, Py_ssize_t b0, Py_ssize_t b1) noexcept nogil:
    """Max over rows [a0, a1) and columns [b0, b1) (strides sa, sb); NaN if any is."""
    cdef Py_ssize_t a, b
    cdef real m = x[a0 * sa + b0 * sb]
    cdef real v
    for a in range(a0, a1):
        for b in range(b0, b1):
            v = x[a * sa + b * sb]
            if v > m or v != v:
                m = v
                if v != v:
                    return m
    return m


cdef void _max_pool(const real* x, real* out, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H,
                    Py_ssize_t W, Py_ssize_t sn, Py_ssize_t sc, Py_ssize_t shh,
                    Py_ssize_t sww, Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sh,
                    Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t Ho,
                    Py_ssize_t Wo, bint nhwc) noexcept nogil:
    cdef Py_ssize_t n, c, oh, ow, a0, a1, b0, b1, a, b
    cdef real* o
    cdef const real* xr
    cdef real m, v
    if ph == 0 and pw == 0 and not nhwc:
        # every window inside: rows of outputs updated one window offset at a time,
        # a branch-free select (a NaN, once in, stays: v > NaN and v != v are false)
        o = out
        for n in range(N):
            for c in range(C):
                for oh in range(Ho):
                    xr = x + n * sn + c * sc + oh * sh * shh
                    for ow in range(Wo):
                        o[ow] = xr[ow * sw * sww]
                    for a in range(kH):
                        for b in range(kW):
                            for ow in range(Wo):
                                v = xr[a * shh + (ow * sw + b) * sww]
                                m = o[ow]
                                o[ow] = v if (v > m or v != v) else m
                    o += Wo
        return
    if ph == 0 and pw == 0 and sc == 1:
        # channels last, contiguous channels: the same select, vectorized over c
        o = out
        for n in range(N):
            for oh in range(Ho):
                for ow in range(Wo):
                    xr = x + n * sn + oh * sh * shh + ow * sw * sww
                    for c in range(C):
                        o[c] = xr[c]
                    for a in range(kH):
                        for b in range(kW):
                            for c in range(C):
                                v = xr[a * shh + b * sww + c]
                                m = o[c]
                                o[c] = v if (v > m or v != v) else m
                    o += C
        return
    for n in range(N):
        for c in range(C):
            for oh in range(Ho):
                a0 = oh * sh - ph
                a1 = a0 + kH
                a0 = 0 if a0 < 0 else a0
                a1 = H if a1 > H else a1
                for ow in range(Wo):
                    b0 = ow * sw - pw
                    b1 = b0 + kW
                    b0 = 0 if b0 < 0 else b0
                    b1 = W if b1 > W else b1
                    if nhwc:
                        o = out + ((n * Ho + oh) * Wo + ow) * C + c
                    else:
                        o = out + ((n * C + c) * Ho + oh) * Wo + ow
                    o[0] = _window_max(x + n * sn + c * sc, shh, sww, a0, a1, b0, b1)


def max_pool(cnp.ndarray x, cnp.ndarray out, kernel, stride, padding, bint nhwc):
    """Max pooling of ``x`` (4-D, any strides) into ``out`` (C-contiguous, the output
    shape in the same layout).  Padding is at most half the kernel, as the modules
    require, so every window holds at least one input value."""
    cdef int kind = _kind(x)
    cdef Py_ssize_t N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo, sn, sc, shh, sww
    N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo = _geometry(x, kernel, stride, padding, nhwc, True)
    sn = _stride(x, 0)
    if nhwc:
        shh, sww, sc = _stride(x, 1), _stride(x, 2), _stride(x, 3)
    else:
        sc, shh, sww = _stride(x, 1), _stride(x, 2), _stride(x, 3)
    _check_out(out, x, N * C * Ho * Wo, "out")
    cdef void* xp = cnp.PyArray_DATA(x)
    cdef void* op = cnp.PyArray_DATA(out)
    with nogil:
        if kind == 0:
            _max_pool(<const float*>xp, <float*>op, N, C, H, W, sn, sc, shh, sww,
                      kH, kW, sh, sw, ph, pw, Ho, Wo, nhwc)
        else:
            _max_pool(<const double*>xp, <double*>op, N, C, H, W, sn, sc, shh, sww,
                      kH, kW, sh, sw, ph, pw, Ho, Wo, nhwc)


# ------------------------------------------------------ max_pool with argmax (training) ----
cdef extern from "_pool.h" nogil:
    void fn_windows_argmax_f32(const float* xw, Py_ssize_t istride, Py_ssize_t L,
                               Py_ssize_t shh, Py_ssize_t sww, Py_ssize_t alo,
                               Py_ssize_t ahi, Py_ssize_t blo, Py_ssize_t bhi, Py_ssize_t kW,
                               float* out, int* index)
    void fn_windows_argmax_f64(const double* xw, Py_ssize_t istride, Py_ssize_t L,
                               Py_ssize_t shh, Py_ssize_t sww, Py_ssize_t alo,
                               Py_ssize_t ahi, Py_ssize_t blo, Py_ssize_t bhi, Py_ssize_t kW,
                               double* out, int* index)
    void fn_pool2x2_argmax_f32(const float* x, Py_ssize_t shh, Py_ssize_t sww, Py_ssize_t Ho,
                               Py_ssize_t Wo, float* out, int* index)
    void fn_pool2x2_argmax_f64(const double* x, Py_ssize_t shh, Py_ssize_t sww,
                               Py_ssize_t Ho, Py_ssize_t Wo, double* out, int* index)


cdef inline void _windows_argmax(const real* xw, Py_ssize_t istride, Py_ssize_t L,
                                 Py_ssize_t shh, Py_ssize_t sww, Py_ssize_t alo,
                                 Py_ssize_t ahi, Py_ssize_t blo, Py_ssize_t bhi,
                                 Py_ssize_t kW, real* out, int* index) noexcept nogil:
    """L windows at once (see _pool.h): window i at xw + i * istride."""
    if real is float:
        fn_windows_argmax_f32(xw, istride, L, shh, sww, alo, ahi, blo, bhi, kW, out, index)
    else:
        fn_windows_argmax_f64(xw, istride, L, shh, sww, alo, ahi, blo, bhi, kW, out, index)


cdef void _max_pool_argmax(const real* x, real* out, int* index, Py_ssize_t N, Py_ssize_t C,
                           Py_ssize_t H, Py_ssize_t W, Py_ssize_t sn, Py_ssize_t sc,
                           Py_ssize_t shh, Py_ssize_t sww, Py_ssize_t kH, Py_ssize_t kW,
                           Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                           Py_ssize_t Ho, Py_ssize_t Wo, bint nhwc) noexcept nogil:
    """out = the window maximum, index = its offset a * kW + b in the window (the first
    maximum, or the last NaN, as PyTorch); outputs C-contiguous in x's layout.  Windows
    go in groups of the same shape (see _pool.h): NHWC the C channels of an output
    position, NCHW the windows of an output row that lie inside the input, and its edge
    windows one at a time; NCHW 2x2 windows of stride 2 without padding plane by plane
    (81 -> 28 us on one thread at (32,32,8,8))."""
    cdef Py_ssize_t n, c, oh, ow, a0, b0, alo, ahi, o, lo, hi
    # output columns whose windows lie inside the input: b0 >= 0 and b0 + kW <= W
    lo = (pw + sw - 1) // sw
    hi = max(lo, min(Wo, (W + pw - kW) // sw + 1))
    cdef bint pool2x2 = (not nhwc and kH == 2 and kW == 2 and sh == 2 and sw == 2
                         and ph == 0 and pw == 0)
    for n in range(N):
        if pool2x2:  # plane by plane (see _pool.h)
            for c in range(C):
                o = (n * C + c) * Ho * Wo
                if real is float:
                    fn_pool2x2_argmax_f32(x + n * sn + c * sc, shh, sww, Ho, Wo, out + o,
                                          index + o)
                else:
                    fn_pool2x2_argmax_f64(x + n * sn + c * sc, shh, sww, Ho, Wo, out + o,
                                          index + o)
            continue
        for oh in range(Ho):
            a0 = oh * sh - ph
            alo = max(0, -a0)
            ahi = min(kH, H - a0)
            if nhwc:  # channels innermost, as stored
                for ow in range(Wo):
                    b0 = ow * sw - pw
                    o = ((n * Ho + oh) * Wo + ow) * C
                    _windows_argmax(x + n * sn + a0 * shh + b0 * sww, sc, C, shh, sww, alo,
                                    ahi, max(0, -b0), min(kW, W - b0), kW, out + o,
                                    index + o)
                continue
            for c in range(C):
                o = ((n * C + c) * Ho + oh) * Wo
                if hi > lo:  # the interior windows together
                    _windows_argmax(x + n * sn + c * sc + a0 * shh + (lo * sw - pw) * sww,
                                    sw * sww, hi - lo, shh, sww, alo, ahi, 0, kW, kW,
                                    out + o + lo, index + o + lo)
                for ow in range(Wo):  # the edge windows one at a time
                    if lo <= ow < hi:
                        continue
                    b0 = ow * sw - pw
                    _windows_argmax(x + n * sn + c * sc + a0 * shh + b0 * sww, 0, 1, shh,
                                    sww, alo, ahi, max(0, -b0), min(kW, W - b0), kW,
                                    out + o + ow, index + o + ow)


cdef void _max_pool_backward(const real* grad, const int* index, real* gx, Py_ssize_t C,
                             Py_ssize_t H, Py_ssize_t W, Py_ssize_t sh, Py_ssize_t sw,
                             Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t Ho, Py_ssize_t Wo,
                             const Py_ssize_t* tab, bint nhwc) noexcept nogil:
    """One sample: gx (C-contiguous, zeroed here) = grad added at each window's
    maximum, at the window's start plus tab[index] (the element offset of window offset
    index: a table, not a division per value)."""
    cdef Py_ssize_t c, oh, ow, o, base
    for o in range(C * H * W):  # zeroed by the thread that adds into it, while in cache
        gx[o] = 0
    if nhwc:
        for oh in range(Ho):
            for ow in range(Wo):
                base = ((oh * sh - ph) * W + ow * sw - pw) * C
                o = (oh * Wo + ow) * C
                for c in range(C):
                    gx[base + c + tab[index[o + c]]] += grad[o + c]
        return
    for c in range(C):
        for oh in range(Ho):
            base = (c * H + oh * sh - ph) * W - pw
            o = (c * Ho + oh) * Wo
            for ow in range(Wo):
                gx[base + ow * sw + tab[index[o + ow]]] += grad[o + ow]


def _geometry(cnp.ndarray x, kernel, stride, padding, bint nhwc, bint pool=False):
    """(N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo) of a convolution or pooling window
    over the 4-D ``x``, checked (pooling: padding at most half the kernel, as the modules
    require, so every window holds at least one input value)."""
    if cnp.PyArray_NDIM(x) != 4:
        raise ValueError(f"x: expected a 4-D array, got shape {(<object>x).shape}")
    kH, kW, sh, sw, ph, pw = kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1]
    if kH < 1 or kW < 1 or sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError("expected kernel >= 1, stride >= 1, padding >= 0")
    if pool and (2 * ph > kH or 2 * pw > kW):
        raise ValueError("expected kernel >= 1, stride >= 1, 0 <= padding <= kernel / 2")
    if nhwc:
        H, W, C = x.shape[1], x.shape[2], x.shape[3]
    else:
        C, H, W = x.shape[1], x.shape[2], x.shape[3]
    Ho, Wo = (H + 2 * ph - kH) // sh + 1, (W + 2 * pw - kW) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"kernel {kernel} with padding {padding} does not fit an input "
                         f"of shape {(<object>x).shape}")
    return x.shape[0], C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo


def max_pool_argmax(cnp.ndarray x, cnp.ndarray out, cnp.ndarray index, kernel, stride,
                    padding, bint nhwc, int nthreads=1):
    """Max pooling for training: ``out`` (x's dtype) and ``index`` (int32), both
    C-contiguous of the output shape in x's layout; ``index`` is the offset of each
    window's maximum inside the window (for ``max_pool_backward``).  The samples on up
    to ``nthreads`` threads."""
    cdef int kind = _kind(x)
    cdef Py_ssize_t N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo, sn, sc, shh, sww
    N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo = _geometry(x, kernel, stride, padding, nhwc, True)
    _check_out(out, x, N * C * Ho * Wo, "out")
    if index.dtype != np.int32 or not index.flags.c_contiguous or index.size != N * C * Ho * Wo:
        raise ValueError(f"index: expected a C-contiguous int32 array of {N * C * Ho * Wo} values")
    sn = _stride(x, 0)
    if nhwc:
        shh, sww, sc = _stride(x, 1), _stride(x, 2), _stride(x, 3)
    else:
        sc, shh, sww = _stride(x, 1), _stride(x, 2), _stride(x, 3)
    cdef char* xp = <char*>cnp.PyArray_DATA(x)
    cdef char* op = <char*>cnp.PyArray_DATA(out)
    cdef int* ip = <int*>cnp.PyArray_DATA(index)
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(x), per = C * Ho * Wo, n
    cdef int nt = max(1, min(nthreads, N))
    for n in prange(N, nogil=True, schedule='static', num_threads=nt):  # sample by sample
        if kind == 0:
            _max_pool_argmax(<const float*>(xp + n * sn * isz), <float*>(op + n * per * isz),
                             ip + n * per, 1, C, H, W, sn, sc, shh, sww, kH, kW, sh, sw, ph,
                             pw, Ho, Wo, nhwc)
        else:
            _max_pool_argmax(<const double*>(xp + n * sn * isz),
                             <double*>(op + n * per * isz), ip + n * per, 1, C, H, W, sn, sc,
                             shh, sww, kH, kW, sh, sw, ph, pw, Ho, Wo, nhwc)


def max_pool_backward(cnp.ndarray grad, cnp.ndarray index, cnp.ndarray gx, kernel, stride,
                      padding, bint nhwc, int nthreads=1):
    """gx (C-contiguous, the input's shape and layout; overwritten) = grad routed to
    each window's maximum as recorded by ``max_pool_argmax``, zero elsewhere; grad
    C-contiguous like index.  The samples on up to ``nthreads`` threads (each writes its
    own part of gx)."""
    cdef int kind = _kind(gx)
    cdef Py_ssize_t N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo
    N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo = _geometry(gx, kernel, stride, padding, nhwc, True)
    if not gx.flags.c_contiguous or not gx.flags.writeable:
        raise ValueError("gx: expected a writable C-contiguous array")
    if grad.dtype != gx.dtype or not grad.flags.c_contiguous or grad.size != N * C * Ho * Wo:
        raise ValueError(f"grad: expected a C-contiguous {gx.dtype} array of {N * C * Ho * Wo} values")
    if index.dtype != np.int32 or not index.flags.c_contiguous or index.size != grad.size:
        raise ValueError("index: expected the int32 array from max_pool_argmax")
    cdef char* gp = <char*>cnp.PyArray_DATA(grad)
    cdef char* xp = <char*>cnp.PyArray_DATA(gx)
    cdef int* ip = <int*>cnp.PyArray_DATA(index)
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(gx), per = C * Ho * Wo, img = C * H * W, n, k
    cdef int nt = max(1, min(nthreads, N))
    cdef Py_ssize_t* tab = <Py_ssize_t*>PyMem_RawMalloc(kH * kW * sizeof(Py_ssize_t))
    if tab == NULL:
        raise MemoryError()
    for k in range(kH * kW):  # window offset k = a * kW + b -> elements from its start
        tab[k] = ((k // kW) * W + k % kW) * (C if nhwc else 1)
    for n in prange(N, nogil=True, schedule='static', num_threads=nt):  # sample by sample
        if kind == 0:
            _max_pool_backward(<const float*>(gp + n * per * isz), ip + n * per,
                               <float*>(xp + n * img * isz), C, H, W, sh, sw, ph, pw,
                               Ho, Wo, tab, nhwc)
        else:
            _max_pool_backward(<const double*>(gp + n * per * isz), ip + n * per,
                               <double*>(xp + n * img * isz), C, H, W, sh, sw, ph, pw,
                               Ho, Wo, tab, nhwc)
    PyMem_RawFree(tab)


# ---------------------------------------------------------------------------- col2im ----
cdef void _col2im_nchw(const real* cols, real* gx, Py_ssize_t C,
                       Py_ssize_t H, Py_ssize_t W, Py_ssize_t kH, Py_ssize_t kW,
                       Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                       Py_ssize_t Ho, Py_ssize_t Wo, real* plane) noexcept nogil:
    """The adjoint of _im2col_nchw for one sample: each channel's plane is accumulated
    with its padding in ``plane``, then its interior is written to gx (C-contiguous
    CHW)."""
    cdef Py_ssize_t c, i, j, oh, ow, h, w
    cdef Py_ssize_t Hp = H + 2 * ph, Wp = W + 2 * pw
    cdef const real* src = cols
    cdef real* row
    cdef real* dst
    for c in range(C):
        for h in range(Hp * Wp):
            plane[h] = 0
        for i in range(kH):
            for j in range(kW):
                for oh in range(Ho):
                    row = plane + (oh * sh + i) * Wp + j
                    if sw == 1:
                        for ow in range(Wo):
                            row[ow] += src[ow]
                    else:
                        for ow in range(Wo):
                            row[ow * sw] += src[ow]
                    src += Wo
        dst = gx + c * H * W
        for h in range(H):
            for w in range(W):
                dst[h * W + w] = plane[(h + ph) * Wp + pw + w]


cdef void _col2im_nhwc(const real* cols, real* gx, Py_ssize_t C,
                       Py_ssize_t H, Py_ssize_t W, Py_ssize_t kH, Py_ssize_t kW,
                       Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                       Py_ssize_t Ho, Py_ssize_t Wo, real* plane) noexcept nogil:
    """The adjoint of _im2col_nhwc for one sample into gx (C-contiguous HWC): window
    rows of kW*C values added into the padded image ``plane`` (what lands in the padding
    is dropped), then its interior copied out.  Each value of gx gets its terms in the
    order of the windows, as without the padded image."""
    cdef Py_ssize_t t, i, oh, ow, h
    cdef Py_ssize_t Hp = H + 2 * ph, Wp = W + 2 * pw, L = kW * C
    cdef const real* src = cols
    cdef real* dst
    for t in range(Hp * Wp * C):
        plane[t] = 0
    for oh in range(Ho):
        for ow in range(Wo):
            for i in range(kH):
                dst = plane + ((oh * sh + i) * Wp + ow * sw) * C
                for t in range(L):
                    dst[t] += src[t]
                src += L
    for h in range(H):
        dst = plane + ((h + ph) * Wp + pw) * C
        for t in range(W * C):
            gx[h * W * C + t] = dst[t]


cdef inline void _col2im_sample(int kind, bint nhwc, char* cols, char* gx, Py_ssize_t C,
                                Py_ssize_t H, Py_ssize_t W, Py_ssize_t kH, Py_ssize_t kW,
                                Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                                Py_ssize_t Ho, Py_ssize_t Wo, char* plane) noexcept nogil:
    if kind == 0 and nhwc:
        _col2im_nhwc(<const float*>cols, <float*>gx, C, H, W, kH, kW, sh, sw, ph, pw, Ho,
                     Wo, <float*>plane)
    elif kind == 0:
        _col2im_nchw(<const float*>cols, <float*>gx, C, H, W, kH, kW, sh, sw, ph, pw, Ho,
                     Wo, <float*>plane)
    elif nhwc:
        _col2im_nhwc(<const double*>cols, <double*>gx, C, H, W, kH, kW, sh, sw, ph, pw, Ho,
                     Wo, <double*>plane)
    else:
        _col2im_nchw(<const double*>cols, <double*>gx, C, H, W, kH, kW, sh, sw, ph, pw, Ho,
                     Wo, <double*>plane)


def col2im(cnp.ndarray cols, cnp.ndarray gx, kernel, stride, padding, bint nhwc,
           int nthreads=1):
    """The adjoint of ``im2col``: sum the column-matrix gradient ``cols`` (C-contiguous,
    the layout ``im2col`` writes) back into ``gx`` (C-contiguous 4-D, NCHW or NHWC, the
    input's shape and dtype), overwriting it; the samples on up to ``nthreads`` threads
    (each sums its own in a fixed order: the same values for any count)."""
    cdef int kind = _kind(gx)
    if cnp.PyArray_NDIM(gx) != 4 or not gx.flags.c_contiguous or not gx.flags.writeable:
        raise ValueError("gx: expected a writable C-contiguous 4-D array")
    cdef Py_ssize_t N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo
    N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo = _geometry(gx, kernel, stride, padding, nhwc)
    if cols.dtype != gx.dtype or not cols.flags.c_contiguous \
            or cols.size != N * C * kH * kW * Ho * Wo:
        raise ValueError(f"cols: expected a C-contiguous {gx.dtype} array of "
                         f"{N * C * kH * kW * Ho * Wo} values")
    cdef Py_ssize_t per = C * kH * kW * Ho * Wo  # column values per sample
    cdef Py_ssize_t img = C * H * W              # gx values per sample
    cdef Py_ssize_t psize = (H + 2 * ph) * (W + 2 * pw)
    cdef int nt = max(1, min(nthreads, N))
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(gx)
    cdef char* cp = <char*>cnp.PyArray_DATA(cols)
    cdef char* gp = <char*>cnp.PyArray_DATA(gx)
    cdef char* planes = NULL
    cdef Py_ssize_t n
    if nhwc:  # a padded image (HWC) per thread
        psize = psize * C
    planes = <char*>PyMem_RawMalloc(nt * psize * isz)  # else a padded plane per thread
    if planes == NULL:
        raise MemoryError()
    for n in prange(N, nogil=True, schedule='static', num_threads=nt):
        _col2im_sample(kind, nhwc, cp + n * per * isz, gp + n * img * isz, C, H, W, kH, kW,
                       sh, sw, ph, pw, Ho, Wo, planes + threadid() * psize * isz)
    PyMem_RawFree(planes)


# ------------------------------------------------------------------- batched products ----
# BLAS's sgemm/dgemm, taken from capsules (scipy.linalg.cython_blas.__pyx_capi__, set by
# fastnorm.ops when SciPy is importable), called from the kernels' thread team: NumPy's
# batched matmul runs its products one after another on one thread, and handing half of
# them to a Python thread cost ~80 us here, as much as the half it saves.
from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer

ctypedef void (*sgemm_t)(char* ta, char* tb, int* m, int* n, int* k, float* alpha,
                         float* a, int* lda, float* b, int* ldb, float* beta, float* c,
                         int* ldc) noexcept nogil
ctypedef void (*dgemm_t)(char* ta, char* tb, int* m, int* n, int* k, double* alpha,
                         double* a, int* lda, double* b, int* ldb, double* beta, double* c,
                         int* ldc) noexcept nogil
cdef sgemm_t _sgemm = NULL
cdef dgemm_t _dgemm = NULL


cdef inline void _mm(int kind, bint ta, bint tb, int M, int Nc, int K, char* a, char* b,
                     char* c, bint add) noexcept nogil:
    """Row-major c (M x Nc) = op(a) @ op(b), plus c with ``add``; a is M x K (K x M with
    ``ta``), b is K x Nc (Nc x K with ``tb``), all C-contiguous; one BLAS call."""
    # row major C = A @ B is column major C^T = B^T @ A^T: BLAS gets b first
    cdef char tra = b'T' if tb else b'N', trb = b'T' if ta else b'N'
    cdef int lda = K if tb else Nc, ldb = M if ta else K, ldc = Nc
    cdef float f1 = 1.0, fb = 1.0 if add else 0.0
    cdef double d1 = 1.0, db = 1.0 if add else 0.0
    if lda < 1:
        lda = 1
    if ldb < 1:
        ldb = 1
    if ldc < 1:
        ldc = 1
    if kind == 0:
        _sgemm(&tra, &trb, &Nc, &M, &K, &f1, <float*>b, &lda, <float*>a, &ldb, &fb,
               <float*>c, &ldc)
    else:
        _dgemm(&tra, &trb, &Nc, &M, &K, &d1, <double*>b, &lda, <double*>a, &ldb, &db,
               <double*>c, &ldc)


def set_gemm(sgemm, dgemm):
    """Use the Fortran BLAS ``sgemm``/``dgemm`` in these capsules for ``batched_matmul``
    (None, None: none)."""
    global _sgemm, _dgemm
    if sgemm is None or dgemm is None:
        _sgemm, _dgemm = NULL, NULL
        return
    _sgemm = <sgemm_t>PyCapsule_GetPointer(sgemm, PyCapsule_GetName(sgemm))
    _dgemm = <dgemm_t>PyCapsule_GetPointer(dgemm, PyCapsule_GetName(dgemm))


def has_gemm():
    return _sgemm != NULL


cdef inline bint _operand(cnp.ndarray a, int kind, Py_ssize_t N, Py_ssize_t* r,
                          Py_ssize_t* c, bint* shared) except -1:
    """(rows, cols) of one matrix of a C-contiguous 2-D (shared) or 3-D (N of them)
    operand of dtype ``kind``."""
    if _kind(a) != kind or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError("operands: expected C-contiguous arrays of one float dtype")
    cdef int nd = cnp.PyArray_NDIM(a)
    if nd == 2:
        shared[0] = True
    elif nd == 3 and cnp.PyArray_DIMS(a)[0] == N:
        shared[0] = False
    else:
        raise ValueError(f"operands: expected 2-D or ({N}, r, c) arrays, got "
                         f"{(<object>a).shape}")
    r[0] = cnp.PyArray_DIMS(a)[nd - 2]
    c[0] = cnp.PyArray_DIMS(a)[nd - 1]
    return True


def batched_matmul(cnp.ndarray a, cnp.ndarray b, cnp.ndarray out, bint ta, bint tb,
                   int nthreads=1, Py_ssize_t samples=0):
    """out[n] = op(a[n]) @ op(b[n]) for n < N = out.shape[0], op transposing with
    ``ta``/``tb``; a 2-D operand is the same matrix for every n.  C-contiguous arrays of
    one float dtype; the products on up to ``nthreads`` threads, one BLAS call (one
    thread) each, so the values do not depend on the thread count.

    ``samples`` > G = out.shape[0]: the operands hold ``samples`` matrices and out[g] is
    the sum of the products of the samples n with n * G // samples == g, added in order
    by BLAS (beta = 1); the groups go to the threads, so the sums do not depend on the
    thread count either.  (A weight gradient: G partial sums instead of one product per
    sample written out and summed.)"""
    if _sgemm == NULL:
        raise RuntimeError("batched_matmul: no BLAS set (set_gemm)")
    cdef int kind = _kind(out)
    if cnp.PyArray_NDIM(out) != 3 or not cnp.PyArray_IS_C_CONTIGUOUS(out) \
            or not cnp.PyArray_ISWRITEABLE(out):
        raise ValueError("out: expected a writable C-contiguous 3-D array")
    cdef Py_ssize_t G = cnp.PyArray_DIMS(out)[0]
    cdef Py_ssize_t N = samples if samples > G else G
    cdef Py_ssize_t M = cnp.PyArray_DIMS(out)[1], Nc = cnp.PyArray_DIMS(out)[2]
    cdef Py_ssize_t ar, ac, br, bc
    cdef bint ash, bsh
    _operand(a, kind, N, &ar, &ac, &ash)
    _operand(b, kind, N, &br, &bc, &bsh)
    cdef Py_ssize_t K = ar if ta else ac
    if (ac if ta else ar) != M or (bc if tb else br) != K or (br if tb else bc) != Nc:
        raise ValueError(f"shapes: op(a) {(<object>a).shape} @ op(b) {(<object>b).shape} "
                         f"does not give {(<object>out).shape[1:]}")
    if M > 2147483647 or Nc > 2147483647 or K > 2147483647:
        raise ValueError("shapes: matrices larger than BLAS's int")
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(out)
    cdef Py_ssize_t sa = 0 if ash else ar * ac * isz, sb = 0 if bsh else br * bc * isz
    cdef Py_ssize_t so = M * Nc * isz
    cdef char* ap = <char*>cnp.PyArray_DATA(a)
    cdef char* bp = <char*>cnp.PyArray_DATA(b)
    cdef char* op = <char*>cnp.PyArray_DATA(out)
    cdef int nt = max(1, min(nthreads, G))
    cdef Py_ssize_t g, i, i0
    if G == 0 or M == 0 or Nc == 0:
        return
    if K == 0 or N == 0:
        out[...] = 0
        return
    for g in prange(G, nogil=True, schedule='static', num_threads=nt):
        i0 = (g * N + G - 1) // G  # the first sample n with n * G // N == g
        i = i0
        while i < ((g + 1) * N + G - 1) // G:
            _mm(kind, ta, tb, <int>M, <int>Nc, <int>K, ap + i * sa, bp + i * sb, op + g * so,
                i > i0)
            i = i + 1


# ----------------------------------------------------------- a convolution's passes ----
# The column matrix and the products of a convolution in one parallel region, sample by
# sample: a sample's columns are multiplied while they are in cache, its column gradient
# never leaves the thread's buffer, and a training step waits for the thread team twice
# per convolution instead of five times.  The BLAS calls (``_mm``) are the ones
# ``batched_matmul`` makes, on the same operands: the same values.
cdef inline void _check_matrix(cnp.ndarray a, cnp.ndarray like, Py_ssize_t r, Py_ssize_t c,
                               str name) except *:
    if cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(like) or not cnp.PyArray_IS_C_CONTIGUOUS(a) \
            or cnp.PyArray_SIZE(a) != r * c:
        raise ValueError(f"{name}: expected a C-contiguous {like.dtype} array of {r}x{c} "
                         f"values, got {a.dtype} {(<object>a).shape}")


def conv_forward(cnp.ndarray x not None, cnp.ndarray w not None, cnp.ndarray cols not None,
                 cnp.ndarray out not None, kernel, stride, padding, bint nhwc,
                 int nthreads=1):
    """A convolution's forward, sample by sample on up to ``nthreads`` threads: the
    sample's columns into ``cols`` (as ``im2col`` writes them, kept for the weight
    gradient), then its product into ``out`` (C-contiguous, N*O*Ho*Wo values): NCHW
    out[n] = w (O, K) @ cols[n] (K, Ho*Wo); NHWC out[n] = cols[n] (Ho*Wo, K) @ w (K, O),
    K = C*kH*kW."""
    if _sgemm == NULL:
        raise RuntimeError("conv_forward: no BLAS set (set_gemm)")
    cdef int kind = _kind(x)
    cdef Py_ssize_t N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo
    N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo = _geometry(x, kernel, stride, padding, nhwc)
    cdef Py_ssize_t K = C * kH * kW, P = Ho * Wo
    cdef Py_ssize_t O = cnp.PyArray_SIZE(w) // K if K > 0 else 0
    _check_matrix(w, x, K if nhwc else O, O if nhwc else K, "w")
    _check_out(cols, x, N * K * P, "cols")
    _check_out(out, x, N * O * P, "out")
    if max(K, P, O) > 2147483647:
        raise ValueError("shapes: matrices larger than BLAS's int")
    cdef Py_ssize_t s0 = _stride(x, 0), s1 = _stride(x, 1), s2 = _stride(x, 2)
    cdef Py_ssize_t s3 = _stride(x, 3)
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(x)
    cdef Py_ssize_t psize = (H + 2 * ph) * (W + 2 * pw) * (C if nhwc else 1)
    cdef int nt = max(1, min(nthreads, N))
    cdef char* xp = <char*>cnp.PyArray_DATA(x)
    cdef char* wp = <char*>cnp.PyArray_DATA(w)
    cdef char* cp = <char*>cnp.PyArray_DATA(cols)
    cdef char* op = <char*>cnp.PyArray_DATA(out)
    cdef int m = <int>O, p = <int>P, k = <int>K
    cdef Py_ssize_t n
    cdef char* cn
    # a padded plane (NCHW) or image (NHWC, its padding zeroed here once) per thread
    cdef char* planes = <char*>PyMem_RawCalloc(nt * psize, isz)
    if planes == NULL:
        raise MemoryError()
    for n in prange(N, nogil=True, schedule='static', num_threads=nt):
        cn = cp + n * K * P * isz
        _im2col_sample(kind, nhwc, xp + n * s0 * isz, cn, C, H, W, s1, s2, s3, kH, kW,
                       sh, sw, ph, pw, Ho, Wo, planes + threadid() * psize * isz)
        if nhwc:
            _mm(kind, False, False, p, m, k, cn, wp, op + n * O * P * isz, False)
        else:
            _mm(kind, False, False, m, p, k, wp, cn, op + n * O * P * isz, False)
    PyMem_RawFree(planes)


def conv_backward(cnp.ndarray g not None, object cols, cnp.ndarray w not None, object gw,
                  cnp.ndarray gx not None, kernel, stride, padding, bint nhwc,
                  int nthreads=1):
    """A convolution's backward in one parallel region: the input gradient ``gx``
    (C-contiguous 4-D, the input's shape) sample by sample, the column gradient of a
    sample in the thread's buffer, scattered back as ``col2im`` does; with ``gw`` (a
    C-contiguous (G, K, O) array, or None) also the weight gradient's G partial sums,
    each over a fixed run of samples added in order, as ``batched_matmul`` with
    ``samples`` computes them.  ``g`` is the output gradient (N, O, Ho*Wo) NCHW or
    (N, Ho*Wo, O) NHWC, ``cols`` the forward's columns, ``w`` the weight as (O, K) (NHWC:
    its (O, kH, kW, C) transpose); ``cols`` may be None without ``gw``.  Each work item (a
    group, a sample) writes its own outputs: the same values for any thread count."""
    if _sgemm == NULL:
        raise RuntimeError("conv_backward: no BLAS set (set_gemm)")
    cdef int kind = _kind(gx)
    if cnp.PyArray_NDIM(gx) != 4 or not gx.flags.c_contiguous or not gx.flags.writeable:
        raise ValueError("gx: expected a writable C-contiguous 4-D array")
    cdef Py_ssize_t N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo
    N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo = _geometry(gx, kernel, stride, padding, nhwc)
    cdef Py_ssize_t K = C * kH * kW, P = Ho * Wo
    cdef Py_ssize_t O = cnp.PyArray_SIZE(w) // K if K > 0 else 0
    _check_matrix(w, gx, O, K, "w")
    _check_matrix(g, gx, N * O, P, "g")
    cdef Py_ssize_t G = 0
    cdef char* gwp = NULL
    cdef char* cp = NULL
    if gw is not None:
        if cols is None:
            raise ValueError("cols: the forward's columns are needed for gw")
        _check_matrix(cols, gx, N * K, P, "cols")
        cp = <char*>cnp.PyArray_DATA(cols)
        _check_out(gw, gx, cnp.PyArray_SIZE(gw), "gw")
        G = (<object>gw).shape[0] if (<cnp.ndarray>gw).ndim == 3 else -1
        if G < 1 or G > N or cnp.PyArray_SIZE(gw) != G * K * O:
            raise ValueError(f"gw: expected a (G, {K}, {O}) array with 1 <= G <= {N}, got "
                             f"{(<object>gw).shape}")
        gwp = <char*>cnp.PyArray_DATA(gw)
    if max(K, P, O) > 2147483647:
        raise ValueError("shapes: matrices larger than BLAS's int")
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(gx)
    cdef Py_ssize_t psize = (H + 2 * ph) * (W + 2 * pw) * (C if nhwc else 1)
    cdef Py_ssize_t per = K * P + psize  # a thread's column gradient, then its plane
    cdef int nt = max(1, min(nthreads, N + G))
    cdef char* gp = <char*>cnp.PyArray_DATA(g)
    cdef char* wp = <char*>cnp.PyArray_DATA(w)
    cdef char* xp = <char*>cnp.PyArray_DATA(gx)
    cdef int m = <int>O, p = <int>P, k = <int>K
    cdef Py_ssize_t it, i, i0, i1, j
    cdef char* buf
    cdef char* bufs = <char*>PyMem_RawMalloc(nt * per * isz)
    if bufs == NULL:
        raise MemoryError()
    for it in prange(G + N, nogil=True, schedule='static', num_threads=nt):
        # the G groups sit at items j * (G + N) // G, spread evenly among the samples so
        # that the threads' runs of items hold as many groups
        j = ((it + 1) * G + G + N - 1) // (G + N)  # groups at items <= it
        if j > G:
            j = G
        if j > 0 and (j - 1) * (G + N) // G == it:  # partial sum j - 1, (K, O)
            j = j - 1
            i = (j * N + G - 1) // G  # its first sample: n * G // N == j
            i0 = i
            i1 = ((j + 1) * N + G - 1) // G
            while i < i1:
                if nhwc:  # cols[i]^T (K, P) @ g[i] (P, O)
                    _mm(kind, True, False, k, m, p, cp + i * K * P * isz,
                        gp + i * O * P * isz, gwp + j * K * O * isz, i > i0)
                else:  # cols[i] (K, P) @ g[i]^T (P, O)
                    _mm(kind, False, True, k, m, p, cp + i * K * P * isz,
                        gp + i * O * P * isz, gwp + j * K * O * isz, i > i0)
                i = i + 1
        else:
            i = it - j
            buf = bufs + threadid() * per * isz
            if nhwc:  # g[i] (P, O) @ w (O, K): the sample's (P, K) column gradient
                _mm(kind, False, False, p, k, m, gp + i * O * P * isz, wp, buf, False)
            else:  # w^T (K, O) @ g[i] (O, P): (K, P)
                _mm(kind, True, False, k, p, m, wp, gp + i * O * P * isz, buf, False)
            _col2im_sample(kind, nhwc, buf, xp + i * C * H * W * isz, C, H, W, kH, kW, sh,
                           sw, ph, pw, Ho, Wo, buf + K * P * isz)
    PyMem_RawFree(bufs)


include "_wino.pxi"
