"""`run_prompts`: the Python API behind `vlm-export run`."""

from __future__ import annotations

import os
from pathlib import Path

from vlm_export.results import GenerationResult
from vlm_export.runtime.artifact_set import ArtifactSet
from vlm_export.runtime.generation import Generator, Request
from vlm_export.runtime.sampling import SamplingParams


def physical_cores() -> int:
    """Intra-op threads = physical cores: hyperthreads only add contention in GEMV-bound decode."""
    try:
        siblings = {
            Path(f"/sys/devices/system/cpu/cpu{i}/topology/thread_siblings_list").read_text().strip()
            for i in os.sched_getaffinity(0)
        }
        return max(1, len(siblings))
    except OSError:
        return max(1, (os.cpu_count() or 2) // 2)


def run_prompts(artifacts: str | Path, prompts: list[str], image=None, backend: str = "ort", providers=None,
                threads: int | None = None, params: SamplingParams = SamplingParams(),
                on_token=None) -> tuple[list[GenerationResult], dict]:
    artifact_set = ArtifactSet.open(artifacts)
    options = {"providers": providers, "threads": threads or physical_cores()} if backend == "ort" else {}
    requests = [Request.ask(p, image) for p in prompts]
    with Generator(artifact_set, backend, **options) as generator:
        results = generator.generate(requests, params, on_token)
        return results, generator.timings
