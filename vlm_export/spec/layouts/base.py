"""What a decoder layout is: one object that owns everything the rest of the package would
otherwise decide by comparing layout names.

A layout says how a decoder graph keeps its KV cache, and from that follow, all in one class:
its graph specs (names, shapes, dtypes: the export contract), the validation and diff cases and
their inputs, which output positions are meaningful, the runtime KV cache and its feeds, and how a
batch of prompts is packed into prefill calls. Torch-free (numpy only): the exporters and the
runtime both read it, so it sits below both (`tests/test_layering.py`).

Adding a layout = one module here with a `DecoderLayout` subclass, and one entry in
`vlm_export/spec/layouts/__init__.py`'s registry. The torch wrapper that the exporter traces is chosen by
the layout's `kv_update` (`model/graph_modules.py`), so a layout that reuses one of the three
`KvUpdate` kinds needs no PyTorch code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vlm_export.results import check_context
from vlm_export.spec.graph_io import (
    Dim,
    ExportOptions,
    GraphRole,
    GraphSpec,
    KvUpdate,
    TensorSpec,
    kv_tensors,
)
from vlm_export.spec.model_spec import LLMSpec, ModelSpec

PAST, PRESENT = "past_key_values", "present"  # K/V input and output name prefixes (graph_io.kv_tensors)


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """`prefix.{layer}.key` / `.value` for every layer, in graph order."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


class KVCache(Protocol):
    """A generation's KV cache as a layout keeps it. `values`: past name -> array or backend value."""

    past_names: list[str]
    present_names: list[str]
    values: dict

    @property
    def length(self) -> int: ...

    def feeds(self, keep: np.ndarray, positions: np.ndarray) -> dict:
        """The step's cache inputs: `keep` (B, S) int64 1 = a real token, `positions` (B, S) int64."""

    def update(self, outputs: dict, keep: np.ndarray) -> None:
        """Take the step's `present.*` outputs (backend-native values) into the cache."""


@dataclass(frozen=True)
class PrefillPlan:
    """A batch of prompts packed for a layout's prefill: run `graph` over `embeds`/`keep`/`positions`
    in slices of `step` positions, into a cache made for `capacity` positions."""

    graph: str  # the manifest name of the graph that takes the prefill
    embeds: np.ndarray  # (B, S, C), float, padding rows zero
    keep: np.ndarray  # (B, S) int64, 1 = a real prompt token
    positions: np.ndarray  # (B, S) int64 rotary position of each slot
    step: int  # positions per decoder call
    capacity: int  # KV positions the cache must hold (prompt span + new tokens)

    @property
    def lengths(self) -> np.ndarray:
        """(B,) int64 prompt tokens per row = each row's next position."""
        return self.keep.sum(axis=1)


class DecoderLayout:
    """One decoder layout. Subclasses set the class attributes and implement the abstract methods."""

    name: str  # what manifests hold in a decoder record's attrs["layout"]
    kv_update: KvUpdate  # what the graph's present.* outputs hold
    summary: str  # one line for help texts
    prefill_graph: str = "decoder"
    decode_graph: str = "decoder"
    fixed_batch: bool = False  # graphs exported for one batch size: the loop runs requests one by one
    returns_every_position: bool = True  # whether a graph of this layout can give every position's logits
    diff_cases: tuple[dict, ...] = ()  # validation cases of `vlm-export diff` (every position valid)

    # -- the graph contract (export) ----------------------------------------------------------
    def check_options(self, opts: ExportOptions) -> None:
        """Raise VlmExportError when export options this layout reads cannot work together."""

    def check_export(self, spec: ModelSpec, opts: ExportOptions) -> None:
        """Raise VlmExportError when `opts` cannot be exported for `spec` in this layout."""

    def graphs(self, spec: ModelSpec, opts: ExportOptions) -> list[GraphSpec]:
        """The decoder graph spec(s) of this layout for `spec`."""
        raise NotImplementedError

    def example_inputs(self, graph: GraphSpec, case: dict, rng: np.random.Generator, sampler) -> dict:
        """Feeds for one validation `case` of `graph` (export examples, validation, diff)."""
        raise NotImplementedError

    def valid_positions(self, graph: GraphSpec, output: TensorSpec, feeds: dict) -> np.ndarray:
        """(B, positions) bool over `output`'s sequence axis: where it is meaningful (fully masked
        rows are garbage by design, in PyTorch and ONNX alike)."""
        raise NotImplementedError

    # -- the runtime ------------------------------------------------------------------------------
    def new_cache(self, llm: LLMSpec, batch: int, dtype, capacity: int, decoder: dict,
                  to_numpy: Callable) -> KVCache:
        """An empty cache for `batch` rows and `capacity` positions; `decoder` is the decode graph's
        manifest record, `to_numpy` the runner's conversion of its outputs."""
        raise NotImplementedError

    def pack(self, prompts: list[np.ndarray], max_new_tokens: int, max_context: int, graphs: dict) -> PrefillPlan:
        """`prompts` (T_i, C) per row -> the prefill plan. Raises VlmExportError (results.check_context)
        when the longest prompt + max_new_tokens does not fit."""
        raise NotImplementedError

    def max_positions(self, graphs: dict, max_context: int) -> int:
        """The longest sequence one teacher-forced scoring pass can hold."""
        return max_context


# -- shared helpers of the concrete layouts ---------------------------------------------------------
def pad_prompts(prompts: list[np.ndarray], span: int, right: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeds (B, span, C), keep (B, span), positions (B, span)): each prompt left-padded, or
    right-padded when `right`; positions count real tokens from 0 (padding repeats 0)."""
    batch, width = len(prompts), prompts[0].shape[1]
    embeds = np.zeros((batch, span, width), dtype=prompts[0].dtype)
    keep = np.zeros((batch, span), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        rows = slice(0, prompt.shape[0]) if right else slice(span - prompt.shape[0], span)
        embeds[row, rows] = prompt
        keep[row, rows] = 1
    return embeds, keep, np.clip(np.cumsum(keep, axis=1) - 1, 0, None)


def one_call_plan(prompts: list[np.ndarray], max_new_tokens: int, max_context: int, right: bool) -> PrefillPlan:
    """The whole batch in one prefill call (dynamic and inplace layouts)."""
    span = max(p.shape[0] for p in prompts)
    check_context(span, max_new_tokens, max_context)
    embeds, keep, positions = pad_prompts(prompts, span, right)
    return PrefillPlan("decoder", embeds, keep, positions, span, span + max_new_tokens)


def chunk_count(length: int, chunk: int) -> int:
    return math.ceil(length / chunk)


def masked_decoder_inputs(graph: GraphSpec, case: dict, rng: np.random.Generator, sampler,
                          size: Callable[[Dim], int], mask: np.ndarray) -> dict:
    """Feeds of a decoder with attention_mask/position_ids inputs (dynamic, static): embeddings of
    random tokens, past K/V computed by the reference from a random prefix (random K/V would put
    attention far outside what a real run sees) in the first `past_valid` slots."""
    embeds = graph.inputs[0]
    batch, seq = size(embeds.shape[0]), size(embeds.shape[1])
    total = mask.shape[1]
    feeds = {"attention_mask": mask,
             "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -seq:].astype(np.int64),
             "inputs_embeds": sampler.embeds(rng, batch, seq).astype(embeds.dtype)}
    past_len = total - seq
    filled = case.get("past_valid", past_len)
    prefix = sampler.past(rng, mask[:, :filled]) if filled else []
    return {**feeds, **past_buffers(graph, batch, past_len, prefix)}


def past_buffers(graph: GraphSpec, batch: int, length: int, prefix: list[np.ndarray]) -> dict:
    """Zeroed past K/V inputs (batch, kv heads, `length`, head dim) of `graph`, each starting with
    its `prefix` array (the reference's K/V of a random prefix; none: all zeros)."""
    buffers = {}
    for index, tensor in enumerate(t for t in graph.inputs if t.name.startswith(PAST)):
        buffer = np.zeros((batch, tensor.shape[1], length, tensor.shape[3]), dtype=tensor.dtype)
        if prefix:
            buffer[:, :, :prefix[index].shape[2]] = prefix[index]
        buffers[tensor.name] = buffer
    return buffers


def decoder_tolerance(dtype: str) -> dict[str, float]:
    """Export validation tolerance of a decoder graph against PyTorch: |diff| <= atol + rtol * max|ref|.

    fp32: PyTorch and ONNX Runtime sum in different orders, and the order depends on the CPU's
    vector units; through smol's 30 blocks that reached 5.2e-4 on logits of magnitude 31.5
    (1.6e-5 relative) on an AMD EPYC (AVX-512, no AMX), against under 4.2e-4 on the Intel Xeon
    (AMX) the earlier bound was set on. rtol 1e-4 keeps 6x headroom over that and stays far below
    what an export fault costs (1e-2 and up). fp16: half-precision rounding."""
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == "float32" else {"atol": 5e-2, "rtol": 1e-2}


def decoder_graph(spec: ModelSpec, opts: ExportOptions, name: str, file: str, batch: Dim, seq: Dim, past: Dim,
                  total: Dim, cases: tuple[dict, ...], present_len: Dim, attrs: dict, last_only: bool) -> GraphSpec:
    """A decoder spec with attention_mask/position_ids inputs and K/V past/present (dynamic, static)."""
    f = opts.float_dtype
    return GraphSpec(
        name=name, file=file, wrapper=GraphRole.DECODER,
        inputs=(
            TensorSpec("inputs_embeds", f, (batch, seq, spec.llm.hidden_size)),
            TensorSpec("attention_mask", "int64", (batch, total)),
            TensorSpec("position_ids", "int64", (batch, seq)),
            *kv_tensors(spec, PAST, batch, past, f),
        ),
        outputs=(
            TensorSpec("logits", f, (batch, 1 if last_only else seq, spec.llm.vocab_size)),
            *kv_tensors(spec, PRESENT, batch, present_len, f),
        ),
        cases=cases,
        **decoder_tolerance(f),
        attrs={**attrs, "last_logits_only": last_only},
    )
