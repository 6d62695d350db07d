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
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vlm_export.errors import VlmExportError
from vlm_export.model.preprocess import model_pixels
from vlm_export.runtime.runners.base import Runner

IMAGE_EMBEDS_KEPT = 32  # embeddings a process keeps (each (144, C) float: 0.3 MB for smol, 1.2 MB at 2048 wide)
_KEPT: OrderedDict[tuple, np.ndarray] = OrderedDict()
_CACHING = [0]  # open cached_images() blocks
_PENDING: dict[tuple, Future] = {}  # embeddings a prefetch() is computing, by the key they will be kept under
_LOCK = threading.Lock()  # _KEPT and _PENDING, shared with prefetch threads


@contextlib.contextmanager
def cached_images():
    """Within this block image files' embeddings are computed once per process and vision graph."""
    _CACHING[0] += 1
    try:
        yield
    finally:
        _CACHING[0] -= 1


def graph_identity(sha256: str, backend: str, options: dict) -> tuple:
    """The cache's key for a vision graph: its file's digest, the backend and its options."""
    return (sha256, backend, repr(sorted(options.items())))


def vision_identity(artifacts, backend: str, options: dict) -> tuple | None:
    """What a set's vision graph computes with (`graph_identity` of its manifest digest); None where
    the set has no vision graph file with a digest."""
    vision = artifacts.graphs.get("vision")
    record = artifacts.manifest.get("files", {}).get(vision["file"]) if vision and artifacts.directory else None
    return graph_identity(record["sha256"], backend, options) if record else None


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
        for key in keys:  # one a prefetch is computing: its answer, not a second run
            with _LOCK:
                pending = _PENDING.get(key) if key is not None else None
            if pending is not None:
                with contextlib.suppress(Exception):  # a prefetch that failed: computed here (and fails here, if it must)
                    pending.result()
        with _LOCK:
            todo = [i for i, k in enumerate(keys) if k is None or k not in _KEPT]
        computed = dict(zip(todo, self.run([images[i] for i in todo])))
        out = []
        for i, key in enumerate(keys):
            if key is None:
                out.append(computed[i])
                continue
            with _LOCK:
                if i in computed:
                    _keep(key, computed[i])
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


def _keep(key: tuple, embeds: np.ndarray) -> None:  # with _LOCK held
    embeds.flags.writeable = False
    _KEPT[key] = embeds
    while len(_KEPT) > IMAGE_EMBEDS_KEPT:
        _KEPT.popitem(last=False)


class Prefetch:
    """Image files' embeddings through a vision graph, computed on a thread of their own (its ORT
    session on one intra-op thread) into the process's cache, where any set whose vision graph has
    the same digest and backend finds them inside `cached_images()` (an assembled variant's linked
    copy of it too). An ImageEncoder that asks for one still being computed waits for it. Thread
    counts do not change ORT's CPU results (smol's CLIP-L: equal bit for bit at 1 and 2 threads),
    so the key ignores them.

    A cpu build starts one as soon as its vision graph is exported: calibration and scoring ran fp32
    CLIP-L in line (~2.6 s an image, 2.8 s per session) while the export and the fp32 decoder's
    re-export left a core idle. `close()` waits for the image being computed, drops the others and
    frees the session; errors are not raised here (the image is then computed again where it is
    needed, and fails there)."""

    def __init__(self, runner: Runner | None, spec, dtype, identity: tuple | None, images: list[Path]):
        self._runner = runner
        keys = [_image_key(identity, image) for image in images]
        self._encoder = ImageEncoder(lambda: runner, spec, dtype, None)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vlm-export-images")
        with _LOCK:
            jobs = [(k, image) for k, image in zip(keys, images) if k is not None and k not in _KEPT and k not in _PENDING]
            self._futures = {key: self._pool.submit(self._one, key, image) for key, image in jobs if runner is not None}
            _PENDING.update(self._futures)

    @classmethod
    def of_set(cls, directory: Path, images: list[Path], backend: str = "ort") -> Prefetch:
        """Through the vision graph of the artifact set in `directory`."""
        from vlm_export.runtime.artifact_set import ArtifactSet

        artifacts = ArtifactSet.open(directory, check_hashes=False)
        # one intra-op thread beside the export's two: on every core (idle threads asleep) the calibration
        # waited 4.6 s less for its images but the export took 11.5 s longer (smol, back to back)
        runner = artifacts.runners(backend, threads=1).get("vision")
        dtype = artifacts.graphs["vision"]["inputs"][0]["dtype"] if runner is not None else np.float32
        return cls(runner, artifacts.spec, dtype, vision_identity(artifacts, backend, {}), images)

    @classmethod
    def of_graph(cls, record: dict, directory: Path, sha256: str, spec, images: list[Path]) -> Prefetch:
        """Through the ORT graph of manifest `record` in `directory` whose file's digest is `sha256`
        (a graph just exported, before its set's manifest exists)."""
        from vlm_export.runtime.runners.ort_runner import make_runner

        runner = make_runner(record, directory, {"threads": 1})  # as of_set's
        return cls(runner, spec, record["inputs"][0]["dtype"], graph_identity(sha256, "ort", {}), images)

    def _one(self, key: tuple, image: Path) -> None:
        try:
            embeds = self._encoder.run([image])[0]
            with _LOCK:
                _keep(key, embeds)
        finally:
            with _LOCK:
                _PENDING.pop(key, None)

    def close(self) -> None:
        """Waits for the image being computed, drops those not started, frees the session."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with _LOCK:
            for key in self._futures:
                _PENDING.pop(key, None)
        if self._runner is not None:
            self._runner.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
