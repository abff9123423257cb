# The body of the Cython kernels, included by kernels.pyx (portable build) and
# kernels_avx2.pyx (built with -mavx2 -mfma); see kernels.pyx for the design notes.

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, NAN, INFINITY
from libc.string cimport memcpy

cdef extern from *:
    """
    #ifdef _OPENMP
    #define FASTNORM_OPENMP 1
    #else
    #define FASTNORM_OPENMP 0
    #endif
    #if defined(__AVX2__)
    #define FASTNORM_ISA "avx2"
    #else
    #define FASTNORM_ISA "baseline"
    #endif
    #if defined(__x86_64__) || defined(__i386__)
    static int fastnorm_cpu_has_avx2_fma(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    #else
    static int fastnorm_cpu_has_avx2_fma(void) { return 0; }
    #endif
    """
    int FASTNORM_OPENMP
    const char* FASTNORM_ISA
    int fastnorm_cpu_has_avx2_fma()


def isa():
    """The instruction set this module was compiled for: 'baseline' or 'avx2'."""
    return FASTNORM_ISA.decode()


def cpu_has_avx2_fma():
    """True when the running CPU can execute the 'avx2' build."""
    return bool(fastnorm_cpu_has_avx2_fma())


cdef extern from "_simd.h" nogil:
    # float32 inner loops with AVX2+FMA intrinsics in the avx2 build (see _simd.h)
    void fn_sums_f32(const float* x, Py_ssize_t n, double shift, double* s1, double* s2)
    void fn_affine_f32(const float* x, float* y, Py_ssize_t n, double mean, double a,
                       double bias, int stream)
    void fn_affine_values_f32(const float* x, float* y, Py_ssize_t n, double mean,
                              double invstd, const float* w, const float* b, int stream)
    void fn_gsums_f32(const float* dy, const float* x, Py_ssize_t n, double mean,
                      double* t1, double* t2)
    void fn_dx_f32(const float* dy, const float* x, float* dx, Py_ssize_t n, double k1,
                   double k2, double k3, double mean, const float* w, int stream)
    double fn_muladd_rounded(double a, double b, double c)
    void fn_affine_runs_f32(const float* x, float* y, Py_ssize_t rowstride, Py_ssize_t L,
                            Py_ssize_t M, double mean, double a, double bias, int stream)
    void fn_dx_runs_f32(const float* dy, const float* x, float* dx, Py_ssize_t rowstride,
                        Py_ssize_t L, Py_ssize_t M, double k1, double k2, double k3,
                        double mean, const float* w, int stream)
    void fn_sfence()
    void fn_gsums_w_f32(const float* dy, const float* x, const float* w, Py_ssize_t n,
                        double mean, double* A, double* B)
    void fn_rows_pgrads_f32(const float* dy, const float* x, Py_ssize_t rows,
                            Py_ssize_t stride, Py_ssize_t n, const double* mean,
                            const double* invstd, double* dw, double* db)
    Py_ssize_t FN_PG_ROWS
    void fn_split(double v, float* hi, float* lo)
    void fn_col_affine_ps(const float* x, Py_ssize_t rows, Py_ssize_t W, const float* mh,
                          const float* ml, const float* a, const float* b, float* y,
                          int stream)
    void fn_col_dx_ps(const float* dy, const float* x, Py_ssize_t rows, Py_ssize_t W,
                      const float* mh, const float* ml, const float* k1, const float* k2,
                      const float* k3, float* dx, int stream)
    void fn_runs_sums_f32(const float* x, Py_ssize_t rowstride, Py_ssize_t L, Py_ssize_t M,
                          double shift, double* s1, double* s2)
    void fn_runs_gsums_f32(const float* dy, const float* x, Py_ssize_t rowstride,
                           Py_ssize_t L, Py_ssize_t M, double mean, double* t1, double* t2)
    void fn_col_sums_f32(const float* x, Py_ssize_t rows, Py_ssize_t W,
                         const double* shift, double* s1, double* s2)
    void fn_col_gsums_f32(const float* dy, const float* x, Py_ssize_t rows, Py_ssize_t W,
                          const double* mean, double* sdy, double* sdyxc)
    void fn_col_apply_f32(const float* x, Py_ssize_t rows, Py_ssize_t W,
                          const double* alpha, const double* beta, float* y)
    void fn_col_dx_f32(const float* dy, const float* x, Py_ssize_t rows, Py_ssize_t W,
                       const double* k1, const double* k2, const double* k3, float* dx)


cdef struct Sums:
    double a
    double b


def openmp_enabled():
    """True when the module was compiled with OpenMP (prange runs in parallel)."""
    return bool(FASTNORM_OPENMP)


def prepare(nthreads):
    """No-op: every prange takes the thread count as ``num_threads`` (kept for the
    Numba module's interface, whose thread setting is per calling thread)."""
    pass


cdef inline void _need(Py_ssize_t size, Py_ssize_t needed, str name):
    """Raise unless an array has at least ``needed`` values (boundscheck is off)."""
    if size < needed:
        raise ValueError(f"{name}: expected at least {needed} values, got {size}")


cdef inline void _need_opt(Py_ssize_t size, Py_ssize_t needed, str name):
    """Like _need for an optional array (size 0 = absent)."""
    if size != 0 and size < needed:
        raise ValueError(f"{name}: expected 0 or at least {needed} values, got {size}")


# Outputs of at least this many bytes (float32) are written with streaming stores (see
# fn_st8 in _simd.h); the driver sets it from fastnorm._config.STREAM_MIN_BYTES.
cdef Py_ssize_t _stream_min_bytes = 16 << 20


def stream_min_bytes(n=None):
    """The output size from which float32 results are stored non-temporally; with ``n``,
    set it (bytes, >= 0) and return the previous value."""
    global _stream_min_bytes
    cdef Py_ssize_t old = _stream_min_bytes
    if n is not None:
        if n < 0:
            raise ValueError(f"n: expected a size in bytes >= 0, got {n}")
        _stream_min_bytes = n
    return old


cdef inline bint _streams(Py_ssize_t nvalues, size_t itemsize) noexcept nogil:
    """Whether a pass writing nvalues of the given size streams its stores."""
    return itemsize == 4 and nvalues * <Py_ssize_t>itemsize >= _stream_min_bytes


# ----------------------------------------------------------------------------------------
# Segment shape: group (p, g) is M segments of L = Kc*Ks contiguous values, segment m at
# base + m*rowstride.  An *item* is a contiguous range [f0, f1) of the group's M*L values
# (the whole group unless a few large groups are split into parts).  Helpers take
# pointers; ``weight``/``bias``/``sdy``/``sdyxc`` are NULL when absent.
# ----------------------------------------------------------------------------------------

cdef inline Sums _item_sums(const floating* x, Py_ssize_t base, Py_ssize_t rowstride,
                            Py_ssize_t L, Py_ssize_t f0, Py_ssize_t f1,
                            double shift) noexcept nogil:
    """Sums of d and d*d, d = x - shift, over the item."""
    cdef Sums s
    cdef double s1 = 0.0, s2 = 0.0, d, t1, t2
    cdef Py_ssize_t m, j, ja, jb
    cdef Py_ssize_t m0 = f0 // L, m1 = (f1 - 1) // L
    cdef const floating* xr
    if floating is float:
        if f0 % L == 0 and f1 % L == 0:  # whole runs: accumulators kept across them
            fn_runs_sums_f32(x + base + m0 * rowstride, rowstride, L, m1 + 1 - m0, shift,
                             &s.a, &s.b)
            return s
    for m in range(m0, m1 + 1):
        ja = f0 - m * L if m == m0 else 0
        jb = f1 - m * L if m == m1 else L
        xr = x + base + m * rowstride
        if floating is float:
            fn_sums_f32(xr + ja, jb - ja, shift, &t1, &t2)
            s1 += t1
            s2 += t2
        else:
            for j in range(ja, jb):
                d = <double>xr[j] - shift
                s1 += d
                s2 += d * d
    s.a = s1
    s.b = s2
    return s


cdef inline void _affine(const floating* x, floating* y, Py_ssize_t j0, Py_ssize_t j1,
                         double mean, double a, double bias, bint stream) noexcept nogil:
    """y[j] = (x[j] - mean) * a + bias for j in [j0, j1) (in double as x * a + b)."""
    cdef Py_ssize_t j
    cdef double b = -mean * a + bias
    if floating is float:
        fn_affine_f32(x + j0, y + j0, j1 - j0, mean, a, bias, stream)
    else:
        for j in range(j0, j1):
            y[j] = <floating>(<double>x[j] * a + b)


cdef inline void _item_apply(const floating* x, floating* y, Py_ssize_t base,
                             Py_ssize_t rowstride, Py_ssize_t L, Py_ssize_t Ks,
                             Py_ssize_t f0, Py_ssize_t f1, double mean, double invstd,
                             const floating* weight, const floating* bias,
                             Py_ssize_t wofs, bint stream) noexcept nogil:
    """y = (x - mean) * invstd * weight[c] + bias[c] over the item: as x*a + b per
    channel run (Ks > 1), as written per value (Ks == 1), like the Numba kernel; float32
    results with streaming stores when ``stream`` (see fn_st8)."""
    cdef Py_ssize_t m, kc, ja, jb, off
    cdef Py_ssize_t m0 = f0 // L, m1 = (f1 - 1) // L
    cdef double a, b
    cdef const floating* w = weight + wofs if weight != NULL else NULL
    cdef const floating* bs = bias + wofs if bias != NULL else NULL
    if floating is float:
        if L == Ks and L > 1 and f0 % L == 0 and f1 % L == 0:  # one channel, whole runs
            fn_affine_runs_f32(x + base + m0 * rowstride, y + base + m0 * rowstride,
                               rowstride, L, m1 + 1 - m0, mean,
                               invstd * <double>w[0] if w != NULL else invstd,
                               <double>bs[0] if bs != NULL else 0.0, stream)
            return
    for m in range(m0, m1 + 1):
        ja = f0 - m * L if m == m0 else 0
        jb = f1 - m * L if m == m1 else L
        off = base + m * rowstride
        if Ks == 1:  # one parameter per value (LayerNorm-like): vectorize over kc
            if floating is float:
                fn_affine_values_f32(x + off + ja, y + off + ja, jb - ja, mean, invstd,
                                     w + ja if w != NULL else NULL,
                                     bs + ja if bs != NULL else NULL, stream)
            elif w == NULL and bs == NULL:
                _affine(x + off, y + off, ja, jb, mean, invstd, 0.0, False)
            elif w == NULL:
                _affine_b(x + off, y + off, bs, ja, jb, mean, invstd)
            elif bs == NULL:
                _affine_w(x + off, y + off, w, ja, jb, mean, invstd)
            else:
                _affine_wb(x + off, y + off, w, bs, ja, jb, mean, invstd)
        else:
            for kc in range(ja // Ks, (jb - 1) // Ks + 1):
                a = invstd
                if w != NULL:
                    a = invstd * <double>w[kc]
                _affine(x + off, y + off, max(ja, kc * Ks), min(jb, kc * Ks + Ks), mean, a,
                        <double>bs[kc] if bs != NULL else 0.0, stream)


cdef inline void _affine_b(const floating* x, floating* y, const floating* bias,
                           Py_ssize_t j0, Py_ssize_t j1, double mean,
                           double invstd) noexcept nogil:
    """Per-value affine, bias only: y = (x - mean) * invstd + bias[j]."""
    cdef Py_ssize_t j
    for j in range(j0, j1):
        y[j] = <floating>((<double>x[j] - mean) * invstd + <double>bias[j])


cdef inline void _affine_w(const floating* x, floating* y, const floating* weight,
                           Py_ssize_t j0, Py_ssize_t j1, double mean,
                           double invstd) noexcept nogil:
    """Per-value affine, weight only: y = (x - mean) * invstd * weight[j]."""
    cdef Py_ssize_t j
    for j in range(j0, j1):
        y[j] = <floating>((<double>x[j] - mean) * invstd * <double>weight[j])


cdef inline void _affine_wb(const floating* x, floating* y, const floating* weight,
                            const floating* bias, Py_ssize_t j0, Py_ssize_t j1,
                            double mean, double invstd) noexcept nogil:
    """Per-value affine: y = (x - mean) * invstd * weight[j] + bias[j]."""
    cdef Py_ssize_t j
    for j in range(j0, j1):
        y[j] = <floating>((<double>x[j] - mean) * invstd * <double>weight[j]
                          + <double>bias[j])


cdef inline Sums _item_grad_sums(const floating* dy, const floating* x, Py_ssize_t base,
                                 Py_ssize_t rowstride, Py_ssize_t L, Py_ssize_t Ks,
                                 Py_ssize_t f0, Py_ssize_t f1, double mean,
                                 const floating* weight, Py_ssize_t wofs, double* sdy,
                                 double* sdyxc, Py_ssize_t sofs,
                                 bint want) noexcept nogil:
    """A = sum(g), B = sum(g*(x-mean)) with g = dy*weight[c]; with ``want``, per-channel
    sums of dy and dy*(x-mean) are added into sdy/sdyxc at sofs + kc."""
    cdef Sums s, t
    cdef Py_ssize_t m, kc, ja, jb, off
    cdef Py_ssize_t m0 = f0 // L, m1 = (f1 - 1) // L
    cdef double A = 0.0, B = 0.0, wk
    cdef const floating* w = weight + wofs if weight != NULL else NULL
    cdef double* sd = sdy + sofs if want else NULL
    cdef double* sx = sdyxc + sofs if want else NULL
    if floating is float:
        if L == Ks and f0 % L == 0 and f1 % L == 0:  # one channel, whole runs
            fn_runs_gsums_f32(dy + base + m0 * rowstride, x + base + m0 * rowstride,
                              rowstride, L, m1 + 1 - m0, mean, &t.a, &t.b)
            wk = <double>w[0] if w != NULL else 1.0
            if want:
                sd[0] += t.a
                sx[0] += t.b
            s.a = wk * t.a
            s.b = wk * t.b
            return s
    for m in range(m0, m1 + 1):
        ja = f0 - m * L if m == m0 else 0
        jb = f1 - m * L if m == m1 else L
        off = base + m * rowstride
        if Ks == 1:
            s = _grad_sums_values(dy + off, x + off, ja, jb, mean, w, sd, sx)
            A += s.a
            B += s.b
        else:
            for kc in range(ja // Ks, (jb - 1) // Ks + 1):
                t = _grad_sums_run(dy + off, x + off, max(ja, kc * Ks),
                                   min(jb, kc * Ks + Ks), mean)
                wk = 1.0
                if w != NULL:
                    wk = <double>w[kc]
                A += wk * t.a
                B += wk * t.b
                if want:
                    sd[kc] += t.a
                    sx[kc] += t.b
    s.a = A
    s.b = B
    return s


cdef inline Sums _grad_sums_run(const floating* dy, const floating* x, Py_ssize_t j0,
                                Py_ssize_t j1, double mean) noexcept nogil:
    """Sums of dy and dy * (x - mean) over [j0, j1)."""
    cdef Sums s
    cdef Py_ssize_t j
    cdef double t1 = 0.0, t2 = 0.0, d
    if floating is float:
        fn_gsums_f32(dy + j0, x + j0, j1 - j0, mean, &t1, &t2)
    else:
        for j in range(j0, j1):
            d = <double>dy[j]
            t1 += d
            t2 += d * (<double>x[j] - mean)
    s.a = t1
    s.b = t2
    return s


cdef inline Sums _grad_sums_values(const floating* dy, const floating* x, Py_ssize_t j0,
                                   Py_ssize_t j1, double mean, const floating* weight,
                                   double* sdy, double* sdyxc) noexcept nogil:
    """One parameter per value (Ks == 1): A = sum(w*dy), B = sum(w*dy*(x-mean)), and
    sdy[j] += dy, sdyxc[j] += dy*(x-mean) when sdy is not NULL.  One loop per case so
    that each is branch-free."""
    cdef Sums s
    cdef Py_ssize_t j
    cdef double A = 0.0, B = 0.0, d, xc, w
    if floating is float:
        if sdy == NULL:
            fn_gsums_w_f32(dy + j0, x + j0, weight + j0 if weight != NULL else NULL,
                           j1 - j0, mean, &s.a, &s.b)
            return s
    if weight == NULL and sdy == NULL:
        for j in range(j0, j1):
            d = <double>dy[j]
            A += d
            B += d * (<double>x[j] - mean)
    elif weight == NULL:
        for j in range(j0, j1):
            d = <double>dy[j]
            xc = <double>x[j] - mean
            A += d
            B += d * xc
            sdy[j] += d
            sdyxc[j] += d * xc
    elif sdy == NULL:
        for j in range(j0, j1):
            d = <double>dy[j]
            w = <double>weight[j]
            A += w * d
            B += w * d * (<double>x[j] - mean)
    else:
        for j in range(j0, j1):
            d = <double>dy[j]
            xc = <double>x[j] - mean
            w = <double>weight[j]
            A += w * d
            B += w * d * xc
            sdy[j] += d
            sdyxc[j] += d * xc
    s.a = A
    s.b = B
    return s


cdef inline void _item_apply_backward(const floating* dy, const floating* x, floating* dx,
                                      Py_ssize_t base, Py_ssize_t rowstride, Py_ssize_t L,
                                      Py_ssize_t Ks, Py_ssize_t f0, Py_ssize_t f1,
                                      double invstd, double k2, double k3, double mean,
                                      const floating* weight, Py_ssize_t wofs,
                                      bint stream) noexcept nogil:
    """dx = dy * invstd * weight[c] + x * k2 + k3 over the item (``mean``: the group's,
    for the float32 evaluation)."""
    cdef Py_ssize_t m, kc, ja, jb, off
    cdef Py_ssize_t m0 = f0 // L, m1 = (f1 - 1) // L
    cdef double k1
    cdef const floating* w = weight + wofs if weight != NULL else NULL
    if floating is float:
        if L == Ks and L > 1 and f0 % L == 0 and f1 % L == 0:  # one channel, whole runs
            fn_dx_runs_f32(dy + base + m0 * rowstride, x + base + m0 * rowstride,
                           dx + base + m0 * rowstride, rowstride, L, m1 + 1 - m0,
                           invstd * <double>w[0] if w != NULL else invstd, k2, k3, mean,
                           NULL, stream)
            return
    for m in range(m0, m1 + 1):
        ja = f0 - m * L if m == m0 else 0
        jb = f1 - m * L if m == m1 else L
        off = base + m * rowstride
        if Ks == 1:
            if w == NULL:
                _dx_run(dy + off, x + off, dx + off, ja, jb, invstd, k2, k3, mean, stream)
            else:
                _dx_values(dy + off, x + off, dx + off, w, ja, jb, invstd, k2, k3, mean,
                           stream)
        else:
            for kc in range(ja // Ks, (jb - 1) // Ks + 1):
                k1 = invstd
                if w != NULL:
                    k1 = invstd * <double>w[kc]
                _dx_run(dy + off, x + off, dx + off, max(ja, kc * Ks),
                        min(jb, kc * Ks + Ks), k1, k2, k3, mean, stream)


cdef inline void _dx_run(const floating* dy, const floating* x, floating* dx,
                         Py_ssize_t j0, Py_ssize_t j1, double k1, double k2,
                         double k3, double mean, bint stream) noexcept nogil:
    """dx[j] = dy[j] * k1 + x[j] * k2 + k3 for j in [j0, j1)."""
    cdef Py_ssize_t j
    if floating is float:
        fn_dx_f32(dy + j0, x + j0, dx + j0, j1 - j0, k1, k2, k3, mean, NULL, stream)
    else:
        for j in range(j0, j1):
            dx[j] = <floating>(<double>dy[j] * k1 + <double>x[j] * k2 + k3)


cdef inline void _dx_values(const floating* dy, const floating* x, floating* dx,
                            const floating* weight, Py_ssize_t j0, Py_ssize_t j1,
                            double invstd, double k2, double k3, double mean,
                            bint stream) noexcept nogil:
    """dx[j] = dy[j] * invstd * weight[j] + x[j] * k2 + k3 for j in [j0, j1)."""
    cdef Py_ssize_t j
    if floating is float:
        fn_dx_f32(dy + j0, x + j0, dx + j0, j1 - j0, invstd, k2, k3, mean, weight + j0,
                  stream)
    else:
        for j in range(j0, j1):
            dx[j] = <floating>(<double>dy[j] * invstd * <double>weight[j]
                               + <double>x[j] * k2 + k3)


cdef inline void _group_forward(const floating* x, Py_ssize_t u, Py_ssize_t M,
                                Py_ssize_t G, Py_ssize_t Kc, Py_ssize_t Ks,
                                const floating* weight, const floating* bias, double eps,
                                bint center, floating* y, double* mean, double* var,
                                bint stream) noexcept nogil:
    """seg_forward for group u: shifted sums, then the affine."""
    cdef Py_ssize_t L = Kc * Ks
    cdef Py_ssize_t rowstride = G * L
    cdef Py_ssize_t n = M * L
    cdef Py_ssize_t p = u // G
    cdef Py_ssize_t g = u - p * G
    cdef Py_ssize_t base = p * M * rowstride + g * L
    cdef double shift = <double>x[base] if center else 0.0
    cdef Sums s = _item_sums(x, base, rowstride, L, 0, n, shift)
    cdef double mu, v
    if center:
        mu = s.a / n
        v = s.b / n - mu * mu
        if v < 0.0:  # not max(): NaN must stay NaN
            v = 0.0
        mu = mu + shift
    else:
        mu = 0.0
        v = s.b / n
    mean[u] = mu
    var[u] = v
    _item_apply(x, y, base, rowstride, L, Ks, 0, n, mu, 1.0 / sqrt(v + eps),
                weight, bias, g * Kc, stream)


cdef inline void _group_backward(const floating* dy, const floating* x, Py_ssize_t u,
                                 Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc, Py_ssize_t Ks,
                                 const double* mean, const double* invstd,
                                 const floating* weight, bint center, floating* dx,
                                 double* sdy, double* sdyxc, bint want,
                                 bint stream) noexcept nogil:
    """seg_backward for group u: gradient sums, then dx (when dx is not NULL)."""
    cdef Py_ssize_t L = Kc * Ks
    cdef Py_ssize_t rowstride = G * L
    cdef Py_ssize_t n = M * L
    cdef Py_ssize_t p = u // G
    cdef Py_ssize_t g = u - p * G
    cdef Py_ssize_t base = p * M * rowstride + g * L
    cdef Py_ssize_t kc
    cdef double mu = mean[u]
    cdef double r = invstd[u]
    cdef double A, B, k2, k3
    cdef Sums s
    if want:
        for kc in range(Kc):
            sdy[u * Kc + kc] = 0.0
            sdyxc[u * Kc + kc] = 0.0
    s = _item_grad_sums(dy, x, base, rowstride, L, Ks, 0, n, mu, weight, g * Kc,
                        sdy, sdyxc, u * Kc, want)
    if dx != NULL:
        A = s.a if center else 0.0
        B = s.b
        k2 = -r * r * r * B / n
        k3 = r * (mu * r * r * B / n - A / n)
        _item_apply_backward(dy, x, dx, base, rowstride, L, Ks, 0, n, r, k2, k3, mu,
                             weight, g * Kc, stream)


def seg_forward(const floating[::1] x, Py_ssize_t P, Py_ssize_t M, Py_ssize_t G,
                Py_ssize_t Kc, Py_ssize_t Ks, const floating[::1] weight,
                const floating[::1] bias, double eps, bint center, floating[::1] y,
                double[::1] mean, double[::1] var, Py_ssize_t nthreads):
    """One group per task: shifted sums, then the affine while the group is in cache."""
    cdef Py_ssize_t u, total = P * M * G * Kc * Ks
    _need(x.shape[0], total, "x")
    _need(y.shape[0], total, "y")
    _need(mean.shape[0], P * G, "mean")
    _need(var.shape[0], P * G, "var")
    _need_opt(weight.shape[0], G * Kc, "weight")
    _need_opt(bias.shape[0], G * Kc, "bias")
    if total == 0:
        return
    cdef const floating* wp = &weight[0] if weight.shape[0] > 0 else NULL
    cdef const floating* bp = &bias[0] if bias.shape[0] > 0 else NULL
    cdef const floating* xp = &x[0]
    cdef floating* yp = &y[0]
    cdef double* mp = &mean[0]
    cdef double* vp = &var[0]
    cdef bint st = _streams(total, sizeof(floating))
    for u in prange(P * G, nogil=True, schedule='static', num_threads=nthreads):
        _group_forward(xp, u, M, G, Kc, Ks, wp, bp, eps, center, yp, mp, vp, st)
        if st:
            fn_sfence()


def seg_sums(const floating[::1] x, Py_ssize_t P, Py_ssize_t M, Py_ssize_t G,
             Py_ssize_t Kc, Py_ssize_t Ks, Py_ssize_t nparts, const double[::1] shift,
             double[::1] s1, double[::1] s2, Py_ssize_t nthreads):
    """Partial shifted sums of each group split into nparts contiguous parts."""
    cdef Py_ssize_t L = Kc * Ks
    cdef Py_ssize_t rowstride = G * L
    cdef Py_ssize_t n = M * L
    cdef Py_ssize_t it, u, part, p, g, total = P * M * G * Kc * Ks
    cdef Sums s
    _need(x.shape[0], total, "x")
    _need(shift.shape[0], P * G, "shift")
    _need(s1.shape[0], P * G * nparts, "s1")
    _need(s2.shape[0], P * G * nparts, "s2")
    if total == 0:
        return
    cdef const floating* xp = &x[0]
    for it in prange(P * G * nparts, nogil=True, schedule='static', num_threads=nthreads):
        u = it // nparts
        part = it - u * nparts
        p = u // G
        g = u - p * G
        s = _item_sums(xp, p * M * rowstride + g * L, rowstride, L, n * part // nparts,
                       n * (part + 1) // nparts, shift[u])
        s1[it] = s.a
        s2[it] = s.b


def seg_apply(const floating[::1] x, Py_ssize_t P, Py_ssize_t M, Py_ssize_t G,
              Py_ssize_t Kc, Py_ssize_t Ks, Py_ssize_t nparts, const double[::1] mean,
              const double[::1] invstd, const floating[::1] weight,
              const floating[::1] bias, floating[::1] y, Py_ssize_t nthreads):
    """y = (x - mean) * invstd * weight + bias, each group in nparts parts; groups of
    strided runs (nparts 1) row by row in memory order (see _eval_fused)."""
    cdef Py_ssize_t L = Kc * Ks
    cdef Py_ssize_t rowstride = G * L
    cdef Py_ssize_t n = M * L
    cdef Py_ssize_t it, u, part, p, g, total = P * M * G * Kc * Ks
    _need(x.shape[0], total, "x")
    _need(y.shape[0], total, "y")
    _need(mean.shape[0], P * G, "mean")
    _need(invstd.shape[0], P * G, "invstd")
    _need_opt(weight.shape[0], G * Kc, "weight")
    _need_opt(bias.shape[0], G * Kc, "bias")
    if total == 0:
        return
    cdef const floating* wp = &weight[0] if weight.shape[0] > 0 else NULL
    cdef const floating* bp = &bias[0] if bias.shape[0] > 0 else NULL
    cdef const floating* xp = &x[0]
    cdef floating* yp = &y[0]
    cdef bint st = _streams(total, sizeof(floating))
    if nparts == 1 and M > 1:
        for it in prange(P * M, nogil=True, schedule='static', num_threads=nthreads):
            p = it // M
            for g in range(G):
                _item_apply(xp, yp, it * rowstride + g * L, rowstride, L, Ks, 0, L,
                            mean[p * G + g], invstd[p * G + g], wp, bp, g * Kc, st)
            if st:
                fn_sfence()
        return
    for it in prange(P * G * nparts, nogil=True, schedule='static', num_threads=nthreads):
        u = it // nparts
        part = it - u * nparts
        p = u // G
        g = u - p * G
        _item_apply(xp, yp, p * M * rowstride + g * L, rowstride, L, Ks,
                    n * part // nparts, n * (part + 1) // nparts, mean[u], invstd[u],
                    wp, bp, g * Kc, st)
        if st:
            fn_sfence()


def seg_backward(const floating[::1] dy, const floating[::1] x, Py_ssize_t P,
                 Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc, Py_ssize_t Ks,
                 const double[::1] mean, const double[::1] invstd,
                 const floating[::1] weight, bint center, floating[::1] dx,
                 double[::1] sdy, double[::1] sdyxc, bint want, Py_ssize_t nthreads):
    """One group per task: gradient sums, then dx while the group is in cache.
    sdy/sdyxc (P*G*Kc) receive the per-channel sums when ``want``; dx of size 0 is
    skipped."""
    cdef Py_ssize_t u, total = P * M * G * Kc * Ks
    _need(dy.shape[0], total, "dy")
    _need(x.shape[0], total, "x")
    _need(mean.shape[0], P * G, "mean")
    _need(invstd.shape[0], P * G, "invstd")
    _need_opt(weight.shape[0], G * Kc, "weight")
    _need_opt(dx.shape[0], total, "dx")
    if want:
        _need(sdy.shape[0], P * G * Kc, "sdy")
        _need(sdyxc.shape[0], P * G * Kc, "sdyxc")
    if total == 0:
        return
    cdef const floating* wp = &weight[0] if weight.shape[0] > 0 else NULL
    cdef floating* dxp = &dx[0] if dx.shape[0] > 0 else NULL
    cdef double* sdp = &sdy[0] if want else NULL
    cdef double* sxp = &sdyxc[0] if want else NULL
    cdef const floating* dyp = &dy[0]
    cdef const floating* xp = &x[0]
    cdef const double* mp = &mean[0]
    cdef const double* rp = &invstd[0]
    cdef bint st = _streams(total, sizeof(floating))
    for u in prange(P * G, nogil=True, schedule='static', num_threads=nthreads):
        _group_backward(dyp, xp, u, M, G, Kc, Ks, mp, rp, wp, center, dxp, sdp, sxp, want,
                        st)
        if st:
            fn_sfence()


def seg_grad_sums(const floating[::1] dy, const floating[::1] x, Py_ssize_t P,
                  Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc, Py_ssize_t Ks,
                  Py_ssize_t nparts, const double[::1] mean, const floating[::1] weight,
                  double[::1] A, double[::1] B, double[::1] sdy, double[::1] sdyxc,
                  bint want, Py_ssize_t nthreads):
    """Partial gradient sums per (group, part); sdy/sdyxc are (P*G*nparts*Kc)."""
    cdef Py_ssize_t L = Kc * Ks
    cdef Py_ssize_t rowstride = G * L
    cdef Py_ssize_t n = M * L
    cdef Py_ssize_t it, u, part, p, g, kc, total = P * M * G * Kc * Ks
    cdef Sums s
    _need(dy.shape[0], total, "dy")
    _need(x.shape[0], total, "x")
    _need(mean.shape[0], P * G, "mean")
    _need_opt(weight.shape[0], G * Kc, "weight")
    _need(A.shape[0], P * G * nparts, "A")
    _need(B.shape[0], P * G * nparts, "B")
    if want:
        _need(sdy.shape[0], P * G * nparts * Kc, "sdy")
        _need(sdyxc.shape[0], P * G * nparts * Kc, "sdyxc")
    if total == 0:
        return
    cdef const floating* wp = &weight[0] if weight.shape[0] > 0 else NULL
    cdef double* sdp = &sdy[0] if want else NULL
    cdef double* sxp = &sdyxc[0] if want else NULL
    cdef const floating* dyp = &dy[0]
    cdef const floating* xp = &x[0]
    for it in prange(P * G * nparts, nogil=True, schedule='static', num_threads=nthreads):
        u = it // nparts
        part = it - u * nparts
        p = u // G
        g = u - p * G
        if want:
            for kc in range(Kc):
                sdp[it * Kc + kc] = 0.0
                sxp[it * Kc + kc] = 0.0
        s = _item_grad_sums(dyp, xp, p * M * rowstride + g * L, rowstride, L, Ks,
                            n * part // nparts, n * (part + 1) // nparts, mean[u], wp,
                            g * Kc, sdp, sxp, it * Kc, want)
        A[it] = s.a
        B[it] = s.b


def seg_apply_backward(const floating[::1] dy, const floating[::1] x, Py_ssize_t P,
                       Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc, Py_ssize_t Ks,
                       Py_ssize_t nparts, const double[::1] mean, const double[::1] invstd,
                       const double[::1] k2, const double[::1] k3, const floating[::1] weight,
                       floating[::1] dx, Py_ssize_t nthreads):
    """dx = dy * invstd * weight + x * k2 + k3 (k2, k3 per group), in parts."""
    cdef Py_ssize_t L = Kc * Ks
    cdef Py_ssize_t rowstride = G * L
    cdef Py_ssize_t n = M * L
    cdef Py_ssize_t it, u, part, p, g, total = P * M * G * Kc * Ks
    _need(dy.shape[0], total, "dy")
    _need(x.shape[0], total, "x")
    _need(dx.shape[0], total, "dx")
    _need(mean.shape[0], P * G, "mean")
    _need(invstd.shape[0], P * G, "invstd")
    _need(k2.shape[0], P * G, "k2")
    _need(k3.shape[0], P * G, "k3")
    _need_opt(weight.shape[0], G * Kc, "weight")
    if total == 0:
        return
    cdef const floating* wp = &weight[0] if weight.shape[0] > 0 else NULL
    cdef const floating* dyp = &dy[0]
    cdef const floating* xp = &x[0]
    cdef floating* dxp = &dx[0]
    cdef bint st = _streams(total, sizeof(floating))
    for it in prange(P * G * nparts, nogil=True, schedule='static', num_threads=nthreads):
        u = it // nparts
        part = it - u * nparts
        p = u // G
        g = u - p * G
        _item_apply_backward(dyp, xp, dxp, p * M * rowstride + g * L, rowstride, L, Ks,
                             n * part // nparts, n * (part + 1) // nparts, invstd[u],
                             k2[u], k3[u], mean[u], wp, g * Kc, st)
        if st:
            fn_sfence()


# ----------------------------------------------------------------------------------------
# Column shape: x is (P, M, W, Ks) and each of the W columns (a run of Ks values per
# row) is reduced over M rows: the channels-last layouts (Ks = 1) and large BatchNorm
# NCHW inputs, read in memory order.  An item is (p, a block of rows); it sums into its
# own row of per-item accumulators, merged afterwards in a fixed order (by the driver).
# ----------------------------------------------------------------------------------------

cdef inline void _col_sums_block(const floating* x, Py_ssize_t m0, Py_ssize_t m1,
                                 Py_ssize_t W, Py_ssize_t Ks, const double* shift,
                                 double* s1, double* s2) noexcept nogil:
    """s1[w] = sum(x[m, w, :] - shift[w]), s2 likewise squared, over rows [m0, m1) (a
    column is a run of Ks values per row)."""
    cdef Py_ssize_t m, w, k
    cdef const floating* xr
    cdef double d, t1, t2
    if floating is float:
        if Ks == 1:
            fn_col_sums_f32(x + m0 * W, m1 - m0, W, shift, s1, s2)
            return
    for w in range(W):
        s1[w] = 0.0
        s2[w] = 0.0
    for m in range(m0, m1):  # in memory order
        for w in range(W):
            xr = x + (m * W + w) * Ks
            if floating is float:
                fn_sums_f32(xr, Ks, shift[w], &t1, &t2)
            else:
                t1 = 0.0
                t2 = 0.0
                for k in range(Ks):
                    d = <double>xr[k] - shift[w]
                    t1 += d
                    t2 += d * d
            s1[w] += t1
            s2[w] += t2


cdef inline void _col_apply_block(const floating* x, Py_ssize_t m0, Py_ssize_t m1,
                                  Py_ssize_t W, Py_ssize_t Ks, const double* alpha,
                                  const double* beta, floating* y) noexcept nogil:
    """y[m, w, :] = x[m, w, :] * alpha[w] + beta[w] over rows [m0, m1)."""
    cdef Py_ssize_t m, w, k, off
    if floating is float:
        if Ks == 1:
            fn_col_apply_f32(x + m0 * W, m1 - m0, W, alpha, beta, y + m0 * W)
            return
    for m in range(m0, m1):
        for w in range(W):
            off = (m * W + w) * Ks
            for k in range(off, off + Ks):
                y[k] = <floating>(<double>x[k] * alpha[w] + beta[w])


cdef inline void _col_grad_sums_block(const floating* dy, const floating* x,
                                      Py_ssize_t m0, Py_ssize_t m1, Py_ssize_t W,
                                      Py_ssize_t Ks, const double* mean, double* sdy,
                                      double* sdyxc) noexcept nogil:
    """sdy[w] = sum(dy), sdyxc[w] = sum(dy * (x - mean[w])) over rows [m0, m1)."""
    cdef Py_ssize_t m, w, k, off
    cdef double d, t1, t2
    if floating is float:
        if Ks == 1:
            fn_col_gsums_f32(dy + m0 * W, x + m0 * W, m1 - m0, W, mean, sdy, sdyxc)
            return
    for w in range(W):
        sdy[w] = 0.0
        sdyxc[w] = 0.0
    for m in range(m0, m1):  # in memory order
        for w in range(W):
            off = (m * W + w) * Ks
            if floating is float:
                fn_gsums_f32(dy + off, x + off, Ks, mean[w], &t1, &t2)
            else:
                t1 = 0.0
                t2 = 0.0
                for k in range(off, off + Ks):
                    d = <double>dy[k]
                    t1 += d
                    t2 += d * (<double>x[k] - mean[w])
            sdy[w] += t1
            sdyxc[w] += t2


cdef inline void _col_apply_backward_block(const floating* dy, const floating* x,
                                           Py_ssize_t m0, Py_ssize_t m1, Py_ssize_t W,
                                           Py_ssize_t Ks, const double* k1,
                                           const double* k2, const double* k3,
                                           floating* dx) noexcept nogil:
    """dx[m, w, :] = dy * k1[w] + x * k2[w] + k3[w] over rows [m0, m1)."""
    cdef Py_ssize_t m, w, k, off
    if floating is float:
        if Ks == 1:
            fn_col_dx_f32(dy + m0 * W, x + m0 * W, m1 - m0, W, k1, k2, k3, dx + m0 * W)
            return
    for m in range(m0, m1):
        for w in range(W):
            off = (m * W + w) * Ks
            for k in range(off, off + Ks):
                dx[k] = <floating>(<double>dy[k] * k1[w] + <double>x[k] * k2[w] + k3[w])


def col_sums(const floating[::1] x, Py_ssize_t P, Py_ssize_t M, Py_ssize_t W,
             Py_ssize_t Ks, Py_ssize_t nch, const double[::1] shift, double[::1] s1,
             double[::1] s2, Py_ssize_t nthreads):
    """s1[item, w] = sum(x - shift[p, w]), s2 likewise squared, over the item's rows (x
    is (P, M, W, Ks): a column is a run of Ks values per row)."""
    cdef Py_ssize_t it, p, c, total = P * M * W * Ks
    _need(x.shape[0], total, "x")
    _need(shift.shape[0], P * W, "shift")
    _need(s1.shape[0], P * nch * W, "s1")
    _need(s2.shape[0], P * nch * W, "s2")
    if total == 0:
        return
    cdef const floating* xp = &x[0]
    cdef const double* shp = &shift[0]
    cdef double* s1p = &s1[0]
    cdef double* s2p = &s2[0]
    for it in prange(P * nch, nogil=True, schedule='static', num_threads=nthreads):
        p = it // nch
        c = it - p * nch
        _col_sums_block(xp + p * M * W * Ks, M * c // nch, M * (c + 1) // nch, W, Ks,
                        shp + p * W, s1p + it * W, s2p + it * W)


def col_apply(const floating[::1] x, Py_ssize_t P, Py_ssize_t M, Py_ssize_t W,
              Py_ssize_t Ks, Py_ssize_t nch, const double[::1] alpha,
              const double[::1] beta, floating[::1] y, Py_ssize_t nthreads):
    """y[p, m, w, :] = x * alpha[p, w] + beta[p, w]."""
    cdef Py_ssize_t it, p, c, total = P * M * W * Ks
    _need(x.shape[0], total, "x")
    _need(y.shape[0], total, "y")
    _need(alpha.shape[0], P * W, "alpha")
    _need(beta.shape[0], P * W, "beta")
    if total == 0:
        return
    cdef const floating* xp = &x[0]
    cdef floating* yp = &y[0]
    cdef const double* ap = &alpha[0]
    cdef const double* bp = &beta[0]
    for it in prange(P * nch, nogil=True, schedule='static', num_threads=nthreads):
        p = it // nch
        c = it - p * nch
        _col_apply_block(xp + p * M * W * Ks, M * c // nch, M * (c + 1) // nch, W, Ks,
                         ap + p * W, bp + p * W, yp + p * M * W * Ks)


def col_grad_sums(const floating[::1] dy, const floating[::1] x, Py_ssize_t P,
                  Py_ssize_t M, Py_ssize_t W, Py_ssize_t Ks, Py_ssize_t nch,
                  const double[::1] mean, double[::1] sdy, double[::1] sdyxc,
                  Py_ssize_t nthreads):
    """sdy[item, w] = sum(dy), sdyxc[item, w] = sum(dy * (x - mean[p, w]))."""
    cdef Py_ssize_t it, p, c, total = P * M * W * Ks
    _need(dy.shape[0], total, "dy")
    _need(x.shape[0], total, "x")
    _need(mean.shape[0], P * W, "mean")
    _need(sdy.shape[0], P * nch * W, "sdy")
    _need(sdyxc.shape[0], P * nch * W, "sdyxc")
    if total == 0:
        return
    cdef const floating* dyp = &dy[0]
    cdef const floating* xp = &x[0]
    cdef const double* mp = &mean[0]
    cdef double* sdp = &sdy[0]
    cdef double* sxp = &sdyxc[0]
    for it in prange(P * nch, nogil=True, schedule='static', num_threads=nthreads):
        p = it // nch
        c = it - p * nch
        _col_grad_sums_block(dyp + p * M * W * Ks, xp + p * M * W * Ks, M * c // nch,
                             M * (c + 1) // nch, W, Ks, mp + p * W, sdp + it * W,
                             sxp + it * W)


def col_apply_backward(const floating[::1] dy, const floating[::1] x, Py_ssize_t P,
                       Py_ssize_t M, Py_ssize_t W, Py_ssize_t Ks, Py_ssize_t nch,
                       const double[::1] k1, const double[::1] k2, const double[::1] k3,
                       floating[::1] dx, Py_ssize_t nthreads):
    """dx[p, m, w, :] = dy * k1[p, w] + x * k2[p, w] + k3[p, w]."""
    cdef Py_ssize_t it, p, c, total = P * M * W * Ks
    _need(dy.shape[0], total, "dy")
    _need(x.shape[0], total, "x")
    _need(dx.shape[0], total, "dx")
    _need(k1.shape[0], P * W, "k1")
    _need(k2.shape[0], P * W, "k2")
    _need(k3.shape[0], P * W, "k3")
    if total == 0:
        return
    cdef const floating* dyp = &dy[0]
    cdef const floating* xp = &x[0]
    cdef floating* dxp = &dx[0]
    cdef const double* k1p = &k1[0]
    cdef const double* k2p = &k2[0]
    cdef const double* k3p = &k3[0]
    for it in prange(P * nch, nogil=True, schedule='static', num_threads=nthreads):
        p = it // nch
        c = it - p * nch
        _col_apply_backward_block(dyp + p * M * W * Ks, xp + p * M * W * Ks, M * c // nch,
                                  M * (c + 1) // nch, W, Ks, k1p + p * W, k2p + p * W,
                                  k3p + p * W, dxp + p * M * W * Ks)


cdef inline void _row_pgrads_add(const floating* dy, const floating* x, Py_ssize_t r0,
                                 Py_ssize_t r1, Py_ssize_t K, Py_ssize_t k0, Py_ssize_t k1,
                                 const double* mean, const double* invstd, double* dweight,
                                 double* dbias) noexcept nogil:
    """dweight[k] += sum_r dy * (x - mean[r]) * invstd[r], dbias[k] += sum_r dy, for rows
    [r0, r1) and columns [k0, k1): float32 in blocks of FN_PG_ROWS rows, each block's
    sums in registers (fn_rows_pgrads_f32); rows of more than 4096 columns one at a time
    (a strip over many long rows is as many streams, which read slower: LayerNorm
    (8, 2**20) backward 18.5-19 ms one row at a time, 21-21.5 ms by blocks)."""
    cdef Py_ssize_t r, k, off
    cdef Py_ssize_t step = FN_PG_ROWS if k1 - k0 <= 4096 else 1
    cdef double mu, s, d
    if floating is float:
        r = r0
        while r < r1:
            fn_rows_pgrads_f32(dy + r * K + k0, x + r * K + k0, min(step, r1 - r), K,
                               k1 - k0, mean + r, invstd + r, dweight + k0, dbias + k0)
            r += step
    else:
        for r in range(r0, r1):
            off = r * K
            mu = mean[r]
            s = invstd[r]
            for k in range(k0, k1):
                d = <double>dy[off + k]
                dweight[k] += d * (<double>x[off + k] - mu) * s
                dbias[k] += d


cdef inline void _row_param_grads_block(const floating* dy, const floating* x,
                                        Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t K,
                                        Py_ssize_t k0, Py_ssize_t k1, const double* mean,
                                        const double* invstd, double* dweight,
                                        double* dbias) noexcept nogil:
    """dweight[k] = sum_r dy * (x - mean[r]) * invstd[r], dbias[k] = sum_r dy, for rows
    [r0, r1) and columns [k0, k1)."""
    cdef Py_ssize_t k
    for k in range(k0, k1):
        dweight[k] = 0.0
        dbias[k] = 0.0
    _row_pgrads_add(dy, x, r0, r1, K, k0, k1, mean, invstd, dweight, dbias)


cdef inline void _rows_backward(const floating* dy, const floating* x, floating* dx,
                                Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t K,
                                const double* mean, const double* invstd,
                                const floating* weight, bint center, double* dweight,
                                double* dbias, bint stream) noexcept nogil:
    """dx of rows [r0, r1) and their parameter gradients into dweight/dbias (K values
    each, overwritten), block by block: a block's dx, then its parameter gradients while
    its dy and x are still in cache (up to FN_PG_ROWS rows, 256 KB of each).  Measured
    (4096,1024) float32, 2 threads: dx + gradients 2.0-2.7 ms with the gradients in a
    second pass over dy and x, 1.7 ms in blocks of 64 rows, 1.8-2.8 ms in blocks of 16."""
    cdef Py_ssize_t r, a, b, k
    cdef Py_ssize_t B = (262144 // sizeof(floating)) // K
    B = max(1, min(B, FN_PG_ROWS))
    for k in range(K):
        dweight[k] = 0.0
        dbias[k] = 0.0
    a = r0
    while a < r1:
        b = min(a + B, r1)
        for r in range(a, b):
            _group_backward(dy, x, r, 1, 1, K, 1, mean, invstd, weight, center, dx, NULL,
                            NULL, False, stream)
        _row_pgrads_add(dy, x, a, b, K, 0, K, mean, invstd, dweight, dbias)
        a = b


cdef void _rows_backward_chunks(const floating* dy, const floating* x, floating* dx,
                                Py_ssize_t R, Py_ssize_t K, Py_ssize_t nrch,
                                const double* mean, const double* invstd,
                                const floating* weight, bint center, double* dweight,
                                double* dbias, bint stream, int nt) noexcept nogil:
    """``_rows_backward`` over the R rows in nrch chunks on the thread team, chunk c's
    parameter gradients into dweight/dbias + c*K."""
    cdef Py_ssize_t c
    for c in prange(nrch, schedule='static', num_threads=nt):
        _rows_backward(dy, x, dx, R * c // nrch, R * (c + 1) // nrch, K, mean, invstd,
                       weight, center, dweight + c * K, dbias + c * K, stream)
        if stream:
            fn_sfence()


def rows_backward(const floating[::1] dy, const floating[::1] x, Py_ssize_t R,
                  Py_ssize_t K, Py_ssize_t nrch, const double[::1] mean,
                  const double[::1] invstd, const floating[::1] weight, bint center,
                  floating[::1] dx, double[::1] dweight, double[::1] dbias,
                  Py_ssize_t nthreads):
    """Row norms (LayerNorm/RMSNorm): dx and the parameter gradients, the R rows in nrch
    chunks (chunk c sums into dweight/dbias[c*K:(c+1)*K], merged by the caller), each
    chunk in blocks of rows (``_rows_backward``: a block's dx, then its parameter
    gradients while its dy and x are in cache)."""
    cdef Py_ssize_t total = R * K
    _need(dy.shape[0], total, "dy")
    _need(x.shape[0], total, "x")
    _need(dx.shape[0], total, "dx")
    _need(mean.shape[0], R, "mean")
    _need(invstd.shape[0], R, "invstd")
    _need_opt(weight.shape[0], K, "weight")
    _need(dweight.shape[0], nrch * K, "dweight")
    _need(dbias.shape[0], nrch * K, "dbias")
    if nrch < 1 or nrch > R:
        raise ValueError("expected 1 <= nrch <= R")
    if total == 0:
        return
    cdef const floating* dyp = &dy[0]
    cdef const floating* xp = &x[0]
    cdef floating* dxp = &dx[0]
    cdef const floating* wp = &weight[0] if weight.shape[0] > 0 else NULL
    cdef const double* mp = &mean[0]
    cdef const double* rp = &invstd[0]
    cdef double* dwp = &dweight[0]
    cdef double* dbp = &dbias[0]
    with nogil:
        _rows_backward_chunks(dyp, xp, dxp, R, K, nrch, mp, rp, wp, center, dwp, dbp,
                              _streams(total, sizeof(floating)), nthreads)


def row_param_grads(const floating[::1] dy, const floating[::1] x, Py_ssize_t R,
                    Py_ssize_t K, Py_ssize_t nrch, Py_ssize_t nblk, const double[::1] mean,
                    const double[::1] invstd, double[::1] dweight, double[::1] dbias,
                    Py_ssize_t nthreads):
    """Per-value parameter gradients of row norms (LayerNorm/RMSNorm):
    dweight[k] = sum_r dy * (x - mean[r]) * invstd[r], dbias[k] = sum_r dy.
    Rows are split into nrch chunks (chunk c sums into dweight/dbias[c*K:(c+1)*K], merged
    by the caller) and columns into nblk blocks; each (chunk, block) owns its outputs."""
    cdef Py_ssize_t it, c, b, total = R * K
    _need(dy.shape[0], total, "dy")
    _need(x.shape[0], total, "x")
    _need(mean.shape[0], R, "mean")
    _need(invstd.shape[0], R, "invstd")
    _need(dweight.shape[0], nrch * K, "dweight")
    _need(dbias.shape[0], nrch * K, "dbias")
    if total == 0:
        return
    cdef const floating* dyp = &dy[0]
    cdef const floating* xp = &x[0]
    cdef const double* mp = &mean[0]
    cdef const double* rp = &invstd[0]
    cdef double* dwp = &dweight[0]
    cdef double* dbp = &dbias[0]
    for it in prange(nrch * nblk, nogil=True, schedule='static', num_threads=nthreads):
        c = it // nblk
        b = it - c * nblk
        _row_param_grads_block(dyp, xp, R * c // nrch, R * (c + 1) // nrch, K,
                               K * b // nblk, K * (b + 1) // nblk, mp, rp,
                               dwp + c * K, dbp + c * K)


def rows_apply_backward_pgrads(const floating[::1] dy, const floating[::1] x, Py_ssize_t R,
                               Py_ssize_t K, Py_ssize_t nblk, const double[::1] mean,
                               const double[::1] invstd, const double[::1] k2,
                               const double[::1] k3, const floating[::1] weight,
                               floating[::1] dx, double[::1] dweight, double[::1] dbias,
                               Py_ssize_t nthreads):
    """Row norms of a few long rows (LayerNorm/RMSNorm): dx = dy * invstd * weight + x * k2
    + k3 (k2, k3 per row) and the parameter gradients, by blocks of columns.  Block b owns
    columns [K*b/nblk, K*(b+1)/nblk) of dweight/dbias; row by row, its part of dx, then
    that part's parameter-gradient terms while its dy and x are in cache: dy and x are
    read once here instead of once for dx and once for the gradients."""
    cdef Py_ssize_t b, r, k, k0, k1, total = R * K
    _need(dy.shape[0], total, "dy")
    _need(x.shape[0], total, "x")
    _need(dx.shape[0], total, "dx")
    _need(mean.shape[0], R, "mean")
    _need(invstd.shape[0], R, "invstd")
    _need(k2.shape[0], R, "k2")
    _need(k3.shape[0], R, "k3")
    _need_opt(weight.shape[0], K, "weight")
    _need(dweight.shape[0], K, "dweight")
    _need(dbias.shape[0], K, "dbias")
    if nblk < 1 or nblk > max(K, 1):
        raise ValueError("expected 1 <= nblk <= K")
    if total == 0:
        dweight[:] = 0.0
        dbias[:] = 0.0
        return
    cdef const floating* dyp = &dy[0]
    cdef const floating* xp = &x[0]
    cdef floating* dxp = &dx[0]
    cdef const floating* wp = &weight[0] if weight.shape[0] > 0 else NULL
    cdef const double* mp = &mean[0]
    cdef const double* rp = &invstd[0]
    cdef const double* k2p = &k2[0]
    cdef const double* k3p = &k3[0]
    cdef double* dwp = &dweight[0]
    cdef double* dbp = &dbias[0]
    cdef bint st = _streams(total, sizeof(floating))
    for b in prange(nblk, nogil=True, schedule='static', num_threads=nthreads):
        k0 = K * b // nblk
        k1 = K * (b + 1) // nblk
        for k in range(k0, k1):
            dwp[k] = 0.0
            dbp[k] = 0.0
        for r in range(R):
            _item_apply_backward(dyp, xp, dxp, r * K, K, K, 1, k0, k1, rp[r], k2p[r], k3p[r],
                                 mp[r], wp, 0, st)
            _row_pgrads_add(dyp, xp, r, r + 1, K, k0, k1, mp, rp, dwp, dbp)
        if st:
            fn_sfence()


# ----------------------------------------------------------------------------------------
# Entry points with ndarray arguments checked here (the one-call passes below): acquiring
# a typed memoryview costs ~0.17 us per argument, more than applying a BatchNorm to a
# (1, 16, 8, 8) input.
# ----------------------------------------------------------------------------------------
cimport numpy as cnp

cnp.import_array()


cdef inline const void* _small_ptr(object a, int typenum, Py_ssize_t needed, str name,
                                   bint optional, bint writable) except? NULL:
    """Data pointer of a C-contiguous ndarray of ``typenum`` with >= needed values
    (None gives NULL when ``optional``)."""
    if a is None and optional:
        return NULL
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != typenum:
        raise TypeError(f"{name}: expected dtype {cnp.PyArray_DescrFromType(typenum)}, "
                        f"got {arr.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or (writable and not cnp.PyArray_ISWRITEABLE(arr)):
        raise ValueError(f"{name}: expected a {'writable ' if writable else ''}C-contiguous "
                         f"array")
    if cnp.PyArray_SIZE(arr) < needed:
        raise ValueError(f"{name}: expected at least {needed} values, got "
                         f"{cnp.PyArray_SIZE(arr)}")
    return cnp.PyArray_DATA(arr)


# ----------------------------------------------------------------------------------------
# Whole passes in one call: the training forward (statistics, y, saved statistics in the
# caller's dtype, running buffers) and the backward (dx and the parameter gradients), for
# every view except few large groups split into parts.  The driver's general path runs
# the same kernels between a dozen small NumPy operations (moments, coefficients, merges),
# which cost more than the arithmetic below ~1M values.  Work is split as the driver
# splits it (by size only: ``nch`` row blocks, ``nrch`` x ``nblk`` chunks of rows and
# columns), partial sums are merged in a fixed order, so results do not depend on the
# thread count.  float32 columns are applied in float32 with split means (_simd.h).
# ----------------------------------------------------------------------------------------
from libc.stdlib cimport malloc, free


cdef inline const void* _float_ptr(object a, Py_ssize_t needed, str name, bint optional,
                                   bint writable, int* typenum) except? NULL:
    """``_small_ptr`` for an ndarray of either float dtype; its type in ``typenum``
    (-1 for an absent optional argument)."""
    typenum[0] = -1
    if a is None and optional:
        return NULL
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(a).__name__}")
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>a)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {a.dtype}")
    typenum[0] = t
    return _small_ptr(a, t, needed, name, optional, writable)


cdef int _fused_input(object x, Py_ssize_t P, Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc,
                      Py_ssize_t Ks, Py_ssize_t nch, int nthreads) except -1:
    """The type number of x (float32 or float64), after the checks every one-call entry
    makes of its input and view."""
    if not cnp.PyArray_Check(x):
        raise TypeError(f"x: expected a numpy.ndarray, got {type(x).__name__}")
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>x)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        raise TypeError(f"x: expected dtype float32 or float64, got {x.dtype}")
    if P < 1 or M < 1 or G < 1 or Kc < 1 or Ks < 1 or nch < 1 or nch > M or nthreads < 1:
        raise ValueError("expected positive dimensions, 1 <= nch <= M and nthreads >= 1")
    return t


cdef inline double _load(const void* p, int t, Py_ssize_t i) noexcept nogil:
    if t == cnp.NPY_FLOAT32:
        return (<const float*>p)[i]
    return (<const double*>p)[i]


cdef inline void _store(void* p, int t, Py_ssize_t i, double v) noexcept nogil:
    if t == cnp.NPY_FLOAT32:
        (<float*>p)[i] = <float>v
    else:
        (<double*>p)[i] = v


cdef inline void _blend(void* buf, int t, Py_ssize_t i, double momentum,
                        double value) noexcept nogil:
    """buf[i] = (1 - momentum) * buf[i] + momentum * value with NumPy's rounding for the
    expression on a float32 buffer (the first product in float32, the sum in double)."""
    cdef float keep
    if t == cnp.NPY_FLOAT32:
        keep = <float>(1.0 - momentum) * (<float*>buf)[i]
        (<float*>buf)[i] = <float>fn_muladd_rounded(momentum, value, <double>keep)
    else:
        (<double*>buf)[i] = fn_muladd_rounded(momentum, value,
                                              (1.0 - momentum) * (<double*>buf)[i])


cdef int _col_apply_stats(const floating* xp, floating* yp, Py_ssize_t P, Py_ssize_t M,
                          Py_ssize_t G, Py_ssize_t Kc, Py_ssize_t nch, const double* mean,
                          const double* invstd, const floating* wp, const floating* bp,
                          int nt) noexcept nogil:
    """The column shape: y = (x - mean) * invstd * weight + bias with statistics per
    (p, group), parallel over ``nch`` row blocks per p (float32 in float32 with split
    means).  -1 when out of memory."""
    cdef Py_ssize_t W = G * Kc
    cdef Py_ssize_t it, p, c, ci, g, kc, m0, m1
    cdef double mu, a, bias
    cdef double* co = NULL  # float64: alpha, beta per (p, column)
    cdef float* fw = NULL  # float32: mean hi, lo, alpha, bias per (p, column)
    cdef bint st = _streams(P * M * W, sizeof(floating))
    if floating is float:
        fw = <float*>malloc(4 * P * W * sizeof(float))
        if fw == NULL:
            return -1
    else:
        co = <double*>malloc(2 * P * W * sizeof(double))
        if co == NULL:
            return -1
    for p in range(P):
        for c in range(W):
            g = c // Kc if Kc > 1 else c  # (BatchNorm: no division per column)
            ci = p * W + c
            mu = mean[p * G + g]
            a = invstd[p * G + g]
            if wp != NULL:
                a = a * <double>wp[c]
            bias = <double>bp[c] if bp != NULL else 0.0
            if floating is float:
                fn_split(mu, fw + ci, fw + P * W + ci)
                fw[2 * P * W + ci] = <float>a
                fw[3 * P * W + ci] = <float>bias
            else:
                co[ci] = a
                co[P * W + ci] = -mu * a + bias
    for it in prange(P * nch, schedule='static', num_threads=nt):
        p = it // nch
        c = it - p * nch
        m0 = M * c // nch
        m1 = M * (c + 1) // nch
        if floating is float:
            fn_col_affine_ps(xp + (p * M + m0) * W, m1 - m0, W, fw + p * W,
                             fw + P * W + p * W, fw + 2 * P * W + p * W,
                             fw + 3 * P * W + p * W, yp + (p * M + m0) * W, st)
            if st:
                fn_sfence()
        else:
            _col_apply_block(xp + p * M * W, m0, m1, W, 1, co + p * W, co + P * W + p * W,
                             yp + p * M * W)
    free(co)
    if fw != NULL:
        free(fw)
    return 0


cdef int _col_forward(const floating* xp, floating* yp, Py_ssize_t P, Py_ssize_t M,
                      Py_ssize_t G, Py_ssize_t Kc, Py_ssize_t Ks, Py_ssize_t nch,
                      const floating* wp, const floating* bp, double eps, bint center,
                      double* mean, double* var, double* r, int nt) noexcept nogil:
    """The column shape (columns of Ks values per row): block sums (parallel), merged
    per group in block order, then the affine (parallel).  -1 when out of memory."""
    cdef Py_ssize_t W = G * Kc
    cdef Py_ssize_t nb = P * nch
    cdef Py_ssize_t n = M * Kc * Ks
    cdef Py_ssize_t it, p, c, g, kc, u
    cdef double S1, S2, d, v, mu
    cdef int rc
    # per block: s1, s2 (W each); per (p, column): shift
    cdef double* work = <double*>malloc((2 * nb * W + P * W) * sizeof(double))
    if work == NULL:
        return -1
    cdef double* s1 = work
    cdef double* s2 = work + nb * W
    cdef double* sh = work + 2 * nb * W
    for p in range(P):
        for g in range(G):  # each group's first value (row 0, its first channel)
            for kc in range(Kc):
                sh[p * W + g * Kc + kc] = (<double>xp[(p * M * W + g * Kc) * Ks] if center
                                           else 0.0)
    for it in prange(nb, schedule='static', num_threads=nt):
        p = it // nch
        c = it - p * nch
        _col_sums_block(xp + p * M * W * Ks, M * c // nch, M * (c + 1) // nch, W, Ks,
                        sh + p * W, s1 + it * W, s2 + it * W)
    cdef double inv_n = 1.0 / n
    for p in range(P):
        for c in range(1, nch):  # blocks merged into the p's first, in block order
            for it in range(W):  # (vectorized)
                s1[p * nch * W + it] += s1[(p * nch + c) * W + it]
                s2[p * nch * W + it] += s2[(p * nch + c) * W + it]
        for g in range(G):
            S1 = 0.0
            S2 = 0.0
            for kc in range(Kc):
                S1 += s1[p * nch * W + g * Kc + kc]
                S2 += s2[p * nch * W + g * Kc + kc]
            if center:
                d = S1 * inv_n
                v = S2 * inv_n - d * d
                if v < 0.0:  # not max(): NaN must stay NaN
                    v = 0.0
                mu = d + sh[p * W + g * Kc]
            else:
                mu = 0.0
                v = S2 * inv_n
            u = p * G + g
            mean[u] = mu
            var[u] = v
    for u in range(P * G):  # a loop of its own: vectorized
        r[u] = 1.0 / sqrt(var[u] + eps)
    rc = _eval_fused(xp, yp, P, M, G, Kc, Ks, nch, mean, r, wp, bp, nt)
    free(work)
    return rc


cdef int _forward_fused(const floating* xp, floating* yp, Py_ssize_t P, Py_ssize_t M,
                        Py_ssize_t G, Py_ssize_t Kc, Py_ssize_t Ks, Py_ssize_t nch,
                        const floating* wp, const floating* bp, double eps, bint center,
                        double* mean, double* var, double* invstd, int nt) noexcept nogil:
    """Statistics per group into mean/var/invstd and y; -1 when out of memory."""
    cdef Py_ssize_t u
    cdef bint st = _streams(P * M * G * Kc * Ks, sizeof(floating))
    if M > 1 and (Ks == 1 or nch > 1):  # columns (of runs: large inputs, see the driver)
        return _col_forward(xp, yp, P, M, G, Kc, Ks, nch, wp, bp, eps, center, mean, var,
                            invstd, nt)
    for u in prange(P * G, schedule='static', num_threads=nt):  # segments, fused per group
        _group_forward(xp, u, M, G, Kc, Ks, wp, bp, eps, center, yp, mean, var, st)
        if st:
            fn_sfence()
    for u in range(P * G):
        invstd[u] = 1.0 / sqrt(var[u] + eps)
    return 0


cdef int _forward_call(x, Py_ssize_t P, Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc,
                       Py_ssize_t Ks, Py_ssize_t nch, weight, bias, double eps, bint center, y,
                       mean_out, invstd_out, running_mean, running_var, double momentum,
                       int nthreads) except -1:
    """``forward_fused``, its arguments checked here."""
    cdef int t = _fused_input(x, P, M, G, Kc, Ks, nch, nthreads)
    cdef Py_ssize_t total = P * M * G * Kc * Ks
    cdef Py_ssize_t PG = P * G
    cdef int tm, ti, trm, trv, rc = 0
    cdef const void* xp = _small_ptr(x, t, total, "x", False, False)
    cdef void* yp = <void*>_small_ptr(y, t, total, "y", False, True)
    cdef const void* wp = _small_ptr(weight, t, G * Kc, "weight", True, False)
    cdef const void* bp = _small_ptr(bias, t, G * Kc, "bias", True, False)
    cdef void* mo = <void*>_float_ptr(mean_out, PG, "mean_out", True, True, &tm)
    cdef void* io = <void*>_float_ptr(invstd_out, PG, "invstd_out", False, True, &ti)
    cdef void* rm = <void*>_float_ptr(running_mean, G, "running_mean", True, True, &trm)
    cdef void* rv = <void*>_float_ptr(running_var, G, "running_var", True, True, &trv)
    cdef double* st = <double*>malloc(3 * PG * sizeof(double))  # mean, var, invstd
    if st == NULL:
        raise MemoryError()
    cdef Py_ssize_t u, g, p
    cdef double n = <double>(M * Kc * Ks)
    cdef double sm, sv
    with nogil:
        if t == cnp.NPY_FLOAT32:
            rc = _forward_fused(<const float*>xp, <float*>yp, P, M, G, Kc, Ks, nch,
                                <const float*>wp, <const float*>bp, eps, center, st,
                                st + PG, st + 2 * PG, nthreads)
        else:
            rc = _forward_fused(<const double*>xp, <double*>yp, P, M, G, Kc, Ks, nch,
                                <const double*>wp, <const double*>bp, eps, center, st,
                                st + PG, st + 2 * PG, nthreads)
        if rc == 0:
            for u in range(PG):
                if mo != NULL:
                    _store(mo, tm, u, st[u])
                _store(io, ti, u, st[2 * PG + u])
            if rm != NULL or rv != NULL:
                for g in range(G):
                    sm = 0.0
                    sv = 0.0
                    for p in range(P):
                        sm += st[p * G + g]
                        sv = fn_muladd_rounded(st[PG + p * G + g], n / (n - 1.0), sv) \
                            if n > 1 else NAN
                    if rm != NULL:
                        _blend(rm, trm, g, momentum, sm / P)
                    if rv != NULL:
                        _blend(rv, trv, g, momentum, sv / P)
    free(st)
    if rc != 0:
        raise MemoryError()
    return 0


def forward_fused(x, Py_ssize_t P, Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc,
                  Py_ssize_t Ks, Py_ssize_t nch, weight, bias, double eps, bint center, y,
                  mean_out, invstd_out, running_mean, running_var, double momentum,
                  int nthreads):
    """The training forward in one call (GIL released): y; the saved mean and invstd =
    1/sqrt(var + eps) per group into mean_out/invstd_out (P*G values, either float
    dtype; mean_out may be None); running buffers (G values, None to skip) moved towards
    the statistics averaged over p, the variance unbiased by n/(n-1).  The column shape
    sums ``nch`` row blocks per p; segments are not split."""
    _forward_call(x, P, M, G, Kc, Ks, nch, weight, bias, eps, center, y, mean_out,
                  invstd_out, running_mean, running_var, momentum, nthreads)


cdef int _col_backward(const floating* dyp, const floating* xp, floating* dxp,
                       Py_ssize_t P, Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc,
                       Py_ssize_t Ks, Py_ssize_t nch, const double* mean,
                       const double* invstd, const floating* wp, bint center,
                       double* dw, double* db, int nt) noexcept nogil:
    """The column shape: block gradient sums (parallel), merged in block order, then dx
    (parallel); dw/db (not NULL) receive the parameter gradients.  -1: out of memory."""
    cdef Py_ssize_t W = G * Kc
    cdef Py_ssize_t nb = P * nch
    cdef Py_ssize_t n = M * Kc * Ks
    cdef Py_ssize_t it, p, c, g, kc, ci, m0, m1, m, off
    cdef double A, B, r, mu, wk, k2, k3
    # per block: sdy, sdyxc (W each); per (p, column): mean, k1, k2, k3
    cdef double* work = <double*>malloc((2 * nb * W + 4 * P * W) * sizeof(double))
    cdef float* fw = NULL  # float32 columns: mean hi, lo, k1, k2, k3 + k2 * mean
    if work == NULL:
        return -1
    if floating is float:
        fw = <float*>malloc(5 * P * W * sizeof(float))
        if fw == NULL:
            free(work)
            return -1
    cdef double* sd = work
    cdef double* sx = work + nb * W
    cdef double* mw = work + 2 * nb * W
    cdef double* k1w = mw + P * W
    cdef double* k2w = k1w + P * W
    cdef double* k3w = k2w + P * W
    if Kc == 1:  # (BatchNorm: one column per group)
        memcpy(mw, mean, P * W * sizeof(double))
    else:
        for p in range(P):
            for g in range(G):
                for kc in range(Kc):
                    mw[p * W + g * Kc + kc] = mean[p * G + g]
    for it in prange(nb, schedule='static', num_threads=nt):
        p = it // nch
        c = it - p * nch
        _col_grad_sums_block(dyp + p * M * W * Ks, xp + p * M * W * Ks, M * c // nch,
                             M * (c + 1) // nch, W, Ks, mw + p * W, sd + it * W,
                             sx + it * W)
    if dw != NULL:
        for c in range(W):
            dw[c] = 0.0
            db[c] = 0.0
    for p in range(P):
        for c in range(1, nch):  # merged into the p's first block, in block order
            for ci in range(W):
                sd[p * nch * W + ci] += sd[(p * nch + c) * W + ci]
                sx[p * nch * W + ci] += sx[(p * nch + c) * W + ci]
        for g in range(G):
            A = 0.0
            B = 0.0
            for kc in range(Kc):
                ci = g * Kc + kc
                wk = <double>wp[ci] if wp != NULL else 1.0
                A += wk * sd[p * nch * W + ci]
                B += wk * sx[p * nch * W + ci]
            if not center:
                A = 0.0
            r = invstd[p * G + g]
            mu = mean[p * G + g]
            k2 = -r * r * r * B / n
            k3 = r * (mu * r * r * B / n - A / n)
            for kc in range(Kc):
                ci = g * Kc + kc
                k1w[p * W + ci] = r * <double>wp[ci] if wp != NULL else r
                k2w[p * W + ci] = k2
                k3w[p * W + ci] = k3
                if floating is float:
                    fn_split(mu, fw + p * W + ci, fw + P * W + p * W + ci)
                    fw[2 * P * W + p * W + ci] = <float>k1w[p * W + ci]
                    fw[3 * P * W + p * W + ci] = <float>k2
                    fw[4 * P * W + p * W + ci] = <float>(k3 + k2 * mu)
                if dw != NULL:
                    dw[ci] += sx[p * nch * W + ci] * r
                    db[ci] += sd[p * nch * W + ci]
    cdef bint st = _streams(P * M * W * Ks, sizeof(floating))
    for it in prange(nb, schedule='static', num_threads=nt):
        p = it // nch
        c = it - p * nch
        m0 = M * c // nch
        m1 = M * (c + 1) // nch
        if floating is float:
            if Ks > 1:  # runs in memory order, float32 (fn_dx_f32)
                for m in range(m0, m1):
                    for ci in range(W):
                        off = ((p * M + m) * W + ci) * Ks
                        fn_dx_f32(dyp + off, xp + off, dxp + off, Ks, k1w[p * W + ci],
                                  k2w[p * W + ci], k3w[p * W + ci], mw[p * W + ci], NULL,
                                  st)
            else:
                fn_col_dx_ps(dyp + (p * M + m0) * W, xp + (p * M + m0) * W, m1 - m0, W,
                             fw + p * W, fw + P * W + p * W, fw + 2 * P * W + p * W,
                             fw + 3 * P * W + p * W, fw + 4 * P * W + p * W,
                             dxp + (p * M + m0) * W, st)
            if st:
                fn_sfence()
        else:
            _col_apply_backward_block(dyp + p * M * W * Ks, xp + p * M * W * Ks, m0, m1,
                                      W, Ks, k1w + p * W, k2w + p * W, k3w + p * W,
                                      dxp + p * M * W * Ks)
    free(work)
    if fw != NULL:
        free(fw)
    return 0


cdef inline void _merge_chunks(const double* work, Py_ssize_t nrch, Py_ssize_t K,
                              double* dw, double* db) noexcept nogil:
    """dw/db = the sums of the nrch chunks' parameter gradients (work: nrch rows of dw
    sums, then nrch rows of db sums), chunk by chunk: the same order for every value."""
    cdef Py_ssize_t c, ch
    for c in range(K):
        dw[c] = 0.0
        db[c] = 0.0
    for ch in range(nrch):
        for c in range(K):
            dw[c] += work[ch * K + c]
            db[c] += work[(nrch + ch) * K + c]


cdef int _backward_fused(const floating* dyp, const floating* xp, floating* dxp,
                         Py_ssize_t P, Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc,
                         Py_ssize_t Ks, Py_ssize_t nch, Py_ssize_t nrch, Py_ssize_t nblk,
                         const double* mean, const double* invstd, const floating* wp,
                         bint center, double* dw, double* db, int nt) noexcept nogil:
    """dx, and with dw/db (not NULL) the parameter gradients; -1 when out of memory."""
    cdef Py_ssize_t W = G * Kc
    cdef Py_ssize_t u, kc, c, it, ch, b
    cdef double* work
    cdef bint want = dw != NULL
    cdef bint st = _streams(P * M * W * Ks, sizeof(floating))
    if M > 1 and (Ks == 1 or nch > 1):  # columns (of runs: large inputs, see the driver)
        return _col_backward(dyp, xp, dxp, P, M, G, Kc, Ks, nch, mean, invstd, wp, center,
                             dw, db, nt)
    if Ks == 1 and M == 1 and G == 1 and want and nblk == 1:
        # rows (LayerNorm, RMSNorm), a parameter per value: dx and the parameter gradients
        # of a block of rows while it is in cache, nrch chunks of rows
        work = <double*>malloc(2 * nrch * Kc * sizeof(double))  # per chunk of rows
        if work == NULL:
            return -1
        _rows_backward_chunks(dyp, xp, dxp, P, Kc, nrch, mean, invstd, wp, center, work,
                              work + nrch * Kc, st, nt)
        _merge_chunks(work, nrch, Kc, dw, db)
        free(work)
        return 0
    if Ks == 1 and M == 1 and G == 1:  # rows, columns in blocks (long rows), or no dw
        for u in prange(P, schedule='static', num_threads=nt):
            _group_backward(dyp, xp, u, 1, 1, Kc, 1, mean, invstd, wp, center, dxp, NULL,
                            NULL, False, st)
            if st:
                fn_sfence()
        if not want:
            return 0
        work = <double*>malloc(2 * nrch * Kc * sizeof(double))  # per chunk of rows
        if work == NULL:
            return -1
        for it in prange(nrch * nblk, schedule='static', num_threads=nt):
            ch = it // nblk
            b = it - ch * nblk
            _row_param_grads_block(dyp, xp, P * ch // nrch, P * (ch + 1) // nrch, Kc,
                                   Kc * b // nblk, Kc * (b + 1) // nblk, mean, invstd,
                                   work + ch * Kc, work + (nrch + ch) * Kc)
        _merge_chunks(work, nrch, Kc, dw, db)
        free(work)
        return 0
    work = <double*>malloc(2 * P * W * sizeof(double))  # segments: per-channel sums
    if work == NULL:
        return -1
    for u in prange(P * G, schedule='static', num_threads=nt):
        _group_backward(dyp, xp, u, M, G, Kc, Ks, mean, invstd, wp, center, dxp, work,
                        work + P * W, want, st)
        if st:
            fn_sfence()
    if want:
        for c in range(W):
            dw[c] = 0.0
            db[c] = 0.0
        for u in range(P * G):
            for kc in range(Kc):
                c = (u % G) * Kc + kc
                dw[c] += work[P * W + u * Kc + kc] * invstd[u]
                db[c] += work[u * Kc + kc]
    free(work)
    return 0


cdef int _backward_call(dy, x, Py_ssize_t P, Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc,
                        Py_ssize_t Ks, Py_ssize_t nch, Py_ssize_t nrch, Py_ssize_t nblk, mean,
                        invstd, weight, bint center, dx, dweight, dbias, int nthreads) except -1:
    """``backward_fused``, its arguments checked here."""
    cdef int t = _fused_input(x, P, M, G, Kc, Ks, nch, nthreads)
    if nrch < 1 or nrch > P or nblk < 1 or nblk > Kc:
        raise ValueError("expected 1 <= nrch <= P and 1 <= nblk <= Kc")
    if (dweight is None) != (dbias is None):
        raise ValueError("dweight, dbias: expected both or neither")
    cdef Py_ssize_t total = P * M * G * Kc * Ks
    cdef Py_ssize_t PG = P * G
    cdef Py_ssize_t W = G * Kc
    cdef int tm, ti, tw, tb, rc = 0
    cdef const void* dyp = _small_ptr(dy, t, total, "dy", False, False)
    cdef const void* xp = _small_ptr(x, t, total, "x", False, False)
    cdef void* dxp = <void*>_small_ptr(dx, t, total, "dx", False, True)
    cdef const void* wp = _small_ptr(weight, t, W, "weight", True, False)
    cdef const void* mp = _float_ptr(mean, PG, "mean", True, False, &tm)
    cdef const void* ip = _float_ptr(invstd, PG, "invstd", False, False, &ti)
    cdef void* dwp = <void*>_float_ptr(dweight, W, "dweight", True, True, &tw)
    cdef void* dbp = <void*>_float_ptr(dbias, W, "dbias", True, True, &tb)
    cdef double* st = <double*>malloc((2 * PG + 2 * W) * sizeof(double))
    if st == NULL:
        raise MemoryError()
    cdef double* gw = st + 2 * PG if dwp != NULL else NULL
    cdef Py_ssize_t u, c
    with nogil:
        for u in range(PG):
            st[u] = _load(mp, tm, u) if mp != NULL else 0.0
            st[PG + u] = _load(ip, ti, u)
        if t == cnp.NPY_FLOAT32:
            rc = _backward_fused(<const float*>dyp, <const float*>xp, <float*>dxp, P, M, G,
                                 Kc, Ks, nch, nrch, nblk, st, st + PG, <const float*>wp,
                                 center, gw, st + 2 * PG + W, nthreads)
        else:
            rc = _backward_fused(<const double*>dyp, <const double*>xp, <double*>dxp, P, M,
                                 G, Kc, Ks, nch, nrch, nblk, st, st + PG, <const double*>wp,
                                 center, gw, st + 2 * PG + W, nthreads)
        if rc == 0 and dwp != NULL:
            for c in range(W):
                _store(dwp, tw, c, gw[c])
                _store(dbp, tb, c, gw[W + c])
    free(st)
    if rc != 0:
        raise MemoryError()
    return 0


def backward_fused(dy, x, Py_ssize_t P, Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc,
                   Py_ssize_t Ks, Py_ssize_t nch, Py_ssize_t nrch, Py_ssize_t nblk, mean,
                   invstd, weight, bint center, dx, dweight, dbias, int nthreads):
    """The backward in one call (GIL released): dx, and the parameter gradients into
    dweight/dbias (G*Kc values, either float dtype, both or neither None).  mean (None:
    zeros) and invstd are the saved statistics, P*G values of either float dtype.  The
    column shape sums ``nch`` row blocks per p; row norms sum their parameter gradients
    in ``nrch`` chunks of rows times ``nblk`` blocks of columns."""
    _backward_call(dy, x, P, M, G, Kc, Ks, nch, nrch, nblk, mean, invstd, weight, center,
                   dx, dweight, dbias, nthreads)


cdef int _eval_fused(const floating* xp, floating* yp, Py_ssize_t P, Py_ssize_t M,
                     Py_ssize_t G, Py_ssize_t Kc, Py_ssize_t Ks, Py_ssize_t nch,
                     const double* mean, const double* invstd, const floating* wp,
                     const floating* bp, int nt) noexcept nogil:
    cdef Py_ssize_t L = Kc * Ks
    cdef Py_ssize_t u, p, g, it, m
    cdef bint st = _streams(P * M * G * L, sizeof(floating))
    if Ks == 1 and M > 1:
        return _col_apply_stats(xp, yp, P, M, G, Kc, nch, mean, invstd, wp, bp, nt)
    if M == 1:  # each group contiguous
        for u in prange(P * G, schedule='static', num_threads=nt):
            p = u // G
            g = u - p * G
            _item_apply(xp, yp, p * G * L + g * L, G * L, L, Ks, 0, L, mean[u], invstd[u],
                        wp, bp, g * Kc, st)
            if st:
                fn_sfence()
        return 0
    # groups of strided runs (BatchNorm NCHW): in memory order, row by row, which the
    # prefetchers follow (a group at a time strides over the whole input).  The loops are
    # those of seg_apply; calling one shared helper from both measured 40% slower here
    # ((32,16,8,8): 6.7 against 4.7 us).
    for it in prange(P * M, schedule='static', num_threads=nt):
        p = it // M
        m = it - p * M
        for g in range(G):
            _item_apply(xp, yp, it * G * L + g * L, G * L, L, Ks, 0, L, mean[p * G + g],
                        invstd[p * G + g], wp, bp, g * Kc, st)
        if st:
            fn_sfence()
    return 0


cdef int _apply_call(x, Py_ssize_t P, Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc,
                     Py_ssize_t Ks, Py_ssize_t nch, mean, invstd, var, double eps, weight, bias,
                     y, int nthreads) except -1:
    """``apply_fused``, its arguments checked here."""
    cdef int t = _fused_input(x, P, M, G, Kc, Ks, nch, nthreads)
    cdef Py_ssize_t total = P * M * G * Kc * Ks
    cdef Py_ssize_t PG = P * G
    cdef int tm, ts, rc = 0
    cdef bint from_var = invstd is None
    cdef const void* xp = _small_ptr(x, t, total, "x", False, False)
    cdef void* yp = <void*>_small_ptr(y, t, total, "y", False, True)
    cdef const void* wp = _small_ptr(weight, t, G * Kc, "weight", True, False)
    cdef const void* bp = _small_ptr(bias, t, G * Kc, "bias", True, False)
    cdef const void* mp = _float_ptr(mean, PG, "mean", False, False, &tm)
    cdef const void* sp = _float_ptr(var if from_var else invstd, PG,
                                     "var" if from_var else "invstd", False, False, &ts)
    cdef double* st = <double*>malloc(2 * PG * sizeof(double))
    if st == NULL:
        raise MemoryError()
    cdef Py_ssize_t u
    with nogil:
        for u in range(PG):
            st[u] = _load(mp, tm, u)
            st[PG + u] = 1.0 / sqrt(_load(sp, ts, u) + eps) if from_var else _load(sp, ts, u)
        if t == cnp.NPY_FLOAT32:
            rc = _eval_fused(<const float*>xp, <float*>yp, P, M, G, Kc, Ks, nch, st, st + PG,
                             <const float*>wp, <const float*>bp, nthreads)
        else:
            rc = _eval_fused(<const double*>xp, <double*>yp, P, M, G, Kc, Ks, nch, st,
                             st + PG, <const double*>wp, <const double*>bp, nthreads)
    free(st)
    if rc != 0:
        raise MemoryError()
    return 0


def apply_fused(x, Py_ssize_t P, Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc,
                Py_ssize_t Ks, Py_ssize_t nch, mean, invstd, var, double eps, weight, bias,
                y, int nthreads):
    """y = (x - mean) * invstd * weight + bias in one call (GIL released), with the
    statistics given as ``invstd`` or, when it is None, as ``var`` (invstd = 1/sqrt(var +
    eps): running buffers); P*G values each, either float dtype.  The column shape in
    ``nch`` row blocks per p."""
    _apply_call(x, P, M, G, Kc, Ks, nch, mean, invstd, var, eps, weight, bias, y, nthreads)


# ----------------------------------------------------------------------------------------
# BatchNorm in one call from its user-facing arguments (fastnorm.norms tries these first).
# They take arguments as they are or not at all: x a C-contiguous float32/float64 ndarray
# (not a subclass) with values and 2+ dimensions, layout exactly 'NCHW' or 'NHWC',
# weight/bias None or C-contiguous (C,) arrays of x's dtype, buffers and outputs
# C-contiguous and writable, eps and momentum Python floats in range.  Anything else,
# and views the one-call passes do not serve, returns None: norms then validates,
# converts and raises as before.  Checked in C, these cost ~0.5 us where the same checks
# and the driver's decisions in Python cost ~4 us (a (1,16,8,8) training forward: 5.5
# against 1.6 us for the kernel call).  The view and the work split are the driver's
# (fastnorm.kernels.compiled), from the thresholds configure() copies from
# fastnorm._config when the backend is created.
# ----------------------------------------------------------------------------------------
cdef Py_ssize_t _parallel_min = 1 << 15
cdef Py_ssize_t _run_columns_min = 1 << 18
cdef Py_ssize_t _min_chunk = 16384
cdef Py_ssize_t _max_chunks = 64
cdef Py_ssize_t _split_units_below = 8
cdef Py_ssize_t _split_min = 1 << 16


def configure(Py_ssize_t parallel_min, Py_ssize_t run_columns_min, Py_ssize_t min_chunk,
              Py_ssize_t max_chunks, Py_ssize_t split_units_below, Py_ssize_t split_min):
    """Copy the driver's work-split thresholds (fastnorm._config) for the bn_* entries."""
    global _parallel_min, _run_columns_min, _min_chunk, _max_chunks, _split_units_below
    global _split_min
    if min_chunk < 1 or max_chunks < 1:
        raise ValueError("min_chunk, max_chunks: expected >= 1")
    _parallel_min, _run_columns_min, _min_chunk = parallel_min, run_columns_min, min_chunk
    _max_chunks, _split_units_below, _split_min = max_chunks, split_units_below, split_min


cdef struct BnView:
    Py_ssize_t M, C, Ks, nch   # the view (1, M, C, 1, Ks) and its row blocks
    int t                      # x's type number
    int nt                     # threads for the pass


cdef inline Py_ssize_t _ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline int _front_type(object x, int min_ndim) noexcept:
    """x's type number when the one-call entries take x as it is: an ndarray (not a
    subclass) of float32/float64, C-contiguous, aligned, of min_ndim or more dimensions
    and with values; -1 otherwise."""
    if not cnp.PyArray_CheckExact(x):
        return -1
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef int t = cnp.PyArray_TYPE(a)
    if (t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64) or cnp.PyArray_NDIM(a) < min_ndim \
            or not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_ISALIGNED(a) \
            or cnp.PyArray_SIZE(a) < 1:
        return -1
    return t


cdef inline int _front_threads(Py_ssize_t total, int nthreads) noexcept nogil:
    """The driver's ``_threads``: one below PARALLEL_MIN_ELEMENTS values."""
    return 1 if total < _parallel_min else max(1, nthreads)


cdef bint _served(Py_ssize_t P, Py_ssize_t M, Py_ssize_t G, Py_ssize_t Kc, Py_ssize_t Ks,
                  Py_ssize_t* nch) noexcept nogil:
    """The driver's split of the view (P, M, G, Kc, Ks): for the column shape
    (``_is_columns``) its row blocks per p (``_row_blocks``) into nch; for segments nch
    1, and False when they are split into parts (``_nparts`` > 1), which the one-call
    passes do not serve."""
    cdef Py_ssize_t per_p
    if M > 1 and (Ks == 1 or P * M * G * Kc * Ks >= _run_columns_min):
        per_p = _ceil_div(M * G * Kc * Ks, _min_chunk)
        if per_p > 1:
            per_p += per_p & 1  # even (the driver's _row_blocks)
        nch[0] = max(1, min(M, per_p, _ceil_div(_max_chunks, P)))
        return True
    nch[0] = 1
    cdef Py_ssize_t n = M * Kc * Ks
    if P * G >= _split_units_below or n < _split_min:
        return True
    return max(1, min(_max_chunks // (P * G), n // _min_chunk)) == 1


cdef inline bint _is_like(object a, object x, int t) noexcept:
    """a is an ndarray (not a subclass) of type t and x's shape, C-contiguous, aligned
    (a backward's dy)."""
    if not cnp.PyArray_CheckExact(a):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    return cnp.PyArray_TYPE(arr) == t and cnp.PyArray_SAMESHAPE(arr, <cnp.ndarray>x) \
        and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr)


cdef inline int _grads_flag(object param_grads, object weight) noexcept:
    """A backward's ``param_grads`` (None: weight is not None) as 1/0; -1 when it is
    neither None nor a bool."""
    if param_grads is None:
        return weight is not None
    if type(param_grads) is bool:
        return 1 if param_grads else 0
    return -1


cdef bint _is_running(object running_mean, object running_var, object momentum,
                      Py_ssize_t C) noexcept:
    """Running buffers taken as they are (each None or a writable (C,) float vector) and,
    when there is one, a Python float momentum in [0, 1]."""
    if running_mean is None and running_var is None:
        return True
    if type(momentum) is not float or not 0.0 <= <double>momentum <= 1.0:
        return False
    if running_mean is not None and not _is_float_vector(running_mean, C, True, False):
        return False
    return running_var is None or _is_float_vector(running_var, C, True, False)


cdef bint _bn_view(object x, object layout, int nthreads, BnView* v) noexcept:
    """BatchNorm's view of x (channel_view) and the driver's split for it (``_nch``,
    ``_nparts``, ``_threads``); False when x or layout is not taken as is, or when the
    one-call passes do not serve the view (segments split into parts, one value)."""
    cdef int t = _front_type(x, 2)
    if t < 0 or type(layout) is not str:
        return False
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(a)
    cdef Py_ssize_t total = cnp.PyArray_SIZE(a)
    cdef cnp.npy_intp* shape = cnp.PyArray_DIMS(a)
    if total < 2:
        return False
    if layout == "NCHW":
        v.C = shape[1]
        v.M = shape[0]
        v.Ks = total // (shape[0] * shape[1])
    elif layout == "NHWC":
        v.C = shape[nd - 1]
        v.M = total // v.C
        v.Ks = 1
    else:
        return False
    v.t = t
    v.nt = _front_threads(total, nthreads)
    return _served(1, v.M, v.C, 1, v.Ks, &v.nch)


def bn_view(x, layout, int nthreads):
    """(M, C, Ks, nch, threads) of ``_bn_view``, or None (for tests against the driver)."""
    cdef BnView v
    if not _bn_view(x, layout, nthreads, &v):
        return None
    return v.M, v.C, v.Ks, v.nch, v.nt


cdef inline bint _is_param(object p, int t, Py_ssize_t C) noexcept:
    """None, or a C-contiguous aligned (C,) ndarray of type t."""
    if p is None:
        return True
    if not cnp.PyArray_CheckExact(p):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>p
    return cnp.PyArray_TYPE(a) == t and cnp.PyArray_NDIM(a) == 1 \
        and cnp.PyArray_DIMS(a)[0] == C and cnp.PyArray_IS_C_CONTIGUOUS(a) \
        and cnp.PyArray_ISALIGNED(a)


cdef inline bint _is_float_vector(object p, Py_ssize_t C, bint writable,
                                  bint any_shape) noexcept:
    """A C-contiguous aligned float32/float64 ndarray of shape (C,) (any shape of C
    values with ``any_shape``), writable when asked."""
    if not cnp.PyArray_CheckExact(p):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>p
    cdef int t = cnp.PyArray_TYPE(a)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        return False
    if any_shape:
        if cnp.PyArray_SIZE(a) != C:
            return False
    elif cnp.PyArray_NDIM(a) != 1 or cnp.PyArray_DIMS(a)[0] != C:
        return False
    return cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISALIGNED(a) \
        and (not writable or cnp.PyArray_ISWRITEABLE(a))


cdef inline object _result(object out, object x, int t, tuple apart):
    """out when it is a C-contiguous aligned writable ndarray of x's shape and type;
    a new array for None (from 1 MB placed apart from the arrays in ``apart``, as
    fastnorm._checks.empty_apart places it); else None."""
    cdef cnp.ndarray a = <cnp.ndarray>x
    if out is None:
        if cnp.PyArray_NBYTES(a) >= (1 << 20):  # _checks.APART_MIN_BYTES
            from fastnorm._checks import empty_apart
            return empty_apart((<object>x).shape, (<object>x).dtype, apart)
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(a), cnp.PyArray_DIMS(a), t, 0)
    if not cnp.PyArray_CheckExact(out):
        return None
    cdef cnp.ndarray o = <cnp.ndarray>out
    if cnp.PyArray_TYPE(o) != t or not cnp.PyArray_SAMESHAPE(o, a) \
            or not cnp.PyArray_IS_C_CONTIGUOUS(o) or not cnp.PyArray_ISALIGNED(o) \
            or not cnp.PyArray_ISWRITEABLE(o):
        return None
    return out


cdef inline bint _is_eps(object eps) noexcept:
    return type(eps) is float and 0.0 < <double>eps < INFINITY


def bn_train(x, weight, bias, eps, layout, out, running_mean, running_var, momentum,
             int nthreads):
    """``batch_norm_train``: (y, mean, invstd), or None (see above)."""
    cdef BnView v
    if not _bn_view(x, layout, nthreads, &v) or not _is_eps(eps):
        return None
    if cnp.PyArray_SIZE(<cnp.ndarray>x) == v.C:  # one value per channel: norms raises
        return None
    if not _is_param(weight, v.t, v.C) or not _is_param(bias, v.t, v.C) \
            or not _is_running(running_mean, running_var, momentum, v.C):
        return None
    y = _result(out, x, v.t, (x,))
    if y is None:
        return None
    cdef cnp.npy_intp c = v.C
    mean = cnp.PyArray_EMPTY(1, &c, v.t, 0)
    invstd = cnp.PyArray_EMPTY(1, &c, v.t, 0)
    _forward_call(x, 1, v.M, v.C, 1, v.Ks, v.nch, weight, bias, eps, True, y, mean, invstd,
                  running_mean, running_var, momentum if type(momentum) is float else 0.0,
                  v.nt)
    return y, mean, invstd


def bn_eval(x, running_mean, running_var, weight, bias, eps, layout, out, int nthreads):
    """``batch_norm`` with training=False (the running statistics): y, or None."""
    cdef BnView v
    if not _bn_view(x, layout, nthreads, &v) or not _is_eps(eps):
        return None
    if not _is_param(weight, v.t, v.C) or not _is_param(bias, v.t, v.C):
        return None
    if not _is_float_vector(running_mean, v.C, True, False) \
            or not _is_float_vector(running_var, v.C, True, False):
        return None
    y = _result(out, x, v.t, (x,))
    if y is None:
        return None
    _apply_call(x, 1, v.M, v.C, 1, v.Ks, v.nch, running_mean, None, running_var, eps, weight,
                bias, y, v.nt)
    return y


def bn_backward(dy, x, mean, invstd, weight, layout, out, param_grads, int nthreads):
    """``batch_norm_backward``: (dx, dweight, dbias), or None."""
    cdef BnView v
    if not _bn_view(x, layout, nthreads, &v):
        return None
    if not _is_param(weight, v.t, v.C):
        return None
    if not _is_like(dy, x, v.t):
        return None
    if not _is_float_vector(mean, v.C, False, True) \
            or not _is_float_vector(invstd, v.C, False, True):
        return None
    cdef int grads = _grads_flag(param_grads, weight)
    if grads < 0:
        return None
    dx = _result(out, x, v.t, (dy, x))
    if dx is None:
        return None
    cdef cnp.npy_intp c = v.C
    dw = cnp.PyArray_EMPTY(1, &c, v.t, 0) if grads else None
    db = cnp.PyArray_EMPTY(1, &c, v.t, 0) if grads else None
    _backward_call(dy, x, 1, v.M, v.C, 1, v.Ks, v.nch, 1, 1, mean, invstd, weight, True, dx,
                   dw, db, v.nt)
    return dx, dw, db


# ----------------------------------------------------------------------------------------
# LayerNorm and RMSNorm in one call (fastnorm.norms tries these first), on the terms of the
# bn_* entries: x a C-contiguous aligned float32/float64 ndarray (not a subclass) with
# values, normalized_shape an int or a tuple of ints equal to x's trailing dimensions,
# weight/bias None or C-contiguous aligned arrays of x's dtype and the normalized shape,
# eps a Python float in range.  Anything else returns None, as do the rows the one-call
# passes do not serve (a few long rows split into parts; the backward of rows long enough
# for blocks of columns): norms then validates and raises, or runs the driver, as before.
# The rows are the driver's view (P, 1, 1, K, 1) of fastnorm.norms.row_view.
# ----------------------------------------------------------------------------------------
cdef struct RowView:
    Py_ssize_t R, K    # rows, values per row
    int k              # dimensions normalized
    int t              # x's type number
    int nt             # threads for the pass


cdef bint _row_view(object x, object normalized_shape, int nthreads, RowView* v) noexcept:
    """The rows of x over the trailing ``normalized_shape``; False when x or the shape is
    not taken as is, or when the rows are split into parts (``_nparts`` > 1)."""
    cdef int t = _front_type(x, 1)
    if t < 0:
        return False
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(a)
    cdef cnp.npy_intp* shape = cnp.PyArray_DIMS(a)
    cdef Py_ssize_t K = 1, i, nch
    cdef int k
    if type(normalized_shape) is int:  # compared as Python ints: no overflow to raise
        if nd < 1 or <object>shape[nd - 1] != normalized_shape:
            return False
        k = 1
        K = shape[nd - 1]
    elif type(normalized_shape) is tuple:
        k = len(<tuple>normalized_shape)
        if k < 1 or k > nd:
            return False
        for i in range(k):
            s = (<tuple>normalized_shape)[i]
            if type(s) is not int or <object>shape[nd - k + i] != s:
                return False
            K *= shape[nd - k + i]
    else:
        return False
    cdef Py_ssize_t total = cnp.PyArray_SIZE(a)
    if K < 1:
        return False
    v.R = total // K
    v.K = K
    v.k = k
    v.t = t
    v.nt = _front_threads(total, nthreads)
    return _served(v.R, 1, 1, K, 1, &nch)  # segments: unless few long rows in parts


cdef inline bint _is_row_param(object p, RowView* v, object x) noexcept:
    """None, or a C-contiguous aligned ndarray of x's type and the normalized shape."""
    if p is None:
        return True
    if not cnp.PyArray_CheckExact(p):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>p
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(xa), i
    if cnp.PyArray_TYPE(a) != v.t or cnp.PyArray_NDIM(a) != v.k \
            or not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_ISALIGNED(a):
        return False
    for i in range(v.k):
        if cnp.PyArray_DIMS(a)[i] != cnp.PyArray_DIMS(xa)[nd - v.k + i]:
            return False
    return True


cdef inline object _row_stat(object x, RowView* v):
    """A new array for one statistic per row: x's leading shape and type."""
    cdef cnp.ndarray a = <cnp.ndarray>x
    return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(a) - v.k, cnp.PyArray_DIMS(a), v.t, 0)


cdef inline object _row_param_grad(object x, RowView* v):
    """A new array of the normalized shape and x's type."""
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(a)
    return cnp.PyArray_EMPTY(v.k, cnp.PyArray_DIMS(a) + nd - v.k, v.t, 0)


def row_train(x, normalized_shape, weight, bias, eps, bint center, int nthreads):
    """``layer_norm_train`` (center: (y, mean, invstd)) and ``rms_norm_train`` (not
    center: (y, invrms)), or None (see above)."""
    cdef RowView v
    if not _row_view(x, normalized_shape, nthreads, &v) or not _is_eps(eps):
        return None
    if not _is_row_param(weight, &v, x) or not _is_row_param(bias, &v, x):
        return None
    y = _result(None, x, v.t, (x,))
    mean = _row_stat(x, &v) if center else None
    invstd = _row_stat(x, &v)
    _forward_call(x, v.R, 1, 1, v.K, 1, 1, weight, bias, eps, center, y, mean, invstd,
                  None, None, 0.0, v.nt)
    return (y, mean, invstd) if center else (y, invstd)


def row_backward(dy, x, mean, invstd, normalized_shape, weight, param_grads,
                 int nthreads):
    """``layer_norm_backward`` (mean given: (dx, dweight, dbias)) and ``rms_norm_backward``
    (mean None: (dx, dweight)), or None (see above; also for rows whose parameter
    gradients go by blocks of columns, as the driver's ``_backward_split``)."""
    cdef RowView v
    if not _row_view(x, normalized_shape, nthreads, &v) or not _is_row_param(weight, &v, x):
        return None
    if not _is_like(dy, x, v.t):
        return None
    cdef bint center = mean is not None
    if (center and not _is_float_vector(mean, v.R, False, True)) \
            or not _is_float_vector(invstd, v.R, False, True):
        return None
    cdef int grads = _grads_flag(param_grads, weight)
    if grads < 0:
        return None
    # _row_chunks: chunks of rows x blocks of columns for the parameter gradients
    cdef Py_ssize_t nblk = max(1, min(_max_chunks, v.K // _min_chunk))
    if nblk > 1:  # long rows: the driver's path
        return None
    cdef Py_ssize_t nrch = max(1, min(_max_chunks, _ceil_div(v.R * v.K, _min_chunk), v.R,
                                      (1 << 22) // v.K))
    dx = _result(None, x, v.t, (dy, x))
    dw = _row_param_grad(x, &v) if grads else None
    db = _row_param_grad(x, &v) if grads else None
    _backward_call(dy, x, v.R, 1, 1, v.K, 1, 1, nrch, 1, mean, invstd, weight, center, dx,
                   dw, db, v.nt)
    return (dx, dw, db) if center else (dx, dw)


# ----------------------------------------------------------------------------------------
# GroupNorm and InstanceNorm in one call, on the same terms: layout exactly 'NCHW' or
# 'NHWC', num_groups a Python int dividing the channels (None: InstanceNorm, one channel
# per group, which norms alone passes; declined when a channel has one value: norms
# raises), weight/bias None or C-contiguous aligned (C,) arrays of x's dtype, running
# buffers (InstanceNorm) as for bn_train.  The view is the driver's
# (fastnorm.norms.group_view): NCHW (N, 1, G, C/G, HW) segments, NHWC (N, HW, G, C/G, 1)
# columns; declined where the driver's one-call passes do not serve (segments split into
# parts; (N, C) in one group, the driver's row norm).
# ----------------------------------------------------------------------------------------
cdef struct GroupView:
    Py_ssize_t P, M, G, Kc, Ks, nch
    int t
    int nt


cdef bint _group_view(object x, object num_groups, object layout, int nthreads,
                      GroupView* v) noexcept:
    cdef int t = _front_type(x, 2 if num_groups is not None else 3)
    if t < 0 or type(layout) is not str:
        return False
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(a)
    cdef Py_ssize_t total = cnp.PyArray_SIZE(a)
    cdef cnp.npy_intp* shape = cnp.PyArray_DIMS(a)
    cdef Py_ssize_t N = shape[0], C, S, G
    if layout == "NCHW":
        C = shape[1]
    elif layout == "NHWC":
        C = shape[nd - 1]
    else:
        return False
    S = total // (N * C)  # values per channel and sample
    if num_groups is None:  # InstanceNorm
        if S == 1:
            return False
        G = C
    elif type(num_groups) is int and 0 < num_groups <= C:
        G = <Py_ssize_t>num_groups
        if C % G:
            return False
    else:
        return False
    v.P = N
    v.G = G
    v.Kc = C // G
    if layout == "NCHW":
        v.M, v.Ks = 1, S
    else:
        v.M, v.Ks = S, 1
    if v.M == 1 and v.Ks == 1 and G == 1:  # (N, C) in one group: the driver's row norm
        return False
    v.t = t
    v.nt = _front_threads(total, nthreads)
    return _served(v.P, v.M, G, v.Kc, v.Ks, &v.nch)


def group_view(x, num_groups, layout, int nthreads):
    """(P, M, G, Kc, Ks, nch, threads) of ``_group_view``, or None (for tests against the
    driver)."""
    cdef GroupView v
    if not _group_view(x, num_groups, layout, nthreads, &v):
        return None
    return v.P, v.M, v.G, v.Kc, v.Ks, v.nch, v.nt


def group_train(x, num_groups, weight, bias, eps, layout, running_mean, running_var,
                momentum, int nthreads):
    """``group_norm_train`` (num_groups an int) and ``instance_norm_train`` (None): (y,
    mean, invstd) with statistics of shape (N, groups), or None (see above)."""
    cdef GroupView v
    if not _group_view(x, num_groups, layout, nthreads, &v) or not _is_eps(eps):
        return None
    cdef Py_ssize_t C = v.G * v.Kc
    if not _is_param(weight, v.t, C) or not _is_param(bias, v.t, C):
        return None
    if (num_groups is not None and (running_mean is not None or running_var is not None)) \
            or not _is_running(running_mean, running_var, momentum, C):
        return None  # (running buffers are InstanceNorm's)
    y = _result(None, x, v.t, (x,))
    cdef cnp.npy_intp dims[2]
    dims[0] = v.P
    dims[1] = v.G
    mean = cnp.PyArray_EMPTY(2, dims, v.t, 0)
    invstd = cnp.PyArray_EMPTY(2, dims, v.t, 0)
    _forward_call(x, v.P, v.M, v.G, v.Kc, v.Ks, v.nch, weight, bias, eps, True, y, mean,
                  invstd, running_mean, running_var,
                  momentum if type(momentum) is float else 0.0, v.nt)
    return y, mean, invstd


def group_backward(dy, x, mean, invstd, num_groups, weight, layout, param_grads,
                   int nthreads):
    """``group_norm_backward`` (num_groups an int) and ``instance_norm_backward`` (None):
    (dx, dweight, dbias), or None."""
    cdef GroupView v
    if not _group_view(x, num_groups, layout, nthreads, &v):
        return None
    cdef Py_ssize_t C = v.G * v.Kc
    if not _is_param(weight, v.t, C):
        return None
    if not _is_like(dy, x, v.t):
        return None
    if not _is_float_vector(mean, v.P * v.G, False, True) \
            or not _is_float_vector(invstd, v.P * v.G, False, True):
        return None
    cdef int grads = _grads_flag(param_grads, weight)
    if grads < 0:
        return None
    dx = _result(None, x, v.t, (dy, x))
    cdef cnp.npy_intp c = C
    dw = cnp.PyArray_EMPTY(1, &c, v.t, 0) if grads else None
    db = cnp.PyArray_EMPTY(1, &c, v.t, 0) if grads else None
    _backward_call(dy, x, v.P, v.M, v.G, v.Kc, v.Ks, v.nch, 1, 1, mean, invstd, weight, True,
                   dx, dw, db, v.nt)
    return dx, dw, db
