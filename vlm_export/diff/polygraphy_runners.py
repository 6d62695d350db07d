"""Polygraphy runners for the two sides of a diff: the PyTorch reference and ONNX Runtime."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.logger import G_LOGGER

G_LOGGER.module_severity = G_LOGGER.ERROR  # the report carries the numbers; Polygraphy's chatter is noise

from vlm_export.spec.graph_io import GraphSpec


class TorchGraphRunner(BaseRunner):
    """Runs a graph-shaped module of the reference (model/graph_modules.py) as a Polygraphy runner."""

    def __init__(self, module: torch.nn.Module, graph: GraphSpec, name: str = "pytorch-reference"):
        super().__init__(name=name, prefix="torch")
        self.module, self.graph = module, graph

    def activate_impl(self):
        self.dtype = next(self.module.parameters()).dtype

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for tensor in self.graph.inputs:
            meta.add(tensor.name, np.dtype(tensor.dtype), [d if isinstance(d, int) else -1 for d in tensor.shape])
        return meta

    @torch.no_grad()
    def infer_impl(self, feed_dict, copy_outputs_to_host=True):
        started = time.perf_counter()
        args = []
        for tensor in self.graph.inputs:
            value = torch.from_numpy(np.ascontiguousarray(feed_dict[tensor.name]))
            args.append(value.to(self.dtype) if value.is_floating_point() else value)
        outputs = self.module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        self.inference_time = time.perf_counter() - started
        # contiguous: Polygraphy's comparator view()s them (a static decoder's present K/V are slices)
        return OrderedDict((t.name, np.require(o.float().numpy(), requirements="C")) for t, o in zip(self.graph.outputs, outputs))

    def deactivate_impl(self):
        pass


def ort_runner(path: Path, name: str, providers: list[str] | None = None, library: Path | None = None) -> OnnxrtRunner:
    """`library`: the variant's kernel library (custom ops), registered in the session. Sessions take
    the runtime's session config (`ort_runner.SESSION_CONFIG`: float activations for int4 weight-only)."""
    providers = providers or ["CPUExecutionProvider"]

    def session():
        import onnxruntime as ort

        from vlm_export.runtime.runners.ort_runner import register_kernels, session_options

        options = session_options()
        if library is not None:
            register_kernels(options, library)
        return ort.InferenceSession(str(path), options, providers=providers)
    return OnnxrtRunner(session, name=name)
