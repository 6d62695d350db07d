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
    """Each MatMul with a constant 2-D weight (K, N) -> a 1x1 Conv with weight (N, K, 1, 1) over the
    rows laid out along the image width: Reshape (..., K) -> (1, 1, rows, K), Transpose to NCHW
    (1, K, 1, rows), Conv, Transpose back, Reshape to (..., N). The same function, in the form whose
    weights the HTP takes with per-output-channel scales (QNN has no per-channel MatMul). The QNN EP
    runs Conv in NHWC, so its own layout transposes cancel ours. Shapes must be static (run
    `fix_dims` first). Returns how many MatMuls were rewritten.

    Rows along the width, not as the Conv's batch: with 128 rows as the batch, compiling smol's
    prefill graph for the emulated HTP v68 had not finished after 18 minutes of CPU.

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
                   numpy_helper.from_array(np.array([1, 1, int(np.prod(shape[:-1])), k], np.int64), f"{base}.rows_shape"),
                   numpy_helper.from_array(np.array([*shape[:-1], n], np.int64), f"{base}.out_shape")]
        model.graph.initializer.extend(tensors)
        nodes += [helper.make_node("Reshape", [node.input[0], tensors[1].name], [f"{base}/rows"], name=f"{base}/ToRows"),
                  helper.make_node("Transpose", [f"{base}/rows"], [f"{base}/nchw"], name=f"{base}/ToNCHW", perm=[0, 3, 1, 2]),
                  helper.make_node("Conv", [f"{base}/nchw", tensors[0].name], [f"{base}/conv"], name=f"{base}/Conv",
                                   kernel_shape=[1, 1]),
                  helper.make_node("Transpose", [f"{base}/conv"], [f"{base}/nhwc"], name=f"{base}/ToNHWC", perm=[0, 2, 3, 1]),
                  helper.make_node("Reshape", [f"{base}/nhwc", tensors[2].name], [node.output[0]], name=f"{base}/FromRows")]
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    drop_unused_initializers(model)
    _save(model, destination, _has_external_data(source))
    return rewritten


RMS_OPSET = 23  # RMSNormalization's first opset


def _at_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """`model` with its default-domain opset raised to `version` (ops converted where their schema
    changed; RMSNormalization, new in 23, is set aside while the rest is converted)."""
    from onnx import version_converter

    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= version:
        return model
    graph = model.graph
    kept = {n.name: onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node if n.op_type == "RMSNormalization"}
    for node in graph.node:
        if node.name in kept:
            node.CopyFrom(onnx.helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name))
    converted = version_converter.convert_version(model, version)
    for node in converted.graph.node:
        if node.op_type == "Identity" and node.name in kept:
            node.CopyFrom(kept[node.name])
    return converted


def _scalar(initializers: dict, name: str) -> float | None:
    from onnx import numpy_helper

    tensor = initializers.get(name)
    return float(numpy_helper.to_array(tensor).reshape(-1)[0]) if tensor is not None and np.prod(tensor.dims) == 1 else None


def rmsnorms_fused(source: Path, destination: Path) -> int:
    """Each RMSNorm the exporter decomposed -- Pow(x, 2) -> ReduceMean(last axis) -> Add(eps) -> Sqrt
    -> Div(1, .) -> Mul(x, .) -> Mul(weight, .) -- as one RMSNormalization (axis -1, the same epsilon),
    which the QNN EP maps to the HTP's RmsNorm. The model moves to opset 23, where ONNX defines that
    op (ONNX Runtime's own SimplifiedLayerNormalization has no schema its QDQ quantizer's opset
    conversion accepts). Returns how many.

    Why: in QDQ form every intermediate gets one 16-bit range, and x**2 spans the square of the
    residual stream's range (smol, block 20: up to 1.1e6), a step of ~16 against a typical token's
    mean square of ~1, so its RMS came out of quantization noise. RmsNorm keeps that sum inside
    the op. Shapes and values are unchanged (checked against the decomposed graph in the tests)."""
    from onnx import helper

    from vlm_export.quantize.smooth import drop_unused_initializers

    model = onnx.load(str(source))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def only(node, op_type: str):
        """The single consumer of `node`'s output, when it is an `op_type` and the output is no graph output."""
        users = consumers.get(node.output[0], [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type and node.output[0] not in outputs else None

    def other(node, name: str) -> str:
        return node.input[1] if node.input[0] == name else node.input[0]

    dropped, fused = set(), []
    for pow_node in [n for n in graph.node if n.op_type == "Pow"]:
        x = pow_node.input[0]
        mean = only(pow_node, "ReduceMean") if _scalar(initializers, pow_node.input[1]) == 2.0 else None
        axes = next((list(a.ints) for a in mean.attribute if a.name == "axes"), None) if mean else None
        add = only(mean, "Add") if axes == [-1] and len(mean.input) == 1 else None
        eps = _scalar(initializers, other(add, mean.output[0])) if add else None
        sqrt = only(add, "Sqrt") if eps is not None else None
        div = only(sqrt, "Div") if sqrt else None
        scale = only(div, "Mul") if div and _scalar(initializers, div.input[0]) == 1.0 and div.input[1] == sqrt.output[0] else None
        last = only(scale, "Mul") if scale and other(scale, div.output[0]) == x else None
        weight = other(last, scale.output[0]) if last else None
        if weight not in initializers:
            continue
        chain = (pow_node, mean, add, sqrt, div, scale, last)
        dropped.update(id(n) for n in chain)
        fused.append((last, helper.make_node("RMSNormalization", [x, weight], [last.output[0]],
                                             name=f"{pow_node.name.rsplit('/', 1)[0]}/RMSNormalization",
                                             axis=-1, epsilon=eps, stash_type=1)))
    replacement = {id(last): node for last, node in fused}
    nodes = [replacement.get(id(n), n) for n in graph.node if id(n) not in dropped or id(n) in replacement]
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(model)
    if fused:
        model = _at_opset(model, RMS_OPSET)
    _save(model, destination, _has_external_data(source))
    return len(fused)


RANGE_MARGIN = 4.0  # calibrated ranges of the decoder's MLP activations, widened this many times
MARGIN_TENSORS = ("/mlp/",)  # name fragments of the activations that get the margin
FIXED_RANGE_OPS = ("Sigmoid", "Softmax", "Tanh")  # outputs bounded by definition (QNN fixes their Sigmoid/Tanh params)


def widen_ranges(path: Path, patterns: tuple[str, ...] = MARGIN_TENSORS, factor: float = RANGE_MARGIN) -> int:
    """Widen, in place, the 16-bit ranges of the activations in the QDQ graph at `path` whose name
    holds one of `patterns`: scale times `factor`, zero point kept (so 0 stays exact and the range
    grows about it). Returns how many scales changed.

    Why: a 16-bit range clips what calibration never saw, and the tokens that grow massive
    activations mid-answer are rare; clipping one is catastrophic, while a 4x wider range costs 12 dB
    of the ~96 a 16-bit code has. Measured on smol (CPU EP on the QDQ decode graph, fp32 prefill, 256
    eval tokens, RMSNorms fused, 16 decode calibration tokens): MLP ranges as calibrated top-1 0.926 /
    mean KL 0.032; 4x wider 0.938 / 0.010. Splitting the outlier channels of down_proj's input into
    a branch of their own instead gave no gain (0.926 / 0.036): held-out steps were clipped, not coarse."""
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    done = set()
    for node in model.graph.node:
        tensor = node.input[0]
        source = producers.get(tensor)
        if (node.op_type != "QuantizeLinear" or source is None or source.op_type in FIXED_RANGE_OPS
                or not any(p in tensor for p in patterns) or node.input[1] in done):
            continue
        scale = initializers[node.input[1]]
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(factor), scale.name))
        done.add(scale.name)
    onnx.save(model, str(path))  # external data (if any) stays where it is: only the scales changed
    return len(done)


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
