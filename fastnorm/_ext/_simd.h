/* Inner loops of the Cython kernels for float32 input, with AVX2+FMA intrinsics when
 * the module is compiled for them (kernels_avx2) and plain loops otherwise.  The code is
 * written over FN_VW doubles per vector; an AVX-512 build of it (FN_VW = 8) measured no
 * faster here: on these inputs the loops are bound by cache bandwidth once the adds
 * no longer wait on each other.
 *
 * Why intrinsics: gcc vectorizes a double reduction such as ``s += x[j]`` with one
 * vector accumulator, so the loop runs at the latency of one vector add per 4 values
 * (measured 0.16 ns/value on these machines, 2.5x slower than Numba's LLVM code, which
 * keeps several accumulators).  Here every reduction keeps 4 independent vector
 * accumulators (4 * FN_VW values per step), and every float is converted to double before any
 * arithmetic, as in the portable loops: all sums and all arithmetic stay in double.
 *
 * The summation order is fixed by n alone (4 * FN_VW lanes, then the tail in order), never by
 * the thread count, so results stay bitwise identical for any number of threads.
 *
 * Sums are returned (not accumulated) through the double pointers.
 */
#ifndef FASTNORM_SIMD_H
#define FASTNORM_SIMD_H

#include <stddef.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FN_SIMD 1
#define FN_VW 4
typedef __m256d fn_vd;
#define FN_LD(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
#define FN_ST(p, v) _mm_storeu_ps((p), _mm256_cvtpd_ps(v))
#define FN_LDD(p) _mm256_loadu_pd(p)
#define FN_STD(p, v) _mm256_storeu_pd((p), (v))
#define FN_ADD _mm256_add_pd
#define FN_SUB _mm256_sub_pd
#define FN_MUL _mm256_mul_pd
#define FN_FMA _mm256_fmadd_pd
#define FN_SET1 _mm256_set1_pd
#define FN_ZERO _mm256_setzero_pd
static inline double fn_hsum(fn_vd a, fn_vd b, fn_vd c, fn_vd d) {
    __m256d s = _mm256_add_pd(_mm256_add_pd(a, b), _mm256_add_pd(c, d));
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}
#else
#define FN_SIMD 0
#endif

/* Applying the transforms in float32.  y = (x - mean) * a + b evaluated in double costs
 * two conversions per 4 values each way and is bound by them; in float32 it is three
 * vector operations per 8 values.  Done naively (x * a + b with b = bias - mean * a) it
 * would cancel badly when the mean is large against the spread (b and x * a both
 * ~1e4 for a mean of 1e4 standard deviations), so the mean is split into float32 parts
 * hi + lo (hi + lo = mean to ~2^-48 relative): x - hi is exact for values near the mean
 * (Sterbenz) and otherwise rounds relative to the difference itself, so the centered
 * value carries ~1 ulp of its own size and the result a few ulp of |y|.  The tails and
 * the portable build compute in double. */
#if FN_SIMD
/* (x - hi) - lo.  The empty asm keeps x - hi as computed: the module is built with
 * -fassociative-math (for the double reductions), which would otherwise fold hi + lo
 * into one float and undo the split. */
static inline __m256 fn_center8(__m256 x, __m256 hi, __m256 lo) {
    __m256 c = _mm256_sub_ps(x, hi);
    __asm__("" : "+x"(c));
    return _mm256_sub_ps(c, lo);
}

/* Stores of 8 results: plain, or with ``s`` non-temporal (streaming: the line goes to
 * memory without being read first, and does not evict cached data).  A pass whose output
 * is large against the last-level cache (STREAM_MIN_BYTES, 3/8 of it) streams it: input
 * and output no longer stay cached together, and the read of each line a plain store
 * makes first is a third of the traffic of an apply pass.  16-byte halves, so 16-byte alignment suffices (NumPy's
 * allocations); callers pass s = 0 for a run that is not 16-byte aligned. */
static inline void fn_st8(float* p, __m256 v, int s) {
    if (s) {
        _mm_stream_ps(p, _mm256_castps256_ps128(v));
        _mm_stream_ps(p + 4, _mm256_extractf128_ps(v, 1));
    } else {
        _mm256_storeu_ps(p, v);
    }
}
#endif

/* Whether the streaming stores of a run starting at p can be used. */
static inline int fn_can_stream(const float* p, int stream) {
    return stream && (((size_t)p) & 15) == 0;
}

/* Orders this thread's streaming stores before whatever it does next (each task that
 * streamed ends with it, before the threads join). */
static inline void fn_sfence(void) {
#if FN_SIMD
    _mm_sfence();
#endif
}

static inline void fn_split(double v, float* hi, float* lo) {
    *hi = (float)v;
    *lo = (float)(v - (double)*hi);
}

/* y = (x - mean) * a + bias over M runs of L values (run m at x + m * rowstride, and
 * likewise in y): the float32 constants are set up once for all the runs. */
static inline void fn_affine_runs_f32(const float* x, float* y, Py_ssize_t rowstride,
                                      Py_ssize_t L, Py_ssize_t M, double mean, double a,
                                      double bias, int stream) {
    Py_ssize_t j, m;
    double b = -mean * a + bias;
#if FN_SIMD
    float mh, ml;
    fn_split(mean, &mh, &ml);
    __m256 vh = _mm256_set1_ps(mh), vl = _mm256_set1_ps(ml);
    __m256 va = _mm256_set1_ps((float)a), vb = _mm256_set1_ps((float)bias);
#endif
    for (m = 0; m < M; m++) {
        const float* xr = x + m * rowstride;
        float* yr = y + m * rowstride;
        j = 0;
#if FN_SIMD
        int s = fn_can_stream(yr, stream);
        for (; j + 16 <= L; j += 16) {
            __m256 c0 = fn_center8(_mm256_loadu_ps(xr + j), vh, vl);
            __m256 c1 = fn_center8(_mm256_loadu_ps(xr + j + 8), vh, vl);
            fn_st8(yr + j, _mm256_fmadd_ps(c0, va, vb), s);
            fn_st8(yr + j + 8, _mm256_fmadd_ps(c1, va, vb), s);
        }
        for (; j + 8 <= L; j += 8)
            fn_st8(yr + j, _mm256_fmadd_ps(fn_center8(_mm256_loadu_ps(xr + j), vh, vl), va, vb),
                   s);
#endif
        for (; j < L; j++)
            yr[j] = (float)((double)xr[j] * a + b);
    }
}

/* y = (x - mean) * a + bias over [0, n) */
static inline void fn_affine_f32(const float* x, float* y, Py_ssize_t n, double mean,
                                 double a, double bias, int stream) {
    fn_affine_runs_f32(x, y, n, n, 1, mean, a, bias, stream);
}

/* One parameter per value (LayerNorm): y = (x - mean) * invstd * w[j] + b[j], w and b
 * NULL when absent. */
static inline void fn_affine_values_f32(const float* x, float* y, Py_ssize_t n,
                                        double mean, double invstd, const float* w,
                                        const float* b, int stream) {
    Py_ssize_t j = 0;
#if FN_SIMD
    int s = fn_can_stream(y, stream);
    float mh, ml;
    fn_split(mean, &mh, &ml);
    __m256 vh = _mm256_set1_ps(mh), vl = _mm256_set1_ps(ml), vr = _mm256_set1_ps((float)invstd);
    for (; j + 8 <= n; j += 8) {
        __m256 c = _mm256_mul_ps(fn_center8(_mm256_loadu_ps(x + j), vh, vl), vr);
        /* (x * invstd) * w as written: under -fassociative-math gcc regrouped the product
         * in one of the loop's two versions (plain / streaming stores), so the result
         * depended on the output's alignment (test_streaming_stores_change_nothing). */
        __asm__("" : "+x"(c));
        if (w != NULL && b != NULL)
            c = _mm256_fmadd_ps(c, _mm256_loadu_ps(w + j), _mm256_loadu_ps(b + j));
        else if (w != NULL)
            c = _mm256_mul_ps(c, _mm256_loadu_ps(w + j));
        else if (b != NULL)
            c = _mm256_add_ps(c, _mm256_loadu_ps(b + j));
        fn_st8(y + j, c, s);
    }
#endif
    for (; j < n; j++) {
        double v = ((double)x[j] - mean) * invstd;
        if (w != NULL)
            v *= (double)w[j];
        if (b != NULL)
            v += (double)b[j];
        y[j] = (float)v;
    }
}

/* dx = dy * k1 + x * k2 + k3 over M runs of L values (run m at m * rowstride in dy, x
 * and dx), in float32 as (x - mean) * k2 + (k3 + k2 * mean) (see fn_affine_f32: x * k2
 * and k3 cancel when the mean is large), the constants set up once; w (NULL when
 * absent) multiplies k1 per value of a run. */
static inline void fn_dx_runs_f32(const float* dy, const float* x, float* dx,
                                  Py_ssize_t rowstride, Py_ssize_t L, Py_ssize_t M,
                                  double k1, double k2, double k3, double mean,
                                  const float* w, int stream) {
    Py_ssize_t j, m;
    double gj;
#if FN_SIMD
    float mh, ml;
    fn_split(mean, &mh, &ml);
    __m256 vh = _mm256_set1_ps(mh), vl = _mm256_set1_ps(ml);
    __m256 v1 = _mm256_set1_ps((float)k1), v2 = _mm256_set1_ps((float)k2);
    __m256 v3 = _mm256_set1_ps((float)(k3 + k2 * mean));
#endif
    for (m = 0; m < M; m++) {
        const float* g = dy + m * rowstride;
        const float* r = x + m * rowstride;
        float* o = dx + m * rowstride;
        j = 0;
#if FN_SIMD
        int s = fn_can_stream(o, stream);
        for (; j + 8 <= L; j += 8) {
            __m256 c = fn_center8(_mm256_loadu_ps(r + j), vh, vl);
            __m256 gv = _mm256_loadu_ps(g + j);
            if (w != NULL)
                gv = _mm256_mul_ps(gv, _mm256_loadu_ps(w + j));
            __asm__("" : "+x"(gv));  /* (dy * w) * k1 as written, see fn_affine_values_f32 */
            fn_st8(o + j, _mm256_fmadd_ps(gv, v1, _mm256_fmadd_ps(c, v2, v3)), s);
        }
#endif
        for (; j < L; j++) {
            gj = (double)g[j] * k1;
            if (w != NULL)
                gj *= (double)w[j];
            o[j] = (float)(gj + (double)r[j] * k2 + k3);
        }
    }
}

/* The same over one run of n values. */
static inline void fn_dx_f32(const float* dy, const float* x, float* dx, Py_ssize_t n,
                             double k1, double k2, double k3, double mean, const float* w,
                             int stream) {
    fn_dx_runs_f32(dy, x, dx, n, n, 1, k1, k2, k3, mean, w, stream);
}

/* Columns: x is rows x W (row stride W).  s1[w] = sum_m (x[m, w] - shift[w]), s2 the
 * squares, over the rows (written).  The rows go in chunks of ~16 KB (L1); within a
 * chunk, strips of 4 vectors of columns keep their 8 accumulators in registers, then
 * single vectors of columns, then the last columns one at a time; the accumulators
 * carry over from chunk to chunk through s1/s2.  Each column is summed over the rows in
 * order whatever the chunk or strip.  (Strips over all the rows at once read a wide x
 * column-wise, a cache line per row per strip, and wait on memory.) */
#define FN_CHUNK_ROWS(W) ((W) * 4 >= 4096 ? 4 : 16384 / ((W) * 4))

static inline void fn_col_sums_strips(const float* x, Py_ssize_t rows, Py_ssize_t W,
                                      const double* shift, double* s1, double* s2) {
    Py_ssize_t w, m, m0, m1, chunk = FN_CHUNK_ROWS(W);
    for (w = 0; w < W; w++) {
        s1[w] = 0.0;
        s2[w] = 0.0;
    }
    for (m0 = 0; m0 < rows; m0 = m1) {
        m1 = m0 + chunk < rows ? m0 + chunk : rows;
        w = 0;
#if FN_SIMD
        for (; w + 4 * FN_VW <= W; w += 4 * FN_VW) {
            fn_vd h0 = FN_LDD(shift + w), h1 = FN_LDD(shift + w + FN_VW);
            fn_vd h2 = FN_LDD(shift + w + 2 * FN_VW), h3 = FN_LDD(shift + w + 3 * FN_VW);
            fn_vd a0 = FN_LDD(s1 + w), a1 = FN_LDD(s1 + w + FN_VW);
            fn_vd a2 = FN_LDD(s1 + w + 2 * FN_VW), a3 = FN_LDD(s1 + w + 3 * FN_VW);
            fn_vd b0 = FN_LDD(s2 + w), b1 = FN_LDD(s2 + w + FN_VW);
            fn_vd b2 = FN_LDD(s2 + w + 2 * FN_VW), b3 = FN_LDD(s2 + w + 3 * FN_VW);
            for (m = m0; m < m1; m++) {
                const float* r = x + m * W + w;
                fn_vd d0 = FN_SUB(FN_LD(r), h0), d1 = FN_SUB(FN_LD(r + FN_VW), h1);
                fn_vd d2 = FN_SUB(FN_LD(r + 2 * FN_VW), h2), d3 = FN_SUB(FN_LD(r + 3 * FN_VW), h3);
                a0 = FN_ADD(a0, d0); a1 = FN_ADD(a1, d1);
                a2 = FN_ADD(a2, d2); a3 = FN_ADD(a3, d3);
                b0 = FN_FMA(d0, d0, b0); b1 = FN_FMA(d1, d1, b1);
                b2 = FN_FMA(d2, d2, b2); b3 = FN_FMA(d3, d3, b3);
            }
            FN_STD(s1 + w, a0); FN_STD(s1 + w + FN_VW, a1);
            FN_STD(s1 + w + 2 * FN_VW, a2); FN_STD(s1 + w + 3 * FN_VW, a3);
            FN_STD(s2 + w, b0); FN_STD(s2 + w + FN_VW, b1);
            FN_STD(s2 + w + 2 * FN_VW, b2); FN_STD(s2 + w + 3 * FN_VW, b3);
        }
        for (; w + FN_VW <= W; w += FN_VW) {
            fn_vd h = FN_LDD(shift + w), a0 = FN_LDD(s1 + w), b0 = FN_LDD(s2 + w);
            for (m = m0; m < m1; m++) {
                fn_vd d0 = FN_SUB(FN_LD(x + m * W + w), h);
                a0 = FN_ADD(a0, d0);
                b0 = FN_FMA(d0, d0, b0);
            }
            FN_STD(s1 + w, a0);
            FN_STD(s2 + w, b0);
        }
#endif
        for (; w < W; w++) {
            double a = s1[w], b = s2[w], d;
            for (m = m0; m < m1; m++) {
                d = (double)x[m * W + w] - shift[w];
                a += d;
                b += d * d;
            }
            s1[w] = a;
            s2[w] = b;
        }
    }
}

/* Columns: sdy[w] = sum_m dy[m, w], sdyxc[w] = sum_m dy * (x - mean[w]) (written), in
 * row chunks as fn_col_sums_strips. */
static inline void fn_col_gsums_strips(const float* dy, const float* x, Py_ssize_t rows,
                                       Py_ssize_t W, const double* mean, double* sdy,
                                       double* sdyxc) {
    Py_ssize_t w, m, m0, m1, chunk = FN_CHUNK_ROWS(W);
    for (w = 0; w < W; w++) {
        sdy[w] = 0.0;
        sdyxc[w] = 0.0;
    }
    for (m0 = 0; m0 < rows; m0 = m1) {
        m1 = m0 + chunk < rows ? m0 + chunk : rows;
        w = 0;
#if FN_SIMD
        for (; w + 4 * FN_VW <= W; w += 4 * FN_VW) {
            fn_vd h0 = FN_LDD(mean + w), h1 = FN_LDD(mean + w + FN_VW);
            fn_vd h2 = FN_LDD(mean + w + 2 * FN_VW), h3 = FN_LDD(mean + w + 3 * FN_VW);
            fn_vd a0 = FN_LDD(sdy + w), a1 = FN_LDD(sdy + w + FN_VW);
            fn_vd a2 = FN_LDD(sdy + w + 2 * FN_VW), a3 = FN_LDD(sdy + w + 3 * FN_VW);
            fn_vd b0 = FN_LDD(sdyxc + w), b1 = FN_LDD(sdyxc + w + FN_VW);
            fn_vd b2 = FN_LDD(sdyxc + w + 2 * FN_VW), b3 = FN_LDD(sdyxc + w + 3 * FN_VW);
            for (m = m0; m < m1; m++) {
                const float* g = dy + m * W + w;
                const float* r = x + m * W + w;
                fn_vd g0 = FN_LD(g), g1 = FN_LD(g + FN_VW), g2 = FN_LD(g + 2 * FN_VW), g3 = FN_LD(g + 3 * FN_VW);
                a0 = FN_ADD(a0, g0); a1 = FN_ADD(a1, g1);
                a2 = FN_ADD(a2, g2); a3 = FN_ADD(a3, g3);
                b0 = FN_FMA(g0, FN_SUB(FN_LD(r), h0), b0);
                b1 = FN_FMA(g1, FN_SUB(FN_LD(r + FN_VW), h1), b1);
                b2 = FN_FMA(g2, FN_SUB(FN_LD(r + 2 * FN_VW), h2), b2);
                b3 = FN_FMA(g3, FN_SUB(FN_LD(r + 3 * FN_VW), h3), b3);
            }
            FN_STD(sdy + w, a0); FN_STD(sdy + w + FN_VW, a1);
            FN_STD(sdy + w + 2 * FN_VW, a2); FN_STD(sdy + w + 3 * FN_VW, a3);
            FN_STD(sdyxc + w, b0); FN_STD(sdyxc + w + FN_VW, b1);
            FN_STD(sdyxc + w + 2 * FN_VW, b2); FN_STD(sdyxc + w + 3 * FN_VW, b3);
        }
        for (; w + FN_VW <= W; w += FN_VW) {
            fn_vd h = FN_LDD(mean + w), a0 = FN_LDD(sdy + w), b0 = FN_LDD(sdyxc + w);
            for (m = m0; m < m1; m++) {
                fn_vd g0 = FN_LD(dy + m * W + w);
                a0 = FN_ADD(a0, g0);
                b0 = FN_FMA(g0, FN_SUB(FN_LD(x + m * W + w), h), b0);
            }
            FN_STD(sdy + w, a0);
            FN_STD(sdyxc + w, b0);
        }
#endif
        for (; w < W; w++) {
            double a = sdy[w], b = sdyxc[w], d;
            for (m = m0; m < m1; m++) {
                d = (double)dy[m * W + w];
                a += d;
                b += d * ((double)x[m * W + w] - mean[w]);
            }
            sdy[w] = a;
            sdyxc[w] = b;
        }
    }
}

/* The widest rows summed four at a time (see fn_col_sums_f32). */
#define FN_ROWS4_MAX_W 64

/* Row by row, the accumulators in memory (L1): for wide rows, where the strips above
 * would read x a cache line per row per strip and wait on memory (measured 0.37 against
 * 0.9-1.1 ns/value at W = 256 out of cache).  Same order per column. */
static inline void fn_col_sums_rows(const float* x, Py_ssize_t rows, Py_ssize_t W,
                                    const double* shift, double* s1, double* s2) {
    Py_ssize_t m, w;
    double d;
    for (w = 0; w < W; w++) {
        s1[w] = 0.0;
        s2[w] = 0.0;
    }
    for (m = 0; m < rows; m++) {
        const float* r = x + m * W;
        w = 0;
#if FN_SIMD
        for (; w + FN_VW <= W; w += FN_VW) {
            fn_vd d0 = FN_SUB(FN_LD(r + w), FN_LDD(shift + w));
            FN_STD(s1 + w, FN_ADD(FN_LDD(s1 + w), d0));
            FN_STD(s2 + w, FN_FMA(d0, d0, FN_LDD(s2 + w)));
        }
#endif
        for (; w < W; w++) {
            d = (double)r[w] - shift[w];
            s1[w] += d;
            s2[w] += d * d;
        }
    }
}

/* As fn_col_sums_rows, four rows per load and store of the sums (the same additions in
 * the same order), into accumulators on the stack (W <= FN_ROWS4_MAX_W), copied out at
 * the end. */
static inline void fn_col_sums_rows4(const float* x, Py_ssize_t rows, Py_ssize_t W,
                                     const double* shift, double* s1, double* s2) {
    double a[FN_ROWS4_MAX_W] __attribute__((aligned(64)));
    double b[FN_ROWS4_MAX_W] __attribute__((aligned(64)));
    Py_ssize_t m = 0, w, k;
    double d;
    for (w = 0; w < W; w++) {
        a[w] = 0.0;
        b[w] = 0.0;
    }
    for (; m + 4 <= rows; m += 4) {
        const float* r = x + m * W;
        w = 0;
#if FN_SIMD
        for (; w + FN_VW <= W; w += FN_VW) {
            fn_vd h = FN_LDD(shift + w);
            fn_vd d0 = FN_SUB(FN_LD(r + w), h), d1 = FN_SUB(FN_LD(r + W + w), h);
            fn_vd d2 = FN_SUB(FN_LD(r + 2 * W + w), h), d3 = FN_SUB(FN_LD(r + 3 * W + w), h);
            FN_STD(a + w, FN_ADD(FN_ADD(FN_ADD(FN_ADD(FN_LDD(a + w), d0), d1), d2), d3));
            FN_STD(b + w, FN_FMA(d3, d3, FN_FMA(d2, d2, FN_FMA(d1, d1,
                                 FN_FMA(d0, d0, FN_LDD(b + w))))));
        }
#endif
        for (; w < W; w++) {
            for (k = 0; k < 4; k++) {
                d = (double)r[k * W + w] - shift[w];
                a[w] += d;
                b[w] += d * d;
            }
        }
    }
    for (; m < rows; m++) {
        for (w = 0; w < W; w++) {
            d = (double)x[m * W + w] - shift[w];
            a[w] += d;
            b[w] += d * d;
        }
    }
    for (w = 0; w < W; w++) {
        s1[w] = a[w];
        s2[w] = b[w];
    }
}

static inline void fn_col_gsums_rows(const float* dy, const float* x, Py_ssize_t rows,
                                     Py_ssize_t W, const double* mean, double* sdy,
                                     double* sdyxc) {
    Py_ssize_t m, w;
    double d;
    for (w = 0; w < W; w++) {
        sdy[w] = 0.0;
        sdyxc[w] = 0.0;
    }
    for (m = 0; m < rows; m++) {
        const float* g = dy + m * W;
        const float* r = x + m * W;
        w = 0;
#if FN_SIMD
        for (; w + FN_VW <= W; w += FN_VW) {
            fn_vd g0 = FN_LD(g + w);
            FN_STD(sdy + w, FN_ADD(FN_LDD(sdy + w), g0));
            FN_STD(sdyxc + w, FN_FMA(g0, FN_SUB(FN_LD(r + w), FN_LDD(mean + w)),
                                     FN_LDD(sdyxc + w)));
        }
#endif
        for (; w < W; w++) {
            d = (double)g[w];
            sdy[w] += d;
            sdyxc[w] += d * ((double)r[w] - mean[w]);
        }
    }
}

/* As fn_col_gsums_rows, four rows at a time into stack accumulators (fn_col_sums_rows4). */
static inline void fn_col_gsums_rows4(const float* dy, const float* x, Py_ssize_t rows,
                                      Py_ssize_t W, const double* mean, double* sdy,
                                      double* sdyxc) {
    double a[FN_ROWS4_MAX_W] __attribute__((aligned(64)));
    double b[FN_ROWS4_MAX_W] __attribute__((aligned(64)));
    Py_ssize_t m = 0, w, k;
    double d;
    for (w = 0; w < W; w++) {
        a[w] = 0.0;
        b[w] = 0.0;
    }
    for (; m + 4 <= rows; m += 4) {
        const float* g = dy + m * W;
        const float* r = x + m * W;
        w = 0;
#if FN_SIMD
        for (; w + FN_VW <= W; w += FN_VW) {
            fn_vd mu = FN_LDD(mean + w);
            fn_vd g0 = FN_LD(g + w), g1 = FN_LD(g + W + w);
            fn_vd g2 = FN_LD(g + 2 * W + w), g3 = FN_LD(g + 3 * W + w);
            FN_STD(a + w, FN_ADD(FN_ADD(FN_ADD(FN_ADD(FN_LDD(a + w), g0), g1), g2), g3));
            fn_vd c = FN_FMA(g0, FN_SUB(FN_LD(r + w), mu), FN_LDD(b + w));
            c = FN_FMA(g1, FN_SUB(FN_LD(r + W + w), mu), c);
            c = FN_FMA(g2, FN_SUB(FN_LD(r + 2 * W + w), mu), c);
            FN_STD(b + w, FN_FMA(g3, FN_SUB(FN_LD(r + 3 * W + w), mu), c));
        }
#endif
        for (; w < W; w++) {
            for (k = 0; k < 4; k++) {
                d = (double)g[k * W + w];
                a[w] += d;
                b[w] += d * ((double)r[k * W + w] - mean[w]);
            }
        }
    }
    for (; m < rows; m++) {
        for (w = 0; w < W; w++) {
            d = (double)dy[m * W + w];
            a[w] += d;
            b[w] += d * ((double)x[m * W + w] - mean[w]);
        }
    }
    for (w = 0; w < W; w++) {
        sdy[w] = a[w];
        sdyxc[w] = b[w];
    }
}

/* Three ways to sum the columns of a block, the same values (each column summed over the
 * rows in order):
 * - strips (registers) for rows of up to 16 values, or a block small enough to be in
 *   cache (the sums of one array: up to 64K values for W <= 256);
 * - rows of up to FN_ROWS4_MAX_W values four at a time into stack accumulators;
 * - wider rows one at a time into the caller's buffer.
 * Measured over blocks of 200K values per thread, 2 threads, the variants alternating in
 * one program (a harness over these functions; the floor is benchmarks/bandwidth_floor.c's
 * read pass): the gradient sums at W = 32 took 1.98 ms in strips (the earlier choice for
 * W <= 32), 1.03 one row at a time and 0.92 four at a time (floor 0.81); the sums at W =
 * 64 2.22-2.26 ms one row at a time into the caller's buffer, 1.30-1.45 four at a time
 * on the stack. At W = 128 and 256 four rows at a time was slower (the gradient sums
 * 0.54 -> 0.82 ms, (256, 50176) 2.77 -> 5.0 ms; eight streams of wide rows), and so were
 * stack accumulators one row at a time (0.68 -> 1.00 ms). */
#define FN_STRIPS(rows, W) ((W) <= 16 || (rows) * (W) <= 16384)
#define FN_SUMS_STRIPS(rows, W) (FN_STRIPS(rows, W) || ((W) <= 256 && (rows) * (W) <= 65536))

static inline void fn_col_sums_f32(const float* x, Py_ssize_t rows, Py_ssize_t W,
                                   const double* shift, double* s1, double* s2) {
    if (FN_SUMS_STRIPS(rows, W))
        fn_col_sums_strips(x, rows, W, shift, s1, s2);
    else if (W <= FN_ROWS4_MAX_W)
        fn_col_sums_rows4(x, rows, W, shift, s1, s2);
    else
        fn_col_sums_rows(x, rows, W, shift, s1, s2);
}

static inline void fn_col_gsums_f32(const float* dy, const float* x, Py_ssize_t rows,
                                    Py_ssize_t W, const double* mean, double* sdy,
                                    double* sdyxc) {
    if (FN_STRIPS(rows, W))
        fn_col_gsums_strips(dy, x, rows, W, mean, sdy, sdyxc);
    else if (W <= FN_ROWS4_MAX_W)
        fn_col_gsums_rows4(dy, x, rows, W, mean, sdy, sdyxc);
    else
        fn_col_gsums_rows(dy, x, rows, W, mean, sdy, sdyxc);
}

/* Columns: y[m, w] = x[m, w] * alpha[w] + beta[w]. */
static inline void fn_col_apply_f32(const float* x, Py_ssize_t rows, Py_ssize_t W,
                                    const double* alpha, const double* beta, float* y) {
    Py_ssize_t m, w;
    for (m = 0; m < rows; m++) {
        const float* r = x + m * W;
        float* o = y + m * W;
        w = 0;
#if FN_SIMD
        for (; w + 2 * FN_VW <= W; w += 2 * FN_VW) {
            FN_ST(o + w, FN_FMA(FN_LD(r + w), FN_LDD(alpha + w),
                                          FN_LDD(beta + w)));
            FN_ST(o + w + FN_VW, FN_FMA(FN_LD(r + w + FN_VW), FN_LDD(alpha + w + FN_VW),
                                              FN_LDD(beta + w + FN_VW)));
        }
#endif
        for (; w < W; w++)
            o[w] = (float)((double)r[w] * alpha[w] + beta[w]);
    }
}

/* Columns: dx[m, w] = dy * k1[w] + x * k2[w] + k3[w]. */
static inline void fn_col_dx_f32(const float* dy, const float* x, Py_ssize_t rows,
                                 Py_ssize_t W, const double* k1, const double* k2,
                                 const double* k3, float* dx) {
    Py_ssize_t m, w;
    for (m = 0; m < rows; m++) {
        const float* g = dy + m * W;
        const float* r = x + m * W;
        float* o = dx + m * W;
        w = 0;
#if FN_SIMD
        for (; w + FN_VW <= W; w += FN_VW) {
            fn_vd t = FN_FMA(FN_LD(r + w), FN_LDD(k2 + w),
                                        FN_LDD(k3 + w));
            FN_ST(o + w, FN_FMA(FN_LD(g + w), FN_LDD(k1 + w), t));
        }
#endif
        for (; w < W; w++)
            o[w] = (float)((double)g[w] * k1[w] + (double)r[w] * k2[w] + k3[w]);
    }
}

/* The same two sums over a whole group of M runs of L values (run m at x + m*rowstride):
 * the vector accumulators live across the runs, so short runs (8x8 images) do not pay a
 * horizontal sum each.  Per run: steps of 4 vectors, one vector, then single values. */
static inline void fn_runs_sums_f32(const float* x, Py_ssize_t rowstride, Py_ssize_t L,
                                    Py_ssize_t M, double shift, double* s1, double* s2) {
    double a = 0.0, b = 0.0, d;
    Py_ssize_t m, j;
#if FN_SIMD
    fn_vd vs = FN_SET1(shift), z = FN_ZERO();
    fn_vd a0 = z, a1 = z, a2 = z, a3 = z, b0 = z, b1 = z, b2 = z, b3 = z;
#endif
    for (m = 0; m < M; m++) {
        const float* r = x + m * rowstride;
        j = 0;
#if FN_SIMD
        for (; j + 4 * FN_VW <= L; j += 4 * FN_VW) {
            fn_vd d0 = FN_SUB(FN_LD(r + j), vs);
            fn_vd d1 = FN_SUB(FN_LD(r + j + FN_VW), vs);
            fn_vd d2 = FN_SUB(FN_LD(r + j + 2 * FN_VW), vs);
            fn_vd d3 = FN_SUB(FN_LD(r + j + 3 * FN_VW), vs);
            a0 = FN_ADD(a0, d0); a1 = FN_ADD(a1, d1);
            a2 = FN_ADD(a2, d2); a3 = FN_ADD(a3, d3);
            b0 = FN_FMA(d0, d0, b0); b1 = FN_FMA(d1, d1, b1);
            b2 = FN_FMA(d2, d2, b2); b3 = FN_FMA(d3, d3, b3);
        }
        for (; j + FN_VW <= L; j += FN_VW) {
            fn_vd d0 = FN_SUB(FN_LD(r + j), vs);
            a0 = FN_ADD(a0, d0);
            b0 = FN_FMA(d0, d0, b0);
        }
#endif
        for (; j < L; j++) {
            d = (double)r[j] - shift;
            a += d;
            b += d * d;
        }
    }
#if FN_SIMD
    a += fn_hsum(a0, a1, a2, a3);
    b += fn_hsum(b0, b1, b2, b3);
#endif
    *s1 = a;
    *s2 = b;
}

/* fn_gsums_f32 over a whole group of M runs (see fn_runs_sums_f32). */
static inline void fn_runs_gsums_f32(const float* dy, const float* x, Py_ssize_t rowstride,
                                     Py_ssize_t L, Py_ssize_t M, double mean, double* t1,
                                     double* t2) {
    double a = 0.0, b = 0.0, d;
    Py_ssize_t m, j;
#if FN_SIMD
    fn_vd vm = FN_SET1(mean), z = FN_ZERO();
    fn_vd a0 = z, a1 = z, a2 = z, a3 = z, b0 = z, b1 = z, b2 = z, b3 = z;
#endif
    for (m = 0; m < M; m++) {
        const float* g = dy + m * rowstride;
        const float* r = x + m * rowstride;
        j = 0;
#if FN_SIMD
        for (; j + 4 * FN_VW <= L; j += 4 * FN_VW) {
            fn_vd g0 = FN_LD(g + j), g1 = FN_LD(g + j + FN_VW);
            fn_vd g2 = FN_LD(g + j + 2 * FN_VW), g3 = FN_LD(g + j + 3 * FN_VW);
            a0 = FN_ADD(a0, g0); a1 = FN_ADD(a1, g1);
            a2 = FN_ADD(a2, g2); a3 = FN_ADD(a3, g3);
            b0 = FN_FMA(g0, FN_SUB(FN_LD(r + j), vm), b0);
            b1 = FN_FMA(g1, FN_SUB(FN_LD(r + j + FN_VW), vm), b1);
            b2 = FN_FMA(g2, FN_SUB(FN_LD(r + j + 2 * FN_VW), vm), b2);
            b3 = FN_FMA(g3, FN_SUB(FN_LD(r + j + 3 * FN_VW), vm), b3);
        }
        for (; j + FN_VW <= L; j += FN_VW) {
            fn_vd g0 = FN_LD(g + j);
            a0 = FN_ADD(a0, g0);
            b0 = FN_FMA(g0, FN_SUB(FN_LD(r + j), vm), b0);
        }
#endif
        for (; j < L; j++) {
            d = (double)g[j];
            a += d;
            b += d * ((double)r[j] - mean);
        }
    }
#if FN_SIMD
    a += fn_hsum(a0, a1, a2, a3);
    b += fn_hsum(b0, b1, b2, b3);
#endif
    *t1 = a;
    *t2 = b;
}

/* a * b + c with the product rounded first, as NumPy evaluates it: never contracted
 * into one FMA (the avx2 build allows contraction elsewhere).  For the running-buffer
 * updates, which must match the NumPy path bit for bit. */
__attribute__((optimize("fp-contract=off")))
static double fn_muladd_rounded(double a, double b, double c) {
    return a * b + c;
}

/* The two sums over one run of n values (see the functions above). */
static inline void fn_sums_f32(const float* x, Py_ssize_t n, double shift, double* s1,
                               double* s2) {
    fn_runs_sums_f32(x, n, n, 1, shift, s1, s2);
}

static inline void fn_gsums_f32(const float* dy, const float* x, Py_ssize_t n,
                                double mean, double* t1, double* t2) {
    fn_runs_gsums_f32(dy, x, n, n, 1, mean, t1, t2);
}

/* Columns in float32 with split means (see fn_affine_f32):
 * y[m, w] = ((x - mh[w]) - ml[w]) * a[w] + b[w]; the last columns (and the portable
 * build) in double with the mean mh + ml. */
static inline void fn_col_affine_ps(const float* x, Py_ssize_t rows, Py_ssize_t W,
                                    const float* mh, const float* ml, const float* a,
                                    const float* b, float* y, int stream) {
    Py_ssize_t m, w;
    for (m = 0; m < rows; m++) {
        const float* r = x + m * W;
        float* o = y + m * W;
        w = 0;
#if FN_SIMD
        int s = fn_can_stream(o, stream) && W % 4 == 0;
        for (; w + 8 <= W; w += 8) {
            __m256 c = fn_center8(_mm256_loadu_ps(r + w), _mm256_loadu_ps(mh + w),
                                  _mm256_loadu_ps(ml + w));
            fn_st8(o + w, _mm256_fmadd_ps(c, _mm256_loadu_ps(a + w), _mm256_loadu_ps(b + w)),
                   s);
        }
#endif
        for (; w < W; w++)
            o[w] = (float)(((double)r[w] - ((double)mh[w] + (double)ml[w])) * (double)a[w]
                           + (double)b[w]);
    }
}

/* dx[m, w] = dy * k1[w] + ((x - mh[w]) - ml[w]) * k2[w] + k3[w], in float32 (the last
 * columns in double). */
static inline void fn_col_dx_ps(const float* dy, const float* x, Py_ssize_t rows,
                                Py_ssize_t W, const float* mh, const float* ml,
                                const float* k1, const float* k2, const float* k3,
                                float* dx, int stream) {
    Py_ssize_t m, w;
    for (m = 0; m < rows; m++) {
        const float* g = dy + m * W;
        const float* r = x + m * W;
        float* o = dx + m * W;
        w = 0;
#if FN_SIMD
        int s = fn_can_stream(o, stream) && W % 4 == 0;
        for (; w + 8 <= W; w += 8) {
            __m256 c = fn_center8(_mm256_loadu_ps(r + w), _mm256_loadu_ps(mh + w),
                                  _mm256_loadu_ps(ml + w));
            __m256 t = _mm256_fmadd_ps(c, _mm256_loadu_ps(k2 + w), _mm256_loadu_ps(k3 + w));
            fn_st8(o + w, _mm256_fmadd_ps(_mm256_loadu_ps(g + w), _mm256_loadu_ps(k1 + w), t),
                   s);
        }
#endif
        for (; w < W; w++)
            o[w] = (float)((double)g[w] * (double)k1[w]
                           + ((double)r[w] - ((double)mh[w] + (double)ml[w])) * (double)k2[w]
                           + (double)k3[w]);
    }
}

/* One weight per value (LayerNorm): A = sum(g), B = sum(g * (x - mean)) with
 * g = dy * w[j] (w NULL: g = dy).  g and the centered x are formed in float32 (a product,
 * and a difference with the split mean: no cancellation), the sums in double. */
static inline void fn_gsums_w_f32(const float* dy, const float* x, const float* w,
                                  Py_ssize_t n, double mean, double* A, double* B) {
    double a = 0.0, b = 0.0, g;
    Py_ssize_t j = 0;
#if FN_SIMD
    if (n >= 16) {
        float mh, ml;
        fn_split(mean, &mh, &ml);
        __m256 vh = _mm256_set1_ps(mh), vl = _mm256_set1_ps(ml);
        __m256d z = _mm256_setzero_pd();
        __m256d a0 = z, a1 = z, a2 = z, a3 = z, b0 = z, b1 = z, b2 = z, b3 = z;
        for (; j + 16 <= n; j += 16) {
            __m256 g0 = _mm256_loadu_ps(dy + j), g1 = _mm256_loadu_ps(dy + j + 8);
            if (w != NULL) {
                g0 = _mm256_mul_ps(g0, _mm256_loadu_ps(w + j));
                g1 = _mm256_mul_ps(g1, _mm256_loadu_ps(w + j + 8));
            }
            __m256 p0 = _mm256_mul_ps(g0, fn_center8(_mm256_loadu_ps(x + j), vh, vl));
            __m256 p1 = _mm256_mul_ps(g1, fn_center8(_mm256_loadu_ps(x + j + 8), vh, vl));
            a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(g0)));
            a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(g0, 1)));
            a2 = _mm256_add_pd(a2, _mm256_cvtps_pd(_mm256_castps256_ps128(g1)));
            a3 = _mm256_add_pd(a3, _mm256_cvtps_pd(_mm256_extractf128_ps(g1, 1)));
            b0 = _mm256_add_pd(b0, _mm256_cvtps_pd(_mm256_castps256_ps128(p0)));
            b1 = _mm256_add_pd(b1, _mm256_cvtps_pd(_mm256_extractf128_ps(p0, 1)));
            b2 = _mm256_add_pd(b2, _mm256_cvtps_pd(_mm256_castps256_ps128(p1)));
            b3 = _mm256_add_pd(b3, _mm256_cvtps_pd(_mm256_extractf128_ps(p1, 1)));
        }
        a = fn_hsum(a0, a1, a2, a3);
        b = fn_hsum(b0, b1, b2, b3);
    }
#endif
    for (; j < n; j++) {
        g = (double)dy[j];
        if (w != NULL)
            g *= (double)w[j];
        a += g;
        b += g * ((double)x[j] - mean);
    }
    *A = a;
    *B = b;
}

/* Parameter gradients of a row norm over a block of ``rows`` rows (row r at dy + r*stride,
 * x + r*stride; its statistics mean[r], invstd[r]) and ``n`` columns:
 * dw[k] += sum_r dy * (x - mean[r]) * invstd[r], db[k] += sum_r dy.  The product is formed
 * in float32 with the split mean, as in fn_gsums_w_f32; the sums stay in double, in
 * registers over the block's rows for a strip of 16 columns, and reach dw/db once per
 * block.  One row at a time with the sums in memory (the previous loop) took ~1.1 ms of
 * a (4096,1024) LayerNorm backward, nearly as much as dx. */
#define FN_PG_ROWS 64
#if FN_SIMD
/* 8 columns of one row: w += dy * (x - (hi + lo)) * s, b += dy, in two double halves. */
static inline void fn_pg8(const float* g_, const float* x_, __m256 vh, __m256 vl, __m256 vs,
                          __m256d* w0, __m256d* w1, __m256d* b0, __m256d* b1) {
    __m256 g = _mm256_loadu_ps(g_);
    __m256 p = _mm256_mul_ps(_mm256_mul_ps(g, fn_center8(_mm256_loadu_ps(x_), vh, vl)), vs);
    *w0 = _mm256_add_pd(*w0, _mm256_cvtps_pd(_mm256_castps256_ps128(p)));
    *w1 = _mm256_add_pd(*w1, _mm256_cvtps_pd(_mm256_extractf128_ps(p, 1)));
    *b0 = _mm256_add_pd(*b0, _mm256_cvtps_pd(_mm256_castps256_ps128(g)));
    *b1 = _mm256_add_pd(*b1, _mm256_cvtps_pd(_mm256_extractf128_ps(g, 1)));
}
#endif

static inline void fn_rows_pgrads_f32(const float* dy, const float* x, Py_ssize_t rows,
                                      Py_ssize_t stride, Py_ssize_t n, const double* mean,
                                      const double* invstd, double* dw, double* db) {
    Py_ssize_t j = 0, r;
#if FN_SIMD
    float mh[FN_PG_ROWS], ml[FN_PG_ROWS], sc[FN_PG_ROWS];
    if (rows > FN_PG_ROWS)
        rows = FN_PG_ROWS;  /* callers pass blocks of at most FN_PG_ROWS rows */
    for (r = 0; r < rows; r++) {
        fn_split(mean[r], &mh[r], &ml[r]);
        sc[r] = (float)invstd[r];
    }
    for (; j + 8 <= n; j += 8) {
        __m256d w0 = _mm256_setzero_pd(), w1 = w0, b0 = w0, b1 = w0;
        __m256d w2 = w0, w3 = w0, b2 = w0, b3 = w0;
        int two = j + 16 <= n;
        for (r = 0; r < rows; r++) {
            const float* g_ = dy + r * stride + j;
            const float* x_ = x + r * stride + j;
            __m256 vh = _mm256_broadcast_ss(mh + r), vl = _mm256_broadcast_ss(ml + r);
            __m256 vs = _mm256_broadcast_ss(sc + r);
            fn_pg8(g_, x_, vh, vl, vs, &w0, &w1, &b0, &b1);
            if (two)
                fn_pg8(g_ + 8, x_ + 8, vh, vl, vs, &w2, &w3, &b2, &b3);
        }
        _mm256_storeu_pd(dw + j, _mm256_add_pd(_mm256_loadu_pd(dw + j), w0));
        _mm256_storeu_pd(dw + j + 4, _mm256_add_pd(_mm256_loadu_pd(dw + j + 4), w1));
        _mm256_storeu_pd(db + j, _mm256_add_pd(_mm256_loadu_pd(db + j), b0));
        _mm256_storeu_pd(db + j + 4, _mm256_add_pd(_mm256_loadu_pd(db + j + 4), b1));
        if (two) {
            j += 8;
            _mm256_storeu_pd(dw + j, _mm256_add_pd(_mm256_loadu_pd(dw + j), w2));
            _mm256_storeu_pd(dw + j + 4, _mm256_add_pd(_mm256_loadu_pd(dw + j + 4), w3));
            _mm256_storeu_pd(db + j, _mm256_add_pd(_mm256_loadu_pd(db + j), b2));
            _mm256_storeu_pd(db + j + 4, _mm256_add_pd(_mm256_loadu_pd(db + j + 4), b3));
        }
    }
#endif
    for (; j < n; j++) {
        double a = 0.0, c = 0.0;
        for (r = 0; r < rows; r++) {
            double d = (double)dy[r * stride + j];
            a += d * ((double)x[r * stride + j] - mean[r]) * invstd[r];
            c += d;
        }
        dw[j] += a;
        db[j] += c;
    }
}

#endif
