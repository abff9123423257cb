/* The transforms of Winograd F(2x2, 3x3) (see _wino.pxi), for float (_f32) and double
 * (_f64).  Each loops over the channels innermost, on C-contiguous channel vectors,
 * with every value of a tile in a named local: gcc vectorizes the channel loop (a first
 * version in Cython with the tile in small arrays ran scalar: the output gradient's
 * transform took a third of a convolution's time).  Adds and subtracts only. */
#ifndef FASTNORM_WINO_H
#define FASTNORM_WINO_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* 1 when v is an inf or a NaN (all exponent bits set), from its bits: a test in floating
 * point (v * 0 != 0) is folded away under -fassociative-math -fno-signed-zeros. */
static inline int fn_nonfinite_f32(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return (u & 0x7f800000u) == 0x7f800000u;
}

static inline int fn_nonfinite_f64(double v)
{
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    return (u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

/* 16 pointers n0..n15 to the matrices of a tile position, ``stride`` values apart: as
 * separate restrict pointers gcc knows the 16 streams apart (through one pointer and a
 * runtime stride it did not, and left the channel loops scalar). */
#define FN_WINO_PTRS16(T, n, base, stride)                                               \
    T* restrict n##0 = (base) + 0 * (stride); T* restrict n##1 = (base) + 1 * (stride);  \
    T* restrict n##2 = (base) + 2 * (stride); T* restrict n##3 = (base) + 3 * (stride);  \
    T* restrict n##4 = (base) + 4 * (stride); T* restrict n##5 = (base) + 5 * (stride);  \
    T* restrict n##6 = (base) + 6 * (stride); T* restrict n##7 = (base) + 7 * (stride);  \
    T* restrict n##8 = (base) + 8 * (stride); T* restrict n##9 = (base) + 9 * (stride);  \
    T* restrict n##10 = (base) + 10 * (stride); T* restrict n##11 = (base) + 11 * (stride); \
    T* restrict n##12 = (base) + 12 * (stride); T* restrict n##13 = (base) + 13 * (stride); \
    T* restrict n##14 = (base) + 14 * (stride); T* restrict n##15 = (base) + 15 * (stride);
#define FN_WINO_CPTRS16(T, n, base, stride) FN_WINO_PTRS16(const T, n, base, stride)

/* Each 2x2 output tile (ty, tx) of an H x W sample, t counting the tiles from t0. */
#define FN_WINO_FOR_TILES(H, W, t0)                                                      \
    for (ptrdiff_t ty = 0, t = (t0); ty < (H) / 2; ty++)                                 \
        for (ptrdiff_t tx = 0; tx < (W) / 2; tx++, t++)

#define FN_WINO_FUNCS(T, S)                                                              \
/* V[xi, t0 + tile, c] = (B^T d B)[xi] for each 4x4 patch d of the padded sample P     \
 * ((H+2) x (W+2) x C); xi strided by TC values. */                                      \
static __attribute__((noinline)) void                                                 \
fn_wino_input_##S(const T* restrict P, T* restrict V, ptrdiff_t C,                       \
                  ptrdiff_t H, ptrdiff_t W, ptrdiff_t t0, ptrdiff_t TC)                  \
{                                                                                        \
    const ptrdiff_t Wp = W + 2;                                                          \
    FN_WINO_FOR_TILES(H, W, t0) {                                                        \
        const T* restrict r0 = P + ((2 * ty) * Wp + 2 * tx) * C;                         \
        const T* restrict r1 = r0 + Wp * C;                                              \
        const T* restrict r2 = r1 + Wp * C;                                              \
        const T* restrict r3 = r2 + Wp * C;                                              \
        FN_WINO_PTRS16(T, v, V + t * C, TC)                                              \
        _Pragma("omp simd")                                                              \
        for (ptrdiff_t c = 0; c < C; c++) {                                              \
            /* B^T d, column by column */                                                \
            T a00 = r0[c] - r2[c], a01 = r0[C + c] - r2[C + c];                          \
            T a02 = r0[2 * C + c] - r2[2 * C + c], a03 = r0[3 * C + c] - r2[3 * C + c];  \
            T a10 = r1[c] + r2[c], a11 = r1[C + c] + r2[C + c];                          \
            T a12 = r1[2 * C + c] + r2[2 * C + c], a13 = r1[3 * C + c] + r2[3 * C + c];  \
            T a20 = r2[c] - r1[c], a21 = r2[C + c] - r1[C + c];                          \
            T a22 = r2[2 * C + c] - r1[2 * C + c], a23 = r2[3 * C + c] - r1[3 * C + c];  \
            T a30 = r1[c] - r3[c], a31 = r1[C + c] - r3[C + c];                          \
            T a32 = r1[2 * C + c] - r3[2 * C + c], a33 = r1[3 * C + c] - r3[3 * C + c];  \
            /* then (.) B, row by row */                                                 \
            v0[c] = a00 - a02;  v1[c] = a01 + a02;                                       \
            v2[c] = a02 - a01;  v3[c] = a01 - a03;                                       \
            v4[c] = a10 - a12;  v5[c] = a11 + a12;                                       \
            v6[c] = a12 - a11;  v7[c] = a11 - a13;                                       \
            v8[c] = a20 - a22;  v9[c] = a21 + a22;                                       \
            v10[c] = a22 - a21; v11[c] = a21 - a23;                                      \
            v12[c] = a30 - a32; v13[c] = a31 + a32;                                      \
            v14[c] = a32 - a31; v15[c] = a31 - a33;                                      \
        }                                                                                \
    }                                                                                    \
}                                                                                        \
                                                                                         \
/* Y (H x W x O, channel-last) = A^T M A for each tile of a sample, its tiles from t0   \
 * in M (xi strided by TO values). */                                                    \
static __attribute__((noinline)) void                                                 \
fn_wino_output_##S(const T* restrict M, T* restrict Y, ptrdiff_t O,                      \
                   ptrdiff_t H, ptrdiff_t W, ptrdiff_t t0, ptrdiff_t TO)                 \
{                                                                                        \
    FN_WINO_FOR_TILES(H, W, t0) {                                                        \
        FN_WINO_CPTRS16(T, m, M + t * O, TO)                                             \
        T* restrict y0 = Y + ((2 * ty) * W + 2 * tx) * O;                                \
        T* restrict y1 = y0 + W * O;                                                     \
        _Pragma("omp simd")                                                              \
        for (ptrdiff_t o = 0; o < O; o++) {                                              \
            /* A^T m, column by column */                                                \
            T q00 = m0[o] + m4[o] + m8[o];                                               \
            T q01 = m1[o] + m5[o] + m9[o];                                               \
            T q02 = m2[o] + m6[o] + m10[o];                                              \
            T q03 = m3[o] + m7[o] + m11[o];                                              \
            T q10 = m4[o] - m8[o] - m12[o];                                              \
            T q11 = m5[o] - m9[o] - m13[o];                                              \
            T q12 = m6[o] - m10[o] - m14[o];                                             \
            T q13 = m7[o] - m11[o] - m15[o];                                             \
            y0[o] = q00 + q01 + q02;                                                     \
            y0[O + o] = q01 - q02 - q03;                                                 \
            y1[o] = q10 + q11 + q12;                                                     \
            y1[O + o] = q11 - q12 - q13;                                                 \
        }                                                                                \
    }                                                                                    \
}                                                                                        \
                                                                                         \
/* dM[xi, t0 + tile, o] = (A dY A^T)[xi] for each tile of a sample's output gradient D \
 * (H x W x O, channel-last): the adjoint of fn_wino_output.  Returns 1 when D holds  \
 * a value that is not finite, else 0. */                                                \
static __attribute__((noinline)) int                                                  \
fn_wino_grad_output_##S(const T* restrict D, T* restrict dM, ptrdiff_t O,                \
                        ptrdiff_t H, ptrdiff_t W, ptrdiff_t t0,                          \
                        ptrdiff_t TO)                                                    \
{                                                                                        \
    int bad = 0;  /* 1 when a value of D is not finite */                                \
    FN_WINO_FOR_TILES(H, W, t0) {                                                        \
        const T* restrict d0 = D + ((2 * ty) * W + 2 * tx) * O;                          \
        const T* restrict d1 = d0 + W * O;                                               \
        FN_WINO_PTRS16(T, m, dM + t * O, TO)                                             \
        _Pragma("omp simd reduction(|:bad)")                                             \
        for (ptrdiff_t o = 0; o < O; o++) {                                              \
            /* rows of A dY: dY0, dY0 + dY1, dY0 - dY1, -dY1 */                          \
            T e00 = d0[o], e01 = d0[O + o];                                              \
            T e10 = d0[o] + d1[o], e11 = d0[O + o] + d1[O + o];                          \
            T e20 = d0[o] - d1[o], e21 = d0[O + o] - d1[O + o];                          \
            T e30 = -d1[o], e31 = -d1[O + o];                                            \
            bad |= fn_nonfinite_##S(d0[o]) | fn_nonfinite_##S(d0[O + o])                 \
                   | fn_nonfinite_##S(d1[o]) | fn_nonfinite_##S(d1[O + o]);              \
            /* then (.) A^T: r0, r0 + r1, r0 - r1, -r1 */                                \
            m0[o] = e00;  m1[o] = e00 + e01;                                             \
            m2[o] = e00 - e01;  m3[o] = -e01;                                            \
            m4[o] = e10;  m5[o] = e10 + e11;                                             \
            m6[o] = e10 - e11;  m7[o] = -e11;                                            \
            m8[o] = e20;  m9[o] = e20 + e21;                                             \
            m10[o] = e20 - e21; m11[o] = -e21;                                           \
            m12[o] = e30; m13[o] = e30 + e31;                                            \
            m14[o] = e30 - e31; m15[o] = -e31;                                           \
        }                                                                                \
    }                                                                                    \
    return bad;                                                                          \
}                                                                                        \
                                                                                         \
/* Add B dV B^T of each tile into the padded sample gradient P ((H+2) x (W+2) x C,      \
 * zeroed by the caller), tiles in order: the adjoint of fn_wino_input. */               \
static __attribute__((noinline)) void                                                 \
fn_wino_grad_input_##S(const T* restrict dV, T* restrict P, ptrdiff_t C,                 \
                       ptrdiff_t H, ptrdiff_t W, ptrdiff_t t0, ptrdiff_t TC)             \
{                                                                                        \
    const ptrdiff_t Wp = W + 2;                                                          \
    FN_WINO_FOR_TILES(H, W, t0) {                                                        \
        FN_WINO_CPTRS16(T, v, dV + t * C, TC)                                            \
        T* restrict p0 = P + ((2 * ty) * Wp + 2 * tx) * C;                               \
        T* restrict p1 = p0 + Wp * C;                                                    \
        T* restrict p2 = p1 + Wp * C;                                                    \
        T* restrict p3 = p2 + Wp * C;                                                    \
        _Pragma("omp simd")                                                              \
        for (ptrdiff_t c = 0; c < C; c++) {                                              \
            /* rows of B dV: v0, v1 - v2 + v3, v1 + v2 - v0, -v3 (per column) */         \
            T b00 = v0[c], b01 = v1[c];                                                  \
            T b02 = v2[c], b03 = v3[c];                                                  \
            T b10 = v4[c] - v8[c] + v12[c];                                              \
            T b11 = v5[c] - v9[c] + v13[c];                                              \
            T b12 = v6[c] - v10[c] + v14[c];                                             \
            T b13 = v7[c] - v11[c] + v15[c];                                             \
            T b20 = v4[c] + v8[c] - v0[c];                                               \
            T b21 = v5[c] + v9[c] - v1[c];                                               \
            T b22 = v6[c] + v10[c] - v2[c];                                              \
            T b23 = v7[c] + v11[c] - v3[c];                                              \
            T b30 = -v12[c], b31 = -v13[c];                                              \
            T b32 = -v14[c], b33 = -v15[c];                                              \
            /* then (.) B^T, added into the patch's rows */                              \
            p0[c] += b00;  p0[C + c] += b01 - b02 + b03;                                 \
            p0[2 * C + c] += b01 + b02 - b00;  p0[3 * C + c] += -b03;                    \
            p1[c] += b10;  p1[C + c] += b11 - b12 + b13;                                 \
            p1[2 * C + c] += b11 + b12 - b10;  p1[3 * C + c] += -b13;                    \
            p2[c] += b20;  p2[C + c] += b21 - b22 + b23;                                 \
            p2[2 * C + c] += b21 + b22 - b20;  p2[3 * C + c] += -b23;                    \
            p3[c] += b30;  p3[C + c] += b31 - b32 + b33;                                 \
            p3[2 * C + c] += b31 + b32 - b30;  p3[3 * C + c] += -b33;                    \
        }                                                                                \
    }                                                                                    \
}

/* Each value in a fixed order of adds, as written: the module is built with
 * -fassociative-math, and the portable and AVX2 builds reassociated these sums
 * differently (outputs 1 ulp apart). */
#pragma GCC push_options
#pragma GCC optimize ("no-associative-math")
FN_WINO_FUNCS(float, f32)
FN_WINO_FUNCS(double, f64)
#pragma GCC pop_options


/* dst[j * ld + i] = src[i * ls + j] for i < R, j < K: a transpose, by 8x8 blocks of
 * AVX registers in the AVX2 build (an NCHW sample to channel-last and back, four times
 * per convolution and sample; one value at a time they took a sixth of Winograd's
 * backward), scalar, stores in order, elsewhere. */
#ifdef __AVX2__
#include <immintrin.h>
static inline void fn_t8x8_f32(const float* s, ptrdiff_t ls, float* d, ptrdiff_t ld)
{
    __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ls);
    __m256 r2 = _mm256_loadu_ps(s + 2 * ls), r3 = _mm256_loadu_ps(s + 3 * ls);
    __m256 r4 = _mm256_loadu_ps(s + 4 * ls), r5 = _mm256_loadu_ps(s + 5 * ls);
    __m256 r6 = _mm256_loadu_ps(s + 6 * ls), r7 = _mm256_loadu_ps(s + 7 * ls);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(d + ld, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(d + 2 * ld, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(d + 3 * ld, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(d + 4 * ld, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(d + 5 * ld, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(d + 6 * ld, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(d + 7 * ld, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

static void fn_transpose_f32(const float* src, ptrdiff_t ls, float* dst, ptrdiff_t ld,
                             ptrdiff_t R, ptrdiff_t K)
{
    ptrdiff_t i0 = 0, j0 = 0;
#ifdef __AVX2__
    for (i0 = 0; i0 + 8 <= R; i0 += 8)
        for (j0 = 0; j0 + 8 <= K; j0 += 8)
            fn_t8x8_f32(src + i0 * ls + j0, ls, dst + j0 * ld + i0, ld);
    /* the rest: columns j >= K8 of every row, rows i >= R8 of the first K8 columns */
    ptrdiff_t R8 = R - R % 8, K8 = K - K % 8;
    for (ptrdiff_t j = K8; j < K; j++)
        for (ptrdiff_t i = 0; i < R; i++)
            dst[j * ld + i] = src[i * ls + j];
    for (ptrdiff_t j = 0; j < K8; j++)
        for (ptrdiff_t i = R8; i < R; i++)
            dst[j * ld + i] = src[i * ls + j];
#else
    (void)i0;
    (void)j0;
    for (ptrdiff_t j = 0; j < K; j++)
        for (ptrdiff_t i = 0; i < R; i++)
            dst[j * ld + i] = src[i * ls + j];
#endif
}

static void fn_transpose_f64(const double* src, ptrdiff_t ls, double* dst, ptrdiff_t ld,
                             ptrdiff_t R, ptrdiff_t K)
{
    for (ptrdiff_t j = 0; j < K; j++)
        for (ptrdiff_t i = 0; i < R; i++)
            dst[j * ld + i] = src[i * ls + j];
}

#endif
