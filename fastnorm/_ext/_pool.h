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

#endif
