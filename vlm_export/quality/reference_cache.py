"""The reference side of a comparison, computed once per process.

A build scores every quantized variant (and each int8-KV screen) against the same fp32 variant on
the same eval sequences: the fp32 side of those runs is identical each time and was about half of
each 90-100 s measurement on smol. Its logits per call and its greedy answers are kept here, keyed
by what determines them: the reference's files (the manifest's sha256 of every file), backend and
logits runner, the sequence's ids (or rows), its context length and the ids per call. Logits go to
float32 `.npy` files in a temporary directory (exact, and out of the process's memory: 2,048 scored
positions of a 49,152-word vocabulary are 400 MB), removed when the process ends.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

LIMIT_BYTES = 4 << 30  # past this, sequences are scored again rather than kept (disk, not memory)


class ReferenceCache:
    def __init__(self):
        self.directory: Path | None = None
        self.logits: dict[str, list[Path]] = {}
        self.answers: dict[str, list[int]] = {}
        self.bytes = 0

    def _folder(self) -> Path:
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="vlm-export-reference-"))
            atexit.register(shutil.rmtree, self.directory, True)
        return self.directory

    def holds(self, key: str | None) -> bool:
        """Whether the sequence `key` is recorded (nothing is read)."""
        return key is not None and key in self.logits

    def replay(self, key: str | None) -> list[np.ndarray] | None:
        """The recorded logits of each call of the sequence `key`, or None."""
        files = self.logits.get(key) if key else None
        return [np.load(f) for f in files] if files is not None else None

    def record(self, key: str | None, calls: list[np.ndarray]) -> None:
        size = sum(c.nbytes for c in calls)
        if key is None or key in self.logits or self.bytes + size > LIMIT_BYTES:
            return
        files = []
        for index, call in enumerate(calls):
            files.append(self._folder() / f"{key[:32]}-{index}.npy")
            np.save(files[-1], np.ascontiguousarray(call, dtype=np.float32))
        self.logits[key] = files
        self.bytes += size

    def clear(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.__init__()


CACHE = ReferenceCache()


def identity(generator, all_logits: bool) -> str | None:
    """What a generator's logits depend on besides its inputs (all_logits: whether they come from its
    all-positions runner); None (never cached) for graphs that are not files with checksums (the
    PyTorch reference built from a spec)."""
    artifacts = generator.artifacts
    files = artifacts.manifest.get("files") if artifacts.directory is not None else None
    if not files:
        return None
    backend = type(generator.runners[generator.decode_graph]).__name__
    return json.dumps({"files": {k: v.get("sha256") for k, v in sorted(files.items())}, "backend": backend,
                       "all_logits": all_logits}, sort_keys=True)


def key(reference_identity: str | None, *parts) -> str | None:
    """A cache key for one sequence (or one greedy answer) of a reference; parts must be
    JSON-serialisable (ids as lists of ints)."""
    if reference_identity is None:
        return None
    text = json.dumps([reference_identity, *parts], sort_keys=True, default=lambda v: np.asarray(v).tolist())
    return hashlib.sha256(text.encode()).hexdigest()


class Recording:
    """A scoring side that passes through and keeps what it returned."""

    def __init__(self, side):
        self.side, self.calls = side, []

    def start(self, context: np.ndarray, capacity: int) -> np.ndarray:
        out = self.side.start(context, capacity)
        self.calls.append(np.array(out, dtype=np.float32))
        return out

    def feed(self, embeds: np.ndarray) -> np.ndarray:
        out = self.side.feed(embeds)
        self.calls.append(np.array(out, dtype=np.float32))
        return out


class Replay:
    """A scoring side that returns a recorded sequence's logits: the start's row, then as many rows
    per feed as it is given embeddings (whatever the calls they were recorded in)."""

    def __init__(self, calls: list[np.ndarray]):
        self.first, self.rows, self.position = calls[0], np.concatenate(calls[1:]) if len(calls) > 1 else None, 0

    def start(self, context: np.ndarray, capacity: int) -> np.ndarray:
        return self.first

    def feed(self, embeds: np.ndarray) -> np.ndarray:
        count = embeds.shape[0]
        if self.rows is None or self.position + count > self.rows.shape[0]:
            raise ValueError("the recorded sequence is shorter than the one being scored")
        self.position += count
        return self.rows[self.position - count:self.position]
