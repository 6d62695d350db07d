"""The graph I/O contract: declarative specs of every exported graph (names, shapes as ints or
named dynamic axes, dtypes, the wrapper that produces it, how to make inputs, the validation
tolerance), per decoder layout.

It sits below both the exporters (which write graphs to it) and the runtime (which reads the
same records back from the manifest), so neither imports the other. Names are defined here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from vlm_export.errors import VlmExportError
from vlm_export.spec.model_spec import ModelSpec

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    name: str  # vision | embed | decoder | decoder_prefill | decoder_decode
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrapper: str  # a GraphRole
    cases: tuple[dict, ...]  # axis sizes for validation (first one is the export example)
    atol: float
    rtol: float
    attrs: dict = field(default_factory=dict)  # layout facts the runtime needs (kv buffer, chunk...)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for tensor in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(tensor.shape) if isinstance(d, str)}
            if named:
                axes[tensor.name] = named
        return axes

    @classmethod
    def from_dict(cls, record: dict, cases: tuple[dict, ...] = ()) -> GraphSpec:
        """A manifest record back into a spec (tensor names, shapes and layout attrs)."""
        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        tolerance = record.get("tolerance", {"atol": 0.0, "rtol": 0.0})
        return cls(name=record["name"], file=record["file"], inputs=tensors(record["inputs"]),
                   outputs=tensors(record["outputs"]), wrapper=record["wrapper"], cases=cases,
                   atol=tolerance["atol"], rtol=tolerance["rtol"], attrs=record.get("attrs", {}))

    def to_dict(self) -> dict:
        return {
            "name": self.name, "file": self.file, "wrapper": self.wrapper, "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs], "attrs": self.attrs,
            "tolerance": {"atol": self.atol, "rtol": self.rtol},
        }


class Layout(StrEnum):
    """How a decoder graph keeps its KV cache (ExportOptions.layout; a decoder record's attrs["layout"]).
    Members are the strings the manifests hold, so they compare equal to what is read back."""

    DYNAMIC = "dynamic"  # past + new K/V concatenated; present = the whole cache (TensorRT, the diff baseline)
    STATIC = "static"  # a fixed KV buffer; present = the new entries, the host writes their slots (NPUs)
    INPLACE = "inplace"  # GroupQueryAttention writes present into past's own buffer (ONNX Runtime CPU)


class KvUpdate(StrEnum):
    """What a decoder's `present.*` outputs hold (attrs["kv_update"]), i.e. what the runtime must do with them."""

    FULL_CACHE = "present_is_full_cache"
    NEW_ENTRIES = "present_is_new_entries_host_writes_slot"
    IN_PLACE = "in_place_shared_buffer"


class GraphRole(StrEnum):
    """Which part of the model a graph is (a record's "wrapper")."""

    VISION = "vision"
    EMBED = "embed"
    DECODER = "decoder"


LAYOUTS = tuple(Layout)


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"  # fp32 | fp16
    layout: str = Layout.DYNAMIC  # a Layout (a plain string is converted)
    logits: str = "all"  # all | last (dynamic layout; static prefill is always last)
    prefill_chunk: int = 128
    kv_buffer: int = 1024
    static_batch: int = 1
    opset: int = 17

    def __post_init__(self):
        if self.dtype not in ("fp32", "fp16"):
            raise VlmExportError(f"unsupported dtype '{self.dtype}'", "use --dtype fp32 or fp16")
        if self.layout not in LAYOUTS:
            raise VlmExportError(f"unsupported layout '{self.layout}'", f"use --layout {' | '.join(LAYOUTS)}")
        object.__setattr__(self, "layout", Layout(self.layout))
        if self.logits not in ("all", "last"):
            raise VlmExportError(f"unsupported logits mode '{self.logits}'", "use --logits all or last")
        if self.layout == Layout.STATIC and not 0 < self.prefill_chunk <= self.kv_buffer:
            raise VlmExportError(
                f"prefill chunk {self.prefill_chunk} must be between 1 and the KV buffer {self.kv_buffer}",
                "lower --prefill-chunk or raise --kv-buffer",
            )

    @property
    def float_dtype(self) -> str:
        return "float16" if self.dtype == "fp16" else "float32"


def _kv_tensors(spec: ModelSpec, prefix: str, batch: Dim, length: Dim, dtype: str) -> list[TensorSpec]:
    llm = spec.llm
    return [
        TensorSpec(f"{prefix}.{i}.{kind}", dtype, (batch, llm.num_kv_heads, length, llm.head_dim))
        for i in range(llm.num_layers)
        for kind in ("key", "value")
    ]


def vision_graph(spec: ModelSpec, opts: ExportOptions) -> GraphSpec:
    size, f = spec.vision.image_size, opts.float_dtype
    return GraphSpec(
        name="vision", file="vision.onnx", wrapper=GraphRole.VISION,
        inputs=(TensorSpec("pixel_values", f, ("batch", 3, size, size)),),
        outputs=(TensorSpec("image_embeds", f, ("batch", spec.num_image_tokens, spec.llm.hidden_size)),),
        cases=({"batch": 2}, {"batch": 1}),
        atol=1e-4 if f == "float32" else 2e-2, rtol=1e-4 if f == "float32" else 2e-2,
    )


def embed_graph(spec: ModelSpec, opts: ExportOptions) -> GraphSpec:
    return GraphSpec(
        name="embed", file="embed.onnx", wrapper=GraphRole.EMBED,
        inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs=(TensorSpec("inputs_embeds", opts.float_dtype, ("batch", "sequence", spec.llm.hidden_size)),),
        cases=({"batch": 2, "sequence": 7}, {"batch": 1, "sequence": 1}),
        atol=0.0, rtol=0.0 if opts.dtype == "fp32" else 1e-3,  # a gather: exact, or fp16 rounding
    )


def _decoder(spec, opts, name, file, batch, seq, past, total, cases, present_len, attrs, last_only) -> GraphSpec:
    f = opts.float_dtype
    logits_len = 1 if last_only else seq
    return GraphSpec(
        name=name, file=file, wrapper=GraphRole.DECODER,
        inputs=(
            TensorSpec("inputs_embeds", f, (batch, seq, spec.llm.hidden_size)),
            TensorSpec("attention_mask", "int64", (batch, total)),
            TensorSpec("position_ids", "int64", (batch, seq)),
            *_kv_tensors(spec, "past_key_values", batch, past, f),
        ),
        outputs=(
            TensorSpec("logits", f, (batch, logits_len, spec.llm.vocab_size)),
            *_kv_tensors(spec, "present", batch, present_len, f),
        ),
        cases=cases,
        atol=1e-4 if f == "float32" else 5e-2, rtol=1e-5 if f == "float32" else 1e-2,
        attrs={**attrs, "last_logits_only": last_only},
    )


def inplace_decoder_graph(spec: ModelSpec, opts: ExportOptions) -> GraphSpec:
    """One graph for prefill and decode: GroupQueryAttention over K/V buffers the runtime binds as
    both past and present (capacity `kv_capacity`, chosen per generation), right-padded rows."""
    f = opts.float_dtype
    # past: tokens already cached per row; new: valid rows of this step (== sequence unless past == 0).
    cases = (
        {"batch": 2, "sequence": 5, "kv_capacity": 12, "past": (0, 0), "new": (5, 3)},
        {"batch": 1, "sequence": 4, "kv_capacity": 16, "past": (7,), "new": (4,)},
        {"batch": 2, "sequence": 1, "kv_capacity": 12, "past": (9, 4), "new": (1, 1)},
    )
    return GraphSpec(
        name="decoder", file="decoder_inplace.onnx", wrapper=GraphRole.DECODER,
        inputs=(
            TensorSpec("inputs_embeds", f, ("batch", "sequence", spec.llm.hidden_size)),
            TensorSpec("seqlens_k", "int32", ("batch",)),
            TensorSpec("total_sequence_length", "int32", ()),
            *_kv_tensors(spec, "past_key_values", "batch", "kv_capacity", f),
        ),
        outputs=(
            TensorSpec("logits", f, ("batch", 1, spec.llm.vocab_size)),
            *_kv_tensors(spec, "present", "batch", "kv_capacity", f),
        ),
        cases=cases,
        atol=1e-4 if f == "float32" else 5e-2, rtol=1e-5 if f == "float32" else 1e-2,
        attrs={"layout": Layout.INPLACE, "kv_update": KvUpdate.IN_PLACE, "last_logits_only": True,
               "max_capacity": spec.llm.max_context},
    )


def decoder_graphs(spec: ModelSpec, opts: ExportOptions) -> list[GraphSpec]:
    if opts.layout == Layout.INPLACE:
        return [inplace_decoder_graph(spec, opts)]
    if opts.layout == Layout.DYNAMIC:
        cases = (
            {"batch": 2, "sequence": 5, "past_sequence": 3, "left_pad": 2},
            {"batch": 1, "sequence": 6, "past_sequence": 0, "left_pad": 0},
            {"batch": 2, "sequence": 1, "past_sequence": 9, "left_pad": 4},
        )
        return [_decoder(
            spec, opts, "decoder", "decoder.onnx", "batch", "sequence", "past_sequence", "total_sequence",
            cases, "total_sequence", {"layout": Layout.DYNAMIC, "kv_update": KvUpdate.FULL_CACHE},
            opts.logits == "last",
        )]
    b, m, chunk = opts.static_batch, opts.kv_buffer, opts.prefill_chunk
    attrs = {"layout": Layout.STATIC, "kv_buffer": m, "kv_update": KvUpdate.NEW_ENTRIES}
    graphs = []
    for name, seq in (("decoder_prefill", chunk), ("decoder_decode", 1)):
        # past_valid: filled slots of the buffer; left_pad: leading invalid slots of the chunk.
        cases = ({"past_valid": 0, "left_pad": min(3, seq - 1)}, {"past_valid": min(m, 37), "left_pad": 0})
        graphs.append(_decoder(
            spec, opts, name, f"{name}.onnx", b, seq, m, m + seq, cases, seq, {**attrs, "sequence": seq}, True,
        ))
    return graphs


# Diff cases keep every position valid, so whole tensors compare (no masked garbage rows).
DIFF_CASES = {
    GraphRole.VISION: ({"batch": 1},),
    GraphRole.EMBED: ({"batch": 1, "sequence": 16},),
    Layout.DYNAMIC: ({"batch": 1, "sequence": 12, "past_sequence": 0, "left_pad": 0},
                {"batch": 1, "sequence": 1, "past_sequence": 12, "left_pad": 0}),
    Layout.STATIC: ({"past_valid": 0, "left_pad": 0}, {"past_valid": 12, "left_pad": 0}),
    Layout.INPLACE: ({"batch": 1, "sequence": 12, "kv_capacity": 16, "past": (0,), "new": (12,)},
                {"batch": 1, "sequence": 1, "kv_capacity": 16, "past": (12,), "new": (1,)}),
}


def diff_cases(graph: GraphSpec) -> tuple[dict, ...]:
    return DIFF_CASES[graph.wrapper if graph.wrapper != GraphRole.DECODER else graph.attrs["layout"]]


def graphs_for(spec: ModelSpec, opts: ExportOptions) -> list[GraphSpec]:
    return [vision_graph(spec, opts), embed_graph(spec, opts), *decoder_graphs(spec, opts)]


# -- inputs for export examples and validation ---------------------------------------------------
def _sizes(graph: GraphSpec, case: dict) -> Callable[[Dim], int]:
    static_past = graph.attrs.get("kv_buffer", 0)

    def size(dim: Dim) -> int:
        if isinstance(dim, int):
            return dim
        if dim == "total_sequence":
            return case["past_sequence"] + case["sequence"]
        return case[dim]

    return size if graph.attrs.get("layout") != Layout.STATIC else (lambda d: d if isinstance(d, int) else static_past)


def decoder_mask(graph: GraphSpec, case: dict, batch: int, total: int, seq: int) -> np.ndarray:
    """Keep-mask over [past | new]: the last row is left-padded; static buffers mark unused slots."""
    mask = np.ones((batch, total), dtype=np.int64)
    if graph.attrs.get("layout") == Layout.STATIC:
        mask[:, case["past_valid"]: total - seq] = 0  # buffer slots not yet written
        mask[-1, total - seq: total - seq + case["left_pad"]] = 0
    else:
        mask[-1, : case["left_pad"]] = 0
    return mask


def make_inputs(graph: GraphSpec, case: dict, rng: np.random.Generator, sampler) -> dict:
    """Inputs for one validation case. `sampler` supplies in-distribution values: embeddings of
    random tokens, and past K/V computed by the reference from a random prefix (random K/V would
    put attention far outside what a real run sees)."""
    size = _sizes(graph, case)
    if graph.attrs.get("layout") == Layout.INPLACE:
        return _inplace_inputs(graph, case, rng, sampler)
    feeds = {}
    if graph.wrapper == GraphRole.DECODER:
        embeds = graph.inputs[0]
        batch, seq = size(embeds.shape[0]), size(embeds.shape[1])
        total = size(graph.inputs[1].shape[1])
        mask = decoder_mask(graph, case, batch, total, seq)
        feeds["attention_mask"] = mask
        feeds["position_ids"] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -seq:].astype(np.int64)
        feeds["inputs_embeds"] = sampler.embeds(rng, batch, seq).astype(embeds.dtype)
        past_len = total - seq
        filled = case.get("past_valid", past_len)
        past = sampler.past(rng, mask[:, :filled]) if filled else []
        for index, tensor in enumerate(graph.inputs[3:]):
            buffer = np.zeros((batch, tensor.shape[1], past_len, tensor.shape[3]), dtype=tensor.dtype)
            if filled:
                buffer[:, :, :filled] = past[index]
            feeds[tensor.name] = buffer
    for tensor in graph.inputs:
        if tensor.name in feeds:
            continue
        shape = tuple(size(d) for d in tensor.shape)
        if tensor.dtype == "int64":
            feeds[tensor.name] = rng.integers(0, sampler.vocab, shape, dtype=np.int64)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(tensor.dtype)
    return feeds


def _inplace_inputs(graph: GraphSpec, case: dict, rng: np.random.Generator, sampler) -> dict:
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
    for index, tensor in enumerate(graph.inputs[3:]):
        buffer = np.zeros((batch, tensor.shape[1], capacity, tensor.shape[3]), dtype=tensor.dtype)
        if longest:
            buffer[:, :, :longest] = prefix[index]
        feeds[tensor.name] = buffer
    return feeds


def valid_positions(graph: GraphSpec, output: TensorSpec, feeds: dict) -> np.ndarray | None:
    """Boolean mask over an output's sequence axis (fully masked rows are garbage by design)."""
    if graph.wrapper != GraphRole.DECODER:
        return None
    if graph.attrs.get("layout") == Layout.INPLACE:
        batch = feeds["seqlens_k"].shape[0]
        if output.name == "logits":
            return np.ones((batch, 1), dtype=bool)
        capacity = feeds[graph.inputs[3].name].shape[2]
        return np.arange(capacity)[None, :] <= feeds["seqlens_k"][:, None]
    mask = feeds["attention_mask"] > 0  # (B, total)
    seq = feeds["inputs_embeds"].shape[1]
    if output.name == "logits":
        return mask[:, -1:] if graph.attrs["last_logits_only"] else mask[:, -seq:]
    return mask[:, -seq:] if graph.attrs["kv_update"].startswith("present_is_new") else mask
