"""Tunables and thread control, in one place.

Threads: ``set_num_threads(n)`` sets the count used by both compiled backends.  The
Cython kernels take it as an explicit ``num_threads`` argument of every ``prange`` (so it
holds in every calling thread, unlike ``omp_set_num_threads`` which is per thread), and
the Numba backend applies it with ``numba.set_num_threads`` before each call (also a
per-thread setting in Numba).  ``FASTNORM_NUM_THREADS`` gives the starting value.
"""
import os

# Work partitioning.  Kernels split their work into a number of chunks that depends on
# the problem size only, never on the thread count: each chunk sums its part in a fixed
# order and chunks are merged in a fixed order, so results are bitwise identical for any
# number of threads.
MAX_CHUNKS = 64          # chunks of one parallel loop (>= threads we expect, for balance)
MIN_CHUNK_ELEMENTS = 16384  # below this a chunk is not worth a task of its own
# Smaller passes run on the calling thread alone.  On a quiet machine two threads pay
# from 32K values: (32,16,8,8) BatchNorm forward 11.7-16.1 -> 9.9 us, (128,512)
# forward+backward 63-96 -> 55 us, both in one run; on a loaded one an OpenMP region can
# wait milliseconds for a descheduled thread, so services with many request threads
# should call set_num_threads(1) (docs/inference.md).
PARALLEL_MIN_ELEMENTS = 1 << 15
SPLIT_UNITS_BELOW = 8    # a reduction with fewer independent groups than this ...
SPLIT_MIN_ELEMENTS = 1 << 16  # ... and at least this many elements per group is split
# Groups of strided runs (BatchNorm NCHW) at least this large are read in memory order as
# columns of runs, in row blocks (see fastnorm.kernels.compiled); smaller ones group by
# group, each summed and applied while it is in cache.
RUN_COLUMNS_MIN_ELEMENTS = 1 << 18


def _last_level_cache_bytes(default=32 << 20):
    """Size of the largest CPU cache (Linux sysfs), else ``default``."""
    best = (0, default)
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for name in os.listdir(base):
            if not name.startswith("index"):
                continue
            with open(os.path.join(base, name, "level")) as f:
                level = int(f.read())
            with open(os.path.join(base, name, "size")) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            size = int(text.rstrip("KM")) * scale
            best = max(best, (level, size))
    except (OSError, ValueError):
        pass
    return best[1]


# Passes whose float32 output has at least this many bytes write it with streaming stores
# (Cython; see fn_st8 in fastnorm/_ext/_simd.h): a plain store first reads each line it
# writes, and input and output together no longer stay in the last-level cache.  3/8 of
# it, as glibc's memcpy streams above 3/4 of a core's share.  Applied when a backend is
# created.  (256,28,28,32) BatchNorm (25 MB) forward 2.66 -> 2.00 ms; GroupNorm
# (16,256,28,28) (12.8 MB) forward 0.72 -> 0.49 ms; a first version that streamed every
# output was 4-10x slower on 1.6 MB (figures in docs/performance.md).
STREAM_MIN_BYTES = _last_level_cache_bytes() * 3 // 8

# Whole training passes in one kernel call where the backend has them (Cython); False
# takes the general path (the kernels between NumPy steps), for comparisons and tests.
FUSED_PASSES = True


def _default_threads():
    env = os.environ.get("FASTNORM_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"FASTNORM_NUM_THREADS: expected a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"FASTNORM_NUM_THREADS: expected a positive integer, got {env!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_num_threads = _default_threads()


def set_num_threads(n):
    """Set the number of threads the compiled kernels use (both Cython and Numba)."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, (int,)) and not hasattr(n, "__index__"):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    _num_threads = n


def get_num_threads():
    """Number of threads the compiled kernels use."""
    return _num_threads
