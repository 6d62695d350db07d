#pragma once
#include <stdint.h>

/* Runs fn(arg, first, last) over [0, ntasks) on some threads and returns when all are done. */
typedef void (*vx_task_fn)(void *arg, int64_t first, int64_t last);
typedef void (*vx_parallel_fn)(void *runner, vx_task_fn fn, void *arg, int64_t ntasks);

/* y[M,N] = x[M,K] @ W; W `bits` (4 or 8) per code, repacked as int4_matmul.c describes. `parallel`
 * NULL = this thread only. 0 on success, -1 for a bad shape or width, -2 out of memory. */
int vx_int4_matmul(const float *x, int64_t M, int64_t K, int64_t N, int64_t block, int bits, const uint8_t *w,
                   const uint16_t *params, float *y, vx_parallel_fn parallel, void *runner);

/* LLaMA's MLP activation on a fused gate|up projection: out[r][j] = silu(g[r][j]) * g[r][half + j],
 * g float[rows][width], out float[rows][width / 2] (silu(x) = x / (1 + e^-x), vector_math.h's exp). */
void vx_swiglu(const float *gate_up, int64_t rows, int64_t width, float *out);
