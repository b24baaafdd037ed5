// ggml's CPU dot product of an MXFP4 weight row with a Q8_0 activation row (the kernel the CPU
// runs over cold experts' plain, not repacked, host copy), timed over rows that stream from
// memory and over rows that stay in the L2 cache, with 1 and with every thread (each thread
// its own rows). If the in-cache rate per thread is near the streaming one, the kernel, not
// the memory, bounds the CPU's pass over the experts.
// Beside it, ggml's kernel with each row asked for PREFETCH bytes ahead, and, where the CPU
// has AVX-512 VNNI, a dot product of the same rows written for those units (two blocks per
// 512-bit step, the products summed in integers by VPDPBUSD, one float multiply-add per
// block pair, the rows asked for ahead; graph/src/mxfp4_cpu.rs is its Rust form). It
// forms the same integer sums in the same lanes as ggml's AVX2 kernel and adds them in the
// same order, so it gives ggml's bits; the tool checks that over 1000 rows before timing.
// Usage: mxfp4_dot [GiB, default 1]. Build against ggml's headers and CPU backend, e.g.
//   cc -O2 -fopenmp mxfp4_dot.c -I<ggml>/include -L<libs> -lggml-cpu -lggml-base -lm
#include "ggml-cpu.h"
#include "ggml.h"
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

// How far ahead of the dot product the prefetching variants ask for their rows (bytes).
#ifndef PREFETCH
#define PREFETCH 4096
#endif

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// The format's facts: an MXFP4 block is one E8M0 exponent byte and 16 bytes of nibbles (element
// j in the low nibble of byte j, element j + 16 in the high one); a nibble is an E2M1 value,
// here doubled to an integer (so the block's scale is halved); a Q8_0 block is an FP16 scale
// and 32 signed bytes.
static const int8_t fp4x2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static float e8m0_half_table[256];  // 2^(e - 128): the block's scale, halved

// The activation row as the kernel below wants it: bytes + 128 (unsigned), a float scale a block.
typedef struct {
  uint8_t *u;
  float *d;
} act_t;

static act_t act_from_q8(const uint8_t *q8, int n) {
  act_t a = {malloc(n), malloc(n / 32 * sizeof(float))};
  for (int b = 0; b < n / 32; b++) {
    const uint8_t *blk = q8 + b * 34;
    uint16_t h;
    memcpy(&h, blk, 2);
    a.d[b] = ggml_fp16_to_fp32(h);
    for (int j = 0; j < 32; j++) a.u[b * 32 + j] = (uint8_t)((int8_t)blk[2 + j] + 128);
  }
  return a;
}

#if defined(__x86_64__)
// Two blocks a step, 128-bit lanes: block 0's low nibbles (elements 0..15), its high nibbles
// (16..31), then block 1's: the lanes of ggml's AVX2 kernel, whose two 8-wide accumulators are
// this one's two halves. Broadcasts come from memory (load ports), leaving the shuffle unit
// the nibble lookup.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni"))) static float dot_vnni(int n, const uint8_t *w, const act_t *a) {
  const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)fp4x2));
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
  __m512 acc = _mm512_setzero_ps();
  for (int b = 0; b + 1 < n / 32; b += 2) {
    const uint8_t *x0 = w + b * 17, *x1 = x0 + 17;
    _mm_prefetch((const char *)x0 + PREFETCH, _MM_HINT_T0);
    __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(x0 + 1)));
    v = _mm512_mask_broadcast_i32x4(v, 0xff00, _mm_loadu_si128((const __m128i *)(x1 + 1)));
    v = _mm512_and_si512(_mm512_srlv_epi64(v, shift), low4);
    const __m512i q = _mm512_shuffle_epi8(lut, v);
    const __m512i u = _mm512_loadu_si512(a->u + b * 32);
    // sum (a + 128) q - 128 sum q = sum a q, exactly, in each 32-bit lane
    __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, q);
    const __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, q);
    s = _mm512_sub_epi32(s, _mm512_slli_epi32(t, 7));
    __m512 dw = _mm512_mask_mov_ps(_mm512_set1_ps(e8m0_half_table[x0[0]]), 0xff00, _mm512_set1_ps(e8m0_half_table[x1[0]]));
    __m512 da = _mm512_mask_mov_ps(_mm512_set1_ps(a->d[b]), 0xff00, _mm512_set1_ps(a->d[b + 1]));
    acc = _mm512_fmadd_ps(_mm512_mul_ps(dw, da), _mm512_cvtepi32_ps(s), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

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
  for (int e = 0; e < 256; e++) e8m0_half_table[e] = ldexpf(1.0f, e - 128);
  act_t act = act_from_q8(q, n);
  int vnni = 0;
#if defined(__x86_64__)
  __builtin_cpu_init();
  vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (vnni) {  // the same rows, both kernels: only the float order of the sum differs
    int differ = 0;
    for (size_t r = 0; r < 1000; r++) {
      float g, o = dot_vnni(n, w + r * row, &act);
      mx->vec_dot(n, &g, 0, w + r * row, 0, q, 0, 1);
      differ += memcmp(&g, &o, sizeof g) != 0;
    }
    printf("VPDPBUSD kernel against ggml's over 1000 rows: %d differ in their bits\n", differ);
  }
#endif
  const int nth = omp_get_max_threads();
  float sink = 0;
  for (int kern = 0; kern < 2 + vnni; kern++)
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
#if defined(__x86_64__)
            if (kern == 2) s = dot_vnni(n, w + (first + r % span) * row, &act); else
#endif
            {
              if (kern == 1) {  // ggml's kernel, the rows PREFETCH bytes ahead asked for first
                const char *ahead = (const char *)w + (first + r % span) * row + PREFETCH;
                for (size_t off = 0; off < row; off += 64) __builtin_prefetch(ahead + off);
              }
              mx->vec_dot(n, &s, 0, w + (first + r % span) * row, 0, q, 0, 1);
            }
            sink += s;
          }
        }
        double gbs = (double)(rows / threads * threads) * row / (now() - t0) / 1e9;
        if (gbs > best) best = gbs;
      }
      printf("%s, %2d thread(s), rows %s: %.1f GB/s of weights (%.2f per thread; best of 3)\n", kern == 2 ? "VPDPBUSD kernel, prefetch" : kern ? "ggml vec_dot, prefetch   " : "ggml vec_dot            ",
             threads, hot ? "in L2 " : "streamed", best, best / threads);
    }
  }
  printf("(checksum %g)\n", sink);
  return 0;
}
