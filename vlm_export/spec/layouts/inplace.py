"""The inplace layout: one graph for prefill and decode, a GroupQueryAttention per layer over K/V
buffers the runtime binds as both past and present, so the graph writes the new entries into the
cache's own memory (ONNX Runtime CPU). Rows are right-padded; the graph learns each row's length
from seqlens_k and returns each row's last logits."""

from __future__ import annotations

import numpy as np

from vlm_export.spec.graph_io import GraphRole, GraphSpec, KvUpdate, Layout, TensorSpec, kv_tensors
from vlm_export.spec.layouts.base import (
    PAST,
    PRESENT,
    DecoderLayout,
    PrefillPlan,
    decoder_tolerance,
    kv_names,
    one_call_plan,
    past_buffers,
)


class InPlaceKV:
    """One buffer per layer (B, nkv, capacity, hd) that the graph itself writes (the ORT runner
    binds it as past and present: nothing is copied); `lengths` (B,) tokens cached per row."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, dtype, capacity: int, to_numpy):
        self.past_names, self.present_names = kv_names(num_layers, PAST), kv_names(num_layers, PRESENT)
        self.values = {n: np.zeros((batch, num_kv_heads, capacity, head_dim), dtype=dtype) for n in self.past_names}
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.capacity = capacity
        self.to_numpy = to_numpy

    @property
    def length(self) -> int:
        return int(self.lengths.max())

    def feeds(self, keep: np.ndarray, positions: np.ndarray) -> dict:
        """`keep` (B, S) must be right-padded (valid rows first); positions follow from the lengths."""
        total = self.lengths + keep.sum(axis=1)
        return {"seqlens_k": (total - 1).astype(np.int32), "total_sequence_length": np.array(total.max(), np.int32),
                **self.values}

    def update(self, outputs: dict, keep: np.ndarray) -> None:
        for past, present in zip(self.past_names, self.present_names):
            if present in outputs:  # a backend that returned a new buffer (PyTorch) rather than writing this one
                self.values[past] = self.to_numpy(outputs[present])
        self.lengths += keep.sum(axis=1)


class InPlaceLayout(DecoderLayout):
    name = Layout.INPLACE
    kv_update = KvUpdate.IN_PLACE
    summary = "GroupQueryAttention over an in-place KV buffer (ONNX Runtime CPU)"
    # past: tokens already cached per row; new: valid rows of this step (== sequence unless past == 0)
    cases = ({"batch": 2, "sequence": 5, "kv_capacity": 12, "past": (0, 0), "new": (5, 3)},
             {"batch": 1, "sequence": 4, "kv_capacity": 16, "past": (7,), "new": (4,)},
             {"batch": 2, "sequence": 1, "kv_capacity": 12, "past": (9, 4), "new": (1, 1)})
    diff_cases = ({"batch": 1, "sequence": 12, "kv_capacity": 16, "past": (0,), "new": (12,)},
                  {"batch": 1, "sequence": 1, "kv_capacity": 16, "past": (12,), "new": (1,)})

    def graphs(self, spec, opts) -> list[GraphSpec]:
        f = opts.float_dtype
        return [GraphSpec(
            name="decoder", file="decoder_inplace.onnx", wrapper=GraphRole.DECODER,
            inputs=(
                TensorSpec("inputs_embeds", f, ("batch", "sequence", spec.llm.hidden_size)),
                TensorSpec("seqlens_k", "int32", ("batch",)),
                TensorSpec("total_sequence_length", "int32", ()),
                *kv_tensors(spec, PAST, "batch", "kv_capacity", f),
            ),
            outputs=(
                TensorSpec("logits", f, ("batch", 1, spec.llm.vocab_size)),
                *kv_tensors(spec, PRESENT, "batch", "kv_capacity", f),
            ),
            cases=self.cases,
            **decoder_tolerance(f),
            attrs={"layout": self.name, "kv_update": self.kv_update, "last_logits_only": True,
                   "max_capacity": spec.llm.max_context},
        )]

    def example_inputs(self, graph, case, rng, sampler) -> dict:
        """Right-padded rows; each buffer holds the reference's K/V of a random prefix in its first
        `past` slots (and zeros after: slots past a row's length are never read)."""
        batch, seq, capacity = case["batch"], case["sequence"], case["kv_capacity"]
        past, new = np.asarray(case["past"]), np.asarray(case["new"])
        total = past + new
        embeds = graph.inputs[0]
        feeds = {"inputs_embeds": sampler.embeds(rng, batch, seq).astype(embeds.dtype),
                 "seqlens_k": (total - 1).astype(np.int32), "total_sequence_length": np.array(total.max(), np.int32)}
        longest = int(past.max())
        prefix_mask = (np.arange(longest)[None, :] < past[:, None]).astype(np.int64)
        prefix = sampler.past(rng, prefix_mask) if longest else []
        return {**feeds, **past_buffers(graph, batch, capacity, prefix)}

    def valid_positions(self, graph, output, feeds) -> np.ndarray:
        batch = feeds["seqlens_k"].shape[0]
        if output.name == "logits":
            return np.ones((batch, 1), dtype=bool)
        capacity = next(v for k, v in feeds.items() if k.startswith(PAST)).shape[2]
        return np.arange(capacity)[None, :] <= feeds["seqlens_k"][:, None]

    def new_cache(self, llm, batch, dtype, capacity, decoder, to_numpy) -> InPlaceKV:
        return InPlaceKV(llm.num_layers, batch, llm.num_kv_heads, llm.head_dim, dtype, capacity, to_numpy)

    def pack(self, prompts, max_new_tokens, max_context, graphs) -> PrefillPlan:
        return one_call_plan(prompts, max_new_tokens, max_context, right=True)
