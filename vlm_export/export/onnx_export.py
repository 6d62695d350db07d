"""The one generic exporter: wrapper + GraphSpec -> a clean, checked ONNX file.

torch.onnx.export (TorchScript tracer: predictable names and axes, ~1e-6 vs PyTorch here)
-> onnxscript optimizer (constant folding, dead-code removal) -> shape inference
-> onnx.checker(full_check) -> saved with external data when the graph is over 2 GB.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from vlm_export.export.graph_specs import GraphSpec

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


def _optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(model)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """One .onnx file, plus one `<name>.data` file when the weights exceed protobuf's 2 GB."""
    large = model.ByteSize() > TWO_GB if not any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer) else True
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def export_graph(wrapper: torch.nn.Module, graph: GraphSpec, example: dict, out_dir: Path, opset: int) -> Path:
    final = out_dir / graph.file
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{graph.name}-") as scratch:
        raw = Path(scratch) / graph.file
        _trace_to_onnx(wrapper, graph, example, raw, opset)
        model = onnx.load(str(raw), load_external_data=True)
        model = _optimize(model)
        model.producer_name = "vlm-export"
        save_model(model, final)
    onnx.shape_inference.infer_shapes_path(str(final), str(final))
    onnx.checker.check_model(str(final), full_check=True)
    return final
