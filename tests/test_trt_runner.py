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
def test_engines_build_and_match_ort(tmp_path):  # pragma: no cover - runs on TensorRT hosts only
    """Where TensorRT imports, `build --target orin` builds real engines and they decode like ORT."""
    import subprocess
    import sys

    out = tmp_path / "orin"
    result = subprocess.run([sys.executable, "-m", "vlm_export", "build", "tiny", "--target", "orin", "--variants", "fp16",
                             "--graphs", str(tmp_path / "graphs"), "--out", str(out)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "fp16").glob("*.engine")) == ["decoder.engine", "embed.engine", "vision.engine"]

    from vlm_export.runtime.artifact_set import ArtifactSet
    from vlm_export.runtime.generation import Generator, Request
    from vlm_export.runtime.sampling import SamplingParams

    ids = {}
    for backend in ("ort", "trt"):
        with Generator(ArtifactSet.open(out / "fp16"), backend) as generator:
            ids[backend] = generator.generate([Request.ask("hello")], SamplingParams(8))[0].token_ids
    assert ids["trt"][:4] == ids["ort"][:4]  # fp16 kernels differ; the first tokens must agree
