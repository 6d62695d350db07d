"""Explicit int8 quantization in the form TensorRT consumes without a calibrator: QuantizeLinear /
DequantizeLinear pairs, symmetric (zero point 0), per-channel weight scales (output channel),
per-tensor activation scales from calibration. Only weight-bearing MatMul / Conv are quantized;
activation x activation MatMuls (attention scores, probs x V) stay in float for accuracy.

Mixed precision, by measurement on smol (real SmolLM2 weights, `vlm-export diff` end to end): with
every weight MatMul in int8, top-1 agreement with fp32 was 0.30 and KL 2.7 -- the inputs of
`down_proj` (SwiGLU products) and `lm_head` carry the large activation outliers per-tensor int8
cannot hold. Keeping those two in float gives top-1 0.73 and KL 0.22 (KEEP_FLOAT).

The orin int8 decoder (DECODER_KEEP_FLOAT) goes further, measured on smol against fp32 over 512 eval-prose
tokens (2026-12-01): SmoothQuant (quantize/smooth.py) first lifts q/k/v/o/gate/up/down-less int8 from
top-1 0.730 / KL 0.179 to 0.869 / 0.055; keeping o_proj float adds nothing (0.865 / 0.051), calibrating
on a long prompt too adds nothing (0.859 / 0.056), keeping the MLP's gate/up float in the last 8 or 15
layers gives 0.912 / 0.029 and 0.910 / 0.029, in every layer 0.934 / 0.017 (without SmoothQuant 0.875 / 0.047): the only form inside the
gpu-int8 budget (KL <= 0.02, top-1 >= 0.92). So the MLP stays in fp16 and int8 covers the attention
projections (and the vision tower).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx

from vlm_export.errors import VlmExportError

log = logging.getLogger(__name__)


class _Samples:
    """ORT's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, samples: list[dict]):
        self._iter = iter(samples)

    def get_next(self):
        return next(self._iter, None)


KEEP_FLOAT = ("/down_proj/", "/lm_head/")  # outlier-heavy inputs, see above
DECODER_KEEP_FLOAT = ("/mlp/", "/lm_head/")  # the orin int8 decoder: the whole MLP float, see above


def _float_matmuls(model: onnx.ModelProto, keep_float: tuple[str, ...]) -> list[str]:
    """Activation x activation MatMuls, and the projections named by `keep_float` (name fragments)."""
    constants = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul"
            and (n.input[1] not in constants or any(p in n.name for p in keep_float))]


@contextlib.contextmanager
def _quiet_root_logger():
    """ORT's quantizer warns about pre-processing on the root logger on every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8_qdq(source: Path, destination: Path, samples: list[dict], uint8_activations: bool = False,
                      keep_float: tuple[str, ...] = KEEP_FLOAT) -> dict:
    """Symmetric int8 activations by default (TensorRT's form); `uint8_activations` gives the
    asymmetric uint8-activation / int8-weight form XNNPACK's QLinear kernels take. MatMuls whose
    name holds a `keep_float` fragment stay float. Raises VlmExportError without samples."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not samples:
        raise VlmExportError(f"no calibration samples for {source.name}", "check the calibration folder")
    exclude = _float_matmuls(onnx.load(str(source), load_external_data=False), keep_float)
    large = (source.parent / (source.name + ".data")).exists()
    leftover = source.with_name(source.stem + "-inferred.onnx")  # ORT writes it beside the source
    with _quiet_root_logger(), contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: leftover.unlink(missing_ok=True))
        quantize_static(
            str(source), str(destination), _Samples(samples), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8 if uint8_activations else QuantType.QInt8, weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Conv"], nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=large,
            extra_options={"ActivationSymmetric": not uint8_activations, "WeightSymmetric": True,
                           "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}},
        )
    quantized = onnx.load(str(destination), load_external_data=False)
    counts = {op: sum(n.op_type == op for n in quantized.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    log.info("%s: %s, %d MatMuls kept in float", source.name, counts, len(exclude))
    return {**counts, "float_matmuls": len(exclude), "calibration_samples": len(samples), "per_channel": True,
            "activations": "uint8" if uint8_activations else "int8 symmetric", "weights": "int8 symmetric"}
