"""The reference cut into graph-shaped pieces: one thin nn.Module per exported graph, so each
graph's inputs and outputs are plain tensors. The exporters trace them; the torch runner runs
them, so the PyTorch backend and the ONNX graphs go through the very same generation loop.

The decoder wrapper restates LLaMA's forward over the reference's own modules (RMSNorm, rotary,
projections, SwiGLU MLP) with the KV cache as flat tensors and the mask built here, because
that is what exports cleanly (no DynamicCache, no vmap mask builder) and what both layouts share:

    dynamic: keys = concat(past [P], new [S])  -> present = the whole concat   (P grows)
    static:  keys = concat(buffer [M], new [S]) -> present = the S new entries (M fixed;
             the runtime writes them into the buffer, so no ScatterND, which HTP v68 lacks)
    inplace: GroupQueryAttention over a buffer [C] -> present = the same buffer, written at
             the step's slots (bound to the past's memory by the runtime; see model/gqa.py)

In the first two, key j is visible to query i when attention_mask[j] == 1 and j <= P + i;
inplace rows are right-padded and described by seqlens_k instead of a mask.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vlm_export.model.gqa import GroupQueryAttention
from vlm_export.model.mobilevlm import MobileVLMForCausalLM
from vlm_export.spec.graph_io import KvUpdate


class VisionGraph(nn.Module):
    """pixel_values (B, 3, 336, 336) -> image_embeds (B, 144, C): CLIP up to the selected layer + LDP."""

    def __init__(self, model: MobileVLMForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.encode_images(pixel_values)


class EmbedGraph(nn.Module):
    """input_ids (B, T) -> inputs_embeds (B, T, C)."""

    def __init__(self, model: MobileVLMForCausalLM):
        super().__init__()
        self.embed_tokens = model.model.embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


def additive_mask(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, P+S) keep-mask -> (B, 1, S, P+S) additive mask, causal over the concatenated keys.

    Each row also sees its own key. A real row's own key is valid anyway; a padding row (masked out
    of every other row, its outputs never read) then computes what a real token would, where with no
    key at all it grew values of 3e4 (smol, block 12) that set the 16-bit ranges of quantized graphs."""
    total = attention_mask.shape[1]
    past = total - seq_len
    key_pos = torch.arange(total, device=attention_mask.device)[None, :]
    query_pos = torch.arange(seq_len, device=attention_mask.device)[:, None] + past
    own = (key_pos == query_pos)[None, None]
    allowed = (key_pos <= query_pos)[None, None] & ((attention_mask[:, None, None, :] > 0) | own)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.tensor(-100.0, dtype=dtype))


class DecoderBlock(nn.Module):
    """One LLaMA layer (pre-norm attention + SwiGLU MLP) over flat K/V tensors.

    Its own module so exported node names carry the layer index (`/blocks.7/self_attn/...`),
    which is what the layer-wise diff maps errors back to.
    """

    def __init__(self, layer, num_heads: int, num_kv_heads: int, head_dim: int, present_is_new_only: bool):
        super().__init__()
        self.input_layernorm, self.self_attn = layer.input_layernorm, layer.self_attn
        self.post_attention_layernorm, self.mlp = layer.post_attention_layernorm, layer.mlp
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.present_is_new_only = present_is_new_only

    def _attention(self, x, cos, sin, past_k, past_v, mask):
        attn = self.self_attn
        b, s, _ = x.shape
        group = self.num_heads // self.num_kv_heads
        q = attn.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        k = attn.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        v = attn.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, nkv, T, hd)
        # GQA without repeating K/V: the query heads of one KV head become extra rows.
        q = q.reshape(b, self.num_kv_heads, group * s, self.head_dim)
        scores = torch.matmul(q, keys.transpose(2, 3)) * (self.head_dim**-0.5)  # (B, nkv, g*S, T)
        scores = scores.view(b, self.num_kv_heads, group, s, -1) + mask[:, :, None]
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype).view(b, self.num_kv_heads, group * s, -1)
        out = torch.matmul(probs, values).view(b, self.num_heads, s, self.head_dim)
        out = attn.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))
        return out, (k, v) if self.present_is_new_only else (keys, values)

    def forward(self, hidden, *attention_inputs):
        attn_out, present = self._attention(self.input_layernorm(hidden), *attention_inputs)
        hidden = hidden + attn_out
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, present


def fused_linear(*layers: nn.Linear) -> nn.Linear:
    """One Linear whose output is the given ones' outputs side by side: one weight read, one kernel.

    The given layers' weights become views into the fused one (same values), so the reference
    does not hold the projections twice (at the 2.7B shape that would be 7 GB more)."""
    weight = torch.cat([layer.weight.detach() for layer in layers])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    start = 0
    for layer in layers:
        rows = layer.weight.shape[0]
        layer.weight = nn.Parameter(weight[start:start + rows], requires_grad=False)
        start += rows
    return fused


class FusedSwiGLU(nn.Module):
    """LLaMA's MLP with gate and up as one projection; down_proj is the reference's own module."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = fused_linear(mlp.gate_proj, mlp.up_proj), mlp.down_proj, mlp.act_fn

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class InPlaceDecoderBlock(DecoderBlock):
    """The same layer with fused projections (q|k|v, gate|up) and its attention as one
    GroupQueryAttention over the in-place buffer (packed QKV in, rotary inside)."""

    def __init__(self, layer, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__(layer, num_heads, num_kv_heads, head_dim, present_is_new_only=False)
        attn = layer.self_attn
        self.qkv_proj, self.o_proj = fused_linear(attn.q_proj, attn.k_proj, attn.v_proj), attn.o_proj
        self.mlp = FusedSwiGLU(layer.mlp)
        del self.self_attn  # node names: /blocks.N/qkv_proj, /blocks.N/o_proj, /blocks.N/mlp/...

    def _attention(self, x, cos_half, sin_half, past_k, past_v, seqlens_k, total_sequence_length):
        out, present_k, present_v = GroupQueryAttention.apply(
            self.qkv_proj(x), None, None, past_k, past_v, seqlens_k, total_sequence_length,
            cos_half, sin_half, self.num_heads, self.num_kv_heads)
        return self.o_proj(out), (present_k, present_v)


def rope_tables(model: MobileVLMForCausalLM, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of every position (positions, head_dim), from the reference's own rotary module."""
    llm = model.spec.llm
    index = torch.arange(max(positions, llm.max_context), device=model.lm_head.weight.device)[None]
    probe = torch.zeros((), dtype=model.lm_head.weight.dtype, device=index.device)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(probe, index)
    return cos[0], sin[0]


class InPlaceDecoderGraph(nn.Module):
    """inputs_embeds (right-padded), seqlens_k, total_sequence_length, K/V buffers -> last logits, buffers.

    `last_logits_only=False`: every position's logits (teacher-forced scoring on the PyTorch backend)."""

    def __init__(self, model: MobileVLMForCausalLM, last_logits_only: bool = True):
        super().__init__()
        self.last_logits_only = last_logits_only
        llm = model.spec.llm
        self.blocks = nn.ModuleList(
            InPlaceDecoderBlock(layer, llm.num_heads, llm.num_kv_heads, llm.head_dim)
            for layer in model.model.layers
        )
        cos, sin = rope_tables(model, 0)
        half = llm.head_dim // 2  # LLaMA's tables repeat [freqs, freqs]; the op takes one half
        self.register_buffer("cos_half", cos[:, :half].contiguous(), persistent=False)
        self.register_buffer("sin_half", sin[:, :half].contiguous(), persistent=False)
        self.norm, self.lm_head = model.model.norm, model.lm_head

    def forward(self, inputs_embeds, seqlens_k, total_sequence_length, *past):
        hidden = inputs_embeds
        presents = []
        for index, block in enumerate(self.blocks):
            hidden, present = block(hidden, self.cos_half, self.sin_half, past[2 * index], past[2 * index + 1],
                                    seqlens_k, total_sequence_length)
            presents.extend(present)
        if not self.last_logits_only:
            return (self.lm_head(self.norm(hidden)), *presents)
        # Each row's last valid query row is min(S, T) - 1: the only logits generation needs.
        last_row = torch.arange(hidden.shape[1], device=hidden.device)[-1]  # S - 1, kept symbolic when traced
        last = torch.minimum(seqlens_k.long(), last_row)
        hidden = hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[2]))
        return (self.lm_head(self.norm(hidden)), *presents)


class DecoderGraph(nn.Module):
    """inputs_embeds, attention_mask, position_ids, past K/V -> logits, present K/V."""

    def __init__(self, model: MobileVLMForCausalLM, present_is_new_only: bool, last_logits_only: bool, positions: int = 0):
        super().__init__()
        llm = model.spec.llm
        self.blocks = nn.ModuleList(
            DecoderBlock(layer, llm.num_heads, llm.num_kv_heads, llm.head_dim, present_is_new_only)
            for layer in model.model.layers
        )
        self.norm = model.model.norm
        # RoPE as a table lookup: cos/sin of every position, computed once by the reference's own
        # rotary module. A Gather by position is exact, and it is what NPUs take (HTP v68 rejects
        # the positions x inv_freq MatMul once quantized, and quantizing angles up to 2k radians
        # would wreck them anyway).
        cos, sin = rope_tables(model, positions)
        self.register_buffer("cos_table", cos, persistent=False)  # (max_context, head_dim)
        self.register_buffer("sin_table", sin, persistent=False)
        self.lm_head = model.lm_head
        self.last_logits_only = last_logits_only

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        hidden = inputs_embeds
        mask = additive_mask(attention_mask, hidden.shape[1], hidden.dtype)
        cos, sin = self.cos_table[position_ids], self.sin_table[position_ids]  # (B, S, head_dim)
        presents = []
        for index, block in enumerate(self.blocks):
            hidden, present = block(hidden, cos, sin, past[2 * index], past[2 * index + 1], mask)
            presents.extend(present)
        if self.last_logits_only:
            hidden = hidden[:, -1:]
        return (self.lm_head(self.norm(hidden)), *presents)


def graph_module(model: MobileVLMForCausalLM, kind: str, attrs: dict) -> nn.Module:
    """The module for a graph record (`wrapper` kind and layout attrs, as in the manifest)."""
    if kind == "vision":
        return VisionGraph(model).eval()
    if kind == "embed":
        return EmbedGraph(model).eval()
    if attrs.get("kv_update") == KvUpdate.IN_PLACE:  # the layout's KV-update kind picks the traced module
        return InPlaceDecoderGraph(model, attrs.get("last_logits_only", True)).eval()
    return DecoderGraph(
        model,
        present_is_new_only=attrs["kv_update"] == KvUpdate.NEW_ENTRIES,
        last_logits_only=attrs["last_logits_only"],
        positions=attrs.get("kv_buffer", 0) + attrs.get("sequence", 0),  # a static buffer may outgrow max_context
    ).eval()
