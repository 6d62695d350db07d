/* Attention over an in-place KV cache for x86-64 with AVX-512F: the contract of ONNX Runtime's
 * com.microsoft.GroupQueryAttention as vlm-export's inplace decoder uses it (model/gqa.py states it:
 * packed q|k|v, rotary inside, right padding, past and present the same buffer).
 *
 * Why this exists: in a decode step ORT's CPU GroupQueryAttention runs each query head on its own
 * (one GEMV over K, a softmax, one over V), so a KV head's cache is streamed once per query head,
 * and its fixed cost per call dominates short contexts. Measured on smol (SmolLM2-135M, 30 layers,
 * 9 query / 3 KV heads of 64, 2 cores): 74 us per layer at ~130 positions, 440 us at ~1,050, where
 * the K/V rows it needs are 1.5 MB (~100 us at this machine's stream rate). Here the query heads
 * that share a KV head read each K and V row once, together, and long caches are split into chunks
 * of CHUNK positions whose partial softmaxes are merged afterwards (flash-decoding), so that both
 * cores stream even when there are fewer KV heads than threads.
 *
 * Per batch row b (seqlens_k[b] + 1 = T tokens cached after the call, Q = min(S, T) valid query
 * rows, P = T - Q cached before): new K (rotated) and V rows land at slots [P, T); query row s,
 * rotated at position P + s, attends to slots [0, P + s]; output rows [Q, S) are zero.
 * Softmax in float32 with a max shift, exp from vector_math.h.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "vector_math.h"

#define CHUNK 128   /* cache positions per task: ~24 tasks at 1,024 positions and 3 KV heads */
#define MAX_GROUP 32 /* query heads per KV head this kernel takes */
#define MAX_HEAD_DIM 256

typedef struct {
  const float *q;       /* [B][S][H][D], rotated and scaled */
  const float *keys, *values; /* [B][Hkv][C][D] */
  int64_t S, H, Hkv, D, C;
  const int64_t *unit;  /* per task: (b * S + s) * Hkv + h */
  const int64_t *start; /* per task: first cache slot */
  const int32_t *seqlens_k;
  float *partial;       /* per task: G x (max, sum, D accumulators) */
} AttentionJob;

/* e^x for x <= 0 (scores minus their maximum); below -87 it is 0. */
static inline __m512 exp_negative(__m512 x) {
  __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(~tiny, vx_exp(x));
}

static inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

/* q . k as 16 partial sums (D floats each). */
static inline __m512 dot_lanes(const float *q, const float *k, int64_t D) {
  __m512 dot = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    __mmask16 m = lanes(D - d);
    dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), _mm512_maskz_loadu_ps(m, k + d), dot);
  }
  return dot;
}

/* 16 vectors -> one vector of their 16 horizontal sums, in order: a transpose-and-add tree of 45
 * shuffles and adds instead of 16 separate reductions (~130). */
static inline __m512 sum16(const __m512 *v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; i++)  /* per 128-bit lane: [v2i(0+2), v2i+1(0+2), v2i(1+3), v2i+1(1+3)] */
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++)  /* per lane: the lane's sums of v4i .. v4i+3 */
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; i++)  /* lanes pairwise summed */
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

/* One task: the G query heads of unit u against cache slots [first, last): per head, the chunk's
 * maximum score, the sum of exp(score - maximum) and the exp-weighted sum of V rows. */
static void run_task(const AttentionJob *job, int64_t task) {
  const int64_t u = job->unit[task], first = job->start[task];
  const int64_t h = u % job->Hkv, row = u / job->Hkv, b = row / job->S, s = row % job->S;
  const int64_t D = job->D, G = job->H / job->Hkv, T = (int64_t)job->seqlens_k[b] + 1;
  const int64_t Q = job->S < T ? job->S : T, end = T - Q + s + 1;
  const int64_t last = first + CHUNK < end ? first + CHUNK : end, n = last - first;
  const float *q = job->q + (row * job->H + h * G) * D;
  const float *keys = job->keys + ((b * job->Hkv + h) * job->C + first) * D;
  const float *values = job->values + ((b * job->Hkv + h) * job->C + first) * D;
  float *out = job->partial + task * G * (D + 2);
  float scores[MAX_GROUP][CHUNK];
  for (int64_t g = 0; g < G; g++) {
    const float *qg = q + g * D;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      __m512 dots[16];
      for (int64_t r = 0; r < 16; r++) dots[r] = dot_lanes(qg, keys + (j + r) * D, D);
      _mm512_storeu_ps(scores[g] + j, sum16(dots));
    }
    for (; j < n; j++) scores[g][j] = _mm512_reduce_add_ps(dot_lanes(qg, keys + j * D, D));
  }
  for (int64_t g = 0; g < G; g++) {
    float *row_out = out + g * (D + 2);
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) best = _mm512_mask_max_ps(best, lanes(n - j), best, _mm512_maskz_loadu_ps(lanes(n - j), scores[g] + j));
    float maximum = _mm512_reduce_max_ps(best);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      __mmask16 m = lanes(n - j);
      __m512 p = exp_negative(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores[g] + j), _mm512_set1_ps(maximum)));
      p = _mm512_maskz_mov_ps(m, p);
      _mm512_mask_storeu_ps(scores[g] + j, m, p);
      sum = _mm512_add_ps(sum, p);
    }
    row_out[0] = maximum;
    row_out[1] = _mm512_reduce_add_ps(sum);
  }
  for (int64_t g = 0; g < G; g++) {  /* V rows re-read per head from L1/L2; 4 accumulator chains in registers */
    float *acc = out + g * (D + 2) + 2;
    for (int64_t d = 0; d < D; d += 64) {
      const __mmask16 m0 = lanes(D - d), m1 = lanes(D - d - 16), m2 = lanes(D - d - 32), m3 = lanes(D - d - 48);
      __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t j = 0; j < n; j++) {
        const float *v = values + j * D + d;
        const __m512 p = _mm512_set1_ps(scores[g][j]);
        s0 = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m0, v), s0);
        s1 = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m1, v + 16), s1);
        s2 = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m2, v + 32), s2);
        s3 = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m3, v + 48), s3);
      }
      _mm512_mask_storeu_ps(acc + d, m0, s0);
      _mm512_mask_storeu_ps(acc + d + 16, m1, s1);
      _mm512_mask_storeu_ps(acc + d + 32, m2, s2);
      _mm512_mask_storeu_ps(acc + d + 48, m3, s3);
    }
  }
}

static void run_tasks(void *arg, int64_t first, int64_t last) {
  for (int64_t t = first; t < last; t++) run_task((const AttentionJob *)arg, t);
}

/* x (D) rotated LLaMA's way (rotate_half) with cos/sin (D/2) of its position, times `scale`. */
static void rotate(const float *x, const float *cos, const float *sin, int64_t D, float scale, float *y) {
  int64_t half = D / 2;
  for (int64_t i = 0; i < half; i++) {
    float a = x[i], c = x[i + half];
    y[i] = (a * cos[i] - c * sin[i]) * scale;
    y[i + half] = (c * cos[i] + a * sin[i]) * scale;
  }
}

int vx_cached_attention(const float *qkv, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t D, float *keys,
                        float *values, int64_t C, const int32_t *seqlens_k, const float *cos, const float *sin,
                        int64_t rotary_rows, float *out, vx_parallel_fn parallel, void *runner) {
  if (B < 1 || S < 1 || Hkv < 1 || H % Hkv || H / Hkv > MAX_GROUP || D % 2 || D > MAX_HEAD_DIM) return -1;
  const int64_t G = H / Hkv, width = (H + 2 * Hkv) * D;
  int64_t tasks = 0;
  for (int64_t b = 0; b < B; b++) {
    int64_t T = (int64_t)seqlens_k[b] + 1;
    if (T < 1 || T > C || T > rotary_rows) return -3;
    int64_t Q = S < T ? S : T, P = T - Q;
    for (int64_t s = 0; s < Q; s++) tasks += Hkv * ((P + s + CHUNK) / CHUNK);
  }
  float *q = malloc(sizeof(float) * (size_t)(B * S * H * D));
  int64_t *unit = malloc(sizeof(int64_t) * (size_t)tasks), *start = malloc(sizeof(int64_t) * (size_t)tasks);
  float *partial = malloc(sizeof(float) * (size_t)(tasks * G * (D + 2)));
  if (!q || !unit || !start || !partial) { free(q); free(unit); free(start); free(partial); return -2; }
  const float scale = 1.f / sqrtf((float)D);
  int64_t t = 0;
  for (int64_t b = 0; b < B; b++) {
    int64_t T = (int64_t)seqlens_k[b] + 1, Q = S < T ? S : T, P = T - Q;
    for (int64_t s = 0; s < S; s++) {
      const float *x = qkv + (b * S + s) * width;
      float *y = out + (b * S + s) * H * D;
      if (s >= Q) { memset(y, 0, sizeof(float) * (size_t)(H * D)); continue; }
      const float *c = cos + (P + s) * (D / 2), *n = sin + (P + s) * (D / 2);
      for (int64_t head = 0; head < H; head++) rotate(x + head * D, c, n, D, scale, q + ((b * S + s) * H + head) * D);
      for (int64_t h = 0; h < Hkv; h++) {
        int64_t slot = ((b * Hkv + h) * C + P + s) * D;
        rotate(x + (H + h) * D, c, n, D, 1.f, keys + slot);
        memcpy(values + slot, x + (H + Hkv + h) * D, sizeof(float) * (size_t)D);
        for (int64_t from = 0; from < P + s + 1; from += CHUNK, t++) {
          unit[t] = (b * S + s) * Hkv + h;
          start[t] = from;
        }
      }
    }
  }
  AttentionJob job = {q, keys, values, S, H, Hkv, D, C, unit, start, seqlens_k, partial};
  if (parallel && tasks > 1)
    parallel(runner, run_tasks, &job, tasks);
  else
    run_tasks(&job, 0, tasks);
  /* Merge each unit's chunks: out = sum_t e^(m_t - M) acc_t / sum_t e^(m_t - M) l_t. */
  for (int64_t first = 0; first < tasks;) {
    int64_t last = first;
    while (last < tasks && unit[last] == unit[first]) last++;
    const int64_t u = unit[first], h = u % Hkv, row = u / Hkv;
    for (int64_t g = 0; g < G; g++) {
      float maximum = -INFINITY, total = 0.f;
      for (int64_t k = first; k < last; k++) maximum = fmaxf(maximum, partial[(k * G + g) * (D + 2)]);
      float *y = out + (row * H + h * G + g) * D;
      for (int64_t d = 0; d < D; d++) y[d] = 0.f;
      for (int64_t k = first; k < last; k++) {
        const float *p = partial + (k * G + g) * (D + 2);
        float w = expf(p[0] - maximum);
        total += w * p[1];
        for (int64_t d = 0; d < D; d++) y[d] += w * p[2 + d];
      }
      for (int64_t d = 0; d < D; d++) y[d] /= total;
    }
    first = last;
  }
  free(q); free(unit); free(start); free(partial);
  return 0;
}
