"""Attention over an in-place KV buffer: ONNX Runtime's `com.microsoft.GroupQueryAttention`.

One op per layer replaces rotary + concat + matmul/softmax/matmul, and with the past and
present buffers bound to the same memory it writes the step's K/V at their slots instead of
copying the whole cache every step (the Concat was ~20% of an int4 decode step).

PyTorch runs `reference()` (the op's contract, restated below); the exporter emits the op
itself through `symbolic`, so the graph is validated against this reference like any other.

Contract, per batch row b (right padding, BNSH buffers of capacity C):
    T = seqlens_k[b] + 1   tokens in the cache after this step
    Q = min(S, T)          valid query rows (rows [Q, S) are padding; their output is unspecified)
    P = T - Q              tokens cached before this step; query row s sits at position P + s
    rotary (half-split, LLaMA) at those positions; new K/V rows [0, Q) land at slots [P, T);
    query row s attends causally to slots [0, P + s]. Slots >= T are unspecified.
"""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (H, Q, hd); cos/sin (Q, hd/2): LLaMA's rotate_half form."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
              num_heads: int, kv_num_heads: int):
    """`key`/`value` None: `query` is packed [q | k | v] along its last axis (one fused projection)."""
    head_dim = past_key.shape[-1]
    if key is None:
        query, key, value = query.split([num_heads * head_dim, kv_num_heads * head_dim, kv_num_heads * head_dim], dim=-1)
    batch, seq, _ = query.shape
    group = num_heads // kv_num_heads
    q = query.view(batch, seq, num_heads, head_dim).transpose(1, 2)
    k = key.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
    v = value.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
    present_key, present_value = past_key.clone(), past_value.clone()
    output = torch.zeros(batch, num_heads, seq, head_dim, dtype=query.dtype)
    for b in range(batch):
        total = int(seqlens_k[b]) + 1
        valid = min(seq, total)
        past = total - valid
        cos, sin = cos_cache[past:total].to(query.dtype), sin_cache[past:total].to(query.dtype)
        present_key[b, :, past:total] = _rotate(k[b, :, :valid], cos, sin)
        present_value[b, :, past:total] = v[b, :, :valid]
        queries = _rotate(q[b, :, :valid], cos, sin).reshape(kv_num_heads, group * valid, head_dim)
        keys, values = present_key[b, :, :total], present_value[b, :, :total]
        scores = torch.matmul(queries, keys.transpose(1, 2)) * head_dim**-0.5  # (nkv, g*Q, T)
        allowed = torch.arange(total)[None, :] <= (torch.arange(valid) + past)[:, None]  # (Q, T)
        scores = scores.view(kv_num_heads, group, valid, total).masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype).view(kv_num_heads, group * valid, total)
        output[b, :, :valid] = torch.matmul(probs, values).view(num_heads, valid, head_dim)
    return output.transpose(1, 2).reshape(batch, seq, num_heads * head_dim), present_key, present_value


class GroupQueryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                num_heads: int, kv_num_heads: int):
        return reference(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
                         sin_cache, num_heads, kv_num_heads)

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                 num_heads: int, kv_num_heads: int):
        if key is None:  # packed QKV: the op's key and value inputs are left empty
            key, value = _omitted(g), _omitted(g)
        outputs = g.op("com.microsoft::GroupQueryAttention", query, key, value, past_key, past_value, seqlens_k,
                       total_sequence_length, cos_cache, sin_cache, num_heads_i=num_heads,
                       kv_num_heads_i=kv_num_heads, do_rotary_i=1, rotary_interleaved_i=0, outputs=3)
        # The tracer has no shape rule for the op: give every output its type (output: query's
        # batch and sequence, num_heads * head_dim wide -- unknown here, left symbolic).
        outputs[0].setType(query.type().with_sizes([None, None, None]))
        outputs[1].setType(past_key.type())
        outputs[2].setType(past_value.type())
        return outputs


def _omitted(g):
    """An empty optional input (what torch's own symbolics use for one)."""
    placeholder = g.op("prim::Constant")
    placeholder.setType(torch._C.OptionalType.ofTensor())
    return placeholder
