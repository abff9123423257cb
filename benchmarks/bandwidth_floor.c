/* The memory-bandwidth floor of BatchNorm's passes on this machine: the fastest each of
 * the passes a BatchNorm training forward+backward must make can run, on all threads,
 * with the SIMD loads and streaming stores the kernels use.  Arrays of n float32 values:
 *
 *     0  read x                          (forward: the statistics)
 *     1  read x, write y                 (forward: y; eval: y from the running statistics)
 *     2  read dy and x                   (backward: the gradient sums)
 *     3  read dy and x, write dx         (backward: dx)
 *
 * Their sum is the floor of a forward+backward (no library can read less: the
 * statistics are needed before y, the sums before dx); 0 + 1 the floor of a training
 * forward; 1 alone the floor of eval.
 *
 * As a program, the best of 15 runs of each (docs/performance.md):
 *
 *     gcc -O3 -mavx2 -fopenmp benchmarks/bandwidth_floor.c -o /tmp/floor
 *     OMP_NUM_THREADS=2 /tmp/floor 12845056     # (64,56,56,64): 12.8M values
 *
 * As a library, ``floor_pass`` runs one pass (benchmarks/test_bench_floor.py times it
 * in turns with fastnorm and PyTorch):
 *
 *     gcc -O3 -mavx2 -fopenmp -shared -fPIC -DFLOOR_LIBRARY bandwidth_floor.c -o floor.so
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Pass ``kind`` (0-3 above) over n values (a multiple of 8; a, b, c 32-byte aligned):
 * x is a, dy is b, the output c.  Returns a value of the reads, so that they are kept. */
float floor_pass(int kind, const float* a, const float* b, float* c, long n)
{
    float s = 0;
    if (kind == 0) {
#pragma omp parallel for reduction(+ : s) schedule(static)
        for (long i = 0; i < n; i += 8) {
            float v[8];
            _mm256_storeu_ps(v, _mm256_load_ps(a + i));
            s += v[0] + v[7];
        }
    } else if (kind == 1) {
#pragma omp parallel for schedule(static)
        for (long i = 0; i < n; i += 8)
            _mm256_stream_ps(c + i, _mm256_load_ps(a + i));
        _mm_sfence();
    } else if (kind == 2) {
#pragma omp parallel for reduction(+ : s) schedule(static)
        for (long i = 0; i < n; i += 8) {
            float v[8];
            _mm256_storeu_ps(v, _mm256_add_ps(_mm256_load_ps(a + i), _mm256_load_ps(b + i)));
            s += v[0] + v[7];
        }
    } else {
#pragma omp parallel for schedule(static)
        for (long i = 0; i < n; i += 8)
            _mm256_stream_ps(c + i, _mm256_add_ps(_mm256_load_ps(a + i), _mm256_load_ps(b + i)));
        _mm_sfence();
    }
    return s;
}

#ifndef FLOOR_LIBRARY
int main(int argc, char** argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s VALUES\n", argv[0]);
        return 2;
    }
    long n = atol(argv[1]) / 8 * 8;
    float* a = aligned_alloc(64, n * 4);
    float* b = aligned_alloc(64, n * 4);
    float* c = aligned_alloc(64, n * 4);
    if (!a || !b || !c)
        return 1;
    memset(a, 1, n * 4);
    memset(b, 1, n * 4);
    memset(c, 1, n * 4);
    double best[4] = {1e9, 1e9, 1e9, 1e9};
    volatile float sink = 0;
    for (int r = 0; r < 15; r++) {
        for (int k = 0; k < 4; k++) {
            double t = omp_get_wtime();
            sink += floor_pass(k, a, b, c, n);
            t = omp_get_wtime() - t;
            if (t < best[k])
                best[k] = t;
        }
    }
    double mb = n * 4.0 / 1e6;
    const char* name[4] = {"read x", "read x, write y", "read dy and x",
                           "read dy and x, write dx"};
    int arrays[4] = {1, 2, 2, 3};
    printf("%d threads, %.1f MB per array\n", omp_get_max_threads(), mb);
    for (int k = 0; k < 4; k++)
        printf("%-26s %8.3f ms  %6.1f GB/s\n", name[k], best[k] * 1e3,
               arrays[k] * mb / 1e3 / best[k]);
    printf("floor: forward+backward %.3f ms, eval %.3f ms\n",
           (best[0] + best[1] + best[2] + best[3]) * 1e3, best[1] * 1e3);
    return sink == 12345.0f;
}
#endif
