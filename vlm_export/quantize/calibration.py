"""Calibration samples from `calibration/` (real photos + prompts, recipe in recipe.json), run through
the fp32 graphs so the decoder sees real prompt embeddings, spliced images, and real KV caches.

Calibrating on the prefill (positions from 0) and on a decode step both matters: ranges taken from
later steps only clip the single-key attention of step 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlm_export.errors import VlmExportError
from vlm_export.spec.graph_io import Layout

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "calibration"


def calibration_set(directory: Path | None = None) -> tuple[list[Path], list[str]]:
    directory = Path(directory or DEFAULT_DIR)
    recipe_path = directory / "recipe.json"
    if not recipe_path.is_file():
        raise VlmExportError(f"no calibration recipe at {recipe_path}", "pass --calibration DIR with recipe.json, images/ and prompts.txt")
    recipe = json.loads(recipe_path.read_text())
    images = sorted(directory.glob(recipe["images"]))
    prompts_path = directory / recipe["prompts"]
    prompts = [p.strip() for p in prompts_path.read_text().splitlines() if p.strip()] if prompts_path.is_file() else []
    if not images or not prompts:
        raise VlmExportError(f"calibration data missing in {directory} ({len(images)} images, {len(prompts)} prompts)",
                             "add photos under images/ and prompts to prompts.txt")
    return images, prompts


def check_calibration(directory: Path | None = None) -> tuple[list[Path], list[str]]:
    """Fail before any work when the calibration set is missing or holds something that is not a photo."""
    from vlm_export.model.preprocess import load_image

    images, prompts = calibration_set(directory)
    for path in images:
        load_image(path)  # names the file that is not a readable image
    return images, prompts


def vision_samples(images: list[Path], spec) -> list[dict]:
    """Vision-graph feeds for `spec` (a ModelSpec): each image preprocessed as the model sees it."""
    from vlm_export.model.preprocess import model_pixels

    return [{"pixel_values": model_pixels(p, spec)} for p in images]


def decoder_samples(graphs_dir: Path, images: list[Path], prompts: list[str]) -> list[dict]:
    """Prefill and one decode step per calibration request, as feed dicts of the dynamic decoder."""
    from vlm_export.runtime.artifact_set import ArtifactSet
    from vlm_export.runtime.generation import Generator

    samples = []
    with Generator(ArtifactSet.open(graphs_dir, check_hashes=False), "ort") as generator:
        if generator.layout.name != Layout.DYNAMIC:  # the graph these samples calibrate
            raise VlmExportError("int8 calibration needs the dynamic-layout graphs", "build from `vlm-export export MODEL`")
        for request in calibration_requests(images, prompts):
            image = request.image
            image_embeds = generator.image_embeds(image) if image is not None else None
            embeds, _ = generator.encode(request, image_embeds)
            kv = generator.new_cache(1, embeds.shape[0] + 1)
            keep = np.ones((1, embeds.shape[0]), np.int64)
            positions = np.arange(embeds.shape[0], dtype=np.int64)[None]
            samples.append({"inputs_embeds": embeds[None], **kv.feeds(keep, positions)})
            logits = generator.forward(embeds[None], kv, positions)[:, -1]
            token = int(np.argmax(logits[0]))
            step_embeds = generator.embed_ids([token])[None]
            runner = generator.runners[generator.decode_graph]
            step = kv.feeds(np.ones((1, 1), np.int64), np.array([[embeds.shape[0]]], np.int64))
            samples.append({"inputs_embeds": step_embeds, **{k: runner.to_numpy(v) for k, v in step.items()}})
    return samples


def calibration_requests(images: list[Path], prompts: list[str]) -> list:
    """The recipe's pairing: prompt i with image i mod n for even i, text-only for odd i."""
    from vlm_export.runtime.generation import Request

    return [Request.ask(p, images[i % len(images)] if i % 2 == 0 else None) for i, p in enumerate(prompts)]


def recorded_samples(graphs_dir: Path, requests: list, new_tokens: int = 3) -> dict[str, list[dict]]:
    """Feeds of every graph, recorded while the generation loop answers the calibration requests on
    the fp32 graphs: whatever the layout, each graph is calibrated on exactly what it will see (for
    a static decoder: right-aligned prefill chunks from position 0, then decode steps)."""
    from vlm_export.runtime.artifact_set import ArtifactSet
    from vlm_export.runtime.generation import Generator
    from vlm_export.runtime.runners.recording import RecordingRunner
    from vlm_export.runtime.sampling import SamplingParams

    recorded: dict[str, list[dict]] = {}
    with Generator(ArtifactSet.open(graphs_dir, check_hashes=False), "ort") as generator:
        generator.runners = {name: RecordingRunner(runner, recorded.setdefault(name, []))
                             for name, runner in generator.runners.items()}
        for request in requests:
            generator.generate([request], SamplingParams(max_new_tokens=new_tokens))
    return {name: feeds for name, feeds in recorded.items() if feeds}
