// Host memory read bandwidth with every core: each thread sums its share of a large array
// (a read-only stream, like the CPU's pass over cold experts' weights). Prints GB/s, the best
// of several passes, and their mean (the rate a reader beside another one, such as a copy over
// PCIe from the same memory, gets over the whole time).
// Usage: host_read [GiB, default 4] [passes, default 6]
// Build: cc -O3 -march=native -fopenmp host_read.c -o host_read
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
  size_t gib = argc > 1 ? strtoull(argv[1], NULL, 10) : 4;
  int passes = argc > 2 ? atoi(argv[2]) : 6;
  if (passes < 1) passes = 1;
  size_t n = gib * (1ull << 30) / sizeof(uint64_t);
  uint64_t *a = aligned_alloc(64, n * sizeof(uint64_t));
  if (!a) { fprintf(stderr, "no memory for %zu GiB\n", gib); return 1; }
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; i++) a[i] = i;  // first touch by the thread that reads it later
  double best = 0, total = 0;
  uint64_t sink = 0;
  for (int pass = 0; pass < passes; pass++) {
    double t0 = now();
    uint64_t s = 0;
#pragma omp parallel for schedule(static) reduction(+ : s)
    for (size_t i = 0; i < n; i++) s += a[i];
    double dt = now() - t0;
    sink += s;
    total += dt;
    double gbs = n * sizeof(uint64_t) / dt / 1e9;
    if (gbs > best) best = gbs;
  }
  printf("host read: %.1f GB/s best, %.1f GB/s mean (%d threads, %zu GiB, %d passes in %.2f s; checksum %llu)\n", best,
         passes * n * sizeof(uint64_t) / total / 1e9, omp_get_max_threads(), gib, passes, total, (unsigned long long)(sink & 0xff));
  free(a);
  return 0;
}
