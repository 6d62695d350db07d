"""The dynamic layout: past and new K/V concatenated inside the graph; `present.*` is the whole
cache (TensorRT profiles, the diff baseline). Batches are left-padded; an attention mask over
[past | new] marks the padding."""

from __future__ import annotations

import numpy as np

from vlm_export.spec.graph_io import Dim, GraphSpec, KvUpdate, Layout
from vlm_export.spec.layouts.base import (
    PAST,
    PRESENT,
    DecoderLayout,
    PrefillPlan,
    decoder_graph,
    kv_names,
    masked_decoder_inputs,
    one_call_plan,
)


class DynamicKV:
    """Past K/V are whatever the last step returned (backend-native values, never copied here);
    the attention mask grows by each step's length."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, dtype):
        self.past_names, self.present_names = kv_names(num_layers, PAST), kv_names(num_layers, PRESENT)
        empty = np.zeros((batch, num_kv_heads, 0, head_dim), dtype=dtype)
        self.values = {name: empty for name in self.past_names}
        self.mask = np.zeros((batch, 0), dtype=np.int64)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def step_mask(self, keep: np.ndarray) -> np.ndarray:
        """(B, past + S) int64: the mask a step with `keep` (B, S) is fed."""
        return np.concatenate([self.mask, keep], axis=1)

    def feeds(self, keep: np.ndarray, positions: np.ndarray) -> dict:
        return {"attention_mask": self.step_mask(keep), "position_ids": positions, **self.values}

    def update(self, outputs: dict, keep: np.ndarray) -> None:
        self.values = {past: outputs[present] for past, present in zip(self.past_names, self.present_names)}
        self.mask = self.step_mask(keep)


class DynamicLayout(DecoderLayout):
    name = Layout.DYNAMIC
    kv_update = KvUpdate.FULL_CACHE
    summary = "Concat KV: past + new K/V in, the whole cache out (TensorRT, the diff baseline)"
    # (batch, sequence, past_sequence, left_pad): the last row is left-padded
    cases = ({"batch": 2, "sequence": 5, "past_sequence": 3, "left_pad": 2},
             {"batch": 1, "sequence": 6, "past_sequence": 0, "left_pad": 0},
             {"batch": 2, "sequence": 1, "past_sequence": 9, "left_pad": 4})
    diff_cases = ({"batch": 1, "sequence": 12, "past_sequence": 0, "left_pad": 0},
                  {"batch": 1, "sequence": 1, "past_sequence": 12, "left_pad": 0})

    def graphs(self, spec, opts) -> list[GraphSpec]:
        return [decoder_graph(spec, opts, "decoder", "decoder.onnx", "batch", "sequence", "past_sequence",
                              "total_sequence", self.cases, "total_sequence",
                              {"layout": self.name, "kv_update": self.kv_update}, opts.logits == "last")]

    def example_inputs(self, graph, case, rng, sampler) -> dict:
        def size(dim: Dim) -> int:
            if isinstance(dim, int):
                return dim
            return case["past_sequence"] + case["sequence"] if dim == "total_sequence" else case[dim]

        batch, total = case["batch"], case["past_sequence"] + case["sequence"]
        mask = np.ones((batch, total), dtype=np.int64)
        mask[-1, : case["left_pad"]] = 0
        return masked_decoder_inputs(graph, case, rng, sampler, size, mask)

    def valid_positions(self, graph, output, feeds) -> np.ndarray:
        mask = feeds["attention_mask"] > 0  # (B, total)
        seq = feeds["inputs_embeds"].shape[1]
        if output.name == "logits":
            return mask[:, -1:] if graph.attrs["last_logits_only"] else mask[:, -seq:]
        return mask  # present = the whole cache

    def new_cache(self, llm, batch, dtype, capacity, decoder, to_numpy) -> DynamicKV:
        return DynamicKV(llm.num_layers, batch, llm.num_kv_heads, llm.head_dim, dtype)  # grows: capacity unused

    def pack(self, prompts, max_new_tokens, max_context, graphs) -> PrefillPlan:
        return one_call_plan(prompts, max_new_tokens, max_context, right=False)
