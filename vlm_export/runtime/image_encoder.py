"""Images -> (144, C) embeddings through a vision graph; inside `cached_images()`, each image file
once per process.

Scoring and the build's vision check run the same image through the same vision graph many times
(both sides' greedy answers and long prompts, every variant, the fp32-vs-int8 check): ~1.5-5 s of
CLIP-L each on 2 cores. Inside the block, embeddings are kept per (vision graph digest, backend and
its options, image file path, size and modification time); PIL images, graphs without a recorded
digest and runners that record their feeds always run. Outside it every image runs: `run`, `generate`
and the benchmark time the vision graph itself.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vlm_export.errors import VlmExportError
from vlm_export.model.preprocess import model_pixels
from vlm_export.runtime.runners.base import Runner

IMAGE_EMBEDS_KEPT = 32  # embeddings a process keeps (each (144, C) float: 0.3 MB for smol, 1.2 MB at 2048 wide)
_KEPT: OrderedDict[tuple, np.ndarray] = OrderedDict()
_CACHING = [0]  # open cached_images() blocks


@contextlib.contextmanager
def cached_images():
    """Within this block image files' embeddings are computed once per process and vision graph."""
    _CACHING[0] += 1
    try:
        yield
    finally:
        _CACHING[0] -= 1


def vision_identity(artifacts, backend: str, options: dict) -> tuple | None:
    """What a set's vision graph computes with: its file's manifest digest, the backend and its
    options; None where the set has no vision graph file with a digest."""
    vision = artifacts.graphs.get("vision")
    record = artifacts.manifest.get("files", {}).get(vision["file"]) if vision and artifacts.directory else None
    return (record["sha256"], backend, repr(sorted(options.items()))) if record else None


def _image_key(vision: tuple | None, image) -> tuple | None:
    if vision is None or not isinstance(image, str | Path):
        return None
    try:
        stat = Path(image).stat()
    except OSError:
        return None  # preprocessing's own error names the missing file
    return (*vision, str(Path(image).resolve()), stat.st_size, stat.st_mtime_ns)


class ImageEncoder:
    """A set's vision graph behind the process's embeddings cache. `runner()` gives the vision runner
    (activated on first use; None: the set has no vision graph) at each call, so a caller that wraps
    the runners later is seen: a runner that records its feeds (calibration, golden files) gets every
    image run through it, never a cached answer."""

    def __init__(self, runner: Callable[[], Runner | None], spec, dtype: np.dtype, identity: tuple | None):
        self.runner, self.spec, self.dtype, self.identity = runner, spec, np.dtype(dtype), identity

    def __call__(self, images: list) -> list[np.ndarray]:
        """Images (paths or PIL images, any mode) -> (144, C) embeddings each (cached ones read-only)."""
        runner = self.runner()
        identity = self.identity if _CACHING[0] and not getattr(runner, "records_feeds", False) else None
        keys = [_image_key(identity, image) for image in images]
        todo = [i for i, k in enumerate(keys) if k is None or k not in _KEPT]
        computed = dict(zip(todo, self.run([images[i] for i in todo])))
        out = []
        for i, key in enumerate(keys):
            if key is None:
                out.append(computed[i])
                continue
            if i in computed:
                computed[i].flags.writeable = False
                _KEPT[key] = computed[i]
                while len(_KEPT) > IMAGE_EMBEDS_KEPT:
                    _KEPT.popitem(last=False)
            _KEPT.move_to_end(key)
            out.append(_KEPT[key])
        return out

    def run(self, images: list) -> list[np.ndarray]:
        """The vision graph on `images`, no cache: (144, C) arrays, each its own buffer."""
        if not images:
            return []
        runner = self.runner()
        if runner is None:
            raise VlmExportError("these artifacts have no vision graph", "ask without --image, or export the model's vision graph")
        pixels = [model_pixels(image, self.spec) for image in images]
        vision = runner.activate()
        out = vision.infer({"pixel_values": np.concatenate(pixels).astype(self.dtype)})
        return [np.array(row) for row in vision.to_numpy(out["image_embeds"])]


def image_embeds(directory: Path, image, backend: str = "ort") -> np.ndarray:
    """One image through the vision graph of the artifact set in `directory` (opening only that
    graph's session, and none inside `cached_images()` where this process has them) -> (144, C)."""
    from vlm_export.runtime.artifact_set import ArtifactSet

    artifacts = ArtifactSet.open(directory, check_hashes=False)
    runner = artifacts.runners(backend)["vision"]
    dtype = artifacts.graphs["vision"]["inputs"][0]["dtype"]
    try:
        return ImageEncoder(lambda: runner, artifacts.spec, dtype, vision_identity(artifacts, backend, {}))([image])[0]
    finally:
        runner.deactivate()
