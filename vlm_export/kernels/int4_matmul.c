/* int4 (and int8) weight-only MatMul for x86-64 with AVX-512 VNNI: y[M,N] = x[M,K] @ W[K,N].
 *
 * Why this exists: decode is a chain of GEMVs that should stream the int4 weights at the memory's
 * rate. ORT's MLAS kernel for MatMulNBits reaches ~20 GB/s of the ~30 GB/s a 2-core VM reads; its
 * instruction count per cache line is close to the memory's rate, and nothing fetches ahead.
 * This kernel does ~6 vector instructions per 64-byte line and prefetches 2 KiB ahead: ~26 GB/s.
 *
 * Weights are int4 codes q in 0..15 with a float16 scale d and a float16 minimum m per `block`
 * inputs of one output: value = d * q + m. That is llama.cpp's Q4_1 exactly (its blocks of 32
 * carry over bit for bit), Q4_0 and MatMulNBits' symmetric format with m = -8 d, and MatMulNBits
 * with a zero point z with m = -z d. Repacked at build time (quantize/int4_kernel.py) so that one
 * 512-bit load feeds 16 outputs:
 *
 *   tile t (outputs 16t..16t+15) -> block b -> line v (inputs b*block + 8v .. +7) -> 64 bytes,
 *   byte 4c+i: low nibble = q[16t+c][b*block+8v+i], high nibble = q[16t+c][b*block+8v+4+i]
 *   params[t][b][0..15] = d of outputs 16t+c, params[t][b][16..31] = m (float16: one 64-byte line)
 *
 * 8-bit codes (q in 0..255, value = d * q + m: Q8_1-style min/max, and MatMulNBits 8-bit with its
 * zero point folded into m) use the same tiles with one code per byte, no unpacking:
 *
 *   line v (inputs b*block + 4v .. +3) -> byte 4c+i = q[16t+c][b*block+4v+i]
 *
 * Activations are quantized to int8 per block (absmax / 127), as llama.cpp's Q8_1 and MLAS at
 * accuracy level 4 do, so VPDPBUSD multiplies the unsigned nibbles by the signed activations 4 at
 * a time; the minimum comes back as m * (x scale * sum(x_q)) per block (llama.cpp's Q4_1 x Q8_1 dot).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "int4_matmul.h"
#include "vector_math.h"

#define PREFETCH_BYTES 2048
#define SERIAL_BYTES (64 << 10) /* less weight than this: waking a second thread costs more than it saves */

typedef struct {
  const int8_t *xq;      /* [M][K] */
  const float *xscale;   /* [M][K/block] */
  const float *xsum;     /* [M][K/block]: the block's quantized inputs summed, times their scale */
  const uint8_t *w;
  const uint16_t *params; /* float16 scales and minimums, as above */
  float *y;              /* [M][N] */
  int64_t M, K, N, block;
  int bits;              /* 4 or 8 */
} MatMulJob;

/* Per block of `block` inputs (a multiple of 32): scale = absmax / 127, codes = round-half-even(x * 127 /
 * absmax) (the MXCSR's default rounding, as lrintf), their sum times the scale. Vectorised: it runs on
 * the calling thread before the tiles are shared out, and the scalar loop took ~20 % of a 256-row
 * prefill's time while the other thread waited. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t block, int8_t *xq, float *xscale, float *xsum) {
  int64_t nb = K / block;
  for (int64_t r = 0; r < M * nb; r++) {
    const float *src = x + r * block;
    __m512 top = _mm512_setzero_ps();
    for (int64_t i = 0; i < block; i += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(src + i)));
    float absmax = _mm512_reduce_max_ps(top);
    float scale = absmax / 127.f, inv = absmax > 0.f ? 127.f / absmax : 0.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < block; i += 16) {
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + i), vinv));
      sum = _mm512_add_epi32(sum, q);
      _mm_storeu_si128((__m128i *)(xq + r * block + i), _mm512_cvtsepi32_epi8(q));
    }
    xscale[r] = scale;
    xsum[r] = scale * (float)_mm512_reduce_add_epi32(sum);
  }
}

#define MAX_ROWS 4 /* rows sharing each weight load (prefill): 4 x 2 accumulators fit the 32 registers */

/* One tile of 16 outputs for `rows` consecutive rows and `bits`-wide codes (both constants at each
 * call, so the branches fold and the loops over r unroll): each weight line is loaded (and, 4-bit,
 * unpacked) once for all rows. A step covers 8 inputs: one 4-bit line (low nibbles = inputs 0-3,
 * high = 4-7) or two 8-bit lines; two accumulators per row keep two VPDPBUSD chains in flight even
 * for a single row (decode). */
static inline __attribute__((always_inline)) void tile_rows(const MatMulJob *job, const uint8_t *wt, const uint16_t *pt,
                                                            int64_t row, const int rows, const int bits, __m512 *acc) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t nb = job->K / job->block, steps = job->block / 8, step_bytes = bits == 8 ? 128 : 64;
  const int32_t *xq[MAX_ROWS];
  for (int r = 0; r < rows; r++) {
    xq[r] = (const int32_t *)(job->xq + (row + r) * job->K);
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t *wb = wt + b * steps * step_bytes;
    __m512i even[MAX_ROWS], odd[MAX_ROWS];
    for (int r = 0; r < rows; r++) even[r] = odd[r] = _mm512_setzero_si512();
    for (int64_t v = 0; v < steps; v++) {
      const uint8_t *w = wb + v * step_bytes;
      __m512i first, second;
      _mm_prefetch((const char *)(w + PREFETCH_BYTES), _MM_HINT_T0);
      if (bits == 8) {
        _mm_prefetch((const char *)(w + 64 + PREFETCH_BYTES), _MM_HINT_T0);
        first = _mm512_loadu_si512(w);
        second = _mm512_loadu_si512(w + 64);
      } else {
        __m512i packed = _mm512_loadu_si512(w);
        first = _mm512_and_si512(packed, low4);
        second = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
      }
      int64_t at = b * (job->block / 4) + 2 * v;  /* the step's 8 activations, as two int32 of 4 */
      for (int r = 0; r < rows; r++) {
        even[r] = _mm512_dpbusd_epi32(even[r], first, _mm512_set1_epi32(xq[r][at]));
        odd[r] = _mm512_dpbusd_epi32(odd[r], second, _mm512_set1_epi32(xq[r][at + 1]));
      }
    }
    __m512 wscale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(pt + b * 32)));
    __m512 wmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(pt + b * 32 + 16)));
    for (int r = 0; r < rows; r++) {
      int64_t at = (row + r) * nb + b;
      __m512i dot = _mm512_add_epi32(even[r], odd[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wscale, _mm512_set1_ps(job->xscale[at])), acc[r]);
      acc[r] = _mm512_fmadd_ps(wmin, _mm512_set1_ps(job->xsum[at]), acc[r]);
    }
  }
}

static void run_tiles(void *arg, int64_t first, int64_t last) {
  const MatMulJob *job = (const MatMulJob *)arg;
  const int64_t nb = job->K / job->block, tile_bytes = job->K * 2 * job->bits; /* 16 outputs x K codes */
  __m512 acc[MAX_ROWS];
  for (int64_t t = first; t < last; t++) {
    const uint8_t *wt = job->w + t * tile_bytes;
    const uint16_t *pt = job->params + t * nb * 32;
    int64_t n0 = t * 16, valid = job->N - n0 < 16 ? job->N - n0 : 16;
    __mmask16 mask = (__mmask16)((1u << valid) - 1u);
    int64_t m = 0;
    for (; m + MAX_ROWS <= job->M; m += MAX_ROWS) {
      if (job->bits == 8)
        tile_rows(job, wt, pt, m, MAX_ROWS, 8, acc);
      else
        tile_rows(job, wt, pt, m, MAX_ROWS, 4, acc);
      for (int r = 0; r < MAX_ROWS; r++) _mm512_mask_storeu_ps(job->y + (m + r) * job->N + n0, mask, acc[r]);
    }
    for (; m < job->M; m++) {
      if (job->bits == 8)
        tile_rows(job, wt, pt, m, 1, 8, acc);
      else
        tile_rows(job, wt, pt, m, 1, 4, acc);
      _mm512_mask_storeu_ps(job->y + m * job->N + n0, mask, acc[0]);
    }
  }
}

int vx_int4_matmul(const float *x, int64_t M, int64_t K, int64_t N, int64_t block, int bits, const uint8_t *w,
                   const uint16_t *params, float *y, vx_parallel_fn parallel, void *runner) {
  if (block % 32 || K % block || M < 1 || (bits != 4 && bits != 8)) return -1;
  int64_t nb = K / block;
  int8_t *xq = aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
  float *xscale = malloc(sizeof(float) * M * nb);
  float *xsum = malloc(sizeof(float) * M * nb);
  if (!xq || !xscale || !xsum) { free(xq); free(xscale); free(xsum); return -2; }
  quantize_rows(x, M, K, block, xq, xscale, xsum);
  MatMulJob job = {xq, xscale, xsum, w, params, y, M, K, N, block, bits};
  if (!parallel || (N + 15) / 16 * K * 2 * bits < SERIAL_BYTES)
    run_tiles(&job, 0, (N + 15) / 16);
  else
    parallel(runner, run_tiles, &job, (N + 15) / 16);
  free(xq); free(xscale); free(xsum);
  return 0;
}

void vx_swiglu(const float *gate_up, int64_t rows, int64_t width, float *out) {
  const int64_t half = width / 2;
  for (int64_t r = 0; r < rows; r++) {
    const float *gate = gate_up + r * width, *up = gate + half;
    float *y = out + r * half;
    for (int64_t j = 0; j < half; j += 16) {
      __mmask16 m = half - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (half - j)) - 1u);
      __m512 g = _mm512_maskz_loadu_ps(m, gate + j);
      __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), vx_exp(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      _mm512_mask_storeu_ps(y + j, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, up + j)));
    }
  }
}
