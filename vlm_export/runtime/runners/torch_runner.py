"""PyTorch reference runner: runs the graph-shaped modules of the reference model, so the
reference goes through the very same generation loop as every exported artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlm_export.model.graph_modules import graph_module
from vlm_export.runtime.runners.base import Runner


class TorchRunner(Runner):
    def __init__(self, graph: dict, model):
        super().__init__(graph)
        self.model = model
        self.module = None

    def activate_impl(self) -> None:
        self.module = graph_module(self.model, self.graph["wrapper"], self.graph.get("attrs", {}))

    def deactivate_impl(self) -> None:
        self.module = None

    @torch.no_grad()
    def infer_impl(self, feeds: dict) -> dict:
        args = [feeds[n] if isinstance(feeds[n], torch.Tensor) else torch.from_numpy(np.ascontiguousarray(feeds[n]))
                for n in self.input_names]
        outputs = self.module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return dict(zip(self.output_names, outputs))

    def to_numpy(self, value) -> np.ndarray:
        return value.float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


_MODELS: dict[str, object] = {}


def make_runner(graph: dict, directory: Path, options: dict) -> TorchRunner:
    """One reference model per artifact set, shared by its graphs (loaded from the manifest's spec)."""
    from vlm_export.model.load import load_reference

    spec = options["spec"]
    key = str(directory)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_reference(spec)
    return TorchRunner(graph, _MODELS[key])
