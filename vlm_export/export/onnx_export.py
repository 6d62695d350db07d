"""The one generic exporter: wrapper + GraphSpec -> a clean, checked ONNX file.

torch.onnx.export (TorchScript tracer: predictable names and axes, ~1e-6 vs PyTorch here)
-> onnxscript optimizer on onnx_ir (constant folding, dead-code removal; weights stay
memory-mapped, so a 1.4B decoder does not need three copies in RAM) -> saved with one external
data file when over 2 GB -> shape inference -> onnx.checker(full_check).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from vlm_export.spec.graph_io import GraphSpec

log = logging.getLogger(__name__)
TWO_GB = 2**31 - 1


def _trace_to_onnx(wrapper: torch.nn.Module, graph: GraphSpec, example: dict, path: Path, opset: int) -> None:
    args = tuple(torch.from_numpy(example[t.name]) for t in graph.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            wrapper, args, str(path), input_names=[t.name for t in graph.inputs],
            output_names=[t.name for t in graph.outputs], dynamic_axes=graph.dynamic_axes(),
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def _initializer_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def optimize_and_save(raw: Path, final: Path) -> None:
    """Optimise with onnx_ir (weights stay memory-mapped), save with one data file if > 2 GB."""
    import onnx_ir as ir
    import onnxscript.optimizer

    model = ir.load(raw)
    onnxscript.optimizer.optimize_ir(model)
    model.producer_name = "vlm-export"
    external = final.name + ".data" if _initializer_bytes(model) > TWO_GB else None
    ir.save(model, final, external_data=external)


def export_graph(wrapper: torch.nn.Module, graph: GraphSpec, example: dict, out_dir: Path, opset: int) -> Path:
    final = out_dir / graph.file
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{graph.name}-") as scratch:
        raw = Path(scratch) / graph.file
        _trace_to_onnx(wrapper, graph, example, raw, opset)
        optimize_and_save(raw, final)
    onnx.shape_inference.infer_shapes_path(str(final), str(final))
    onnx.checker.check_model(str(final), full_check=True)
    return final
