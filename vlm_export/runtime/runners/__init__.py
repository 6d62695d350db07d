"""Backends by name; each module is imported only when asked for (TensorRT may be absent)."""

from __future__ import annotations

import importlib
import os
import sys

from vlm_export.errors import VlmExportError

BACKENDS = {"torch": "vlm_export.runtime.runners.torch_runner", "torch-cuda": "vlm_export.runtime.runners.torch_cuda_runner",
            "ort": "vlm_export.runtime.runners.ort_runner",
            "trt": "vlm_export.runtime.runners.trt_runner"}
# Backends that run the PyTorch reference modules (transformers' CLIP and LLaMA on PyTorch).
REFERENCE_BACKENDS = ("torch", "torch-cuda")


def keep_transformers_off_torch(backend: str) -> None:
    """For a process about to run exported graphs only (the CLI's `run`): transformers imports
    PyTorch whenever it is installed (1.4 s and ~300 MB of a one-token `run`'s 6 s on `tiny`), while
    this runtime uses only its tokenizers and image processor. transformers' own switch USE_TORCH=0
    skips it. Does nothing once transformers is imported, or for a backend that runs the reference."""
    if backend not in REFERENCE_BACKENDS and "transformers" not in sys.modules:
        os.environ.setdefault("USE_TORCH", "0")


def backend_module(name: str):
    if name not in BACKENDS:
        raise VlmExportError(f"unknown backend '{name}'", f"use one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])
