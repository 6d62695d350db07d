"""The static layout: every shape fixed for NPUs (batch, a prefill chunk, a KV buffer); two graphs,
decoder_prefill (one chunk) and decoder_decode (one token). `present.*` holds only the step's new
entries: the host writes them at the current slot of its buffer. Prompts are front-padded to a
whole number of chunks so the last prompt token is the last chunk's last position, whose logits
are the graph's only logits. Padding rows repeat the prompt's first row at its position: masked out
of every real row, each sees only the KV prefix and its own key (model/graph_modules.additive_mask),
so it computes what the first real token does and stays in the activation ranges of real tokens
(smol's zero padding rows reached 3e4 in the residual stream, real rows ~100-700)."""

from __future__ import annotations

import numpy as np

from vlm_export.errors import VlmExportError
from vlm_export.results import check_context
from vlm_export.spec.graph_io import GraphSpec, KvUpdate, Layout
from vlm_export.spec.layouts.base import (
    PAST,
    PRESENT,
    DecoderLayout,
    PrefillPlan,
    chunk_count,
    decoder_graph,
    kv_names,
    masked_decoder_inputs,
    pad_prompts,
)


class StaticKV:
    """One fixed buffer per layer (B, nkv, M, hd) in host memory; a step's new entries are written
    at the current slot; the mask is [slot validity | step keep]."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, dtype, buffer: int, to_numpy):
        self.past_names, self.present_names = kv_names(num_layers, PAST), kv_names(num_layers, PRESENT)
        self.values = {n: np.zeros((batch, num_kv_heads, buffer, head_dim), dtype=dtype) for n in self.past_names}
        self.valid = np.zeros((batch, buffer), dtype=np.int64)
        self.slot = 0
        self.buffer = buffer
        self.to_numpy = to_numpy

    @property
    def length(self) -> int:
        return self.slot

    def step_mask(self, keep: np.ndarray) -> np.ndarray:
        return np.concatenate([self.valid, keep], axis=1)

    def feeds(self, keep: np.ndarray, positions: np.ndarray) -> dict:
        return {"attention_mask": self.step_mask(keep), "position_ids": positions, **self.values}

    def write_prefix(self, values: dict[str, np.ndarray]) -> None:
        """Fill the first slots of an empty cache with a KV prefix (runtime/kv_prefix.py):
        `values` past_key_values.N.key|value -> (num_kv_heads, P, head_dim), the same for every row."""
        length = next(iter(values.values())).shape[1]
        for name in self.past_names:
            self.values[name][:, :, :length] = values[name][None]
        self.valid[:, :length] = 1
        self.slot = length

    def update(self, outputs: dict, keep: np.ndarray) -> None:
        end = self.slot + keep.shape[1]
        for past, present in zip(self.past_names, self.present_names):
            self.values[past][:, :, self.slot:end] = self.to_numpy(outputs[present])
        self.valid[:, self.slot:end] = keep
        self.slot = end


class StaticLayout(DecoderLayout):
    name = Layout.STATIC
    kv_update = KvUpdate.NEW_ENTRIES
    summary = "fixed shapes for NPUs: a prefill chunk and a KV buffer the host writes (QNN)"
    prefill_graph = "decoder_prefill"
    decode_graph = "decoder_decode"
    fixed_batch = True
    returns_every_position = False  # both graphs return the last position only
    diff_cases = ({"past_valid": 0, "left_pad": 0}, {"past_valid": 12, "left_pad": 0})

    def check_options(self, opts) -> None:
        if not 0 < opts.prefill_chunk <= opts.kv_buffer:
            raise VlmExportError(f"prefill chunk {opts.prefill_chunk} must be between 1 and the KV buffer {opts.kv_buffer}",
                                 "lower --prefill-chunk or raise --kv-buffer")

    def check_export(self, spec, opts) -> None:
        if opts.kv_buffer > spec.llm.max_context:
            raise VlmExportError(f"--kv-buffer {opts.kv_buffer} exceeds the model context {spec.llm.max_context}",
                                 "lower --kv-buffer")

    def graphs(self, spec, opts) -> list[GraphSpec]:
        b, m, chunk = opts.static_batch, opts.kv_buffer, opts.prefill_chunk
        attrs = {"layout": self.name, "kv_buffer": m, "kv_update": self.kv_update}
        graphs = []
        for name, seq in ((self.prefill_graph, chunk), (self.decode_graph, 1)):
            # past_valid: filled slots of the buffer; left_pad: leading invalid slots of the chunk.
            cases = ({"past_valid": 0, "left_pad": min(3, seq - 1)}, {"past_valid": min(m, 37), "left_pad": 0})
            graphs.append(decoder_graph(spec, opts, name, f"{name}.onnx", b, seq, m, m + seq, cases, seq,
                                        {**attrs, "sequence": seq}, True))
        return graphs

    def example_inputs(self, graph, case, rng, sampler) -> dict:
        buffer = graph.attrs["kv_buffer"]
        batch, seq = graph.inputs[0].shape[0], graph.inputs[0].shape[1]
        total = buffer + seq
        mask = np.ones((batch, total), dtype=np.int64)
        mask[:, case["past_valid"]: total - seq] = 0  # buffer slots not yet written
        mask[-1, total - seq: total - seq + case["left_pad"]] = 0
        return masked_decoder_inputs(graph, case, rng, sampler, lambda d: d if isinstance(d, int) else buffer, mask)

    def valid_positions(self, graph, output, feeds) -> np.ndarray:
        mask = feeds["attention_mask"] > 0
        seq = feeds["inputs_embeds"].shape[1]
        return mask[:, -1:] if output.name == "logits" else mask[:, -seq:]  # present = the new entries

    def new_cache(self, llm, batch, dtype, capacity, decoder, to_numpy) -> StaticKV:
        return StaticKV(llm.num_layers, batch, llm.num_kv_heads, llm.head_dim, dtype, decoder["attrs"]["kv_buffer"],
                        to_numpy)

    def pack(self, prompts, max_new_tokens, max_context, graphs) -> PrefillPlan:
        chunk, buffer = graphs[self.prefill_graph]["attrs"]["sequence"], graphs[self.decode_graph]["attrs"]["kv_buffer"]
        span = chunk_count(max(p.shape[0] for p in prompts), chunk) * chunk
        check_context(span, max_new_tokens, buffer, "the static KV buffer (incl. chunk padding)")
        embeds, keep, positions = pad_prompts(prompts, span, right=False)
        for row, prompt in enumerate(prompts):  # padding rows: see the module docstring
            embeds[row, : span - prompt.shape[0]] = prompt[0]
        return PrefillPlan(self.prefill_graph, embeds, keep, positions, chunk, span + max_new_tokens)

    def max_positions(self, graphs: dict, max_context: int) -> int:
        """The KV buffer less one prefill chunk of front padding."""
        chunk, buffer = graphs[self.prefill_graph]["attrs"]["sequence"], graphs[self.decode_graph]["attrs"]["kv_buffer"]
        return min(max_context, buffer - chunk + 1)
