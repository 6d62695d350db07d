"""PyTorch reference runner: runs the graph-shaped modules of the reference model, so the
reference goes through the very same generation loop as every exported artifact.

`torch` runs it in fp32 on the CPU; `torch-cuda` in fp16 on a CUDA GPU (PyTorch eager: the GPU
baseline of the benchmark). Values stay on the device between steps (the KV cache); the loop
fetches only what the host needs (logits) through `to_numpy`."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from vlm_export.model.graph_modules import graph_module
from vlm_export.runtime.runners.base import Runner


class TorchRunner(Runner):
    def __init__(self, graph: dict, model, device: str = "cpu"):
        super().__init__(graph)
        self.model = model
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.module = None

    def activate_impl(self) -> None:
        self.module = graph_module(self.model, self.graph["wrapper"], self.graph.get("attrs", {}))

    def deactivate_impl(self) -> None:
        self.module = None

    @torch.no_grad()
    def infer_impl(self, feeds: dict) -> dict:
        args = [self._tensor(feeds[n]) for n in self.input_names]
        outputs = self.module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return dict(zip(self.output_names, outputs))

    def _tensor(self, value) -> torch.Tensor:
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        if tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        return tensor.to(self.device)  # a no-op for what is already there (the KV cache)

    def to_numpy(self, value) -> np.ndarray:
        return value.float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

    @contextmanager
    def all_logits(self):
        """The same graph-shaped module without its last-row pick (inplace, or dynamic `--logits last`)."""
        record = {**self.graph, "attrs": {**self.graph.get("attrs", {}), "last_logits_only": False}}
        with TorchRunner(record, self.model, self.device) as runner:
            yield runner


_MODELS: dict[tuple, object] = {}


def make_runner(graph: dict, directory: Path | None, options: dict, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> TorchRunner:
    """One reference model per artifact set and device, shared by its graphs (loaded from the manifest's spec)."""
    from vlm_export.model.load import load_reference

    spec = options["spec"]
    key = (str(directory or spec.name), device)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_reference(spec).to(device=device, dtype=dtype)
    return TorchRunner(graph, _MODELS[key], device)
