# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Cython/OpenMP kernels of the two shapes every normalization reduces to.

Mirrors ``fastnorm/kernels/numba_kernels.py`` name for name and argument for argument;
the driver in ``fastnorm/kernels/compiled.py`` calls either module (see it for the
segment and column shapes and how work is split).  Arrays are flat C-contiguous views:
x, y, dy, dx, weight and bias in the input dtype (``floating``: float32 or float64),
statistics and accumulators in float64.  ``weight``/``bias`` of size 0 mean "absent".

All sums and all arithmetic are in double whatever the input dtype (a float accumulator
loses ~0.6% on 10M float32 values); each loaded value is cast to double and results are
written back in the array's dtype.  Sums are *shifted* by one value of the group (close
to its mean) so that E[d^2] - E[d]^2 does not cancel when the mean is 1e4 times the
standard deviation.

Work is split into items by problem size only (the driver's choice); each item is summed
by one thread in a fixed order and ``schedule='static'`` only decides which thread runs
it, so results do not depend on the thread count.  Innermost loops are contiguous and
branch-free so that gcc vectorizes them (``-fassociative-math`` lets it reorder the
double reductions; never ``-ffast-math``, which would drop NaN handling and set
flush-to-zero for the whole process).  In the default (SSE2) build the float32
reductions are bound by the float->double conversions and the vector width, not by
memory: measured ~1.5x slower than Numba (which compiles for the host CPU) on one
thread; the opt-in ``FASTNORM_NATIVE=1`` build (-march=native) comes within ~10%.
So the same source is also built as ``kernels_avx2`` with ``-mavx2 -mfma``, and the
backend loads that twin when the CPU supports it (fastnorm/_backend.py): a portable
wheel that still uses the wide vectors where they exist.
Splitting sums into more partial sums did not help (throughput, not add latency).

prange note: a scalar assigned in a prange body is thread-private and ``+=`` on one makes
it a reduction, so per-item work lives in ``cdef`` helpers that return their sums.
"""
include "_kernels.pxi"
