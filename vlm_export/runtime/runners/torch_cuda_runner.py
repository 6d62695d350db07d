"""`torch-cuda`: the PyTorch reference in fp16 on a CUDA GPU (see torch_runner)."""

from __future__ import annotations

from pathlib import Path

from vlm_export.errors import VlmExportError
from vlm_export.runtime.runners import torch_runner


def make_runner(graph: dict, directory: Path | None, options: dict) -> torch_runner.TorchRunner:
    import torch

    if not torch.cuda.is_available():
        raise VlmExportError(f"backend torch-cuda needs a CUDA GPU; this PyTorch ({torch.__version__}) sees none",
                             "use --backend torch (CPU), or run on a machine with a CUDA GPU and a CUDA build of PyTorch")
    return torch_runner.make_runner(graph, directory, options, device="cuda", dtype=torch.float16)
