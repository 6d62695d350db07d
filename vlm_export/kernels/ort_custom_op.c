/* ONNX Runtime custom-op library: `vlm_export.cpu::Int4MatMul` and `::GroupQueryAttention` run
 * int4_matmul.c and attention.c inside a session.
 *
 * ONNX Runtime's C API is a table of function pointers whose order never changes once shipped;
 * the ORT wheel ships no headers, so this file declares only the handful of entries it calls, by
 * their position in the table (version 1, and ParallelFor from 18), and the version-16 layout of a
 * custom op (ORT reads the input/output characteristics whatever the version says; 16 adds a
 * compute that returns a status, so a bad input is an error in the caller's language instead of a
 * crash). ONNX Runtime 1.18 or newer.
 *
 *   Int4MatMul(A float[..., K], B uint8[ceil(N/16) * K * 8], params float16[ceil(N/16), K/block, 32])
 *     attributes K, N, block  ->  Y float[..., N]
 *   Int8MatMul: the same with 8-bit codes, B uint8[ceil(N/16) * K * 16]
 *   either with attribute swiglu=1: Y float[..., N/2] = silu(P[..., :N/2]) * P[..., N/2:], P the product
 *   GroupQueryAttention: com.microsoft's inputs, outputs and head attributes, packed q|k|v with
 *     rotary (half split) inside, float32 caches (below; attention.c)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "attention.h"
#include "int4_matmul.h"

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtShapeInfo OrtShapeInfo; /* OrtTensorTypeAndShapeInfo */
typedef void *ApiEntry;

/* Positions in OrtApi (version 1 part of the table). */
enum {
  API_CreateStatus = 0,
  API_CreateCustomOpDomain = 26,
  API_CustomOpDomain_Add = 27,
  API_AddCustomOpDomain = 28,
  API_GetTensorMutableData = 51,
  API_GetDimensionsCount = 61,
  API_GetDimensions = 62,
  API_GetTensorShapeElementCount = 64,
  API_GetTensorTypeAndShape = 65,
  API_KernelInfoGetAttribute_int64 = 86,
  API_KernelContext_GetInput = 90,
  API_KernelContext_GetOutput = 91,
  API_ReleaseStatus = 93,
  API_ReleaseTensorTypeAndShapeInfo = 99,
  API_KernelContext_ParallelFor = 274, /* version 18 */
};

typedef struct {
  const ApiEntry *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

enum { TYPE_FLOAT = 1, TYPE_UINT8 = 2, TYPE_INT32 = 6, TYPE_FLOAT16 = 10, ORT_FAIL = 1 };
enum { REQUIRED = 0, OPTIONAL = 1 };

/* Version-16 layout of OrtCustomOp. */
typedef struct CustomOp {
  uint32_t version;
  void *(*CreateKernel)(const struct CustomOp *op, const ApiEntry *api, const OrtKernelInfo *info);
  const char *(*GetName)(const struct CustomOp *op);
  const char *(*GetExecutionProviderType)(const struct CustomOp *op);
  int (*GetInputType)(const struct CustomOp *op, size_t index);
  size_t (*GetInputTypeCount)(const struct CustomOp *op);
  int (*GetOutputType)(const struct CustomOp *op, size_t index);
  size_t (*GetOutputTypeCount)(const struct CustomOp *op);
  void (*KernelCompute)(void *kernel, OrtKernelContext *context);
  void (*KernelDestroy)(void *kernel);
  int (*GetInputCharacteristic)(const struct CustomOp *op, size_t index);  /* 0 = required */
  int (*GetOutputCharacteristic)(const struct CustomOp *op, size_t index);
  int (*GetInputMemoryType)(const struct CustomOp *op, size_t index);      /* 0 = the provider's default */
  int (*GetVariadicInputMinArity)(const struct CustomOp *op);
  int (*GetVariadicInputHomogeneity)(const struct CustomOp *op);
  int (*GetVariadicOutputMinArity)(const struct CustomOp *op);
  int (*GetVariadicOutputHomogeneity)(const struct CustomOp *op);
  OrtStatus *(*CreateKernelV2)(const struct CustomOp *op, const ApiEntry *api, const OrtKernelInfo *info, void **kernel);
  OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *context);
} CustomOp;

#define CALL(api, entry, type) ((type)(api)[API_##entry])
typedef OrtStatus *(*GetInputFn)(const OrtKernelContext *, size_t, const OrtValue **);
typedef OrtStatus *(*GetOutputFn)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **);
typedef OrtStatus *(*GetDataFn)(OrtValue *, void **);
typedef OrtStatus *(*GetShapeInfoFn)(const OrtValue *, OrtShapeInfo **);
typedef OrtStatus *(*GetDimCountFn)(const OrtShapeInfo *, size_t *);
typedef OrtStatus *(*GetDimsFn)(const OrtShapeInfo *, int64_t *, size_t);
typedef OrtStatus *(*GetCountFn)(const OrtShapeInfo *, size_t *);
typedef void (*ReleaseShapeInfoFn)(OrtShapeInfo *);
typedef void (*ReleaseStatusFn)(OrtStatus *);
typedef OrtStatus *(*GetAttrIntFn)(const OrtKernelInfo *, const char *, int64_t *);

typedef OrtStatus *(*CreateStatusFn)(int, const char *);
typedef OrtStatus *(*ParallelForFn)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *);

/* Parts a parallel kernel call is cut into. ORT's pool hands them to its threads as they come free
 * (KernelContext_ParallelFor without batches = its SimpleParallelFor), so the session's own thread
 * count decides how many run at once, and a thread that starts late takes fewer parts. */
#define MAX_PARTS 16
/* The version-18 table, for ParallelFor (kernels are handed the table of the op's version 16). */
static const ApiEntry *api_18;

typedef struct {
  const ApiEntry *api;
  int64_t K, N, block;
  int bits; /* 4: Int4MatMul, 8: Int8MatMul */
  int64_t swiglu; /* attribute swiglu=1: Y = silu(first half) * second half of the product, N/2 wide */
  /* The weights, copied once into memory of our own (ensure_own_copy). */
  pthread_mutex_t lock;
  const void *source;
  uint8_t *weights;
  uint16_t *params;
  size_t mapped;
} Kernel;

/* ORT maps a large external-data file straight into memory and hands that mapping out as the
 * initializer: 4 KiB page-cache pages, a TLB miss every 4 KiB of a stream. A copy in anonymous
 * memory asked to be huge pages (what ORT's MatMulNBits gets from its own pre-packing) is faster:
 * at the 1.4B shape a decode step took 0.90x MLAS's time reading the mapping, 0.85x reading the
 * copy (same runs, MLAS on huge pages in both). One mapping per node holds its weights and scales. */
static void release_source(const void *source, size_t bytes) {
#ifdef MADV_PAGEOUT
  /* The source is never read again: let the kernel reclaim its pages (a hint that loses nothing:
   * file pages are re-read from the file, anonymous ones swapped, if ever touched again), so the
   * weights are resident once, not twice. */
  uintptr_t first = ((uintptr_t)source + 4095) & ~(uintptr_t)4095, end = ((uintptr_t)source + bytes) & ~(uintptr_t)4095;
  if (end > first) madvise((void *)first, end - first, MADV_PAGEOUT);
#else
  (void)source, (void)bytes;
#endif
}

#define HUGE_PAGE ((size_t)2 << 20)

/* Anonymous memory starting on a 2 MiB boundary, so that all of it can be huge pages. */
static void *map_aligned(size_t bytes) {
  uint8_t *memory = mmap(NULL, bytes + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) return NULL;
  uint8_t *aligned = (uint8_t *)(((uintptr_t)memory + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
  if (aligned > memory) munmap(memory, (size_t)(aligned - memory));
  size_t tail = (size_t)(memory + bytes + HUGE_PAGE - (aligned + bytes));
  if (tail) munmap(aligned + bytes, tail);
  madvise(aligned, bytes, MADV_HUGEPAGE);
  return aligned;
}

static void drop_copy(Kernel *kernel) {
  if (kernel->weights) munmap(kernel->weights, kernel->mapped);
  kernel->weights = NULL;
  kernel->params = NULL;
  kernel->source = NULL;
}

static int ensure_own_copy(Kernel *kernel, const void *b, const void *params) {
  int ok = 1;
  pthread_mutex_lock(&kernel->lock);
  if (kernel->source != b) {
    drop_copy(kernel);
    int64_t tiles = (kernel->N + 15) / 16;
    size_t weight_bytes = (size_t)(tiles * kernel->K * 2 * kernel->bits), scale_bytes = (size_t)(tiles * (kernel->K / kernel->block) * 32) * sizeof(uint16_t);
    size_t bytes = (weight_bytes + 63) / 64 * 64 + scale_bytes;
    kernel->mapped = (bytes + 4095) / 4096 * 4096;
    void *memory = map_aligned(kernel->mapped);
    ok = memory != NULL;
    if (ok) {
      kernel->weights = memory;
      kernel->params = (uint16_t *)((uint8_t *)memory + (weight_bytes + 63) / 64 * 64);
      memcpy(kernel->weights, b, weight_bytes);
      memcpy(kernel->params, params, scale_bytes);
      release_source(b, weight_bytes);
      kernel->source = b;
    }
  }
  pthread_mutex_unlock(&kernel->lock);
  return ok;
}

static OrtStatus *error(const ApiEntry *api, const char *message) {
  return CALL(api, CreateStatus, CreateStatusFn)(ORT_FAIL, message);
}

static const char *matmul_name(int bits) { return bits == 8 ? "Int8MatMul" : "Int4MatMul"; }

/* "<op>: message" (ORT copies the text). */
static OrtStatus *matmul_error(const ApiEntry *api, int bits, const char *message) {
  char text[256];
  snprintf(text, sizeof text, "%s: %s", matmul_name(bits), message);
  return error(api, text);
}

static OrtStatus *create_kernel_v2(const CustomOp *op, const ApiEntry *api, const OrtKernelInfo *info, void **out) {
  int bits = strcmp(op->GetName(op), matmul_name(8)) == 0 ? 8 : 4;
  Kernel *kernel = calloc(1, sizeof(Kernel));
  if (!kernel) return matmul_error(api, bits, "out of memory");
  kernel->api = api;
  kernel->bits = bits;
  pthread_mutex_init(&kernel->lock, NULL);
  GetAttrIntFn attr = CALL(api, KernelInfoGetAttribute_int64, GetAttrIntFn);
  OrtStatus *status = attr(info, "K", &kernel->K);
  if (!status) status = attr(info, "N", &kernel->N);
  if (!status) status = attr(info, "block", &kernel->block);
  if (!status) {
    OrtStatus *absent = attr(info, "swiglu", &kernel->swiglu); /* optional: 0 when absent */
    if (absent) {
      CALL(api, ReleaseStatus, ReleaseStatusFn)(absent);
      kernel->swiglu = 0;
    }
  }
  if (!status && (kernel->block <= 0 || kernel->block % 32 || kernel->K % kernel->block || kernel->N <= 0))
    status = matmul_error(api, bits, "block must be a multiple of 32 dividing K, and N positive");
  if (!status && kernel->swiglu && kernel->N % 2)
    status = matmul_error(api, bits, "swiglu needs an even N (gate and up halves)");
  if (status) {
    free(kernel);
    return status;
  }
  *out = kernel;
  return NULL;
}

static void *create_kernel(const CustomOp *op, const ApiEntry *api, const OrtKernelInfo *info) {
  void *kernel = NULL;
  OrtStatus *status = create_kernel_v2(op, api, info, &kernel);
  if (status) CALL(api, ReleaseStatus, ReleaseStatusFn)(status);
  return kernel;
}

static OrtStatus *input_data(const ApiEntry *api, OrtKernelContext *context, size_t index, const OrtValue **value, void **data) {
  OrtStatus *status = CALL(api, KernelContext_GetInput, GetInputFn)(context, index, value);
  if (!status && !*value) status = error(api, "vlm_export.cpu: a required input is missing");
  return status ? status : CALL(api, GetTensorMutableData, GetDataFn)((OrtValue *)*value, data);
}

/* dims <- the shape of A; returns NULL or the failure. */
static OrtStatus *shape_of(const ApiEntry *api, const OrtValue *value, int64_t *dims, size_t *rank) {
  OrtShapeInfo *info = NULL;
  OrtStatus *status = CALL(api, GetTensorTypeAndShape, GetShapeInfoFn)(value, &info);
  if (status) return status;
  status = CALL(api, GetDimensionsCount, GetDimCountFn)(info, rank);
  if (!status && (*rank < 1 || *rank > 8)) status = error(api, "vlm_export.cpu: inputs must have rank 1 to 8");
  if (!status) status = CALL(api, GetDimensions, GetDimsFn)(info, dims, *rank);
  CALL(api, ReleaseTensorTypeAndShapeInfo, ReleaseShapeInfoFn)(info);
  return status;
}

/* The kernel's tiles run on the session's own thread pool (KernelContext_ParallelFor): one pool
 * on the cores, with the spinning and affinity the session was given, and no second pool's threads
 * competing with it between ops. */
typedef struct {
  const ApiEntry *api;
  OrtKernelContext *context;
  vx_task_fn fn;
  void *arg;
  int64_t ntasks, parts;
} SessionTask;

static void run_part(void *data, size_t part) {
  const SessionTask *task = (const SessionTask *)data;
  int64_t per = task->ntasks / task->parts, extra = task->ntasks % task->parts, p = (int64_t)part;
  int64_t first = p * per + (p < extra ? p : extra);
  task->fn(task->arg, first, first + per + (p < extra ? 1 : 0));
}

static void on_session_threads(void *runner, vx_task_fn fn, void *arg, int64_t ntasks) {
  SessionTask *task = (SessionTask *)runner;
  task->fn = fn;
  task->arg = arg;
  task->ntasks = ntasks;
  task->parts = ntasks < MAX_PARTS ? ntasks : MAX_PARTS;
  OrtStatus *status = CALL(api_18, KernelContext_ParallelFor, ParallelForFn)(task->context, run_part, (size_t)task->parts,
                                                                                 0, task);
  if (status) { /* the pool refused: the work still has to be done */
    CALL(task->api, ReleaseStatus, ReleaseStatusFn)(status);
    fn(arg, 0, ntasks);
  }
}

static OrtStatus *element_count(const ApiEntry *api, const OrtValue *value, size_t *count) {
  OrtShapeInfo *info = NULL;
  OrtStatus *status = CALL(api, GetTensorTypeAndShape, GetShapeInfoFn)(value, &info);
  if (status) return status;
  status = CALL(api, GetTensorShapeElementCount, GetCountFn)(info, count);
  CALL(api, ReleaseTensorTypeAndShapeInfo, ReleaseShapeInfoFn)(info);
  return status;
}

/* B and params hold exactly what K, N and block say (so the copy and the kernel stay inside them). */
static OrtStatus *check_weights(const Kernel *kernel, const OrtValue *b_value, const OrtValue *s_value) {
  const ApiEntry *api = kernel->api;
  size_t b_count = 0, s_count = 0;
  int64_t tiles = (kernel->N + 15) / 16;
  OrtStatus *status = element_count(api, b_value, &b_count);
  if (!status) status = element_count(api, s_value, &s_count);
  if (!status && ((int64_t)b_count != tiles * kernel->K * 2 * kernel->bits || (int64_t)s_count != tiles * (kernel->K / kernel->block) * 32))
    status = matmul_error(api, kernel->bits, "B or params does not have the size K, N and block imply");
  return status;
}

static OrtStatus *compute_v2(void *opaque, OrtKernelContext *context) {
  Kernel *kernel = (Kernel *)opaque;
  const ApiEntry *api = kernel->api;
  const OrtValue *a_value, *b_value, *s_value;
  void *a, *b, *params, *y;
  int64_t dims[8];
  size_t rank = 0;
  OrtStatus *status = input_data(api, context, 0, &a_value, &a);
  if (!status) status = input_data(api, context, 1, &b_value, &b);
  if (!status) status = input_data(api, context, 2, &s_value, &params);
  if (!status) status = shape_of(api, a_value, dims, &rank);
  if (!status && kernel->source != b) status = check_weights(kernel, b_value, s_value);
  if (status) return status;
  if (dims[rank - 1] != kernel->K) return matmul_error(api, kernel->bits, "the last dimension of A is not the node's K");
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < rank; i++) rows *= dims[i];
  dims[rank - 1] = kernel->swiglu ? kernel->N / 2 : kernel->N;
  OrtValue *y_value = NULL;
  status = CALL(api, KernelContext_GetOutput, GetOutputFn)(context, 0, dims, rank, &y_value);
  if (!status) status = CALL(api, GetTensorMutableData, GetDataFn)(y_value, &y);
  if (status || rows == 0) return status;
  SessionTask task = {api, context, NULL, NULL, 0, 1};
  float *product = kernel->swiglu ? malloc(sizeof(float) * (size_t)(rows * kernel->N)) : (float *)y;
  int failed = !product || !ensure_own_copy(kernel, b, params) ||
               vx_int4_matmul((const float *)a, rows, kernel->K, kernel->N, kernel->block, kernel->bits, kernel->weights,
                              kernel->params, product, on_session_threads, &task);
  if (!failed && kernel->swiglu) vx_swiglu(product, rows, kernel->N, (float *)y);
  if (kernel->swiglu) free(product);
  return failed ? matmul_error(api, kernel->bits, "out of memory") : NULL;
}

static void compute(void *kernel, OrtKernelContext *context) {
  OrtStatus *status = compute_v2(kernel, context);
  if (status) CALL(((const Kernel *)kernel)->api, ReleaseStatus, ReleaseStatusFn)(status);
}

static void destroy_kernel(void *opaque) {
  Kernel *kernel = (Kernel *)opaque;
  if (!kernel) return;
  drop_copy(kernel);
  pthread_mutex_destroy(&kernel->lock);
  free(kernel);
}
static const char *op_name(const CustomOp *op) { (void)op; return matmul_name(4); }
static const char *op_name8(const CustomOp *op) { (void)op; return matmul_name(8); }
static const char *op_provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int input_type(const CustomOp *op, size_t index) { (void)op; return index == 1 ? TYPE_UINT8 : index == 2 ? TYPE_FLOAT16 : TYPE_FLOAT; }
static size_t input_count(const CustomOp *op) { (void)op; return 3; }
static int output_type(const CustomOp *op, size_t index) { (void)op; (void)index; return TYPE_FLOAT; }
static size_t output_count(const CustomOp *op) { (void)op; return 1; }
static int zero_at(const CustomOp *op, size_t index) { (void)op; (void)index; return 0; }
static int zero(const CustomOp *op) { (void)op; return 0; }

static const CustomOp int4_matmul_op = {
    16, create_kernel, op_name, op_provider, input_type, input_count, output_type, output_count, compute,
    destroy_kernel, zero_at, zero_at, zero_at, zero, zero, zero, zero, create_kernel_v2, compute_v2,
};
static const CustomOp int8_matmul_op = {
    16, create_kernel, op_name8, op_provider, input_type, input_count, output_type, output_count, compute,
    destroy_kernel, zero_at, zero_at, zero_at, zero, zero, zero, zero, create_kernel_v2, compute_v2,
};

/* GroupQueryAttention(query float[B, S, (H + 2 Hkv) D], key, value (omitted: query is packed),
 *   past_key float[B, Hkv, C, D], past_value, seqlens_k int32[B], total_sequence_length int32[1],
 *   cos_cache float[R, D/2], sin_cache) attributes num_heads, kv_num_heads
 *   -> output float[B, S, H D], present_key, present_value (past_key's shape; the same buffers
 *   when bound to them, else copies of the past with the new rows written). attention.c. */
typedef struct {
  const ApiEntry *api;
  int64_t heads, kv_heads;
} AttentionKernel;

static OrtStatus *create_attention_v2(const CustomOp *op, const ApiEntry *api, const OrtKernelInfo *info, void **out) {
  (void)op;
  AttentionKernel *kernel = calloc(1, sizeof(AttentionKernel));
  if (!kernel) return error(api, "GroupQueryAttention: out of memory");
  kernel->api = api;
  GetAttrIntFn attr = CALL(api, KernelInfoGetAttribute_int64, GetAttrIntFn);
  OrtStatus *status = attr(info, "num_heads", &kernel->heads);
  if (!status) status = attr(info, "kv_num_heads", &kernel->kv_heads);
  if (!status && (kernel->kv_heads <= 0 || kernel->heads % kernel->kv_heads))
    status = error(api, "GroupQueryAttention: num_heads must be a multiple of kv_num_heads");
  if (status) {
    free(kernel);
    return status;
  }
  *out = kernel;
  return NULL;
}

static void *create_attention(const CustomOp *op, const ApiEntry *api, const OrtKernelInfo *info) {
  void *kernel = NULL;
  OrtStatus *status = create_attention_v2(op, api, info, &kernel);
  if (status) CALL(api, ReleaseStatus, ReleaseStatusFn)(status);
  return kernel;
}

static OrtStatus *attention_v2(void *opaque, OrtKernelContext *context) {
  AttentionKernel *kernel = (AttentionKernel *)opaque;
  const ApiEntry *api = kernel->api;
  const OrtValue *values[9] = {0};
  void *data[9] = {0};
  int64_t query[8], cache[8], rotary[8], lengths[8];
  size_t query_rank = 0, cache_rank = 0, rotary_rank = 0, lengths_rank = 0;
  OrtStatus *status = NULL;
  for (size_t i = 1; i < 3 && !status; i++) {
    status = CALL(api, KernelContext_GetInput, GetInputFn)(context, i, &values[i]);
    if (!status && values[i]) status = error(api, "GroupQueryAttention: this kernel takes packed q|k|v only (key and value omitted)");
  }
  for (size_t i = 0; i < 9 && !status; i++)
    if (i != 1 && i != 2) status = input_data(api, context, i, &values[i], &data[i]);
  if (!status) status = shape_of(api, values[0], query, &query_rank);
  if (!status) status = shape_of(api, values[3], cache, &cache_rank);
  if (!status) status = shape_of(api, values[7], rotary, &rotary_rank);
  if (!status) status = shape_of(api, values[5], lengths, &lengths_rank);
  if (status) return status;
  const int64_t H = kernel->heads, Hkv = kernel->kv_heads;
  if (query_rank != 3 || cache_rank != 4 || rotary_rank != 2 || lengths_rank != 1)
    return error(api, "GroupQueryAttention: query must be [B, S, W], the caches [B, Hkv, C, D], the rotary tables [R, D/2]");
  const int64_t B = query[0], S = query[1], C = cache[2], D = cache[3];
  if (cache[0] != B || cache[1] != Hkv || query[2] != (H + 2 * Hkv) * D || rotary[1] * 2 != D || lengths[0] != B)
    return error(api, "GroupQueryAttention: query, caches, seqlens_k and rotary tables disagree on B, heads or head size");
  int64_t out_dims[3] = {B, S, H * D};
  OrtValue *outputs[3] = {0};
  void *out[3] = {0};
  for (size_t i = 0; i < 3 && !status; i++) {
    status = CALL(api, KernelContext_GetOutput, GetOutputFn)(context, i, i ? cache : out_dims, i ? 4 : 3, &outputs[i]);
    if (!status) status = CALL(api, GetTensorMutableData, GetDataFn)(outputs[i], &out[i]);
  }
  if (status) return status;
  size_t cache_bytes = sizeof(float) * (size_t)(B * Hkv * C * D);
  for (size_t i = 1; i < 3; i++)  /* not bound to the past's buffer: start from a copy of it */
    if (out[i] != data[2 + i]) memcpy(out[i], data[2 + i], cache_bytes);
  SessionTask task = {api, context, NULL, NULL, 0, 1};
  int failed = vx_cached_attention((const float *)data[0], B, S, H, Hkv, D, (float *)out[1], (float *)out[2], C,
                                   (const int32_t *)data[5], (const float *)data[7], (const float *)data[8], rotary[0],
                                   (float *)out[0], on_session_threads, &task);
  if (failed == -3) return error(api, "GroupQueryAttention: a seqlens_k is outside the KV cache or the rotary tables");
  if (failed == -2) return error(api, "GroupQueryAttention: out of memory");
  if (failed) return error(api, "GroupQueryAttention: unsupported head count or head size (at most 32 query heads per KV head, head size even and <= 256)");
  return NULL;
}

static void attention(void *kernel, OrtKernelContext *context) {
  OrtStatus *status = attention_v2(kernel, context);
  if (status) CALL(((const AttentionKernel *)kernel)->api, ReleaseStatus, ReleaseStatusFn)(status);
}

static const char *attention_name(const CustomOp *op) { (void)op; return "GroupQueryAttention"; }
static int attention_input_type(const CustomOp *op, size_t index) { (void)op; return index == 5 || index == 6 ? TYPE_INT32 : TYPE_FLOAT; }
static size_t attention_input_count(const CustomOp *op) { (void)op; return 9; }
static size_t attention_output_count(const CustomOp *op) { (void)op; return 3; }
static int attention_input_kind(const CustomOp *op, size_t index) { (void)op; return index == 1 || index == 2 ? OPTIONAL : REQUIRED; }

static const CustomOp attention_op = {
    16, create_attention, attention_name, op_provider, attention_input_type, attention_input_count, output_type,
    attention_output_count, attention, free, attention_input_kind, zero_at, zero_at, zero, zero, zero, zero,
    create_attention_v2, attention_v2,
};

/* The only file built without AVX-512, so that this check runs on any x86-64 CPU. */
int vx_cpu_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}

/* Entry point ONNX Runtime looks up in a custom-op library (SessionOptions.register_custom_ops_library). */
OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  const ApiEntry *api = base->GetApi(18);
  if (!api) return error(base->GetApi(1), "vlm_export.cpu::Int4MatMul needs onnxruntime 1.18 or newer");
  api_18 = api;
  typedef OrtStatus *(*CreateDomainFn)(const char *, OrtCustomOpDomain **);
  typedef OrtStatus *(*DomainAddFn)(OrtCustomOpDomain *, const CustomOp *);
  typedef OrtStatus *(*AddDomainFn)(OrtSessionOptions *, OrtCustomOpDomain *);
  if (!vx_cpu_supported())
    return error(api, "vlm_export.cpu::Int4MatMul needs AVX-512 VNNI, which this CPU lacks");
  OrtCustomOpDomain *domain = NULL;
  OrtStatus *status = CALL(api, CreateCustomOpDomain, CreateDomainFn)("vlm_export.cpu", &domain);
  if (!status) status = CALL(api, CustomOpDomain_Add, DomainAddFn)(domain, &int4_matmul_op);
  if (!status) status = CALL(api, CustomOpDomain_Add, DomainAddFn)(domain, &int8_matmul_op);
  if (!status) status = CALL(api, CustomOpDomain_Add, DomainAddFn)(domain, &attention_op);
  if (!status) status = CALL(api, AddCustomOpDomain, AddDomainFn)(options, domain);
  return status;
}
