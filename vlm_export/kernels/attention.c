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
 * A call of PREFILL_ROWS query rows or more (a prefill, teacher-forced scoring) takes another path,
 * shaped like a GEMM: per KV head the cached keys are transposed once (D x T), each task takes a block
 * of query rows and all the query heads that share the KV head, and computes their scores 16 keys at
 * a time with each transposed key tile loaded once for 8 query vectors (broadcast q, no horizontal
 * sums), then the softmax, then P V with each V row loaded once for 4 query vectors. The decode path
 * (one row per task, K rows reduced against q) ran such calls at half ONNX Runtime's speed (smol's
 * shape, 256 rows after 512 cached, 2 threads: 8.3 ms against ORT's 4.5 ms; this path 4.1 ms against
 * ORT's 5.2 ms in one run; 512 rows from empty 3.6 ms against 6.8 ms).
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
#define PREFILL_ROWS 16  /* query rows per call from which the GEMM-shaped path runs: below, transposing
                          * the cached keys costs more than it saves (one thread, 1,024 cached: 4 rows
                          * 0.57 ms on the decode path, 0.95 ms on this one; 16 rows 2.07 / 1.46 ms) */
#define ROW_BLOCK 8      /* query rows per task on that path */
#define QK_VECTORS 8     /* query vectors per key tile load */
#define PV_VECTORS 4     /* query vectors per V row load (prefill_task's named accumulators) */

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

typedef struct {
  const float *q;       /* [B][S][H][D], rotated and scaled */
  const float *kt;      /* [B][Hkv][D][Tpad]: the cached keys transposed, zero past each row's T */
  const float *values;  /* [B][Hkv][C][D] */
  float *out;           /* [B][S][H][D] */
  int64_t S, H, Hkv, D, C, Tpad, blocks; /* blocks: row blocks per batch row */
  const int32_t *seqlens_k;
  volatile int failed;  /* a task's scratch could not be allocated */
} PrefillJob;

/* A scratch buffer of `floats` (64-byte aligned) for the calling thread, kept and grown across calls:
 * a fresh allocation per task (up to ~200 KB, so mmap'ed) cost page faults on every task. NULL when
 * out of memory. */
static float *scratch(size_t floats) {
  static __thread float *buffer;
  static __thread size_t capacity;
  if (floats > capacity) {
    free(buffer);
    capacity = (floats + 4095) & ~(size_t)4095;
    buffer = aligned_alloc(64, sizeof(float) * capacity);
    if (!buffer) capacity = 0;
  }
  return buffer;
}

/* One task: query rows [s0, s0 + ROW_BLOCK) of batch row b, the G query heads of KV head h: full
 * softmax attention over cache slots [0, P + s] per row, written to `out`. */
static void prefill_task(PrefillJob *job, int64_t task) {
  const int64_t per_b = job->blocks * job->Hkv, b = task / per_b, h = task % job->Hkv, block = (task % per_b) / job->Hkv;
  const int64_t D = job->D, G = job->H / job->Hkv, T = (int64_t)job->seqlens_k[b] + 1;
  const int64_t Q = job->S < T ? job->S : T, P = T - Q, s0 = block * ROW_BLOCK;
  if (s0 >= Q) return;
  const int64_t s1 = s0 + ROW_BLOCK < Q ? s0 + ROW_BLOCK : Q, vectors = (s1 - s0) * G;
  const int64_t keys = P + s1, padded = (keys + 15) & ~(int64_t)15; /* slots the block's last row sees */
  const float *kt = job->kt + (b * job->Hkv + h) * D * job->Tpad;
  const float *values = job->values + (b * job->Hkv + h) * job->C * D;
  float *scores = scratch((size_t)(vectors * padded));
  float zero[MAX_HEAD_DIM] = {0};
  if (!scores) { job->failed = 1; return; }
  /* vector v = (row s0 + v / G, head g = v % G): its q, its last visible slot */
#define QVEC(v) (job->q + ((b * job->S + s0 + (v) / G) * job->H + h * G + (v) % G) * D)
  for (int64_t v0 = 0; v0 < vectors; v0 += QK_VECTORS) {
    const float *qv[QK_VECTORS];
    for (int i = 0; i < QK_VECTORS; i++) qv[i] = v0 + i < vectors ? QVEC(v0 + i) : zero;
    for (int64_t j = 0; j < padded; j += 16) {
      __m512 acc[QK_VECTORS];
      for (int i = 0; i < QK_VECTORS; i++) acc[i] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d++) {
        const __m512 k = _mm512_loadu_ps(kt + d * job->Tpad + j);
        for (int i = 0; i < QK_VECTORS; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(qv[i][d]), k, acc[i]);
      }
      for (int i = 0; i < QK_VECTORS && v0 + i < vectors; i++) _mm512_store_ps(scores + (v0 + i) * padded + j, acc[i]);
    }
  }
  float totals[ROW_BLOCK * MAX_GROUP];
  for (int64_t v = 0; v < vectors; v++) { /* softmax over slots [0, P + s]; later slots 0 */
    float *row = scores + v * padded;
    const int64_t n = P + s0 + v / G + 1;
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) best = _mm512_mask_max_ps(best, lanes(n - j), best, _mm512_maskz_loadu_ps(lanes(n - j), row + j));
    const __m512 maximum = _mm512_set1_ps(_mm512_reduce_max_ps(best));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < padded; j += 16) {
      const __mmask16 m = lanes(n - j);
      const __m512 e = _mm512_maskz_mov_ps(m, exp_negative(_mm512_sub_ps(_mm512_load_ps(row + j), maximum)));
      _mm512_store_ps(row + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    totals[v] = _mm512_reduce_add_ps(sum);
  }
  for (int64_t v0 = 0; v0 < vectors; v0 += PV_VECTORS) {
    const int64_t count = vectors - v0 < PV_VECTORS ? vectors - v0 : PV_VECTORS;
    const int64_t n = P + s0 + (v0 + count - 1) / G + 1; /* the group's longest row */
    /* four vectors' weights (a missing one repeats the first, its sums are not stored) */
    const float *p0 = scores + v0 * padded, *p1 = count > 1 ? p0 + padded : p0, *p2 = count > 2 ? p0 + 2 * padded : p0,
                *p3 = count > 3 ? p0 + 3 * padded : p0;
    for (int64_t d = 0; d < D; d += 64) {
      const __mmask16 m0 = lanes(D - d), m1 = lanes(D - d - 16), m2 = lanes(D - d - 32), m3 = lanes(D - d - 48);
      /* named accumulators: an array indexed by the group's vector count was kept on the stack by gcc */
      __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00,
             a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
      for (int64_t j = 0; j < n; j++) {
        const float *vrow = values + j * D + d;
        const __m512 x0 = _mm512_maskz_loadu_ps(m0, vrow), x1 = _mm512_maskz_loadu_ps(m1, vrow + 16),
                     x2 = _mm512_maskz_loadu_ps(m2, vrow + 32), x3 = _mm512_maskz_loadu_ps(m3, vrow + 48);
#define PV_ROW(i) { const __m512 w = _mm512_set1_ps(p##i[j]); a##i##0 = _mm512_fmadd_ps(w, x0, a##i##0); \
        a##i##1 = _mm512_fmadd_ps(w, x1, a##i##1); a##i##2 = _mm512_fmadd_ps(w, x2, a##i##2); a##i##3 = _mm512_fmadd_ps(w, x3, a##i##3); }
        PV_ROW(0) PV_ROW(1) PV_ROW(2) PV_ROW(3)
#undef PV_ROW
      }
#define PV_STORE(i) if (i < count) { \
        const int64_t v = v0 + i; \
        float *y = job->out + ((b * job->S + s0 + v / G) * job->H + h * G + v % G) * D + d; \
        const __m512 inverse = _mm512_set1_ps(1.f / totals[v]); \
        _mm512_mask_storeu_ps(y, m0, _mm512_mul_ps(a##i##0, inverse)); \
        _mm512_mask_storeu_ps(y + 16, m1, _mm512_mul_ps(a##i##1, inverse)); \
        _mm512_mask_storeu_ps(y + 32, m2, _mm512_mul_ps(a##i##2, inverse)); \
        _mm512_mask_storeu_ps(y + 48, m3, _mm512_mul_ps(a##i##3, inverse)); }
      PV_STORE(0) PV_STORE(1) PV_STORE(2) PV_STORE(3)
#undef PV_STORE
    }
  }
#undef QVEC
}

static void prefill_tasks(void *arg, int64_t first, int64_t last) {
  for (int64_t t = first; t < last; t++) prefill_task((PrefillJob *)arg, t);
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

/* The GEMM-shaped path (see the top of this file) once q is rotated and the new K/V rows written. */
static int prefill(const float *q, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t D, const float *keys,
                   const float *values, int64_t C, const int32_t *seqlens_k, int64_t longest, float *out,
                   vx_parallel_fn parallel, void *runner) {
  const int64_t Tpad = (longest + 15) & ~(int64_t)15, blocks = (S + ROW_BLOCK - 1) / ROW_BLOCK;
  float *kt = aligned_alloc(64, sizeof(float) * (size_t)(B * Hkv * D * Tpad));
  if (!kt) return -2;
  for (int64_t b = 0; b < B; b++) {
    const int64_t T = (int64_t)seqlens_k[b] + 1;
    for (int64_t h = 0; h < Hkv; h++) {
      const float *k = keys + (b * Hkv + h) * C * D;
      float *t = kt + (b * Hkv + h) * D * Tpad;
      for (int64_t j = 0; j < T; j++)
        for (int64_t d = 0; d < D; d++) t[d * Tpad + j] = k[j * D + d];
      for (int64_t d = 0; d < D; d++) memset(t + d * Tpad + T, 0, sizeof(float) * (size_t)(Tpad - T));
    }
  }
  PrefillJob job = {q, kt, values, out, S, H, Hkv, D, C, Tpad, blocks, seqlens_k, 0};
  const int64_t tasks = B * blocks * Hkv;
  if (parallel && tasks > 1)
    parallel(runner, prefill_tasks, &job, tasks);
  else
    prefill_tasks(&job, 0, tasks);
  free(kt);
  return job.failed ? -2 : 0;
}

int vx_cached_attention(const float *qkv, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t D, float *keys,
                        float *values, int64_t C, const int32_t *seqlens_k, const float *cos, const float *sin,
                        int64_t rotary_rows, float *out, vx_parallel_fn parallel, void *runner) {
  if (B < 1 || S < 1 || Hkv < 1 || H % Hkv || H / Hkv > MAX_GROUP || D % 2 || D > MAX_HEAD_DIM) return -1;
  const int64_t G = H / Hkv, width = (H + 2 * Hkv) * D;
  const int whole_rows = S >= PREFILL_ROWS; /* the GEMM-shaped path: no chunks, nothing to merge */
  int64_t tasks = 0, longest = 0;
  for (int64_t b = 0; b < B; b++) {
    int64_t T = (int64_t)seqlens_k[b] + 1;
    if (T < 1 || T > C || T > rotary_rows) return -3;
    int64_t Q = S < T ? S : T, P = T - Q;
    longest = T > longest ? T : longest;
    for (int64_t s = 0; s < Q && !whole_rows; s++) tasks += Hkv * ((P + s + CHUNK) / CHUNK);
  }
  float *q = malloc(sizeof(float) * (size_t)(B * S * H * D));
  int64_t *unit = whole_rows ? NULL : malloc(sizeof(int64_t) * (size_t)tasks);
  int64_t *start = whole_rows ? NULL : malloc(sizeof(int64_t) * (size_t)tasks);
  float *partial = whole_rows ? NULL : malloc(sizeof(float) * (size_t)(tasks * G * (D + 2)));
  if (!q || (!whole_rows && (!unit || !start || !partial))) { free(q); free(unit); free(start); free(partial); return -2; }
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
        for (int64_t from = 0; from < P + s + 1 && !whole_rows; from += CHUNK, t++) {
          unit[t] = (b * S + s) * Hkv + h;
          start[t] = from;
        }
      }
    }
  }
  if (whole_rows) {
    int status = prefill(q, B, S, H, Hkv, D, keys, values, C, seqlens_k, longest, out, parallel, runner);
    free(q);
    return status;
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
