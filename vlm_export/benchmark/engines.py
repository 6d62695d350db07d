"""What a benchmark runs: our artifact sets through the shared generation loop (PyTorch or ONNX
Runtime), and llama.cpp (llama-cpp-python) on a GGUF of the same weights. Each engine is measured in
its own process, so its peak RSS is its own and no engine warms the caches of the next.

Every engine is timed the same way: prefill = the prompt's decoder calls; decode at context L = one
token fed after an L-token prompt (embedding lookup + decoder step + argmax), `steps` times.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm_export.benchmark.machine import summary_stats
from vlm_export.errors import VlmExportError


@dataclass
class Settings:
    contexts: tuple[int, ...] = (128, 512, 1024)
    decode_steps: int = 16
    prefill_tokens: int = 256
    warmup: int = 1
    repeats: int = 3
    image: str | None = None
    prompt: str = "Describe the image in detail."
    threads: int = 2
    # Passes over the whole engine list (the suite runner's, not an engine's): this VM's speed drifts
    # by up to 1.5x from minute to minute, so rows measured minutes apart are compared only when every
    # engine was measured in every round (rows: the median of the rounds' medians).
    rounds: int = 1


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


SPEC_PREFIX = "spec:"  # a location that names a model: its reference, unexported (PyTorch backends)


def open_artifacts(location: str):
    from vlm_export.runtime.artifact_set import ArtifactSet

    if location.startswith(SPEC_PREFIX):
        from vlm_export.spec import resolve_spec

        return ArtifactSet.from_spec(resolve_spec(location[len(SPEC_PREFIX):]))
    return ArtifactSet.open(location, check_hashes=False)


class LoopEngine:
    """An artifact set (exported graphs or a built variant) on the `torch`, `torch-cuda` or `ort` backend."""

    def __init__(self, location: str, backend: str, threads: int):
        from vlm_export.runtime.generation import Generator

        if backend.startswith("torch"):
            import torch

            torch.set_num_threads(threads)
        options = {"threads": threads} if backend == "ort" else {}
        self.generator = Generator(open_artifacts(location), backend, **options)
        self.rng = np.random.default_rng(0)

    def _prompt(self, length: int) -> np.ndarray:
        ids = self.rng.integers(3, self.generator.spec.llm.vocab_size, length)
        return self.generator.embed_ids([int(i) for i in ids])

    def vision_seconds(self, settings: Settings) -> list[float] | None:
        if not settings.image:
            return None
        for _ in range(settings.warmup):
            self.generator.image_embeds(settings.image)
        return [_timed(lambda: self.generator.image_embeds(settings.image)) for _ in range(settings.repeats)]

    def ttft_seconds(self, settings: Settings) -> list[float] | None:
        from vlm_export.runtime.generation import Request
        from vlm_export.runtime.sampling import SamplingParams

        request = Request.ask(settings.prompt, settings.image)
        times = []
        for index in range(settings.warmup + settings.repeats):
            self.generator.generate([request], SamplingParams(max_new_tokens=1))
            if index >= settings.warmup:
                times.append(self.generator.timings["ttft_ms"] / 1e3)
        return times

    def prefill_seconds(self, tokens: int, settings: Settings) -> list[float]:
        prompt = self._prompt(tokens)
        for _ in range(settings.warmup):
            self.generator.start([prompt], 1)
        return [_timed(lambda: self.generator.start([prompt], 1)) for _ in range(settings.repeats)]

    def decode_seconds(self, context: int, settings: Settings) -> list[float]:
        session = self.generator.start([self._prompt(context)], settings.decode_steps + 1)
        times = []
        for _ in range(settings.decode_steps):
            start = time.perf_counter()
            session.step([int(np.argmax(session.logits[0]))])
            times.append(time.perf_counter() - start)
        return times[settings.warmup:] or times

    def close(self) -> None:
        self.generator.close()


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python: text only (its CLIP path needs a separate mmproj file)."""

    def __init__(self, gguf: Path, threads: int, context: int):
        from vlm_export.errors import require_module

        llama_cpp = require_module("llama_cpp", "bench", "the llama.cpp comparison")
        self.llm = llama_cpp.Llama(str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=512,
                                   verbose=False)
        self.rng = np.random.default_rng(0)

    def _tokens(self, length: int) -> list[int]:
        return [int(t) for t in self.rng.integers(300, self.llm.n_vocab(), length)]  # past the byte/control tokens

    def vision_seconds(self, settings: Settings):
        return None

    def ttft_seconds(self, settings: Settings):
        return None

    def prefill_seconds(self, tokens: int, settings: Settings) -> list[float]:
        prompt = self._tokens(tokens)
        times = []
        for index in range(settings.warmup + settings.repeats):
            self.llm.reset()
            elapsed = _timed(lambda: self.llm.eval(prompt))
            if index >= settings.warmup:
                times.append(elapsed)
        return times

    def decode_seconds(self, context: int, settings: Settings) -> list[float]:
        self.llm.reset()
        self.llm.eval(self._tokens(context))
        times = []
        tokens = self._tokens(settings.decode_steps)  # which token follows does not change the cost
        for token in tokens:
            start = time.perf_counter()
            self.llm.eval([token])
            times.append(time.perf_counter() - start)
        return times[settings.warmup:] or times

    def close(self) -> None:
        self.llm.close()


def measure(kind: str, location: str, settings: Settings) -> dict:
    """Runs in a fresh process: every measure of one engine, and its peak RSS."""
    if kind == "llama.cpp":
        engine = LlamaCppEngine(Path(location), settings.threads, max(settings.contexts + (settings.prefill_tokens,)) +
                                settings.decode_steps + 8)
    else:
        engine = LoopEngine(location, kind, settings.threads)
    try:
        vision = engine.vision_seconds(settings)
        ttft = engine.ttft_seconds(settings)
        result = {
            "vision_ms": summary_stats([t * 1e3 for t in vision]) if vision else None,
            "ttft_ms": summary_stats([t * 1e3 for t in ttft]) if ttft else None,
            "prefill_tok_s": summary_stats([settings.prefill_tokens / t for t in engine.prefill_seconds(settings.prefill_tokens, settings)]),
            "decode_tok_s": {str(c): summary_stats([1 / t for t in engine.decode_seconds(c, settings)]) for c in settings.contexts},
        }
    finally:
        engine.close()
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> int:
    """This process's own peak RSS. Not ru_maxrss: Linux carries that across execve from the forking
    parent, so a freshly spawned worker would report its parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main(argv: list[str] | None = None) -> None:
    """`python -m vlm_export.benchmark.engines KIND LOCATION SETTINGS_JSON`: one engine, JSON on stdout."""
    import json
    import sys

    kind, location, settings = (argv or sys.argv[1:])[:3]
    values = json.loads(settings)
    values["contexts"] = tuple(values["contexts"])
    try:
        print(json.dumps(measure(kind, location, Settings(**values))))
    except VlmExportError as exc:  # the suite shows this line as the row's reason (not a traceback's last line)
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
