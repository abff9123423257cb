# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Cython/OpenMP kernels of the two shapes every normalization reduces to.

Mirrors ``fastnorm/kernels/numba_kernels.py`` name for name and argument for argument
(the ``*_fused`` entry points below are Cython's own);
the driver in ``fastnorm/kernels/compiled.py`` calls either module (see it for the
segment and column shapes and how work is split).  Arrays are flat C-contiguous views:
x, y, dy, dx, weight and bias in the input dtype (``floating``: float32 or float64),
statistics and accumulators in float64.  ``weight``/``bias`` of size 0 mean "absent".

All sums are in double whatever the input dtype (a float accumulator loses ~0.6% on
10M float32 values): each loaded value is cast to double before it is summed.  Sums are
*shifted* by one value of the group (close to its mean) so that E[d^2] - E[d]^2 does not
cancel when the mean is 1e4 times the standard deviation.  Applying the transforms (y,
dx) to float32 input runs in float32 with the group's mean split into two float32 parts
(_simd.h): x - hi is exact near the mean, so the result carries a few ulp of |y|, and
the loop is three vector operations per 8 values instead of being bound by float<->double
conversions (measured 2x).  float64 input is computed in double throughout.

The float32 inner loops are AVX2+FMA intrinsics (_simd.h) in the ``kernels_avx2`` build:
gcc vectorizes a double reduction with one vector accumulator and then waits on every
add; the intrinsics keep four.

Work is split into items by problem size only (the driver's choice); each item is summed
by one thread in a fixed order and ``schedule='static'`` only decides which thread runs
it, so results do not depend on the thread count.

Innermost loops are contiguous and branch-free so that gcc vectorizes them
(``-fassociative-math`` lets it reorder the double reductions; never ``-ffast-math``,
which would drop NaN handling and set flush-to-zero for the whole process).  The
portable (SSE2) build is ~1.5x slower than Numba (which compiles for the host CPU) on one
thread, so the same source is also built as ``kernels_avx2`` with ``-mavx2 -mfma`` and
the backend loads that twin when the CPU supports it (fastnorm/_backend.py): a portable
wheel that still uses the wide vectors where they exist.  An AVX-512 twin measured no
faster (the loops are then bound by the caches).

The ``*_fused`` entry points (end of _kernels.pxi) run a whole training forward, backward
or eval in one call with ndarray arguments: statistics, y, saved statistics in the
caller's dtype and running buffers, or dx and the parameter gradients.  The driver uses
them wherever they serve; the separate kernels remain for the general path (Numba, few
large groups split into parts, long rows, SyncBatchNorm).

prange note: a scalar assigned in a prange body is thread-private and ``+=`` on one makes
it a reduction, so per-item work lives in ``cdef`` helpers that return their sums.
"""
include "_kernels.pxi"
