"""The runner interface every backend implements (Polygraphy's shape).

    with runner:                       # activate() ... deactivate()
        outputs = runner.infer(feeds)  # checks names, then infer_impl()

Values in `feeds` and in the returned dict may be backend-native (OrtValue, torch tensor, CUDA
buffer), so a KV cache produced by one step is handed to the next without a round trip
through numpy; `to_numpy` fetches what the host needs (logits).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from vlm_export.errors import VlmExportError


class Runner:
    records_feeds = False  # True for a runner whose callers must run every feed through it (recording.py)

    def __init__(self, graph: dict):
        self.graph = graph  # the manifest record: name, file, inputs, outputs, attrs
        self.name = graph["name"]
        self.input_names = [t["name"] for t in graph["inputs"]]
        self.output_names = [t["name"] for t in graph["outputs"]]
        self.is_active = False
        self._reopen = False  # suspended: the next infer() opens it again

    def activate(self) -> Runner:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False
        self._reopen = False

    def suspend(self) -> bool:
        """Close it for a while (memory), to be opened again by the next `infer` only if one comes
        (re-creating a session nobody uses costs seconds for a large graph). -> whether it was active."""
        was_active, waiting = self.is_active, self._reopen  # waiting: opens on use, not opened yet
        self.deactivate()
        self._reopen = was_active or waiting
        return was_active

    def open_on_use(self) -> Runner:
        """Not opened now: the first `infer` opens it (a caller that may never run it, e.g. scoring
        whose reference side is replayed, skips the session's creation)."""
        if not self.is_active:
            self._reopen = True
        return self

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    def infer(self, feeds: dict) -> dict:
        if not self.is_active and self._reopen:
            self.activate()
        if not self.is_active:
            raise RuntimeError(f"runner {self.name} is not active: use `with runner:` or activate()")
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise VlmExportError(f"graph {self.name}: missing inputs {missing[:3]}, unexpected {extra[:3]}",
                                 "the artifacts do not match this version of the runtime; re-export")
        return self.infer_impl(feeds)

    @contextmanager
    def all_logits(self) -> Iterator[Runner | None]:
        """A runner of this decoder graph that returns every position's logits, for the block's
        duration; None where this backend cannot make one (the caller then scores one token per call)."""
        yield None

    # -- for subclasses -------------------------------------------------------------------------
    def activate_impl(self) -> None:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass

    def infer_impl(self, feeds: dict) -> dict:
        raise NotImplementedError

    def to_numpy(self, value) -> np.ndarray:
        return np.asarray(value)
