"""The graph passes a variant on vlm-export's kernels gets after its matmuls moved
(quantize/matmul_kernel.py): attention onto the kernel (attention_graph.py), the MLP activation
into the matmul and the RMSNorms fused (fusions.py)."""

from __future__ import annotations

from pathlib import Path

import onnx

from vlm_export.kernels.attention_graph import use_attention_kernel
from vlm_export.kernels.fusions import fuse_rms_norms, fuse_swiglu
from vlm_export.kernels.library import DOMAIN, ship_library


def use_native_graph(path: Path, record: dict, library: Path) -> dict:
    """Rewrites the graph at `path` in place (its external weights untouched); where any node now
    runs on the kernel library, ships it beside the graph and names it in the manifest `record`.
    Returns what each pass changed."""
    model = onnx.load(str(path), load_external_data=False)
    done = {"attention_kernel_nodes": use_attention_kernel(model), "swiglu_fused": fuse_swiglu(model), **fuse_rms_norms(model)}
    onnx.save_model(model, str(path))
    if any(node.domain == DOMAIN for node in model.graph.node):
        ship_library(library, Path(path).parent, record)
    return done
