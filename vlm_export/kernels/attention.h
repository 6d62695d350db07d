#pragma once
#include <stdint.h>

#include "int4_matmul.h"

/* Attention over an in-place KV cache (attention.c states the contract).
 * qkv float[B][S][(H + 2 Hkv) D] (packed q | k | v); keys, values float[B][Hkv][C][D], written at the
 * new tokens' slots; seqlens_k int32[B] (tokens cached after the call, minus one); cos, sin
 * float[rotary_rows][D/2]; out float[B][S][H D]. `parallel` NULL = this thread only.
 * 0 on success, -1 for unsupported head counts or sizes, -2 out of memory, -3 a seqlens_k outside
 * the cache or the rotary tables. */
int vx_cached_attention(const float *qkv, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t D, float *keys,
                        float *values, int64_t C, const int32_t *seqlens_k, const float *cos, const float *sin,
                        int64_t rotary_rows, float *out, vx_parallel_fn parallel, void *runner);
