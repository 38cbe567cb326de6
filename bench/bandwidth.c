/* Read bandwidth the way decode reads weights: every thread streams its own contiguous slice of a buffer far
 * larger than the caches, with wide loads and several independent accumulators (so the loads, not an add chain,
 * set the pace), and a software prefetch a page ahead as the decode kernels do. Plain C99 + OpenMP; the
 * compiler vectorises the inner loop for the machine it is built on (bench tool, built with -march=native).
 * Returns the XOR of everything read so the loop cannot be dropped. */
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

uint64_t bw_read(const uint64_t *buf, size_t n_words, int threads)
{
    uint64_t total = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(^ : total)
#endif
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#else
        (void)threads;
#endif
        size_t per = (n_words / (size_t)nt) & ~(size_t)63;
        size_t lo = per * (size_t)t, hi = (t == nt - 1) ? (n_words & ~(size_t)63) : lo + per;
        uint64_t a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (size_t i = lo; i < hi; i += 64) {          /* 512 bytes a step */
            __builtin_prefetch(buf + i + 512, 0, 0);      /* 4 KiB ahead */
            for (int k = 0; k < 64; k += 8)
                for (int j = 0; j < 8; j++)
                    a[j] ^= buf[i + k + j];
        }
        for (int j = 0; j < 8; j++)
            total ^= a[j];
    }
    return total;
}
