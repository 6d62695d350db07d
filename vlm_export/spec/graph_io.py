"""The graph I/O contract: declarative specs of every exported graph (names, shapes as ints or
named dynamic axes, dtypes, the wrapper that produces it, how to make inputs, the validation
tolerance), per decoder layout.

It sits below both the exporters (which write graphs to it) and the runtime (which reads the
same records back from the manifest), so neither imports the other. Names are defined here once.
"""

from __future__ import annotations

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
    """The names of the built-in decoder layouts (ExportOptions.layout; a decoder record's
    attrs["layout"]); what each one does is its class in spec/layouts/, looked up by this name.
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
        from vlm_export.spec.layouts import REGISTRY

        layout = REGISTRY.get(self.layout)
        if layout is None:
            raise VlmExportError(f"unsupported layout '{self.layout}'", f"use --layout {' | '.join(REGISTRY)}")
        object.__setattr__(self, "layout", layout.name)
        if self.logits not in ("all", "last"):
            raise VlmExportError(f"unsupported logits mode '{self.logits}'", "use --logits all or last")
        layout.check_options(self)

    @property
    def float_dtype(self) -> str:
        return "float16" if self.dtype == "fp16" else "float32"


def kv_tensors(spec: ModelSpec, prefix: str, batch: Dim, length: Dim, dtype: str) -> list[TensorSpec]:
    """`prefix.{layer}.key|value` tensors (batch, kv heads, length, head dim) for every layer."""
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


def decoder_graphs(spec: ModelSpec, opts: ExportOptions) -> list[GraphSpec]:
    """The decoder graph spec(s) of `opts.layout` (spec/layouts/)."""
    from vlm_export.spec.layouts import layout_of

    return layout_of(opts.layout).graphs(spec, opts)


# Diff cases keep every position valid, so whole tensors compare (no masked garbage rows).
DIFF_CASES = {GraphRole.VISION: ({"batch": 1},), GraphRole.EMBED: ({"batch": 1, "sequence": 16},)}


def diff_cases(graph: GraphSpec) -> tuple[dict, ...]:
    from vlm_export.spec.layouts import graph_layout

    return DIFF_CASES[graph.wrapper] if graph.wrapper != GraphRole.DECODER else graph_layout(graph).diff_cases


def graphs_for(spec: ModelSpec, opts: ExportOptions) -> list[GraphSpec]:
    return [vision_graph(spec, opts), embed_graph(spec, opts), *decoder_graphs(spec, opts)]


# -- inputs for export examples and validation ---------------------------------------------------
def make_inputs(graph: GraphSpec, case: dict, rng: np.random.Generator, sampler) -> dict:
    """Inputs for one validation case. `sampler` supplies in-distribution values: embeddings of
    random tokens, and past K/V computed by the reference from a random prefix (random K/V would
    put attention far outside what a real run sees). Decoders: their layout's own inputs."""
    if graph.wrapper == GraphRole.DECODER:
        from vlm_export.spec.layouts import graph_layout

        # contiguous: Polygraphy's runners view() the arrays (a static layout's K/V buffer slices are not)
        # (np.require keeps 0-d scalars 0-d; ascontiguousarray would make them 1-d)
        return {k: np.require(v, requirements="C") for k, v in graph_layout(graph).example_inputs(graph, case, rng, sampler).items()}
    feeds = {}
    for tensor in graph.inputs:
        shape = tuple(d if isinstance(d, int) else case[d] for d in tensor.shape)
        if tensor.dtype == "int64":
            feeds[tensor.name] = rng.integers(0, sampler.vocab, shape, dtype=np.int64)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(tensor.dtype)
    return feeds


def valid_positions(graph: GraphSpec, output: TensorSpec, feeds: dict) -> np.ndarray | None:
    """Boolean mask over an output's sequence axis (decoders only; None: every position counts)."""
    if graph.wrapper != GraphRole.DECODER:
        return None
    from vlm_export.spec.layouts import graph_layout

    return graph_layout(graph).valid_positions(graph, output, feeds)
