/* The memory-bandwidth floor of BatchNorm's passes on this machine, for the
 * performance notes (docs/performance.md): the fastest each of the passes a BatchNorm
 * training forward+backward must make can run, on all threads, with the SIMD loads and
 * streaming stores the kernels use.  Arrays of N float32 values:
 *
 *     read x                          (forward: the statistics)
 *     read x, write y                 (forward: y; eval: y from the running statistics)
 *     read dy and x                   (backward: the gradient sums)
 *     read dy and x, write dx         (backward: dx)
 *
 * Their sum is the floor of a forward+backward (no library can read less: the
 * statistics are needed before y, the sums before dx); "read x, write y" alone is the
 * floor of eval.  Each is the best of 15 runs.
 *
 *     gcc -O3 -mavx2 -fopenmp benchmarks/bandwidth_floor.c -o /tmp/floor
 *     OMP_NUM_THREADS=2 /tmp/floor 12845056     # (64,56,56,64): 12.8M values
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char** argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s VALUES\n", argv[0]);
        return 2;
    }
    size_t n = (size_t)atol(argv[1]) / 8 * 8;
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
        double t = omp_get_wtime();
        float s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
        for (size_t i = 0; i < n; i += 8) {
            float v[8];
            _mm256_storeu_ps(v, _mm256_load_ps(a + i));
            s += v[0] + v[7];
        }
        t = omp_get_wtime() - t;
        sink += s;
        if (t < best[0]) best[0] = t;
        t = omp_get_wtime();
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i += 8)
            _mm256_stream_ps(c + i, _mm256_load_ps(a + i));
        _mm_sfence();
        t = omp_get_wtime() - t;
        if (t < best[1]) best[1] = t;
        t = omp_get_wtime();
        s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
        for (size_t i = 0; i < n; i += 8) {
            float v[8];
            _mm256_storeu_ps(v, _mm256_add_ps(_mm256_load_ps(a + i), _mm256_load_ps(b + i)));
            s += v[0] + v[7];
        }
        t = omp_get_wtime() - t;
        sink += s;
        if (t < best[2]) best[2] = t;
        t = omp_get_wtime();
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i += 8)
            _mm256_stream_ps(c + i, _mm256_add_ps(_mm256_load_ps(a + i), _mm256_load_ps(b + i)));
        _mm_sfence();
        t = omp_get_wtime() - t;
        if (t < best[3]) best[3] = t;
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
