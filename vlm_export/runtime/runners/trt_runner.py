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
    def __init__(self, graph: dict, engine_path: Path):
        super().__init__(graph)
        self.engine_path = Path(engine_path)
        self.engine = self.context = self.stream = None

    def activate_impl(self) -> None:
        trt = require_module("tensorrt", "trt", "running TensorRT engines")
        import torch

        if not torch.cuda.is_available():
            raise VlmExportError("TensorRT engines need a CUDA GPU, and none is visible", "run on the Jetson / a CUDA host")
        if not self.engine_path.is_file():
            raise VlmExportError(f"engine {self.engine_path} does not exist",
                                 "build it on a TensorRT host: vlm-export build MODEL --target orin")
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

    def to_numpy(self, value) -> np.ndarray:
        return value.float().cpu().numpy() if hasattr(value, "cpu") else np.asarray(value)


def make_runner(graph: dict, directory: Path, options: dict) -> TrtRunner:
    engine = Path(directory) / (Path(graph["file"]).stem + ".engine")
    return TrtRunner(graph, engine)
