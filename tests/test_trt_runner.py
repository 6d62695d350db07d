"""The TensorRT runner is written against TensorRT 10's Python API; it runs only where TensorRT and a
GPU exist (a Jetson, a TensorRT host). Elsewhere the absence is a clear, actionable error."""

import importlib.util

import pytest

from vlm_export.errors import VlmExportError
from vlm_export.runtime.runners import backend_module

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the missing-extra path does not apply")
def test_missing_tensorrt_names_the_extra(tmp_path):
    runner = backend_module("trt").make_runner({"name": "vision", "file": "vision.onnx", "inputs": [], "outputs": []}, tmp_path, {})
    with pytest.raises(VlmExportError, match=r"pip install 'vlm-export\[trt\]'"):
        runner.activate()


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU (not installable on this project's machines)")
def test_engine_runner_matches_ort():  # pragma: no cover - runs on TensorRT hosts only
    pytest.skip("engines are built by the orin target (issue 6); this test runs them once that target lands")
