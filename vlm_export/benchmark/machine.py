"""The machine a report was measured on, and its physical limits, measured in the same run:
memory bandwidth (an fp32 matrix-vector product over a matrix far larger than the caches: the
access pattern of a decode step) and matmul throughput (fp32 GEMM: the pattern of prefill)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time

import numpy as np

from vlm_export.runtime.api import physical_cores


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    from vlm_export.runtime import huge_pages

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": _cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": physical_cores(),
            "memory_gb": round(memory / 2**30, 1), "pages": huge_pages.describe(huge_pages.environment()), "platform": platform.platform(), "python": platform.python_version(),
            "versions": {p: _version(p) for p in ("vlm-export", "torch", "onnxruntime", "onnxruntime-qnn", "llama_cpp_python",
                                                   "transformers", "numpy")}}


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes of an fp32 matrix streamed once per GEMV, per second (best of `repeats`)."""
    import torch

    torch.set_num_threads(physical_cores())
    cols = 4096
    matrix = torch.rand((megabytes * 2**20) // (4 * cols), cols)
    vector = torch.rand(cols)
    seconds = _best_seconds(lambda: torch.mv(matrix, vector), repeats)
    return matrix.numel() * 4 / seconds / 1e9


def matmul_gflops(size: int = 2048, repeats: int = 3) -> float:
    import torch

    torch.set_num_threads(physical_cores())
    a, b = torch.rand(size, size), torch.rand(size, size)
    seconds = _best_seconds(lambda: torch.mm(a, b), repeats)
    return 2 * size**3 / seconds / 1e9


def limits() -> dict:
    return {"memory_bandwidth_gbs": round(memory_bandwidth_gbs(), 1), "fp32_matmul_gflops": round(matmul_gflops(), 1)}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_limits(repeats: int = 10) -> dict:
    """The CUDA GPU's limits, measured as the CPU's are: an fp16 GEMV over 2 GiB (the access pattern
    of a decode step) and an fp16 GEMM (prefill)."""
    import torch

    def synced(fn):
        def run():
            fn()
            torch.cuda.synchronize()
        return run

    def gemv_bandwidth() -> float:
        # its own scope: the 2 GiB matrix (and the closure over it) is freed on return, before the
        # GEMM's operands are allocated
        matrix = torch.rand(16384, 65536, device="cuda", dtype=torch.float16)
        vector = torch.rand(65536, device="cuda", dtype=torch.float16)
        gemv = _best_seconds(synced(lambda: torch.mv(matrix, vector)), repeats)
        return matrix.numel() * 2 / gemv / 1e9

    bandwidth = gemv_bandwidth()
    a, b = (torch.rand(8192, 8192, device="cuda", dtype=torch.float16) for _ in range(2))
    gemm = _best_seconds(synced(lambda: torch.mm(a, b)), repeats)
    return {"device": torch.cuda.get_device_name(), "memory_bandwidth_gbs": round(bandwidth, 1),
            "fp16_matmul_gflops": round(2 * 8192**3 / gemm / 1e9, 1)}


def limits_in_child() -> dict:
    """`limits()` measured in a fresh process with the engines' environment (huge pages included), so
    the roofline is the limit of the very memory the engines run in."""
    import json
    import subprocess
    import sys

    from vlm_export.runtime import huge_pages

    done = subprocess.run([sys.executable, "-m", "vlm_export.benchmark.machine"], capture_output=True, text=True,
                          env=huge_pages.environment(), check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary_stats(samples: list[float]) -> dict:
    return {"median": float(np.median(samples)), "min": float(min(samples)), "max": float(max(samples)), "n": len(samples)}


if __name__ == "__main__":
    import json

    print(json.dumps(limits()))
