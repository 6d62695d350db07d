"""QDQ quantization for the Qualcomm HTP with ONNX Runtime's QNN tooling.

    fixed shapes -> (decoder) MatMuls as 1x1 Convs -> qnn_preprocess_model (LayerNorm fusion...)
    -> get_qnn_qdq_config -> quantize

What HTP v68 (Snapdragon 888) takes, measured in emulation with the CPU fallback disabled:
float ops are rejected (they surface as QNN_COMMON_ERROR_MEM_ALLOC at graph finalize), so every
tensor must be in Q/DQ form. ORT's QDQ quantizer leaves a `Where` whose value inputs are constants
in float unless `ForceQuantizeNoInputCheck` is on; with it, the attention-mask `Where` is quantized
and the whole decoder lands on the HTP. Activations are 16-bit (u8 activations cost the vision
graph cosine 0.99994 -> 0.987 on tiny), weights 8-bit: per output channel for Conv (v68 compiles
it), per-tensor for MatMul (QNN has no per-channel MatMul; bench/reports/qnn-overrides-smol-decode.json
shows the same graph either way). So the decoder's MatMuls are rewritten as 1x1 Convs first
(`matmuls_as_conv`), and their weights take per-channel scales. `overrides` names weights to keep
16-bit; measured on smol, a 16-bit lm_head has no HTP kernel (the node falls off the NPU), so none
is kept by default.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import onnx

from vlm_export.errors import VlmExportError
from vlm_export.quantize.qdq_int8 import _quiet_root_logger, _Samples


def _has_external_data(path: Path) -> bool:
    return (path.parent / (path.name + ".data")).exists()


def _save(model: onnx.ModelProto, path: Path, external: bool) -> None:
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(model, str(path))


def fix_dims(source: Path, destination: Path, sizes: dict[str, int]) -> None:
    """Named dynamic axes -> fixed sizes (the HTP compiles static shapes only)."""
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    model = onnx.load(str(source))
    for name, size in sizes.items():
        make_dim_param_fixed(model.graph, name, size)
    left = {d.dim_param for v in model.graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
    if left:
        raise VlmExportError(f"{source.name} keeps dynamic axes {sorted(left)} the HTP cannot compile", "export the static layout")
    _save(model, destination, _has_external_data(source))


def matmuls_as_conv(source: Path, destination: Path) -> int:
    """Each MatMul with a constant 2-D weight (K, N) -> Reshape to (rows, K, 1, 1), a 1x1 Conv with
    weight (N, K, 1, 1), Reshape back to (..., N): the same function, in the form whose weights the
    HTP takes with per-output-channel scales (QNN has no per-channel MatMul). The rows are the Conv's
    batch, so no Transpose is needed. Shapes must be static (run `fix_dims` first). Returns how many
    MatMuls were rewritten.

    Measured on smol's static prefill graph (u16 activations, ONNX Runtime's CPU EP on the QDQ graph,
    block 0's output against fp32): per-tensor uint8 MatMul weights 3.9 % relative error, per-channel
    int8 Conv weights 1.1 %."""
    from onnx import helper, numpy_helper, shape_inference

    from vlm_export.quantize.smooth import drop_unused_initializers

    model = onnx.load(str(source))
    inferred = shape_inference.infer_shapes(onnx.load(str(source), load_external_data=False))
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input]}
    initializers = {i.name: i for i in model.graph.initializer}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        shape = shapes.get(node.input[0], [])
        if weight is None or len(weight.dims) != 2 or not shape or 0 in shape:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)
        k, n = w.shape
        base = node.name
        tensors = [numpy_helper.from_array(np.ascontiguousarray(w.T.reshape(n, k, 1, 1)), f"{node.input[1]}.conv"),
                   numpy_helper.from_array(np.array([int(np.prod(shape[:-1])), k, 1, 1], np.int64), f"{base}.rows_shape"),
                   numpy_helper.from_array(np.array([*shape[:-1], n], np.int64), f"{base}.out_shape")]
        model.graph.initializer.extend(tensors)
        nodes += [helper.make_node("Reshape", [node.input[0], tensors[1].name], [f"{base}/rows"], name=f"{base}/ToRows"),
                  helper.make_node("Conv", [f"{base}/rows", tensors[0].name], [f"{base}/conv"], name=f"{base}/Conv",
                                   kernel_shape=[1, 1]),
                  helper.make_node("Reshape", [f"{base}/conv", tensors[2].name], [node.output[0]], name=f"{base}/FromRows")]
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    drop_unused_initializers(model)
    _save(model, destination, _has_external_data(source))
    return rewritten


def weight_overrides(model_path: Path, patterns: tuple[str, ...]) -> dict:
    """Weight initializers of MatMul/Gemm/Conv nodes whose name matches a pattern -> 16-bit."""
    from onnxruntime.quantization import QuantType

    model = onnx.load(str(model_path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    chosen = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
              and len(n.input) > 1 and n.input[1] in weights and any(p in n.name for p in patterns)}
    return {name: [{"quant_type": QuantType.QUInt16}] for name in sorted(chosen)}


def quantize_for_qnn(source: Path, destination: Path, samples: list[dict], overrides: tuple[str, ...] = (),
                     per_channel: bool = True) -> dict:
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    if not samples:
        raise VlmExportError(f"no calibration samples for {source.name}", "check the calibration folder")
    external = _has_external_data(source)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".qnn-") as work, _quiet_root_logger():
        prepared = Path(work) / source.name
        if not qnn_preprocess_model(str(source), str(prepared), fuse_layernorm=True, save_as_external_data=external,
                                    all_tensors_to_one_file=True, external_data_location=source.name + ".data"):
            prepared = source
        sixteen = weight_overrides(prepared, overrides)
        config = get_qnn_qdq_config(str(prepared), _Samples(samples), activation_type=QuantType.QUInt16,
                                    weight_type=QuantType.QUInt8, per_channel=per_channel, init_overrides=sixteen or None)
        config.extra_options["ForceQuantizeNoInputCheck"] = True  # see the module docstring
        config.use_external_data_format = external
        with contextlib.ExitStack() as cleanup:
            leftover = prepared.with_name(prepared.stem + "-inferred.onnx")
            cleanup.callback(lambda: leftover.unlink(missing_ok=True))
            quantize(str(prepared), str(destination), config)
    quantized = onnx.load(str(destination), load_external_data=False)
    count = {op: sum(n.op_type == op for n in quantized.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    # QNN has no per-channel MatMul: ORT's QNN config keeps MatMul weights per-tensor uint8 either way
    # (measured on smol's decoder: identical graphs); per-channel reaches the Conv weights (vision).
    weights = "8-bit: Conv per-channel, MatMul per-tensor" if per_channel else "8-bit per-tensor"
    return {**count, "activations": "uint16", "weights": weights,
            "weights_16bit": sorted(sixteen),
            "calibration_samples": len(samples), "opset": next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx"))}
