"""A runner that records every feed it is given, then runs the runner it wraps: calibration sees
exactly what the generation loop feeds each graph, whatever the layout."""

from __future__ import annotations

import numpy as np

from vlm_export.runtime.runners.base import Runner


class RecordingRunner(Runner):
    """Wraps `inner` (any Runner, active or not); each `infer` appends a host copy of its feeds
    ({name: numpy array}, backend tensors fetched with the inner runner's `to_numpy`) to `sink`."""

    records_feeds = True  # every feed must reach it: callers do not answer from a cache (runtime/image_encoder.py)

    def __init__(self, inner: Runner, sink: list[dict]):
        super().__init__(inner.graph)
        self.inner, self.sink = inner, sink

    def activate(self) -> Runner:
        self.inner.activate()
        return self

    def deactivate(self) -> None:
        self.inner.deactivate()

    @property
    def is_active(self) -> bool:
        return self.inner.is_active

    @is_active.setter
    def is_active(self, value: bool) -> None:  # Runner.__init__ sets it; the inner runner's state is the truth
        pass

    def infer(self, feeds: dict) -> dict:
        self.sink.append({name: np.array(self.inner.to_numpy(value)) for name, value in feeds.items()})
        return self.inner.infer(feeds)

    def to_numpy(self, value) -> np.ndarray:
        return self.inner.to_numpy(value)

    def all_logits(self):
        return self.inner.all_logits()
