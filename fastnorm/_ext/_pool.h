/* The window maxima of max pooling with their positions, for L windows at once.
 *
 * Which value of a window wins is data.  Written per window with `if` (or with a
 * conditional expression, which Cython turns into `if`), gcc kept a jump per value and
 * mispredicted about half of them on random inputs: 4.7 ns per input value on
 * (32,32,32,32).  Here L windows of the same shape (an output row's interior windows in
 * NCHW, the C channels of an output position in NHWC) are updated together, offset by
 * offset: the loop over the windows has no jump that depends on the data, and gcc turns
 * its selects into vector blends.
 *
 * Semantics (PyTorch's CPU kernel, ``val > maxval || isnan(val)``): the first maximum of
 * each window in row-major order, or its last NaN when it has any.  Window i starts at xw + i * istride (its offset (0, 0), which
 * may lie in the padding); rows [alo, ahi) and columns [blo, bhi) of the windows lie
 * inside the input (strides shh, sww in elements).  out[i] and index[i] (the offset
 * a * kW + b of the winner) are written for i in [0, L). */
#ifndef FASTNORM_POOL_H
#define FASTNORM_POOL_H

#include <stddef.h>

#define FN_WINDOWS_ARGMAX(NAME, REAL)                                                    \
static inline void NAME(const REAL* restrict xw, ptrdiff_t istride, ptrdiff_t L,         \
                        ptrdiff_t shh, ptrdiff_t sww, ptrdiff_t alo, ptrdiff_t ahi,      \
                        ptrdiff_t blo, ptrdiff_t bhi, ptrdiff_t kW, REAL* restrict out,  \
                        int* restrict index) {                                           \
    ptrdiff_t i, a, b;                                                                   \
    const REAL* r = xw + alo * shh + blo * sww;                                          \
    for (i = 0; i < L; i++) {                                                            \
        out[i] = r[i * istride];                                                         \
        index[i] = (int)(alo * kW + blo);                                                \
    }                                                                                    \
    for (a = alo; a < ahi; a++) {                                                        \
        for (b = blo; b < bhi; b++) {                                                    \
            int k = (int)(a * kW + b);                                                   \
            if (a == alo && b == blo)                                                    \
                continue;                                                                \
            r = xw + a * shh + b * sww;                                                  \
            for (i = 0; i < L; i++) {                                                    \
                REAL v = r[i * istride], m = out[i];                                     \
                int take = (v > m) | (v != v); /* larger, or a NaN */                    \
                out[i] = take ? v : m;                                                   \
                index[i] = take ? k : index[i];                                          \
            }                                                                            \
        }                                                                                \
    }                                                                                    \
}

FN_WINDOWS_ARGMAX(fn_windows_argmax_f32, float)
FN_WINDOWS_ARGMAX(fn_windows_argmax_f64, double)

/* 2x2 windows with stride 2 and no padding over one plane (row stride shh, column
 * stride sww), the common MaxPool2d(2): the four offsets unrolled, so that an output row
 * is one loop without jumps that depend on the data (the general loops above see rows
 * of a few windows each on small images: (32,32,8,8) took 81 us on one thread). */
#define FN_POOL2X2_ARGMAX(NAME, REAL)                                                    \
static inline void NAME(const REAL* restrict x, ptrdiff_t shh, ptrdiff_t sww,            \
                        ptrdiff_t Ho, ptrdiff_t Wo, REAL* restrict out,                  \
                        int* restrict index) {                                           \
    ptrdiff_t oh, ow;                                                                    \
    for (oh = 0; oh < Ho; oh++) {                                                        \
        const REAL* r0 = x + 2 * oh * shh;                                               \
        const REAL* r1 = r0 + shh;                                                       \
        REAL* o = out + oh * Wo;                                                         \
        int* ix = index + oh * Wo;                                                       \
        for (ow = 0; ow < Wo; ow++) {                                                    \
            REAL m = r0[2 * ow * sww], v;                                                \
            int k = 0, take;                                                             \
            v = r0[(2 * ow + 1) * sww];                                                  \
            take = (v > m) | (v != v);                                                   \
            m = take ? v : m;                                                            \
            k = take ? 1 : k;                                                            \
            v = r1[2 * ow * sww];                                                        \
            take = (v > m) | (v != v);                                                   \
            m = take ? v : m;                                                            \
            k = take ? 2 : k;                                                            \
            v = r1[(2 * ow + 1) * sww];                                                  \
            take = (v > m) | (v != v);                                                   \
            o[ow] = take ? v : m;                                                        \
            ix[ow] = take ? 3 : k;                                                       \
        }                                                                                \
    }                                                                                    \
}

FN_POOL2X2_ARGMAX(fn_pool2x2_argmax_f32, float)
FN_POOL2X2_ARGMAX(fn_pool2x2_argmax_f64, double)

#endif
