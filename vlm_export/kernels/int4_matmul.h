#pragma once
#include <stdint.h>

/* Runs fn(arg, first, last) over [0, ntasks) on some threads and returns when all are done. */
typedef void (*vx_task_fn)(void *arg, int64_t first, int64_t last);
typedef void (*vx_parallel_fn)(void *runner, vx_task_fn fn, void *arg, int64_t ntasks);

/* y[M,N] = x[M,K] @ W; W repacked as int4_matmul.c describes. `parallel` NULL = this thread only.
 * 0 on success, -1 for a bad shape, -2 out of memory. */
int vx_int4_matmul(const float *x, int64_t M, int64_t K, int64_t N, int64_t block, const uint8_t *w,
                   const uint16_t *params, float *y, vx_parallel_fn parallel, void *runner);
