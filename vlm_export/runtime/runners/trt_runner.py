"""TensorRT engine runner (TensorRT 10 name-based I/O API), imported only when asked for.

Buffers are CUDA torch tensors, so KV outputs of one step feed the next without leaving the GPU.
Engines are found beside the graphs as `<graph>.engine` (the orin target writes them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlm_export.errors import VlmExportError, require_module
from vlm_export.runtime.runners.base import Runner


class TrtRunner(Runner):
    def __init__(self, graph: dict, engine_path: Path, built_with: dict | None = None):
        super().__init__(graph)
        self.engine_path = Path(engine_path)
        self.built_with = built_with or {}  # the build manifest's record: TensorRT version, GPU capability
        self.engine = self.context = self.stream = None
        self.profile = None

    def _check_build_matches(self, trt, torch) -> None:
        """Engines are specific to the TensorRT version and the GPU they were built for."""
        built_version = self.built_with.get("tensorrt")
        if built_version and built_version.split(".")[:2] != trt.__version__.split(".")[:2]:
            raise VlmExportError(f"{self.engine_path.name} was built with TensorRT {built_version}, this is {trt.__version__}",
                                 "rebuild the engines here with build_engines.sh")
        built_cc = self.built_with.get("compute_capability")
        here_cc = ".".join(str(v) for v in torch.cuda.get_device_capability())
        if built_cc and built_cc != here_cc:
            raise VlmExportError(f"{self.engine_path.name} was built for compute capability {built_cc}, this GPU is {here_cc}",
                                 "rebuild the engines on this device")

    def activate_impl(self) -> None:
        trt = require_module("tensorrt", "trt", "running TensorRT engines")
        import torch

        if not torch.cuda.is_available():
            raise VlmExportError("TensorRT engines need a CUDA GPU, and none is visible", "run on the Jetson / a CUDA host")
        if not self.engine_path.is_file():
            raise VlmExportError(f"engine {self.engine_path} does not exist",
                                 "build it on a TensorRT host: vlm-export build MODEL --target orin")
        self._check_build_matches(trt, torch)
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise VlmExportError(f"TensorRT could not deserialize {self.engine_path}",
                                 "rebuild the engine with this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def deactivate_impl(self) -> None:
        self.engine = self.context = self.stream = None

    def infer_impl(self, feeds: dict) -> dict:
        import tensorrt as trt
        import torch

        self._select_profile(feeds)
        keep = []
        for name in self.input_names:
            value = feeds[name]
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
            tensor = tensor.cuda().contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.name} failed")
        self.stream.synchronize()
        return outputs

    def _select_profile(self, feeds: dict) -> None:
        """Engines built with several profiles (decoder: prefill, decode): pick the one that fits."""
        shapes = {n: tuple(feeds[n].shape) for n in self.input_names}
        for index in range(self.engine.num_optimization_profiles):
            fits = all(
                all(lo <= d <= hi for d, lo, hi in zip(shape, *self.engine.get_tensor_profile_shape(name, index)[::2]))
                for name, shape in shapes.items()
            )
            if fits:
                if index != self.profile:
                    self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
                    self.profile = index
                return
        raise VlmExportError(f"{self.name}: input shapes {shapes} are outside every optimisation profile",
                             "rebuild with larger --max-prompt / --max-context")

    def to_numpy(self, value) -> np.ndarray:
        return value.float().cpu().numpy() if hasattr(value, "cpu") else np.asarray(value)


def make_runner(graph: dict, directory: Path, options: dict) -> TrtRunner:
    engine = Path(directory) / (Path(graph["file"]).stem + ".engine")
    return TrtRunner(graph, engine, options.get("engines", {}).get(engine.name))
