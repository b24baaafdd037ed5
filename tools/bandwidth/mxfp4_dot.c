// ggml's CPU dot product of an MXFP4 weight row with a Q8_0 activation row (the kernel the CPU
// runs over cold experts' plain, not repacked, host copy), timed over rows that stream from
// memory and over rows that stay in the L2 cache, with 1 and with every thread (each thread
// its own rows). If the in-cache rate per thread is near the streaming one, the kernel, not
// the memory, bounds the CPU's pass over the experts.
// Usage: mxfp4_dot [GiB, default 1]. Build against ggml's headers and CPU backend, e.g.
//   cc -O2 -fopenmp mxfp4_dot.c -I<ggml>/include -L<libs> -lggml-cpu -lggml-base -lm
#include "ggml-cpu.h"
#include "ggml.h"
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv) {
  ggml_cpu_init();
  const int n = 4096;  // an expert's up or gate row at full width
  size_t gib = argc > 1 ? strtoull(argv[1], NULL, 10) : 1;
  const struct ggml_type_traits_cpu *mx = ggml_get_type_traits_cpu(GGML_TYPE_MXFP4);
  const size_t row = ggml_row_size(GGML_TYPE_MXFP4, n);
  const size_t rows = gib * (1ull << 30) / row;
  uint8_t *w = aligned_alloc(64, (rows * row + 63) / 64 * 64);
  if (!w) { fprintf(stderr, "no memory for %zu GiB\n", gib); return 1; }
  const size_t blocks = rows * row / 17;  // block_mxfp4: one E8M0 exponent, 16 bytes of nibbles
#pragma omp parallel for schedule(static)
  for (size_t b = 0; b < blocks; b++) {
    w[b * 17] = 118 + b % 8;
    for (int j = 1; j < 17; j++) w[b * 17 + j] = (uint8_t)((b * 2654435761u + j * 40503u) >> 7);
  }
  float *x = malloc(n * sizeof(float));
  for (int i = 0; i < n; i++) x[i] = sinf(0.37f * i);
  void *q = malloc(ggml_row_size(GGML_TYPE_Q8_0, n));
  ggml_get_type_traits_cpu(GGML_TYPE_Q8_0)->from_float(x, q, n);
  const int nth = omp_get_max_threads();
  float sink = 0;
  for (int threads = 1; threads <= nth; threads = threads == nth ? nth + 1 : nth) {
    for (int hot = 0; hot < 2; hot++) {
      double best = 0;
      for (int pass = 0; pass < 3; pass++) {
        double t0 = now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
        {
          const int t = omp_get_thread_num();
          const size_t per = rows / threads, first = t * per;
          const size_t span = hot ? 32 : per;  // 32 rows, 70 KB: in L2
          float s;
          for (size_t r = 0; r < per; r++) {
            mx->vec_dot(n, &s, 0, w + (first + r % span) * row, 0, q, 0, 1);
            sink += s;
          }
        }
        double gbs = (double)(rows / threads * threads) * row / (now() - t0) / 1e9;
        if (gbs > best) best = gbs;
      }
      printf("mxfp4 x q8_0 dot, %2d thread(s), rows %s: %.1f GB/s of weights (%.2f per thread; best of 3)\n", threads,
             hot ? "in L2 " : "streamed", best, best / threads);
    }
  }
  printf("(checksum %g)\n", sink);
  return 0;
}
