"""Decoder layouts, registered by name (the string a decoder record's attrs["layout"] holds).

    dynamic  Concat KV; present = the whole cache (TensorRT, the diff baseline)
    static   fixed shapes, chunked prefill, host-written KV buffer (QNN / NPUs)
    inplace  GroupQueryAttention writing into the bound KV buffer (ONNX Runtime CPU)

Adding a layout = one module in this package with a `DecoderLayout` subclass (base.py says what it
owns) and one entry in `REGISTRY` below.
"""

from __future__ import annotations

from vlm_export.errors import VlmExportError
from vlm_export.spec.layouts.base import DecoderLayout, KVCache, PrefillPlan, kv_names
from vlm_export.spec.layouts.dynamic import DynamicLayout
from vlm_export.spec.layouts.inplace import InPlaceLayout
from vlm_export.spec.layouts.static import StaticLayout

REGISTRY: dict[str, DecoderLayout] = {layout.name: layout for layout in (DynamicLayout(), StaticLayout(), InPlaceLayout())}
NAMES = tuple(REGISTRY)


def layout_of(name: str) -> DecoderLayout:
    """The registered layout called `name`. Raises VlmExportError naming the known ones."""
    if name not in REGISTRY:
        raise VlmExportError(f"unknown decoder layout '{name}'", f"use one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def graph_layout(graph) -> DecoderLayout:
    """The layout of a decoder graph: a GraphSpec or a manifest record (absent: dynamic, the first one)."""
    attrs = graph.attrs if hasattr(graph, "attrs") else graph.get("attrs", {})
    return layout_of(attrs.get("layout", DynamicLayout.name))


__all__ = ["NAMES", "REGISTRY", "DecoderLayout", "KVCache", "PrefillPlan", "graph_layout", "kv_names", "layout_of"]
