"""Backends by name; each module is imported only when asked for (TensorRT may be absent)."""

from __future__ import annotations

import importlib

from vlm_export.errors import VlmExportError

BACKENDS = {"torch": "vlm_export.runtime.runners.torch_runner", "torch-cuda": "vlm_export.runtime.runners.torch_cuda_runner",
            "ort": "vlm_export.runtime.runners.ort_runner",
            "trt": "vlm_export.runtime.runners.trt_runner"}


def backend_module(name: str):
    if name not in BACKENDS:
        raise VlmExportError(f"unknown backend '{name}'", f"use one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])
