"""KV-cache bookkeeping for both decoder layouts.

dynamic: past K/V are whatever the last step returned (backend-native values, never copied
         here); the attention mask grows by the step's length.
static:  one fixed buffer per layer (B, nkv, M, hd) in host memory; a step returns only its new
         entries, which are written at the current slot; the mask is [slot validity | step keep].
"""

from __future__ import annotations

import numpy as np


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


class DynamicKV:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, dtype):
        self.past_names, self.present_names = kv_names(num_layers, "past_key_values"), kv_names(num_layers, "present")
        empty = np.zeros((batch, num_kv_heads, 0, head_dim), dtype=dtype)
        self.values = {name: empty for name in self.past_names}
        self.mask = np.zeros((batch, 0), dtype=np.int64)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def step_mask(self, keep: np.ndarray) -> np.ndarray:
        return np.concatenate([self.mask, keep], axis=1)

    def update(self, outputs: dict, keep: np.ndarray) -> None:
        self.values = {past: outputs[present] for past, present in zip(self.past_names, self.present_names)}
        self.mask = self.step_mask(keep)


class StaticKV:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, dtype, buffer: int, to_numpy):
        self.past_names, self.present_names = kv_names(num_layers, "past_key_values"), kv_names(num_layers, "present")
        self.values = {n: np.zeros((batch, num_kv_heads, buffer, head_dim), dtype=dtype) for n in self.past_names}
        self.valid = np.zeros((batch, buffer), dtype=np.int64)
        self.slot = 0
        self.buffer = buffer
        self.to_numpy = to_numpy

    @property
    def length(self) -> int:
        return self.slot

    def step_mask(self, keep: np.ndarray) -> np.ndarray:
        return np.concatenate([self.valid, keep], axis=1)

    def update(self, outputs: dict, keep: np.ndarray) -> None:
        steps = keep.shape[1]
        end = self.slot + steps
        for past, present in zip(self.past_names, self.present_names):
            self.values[past][:, :, self.slot:end] = self.to_numpy(outputs[present])
        self.valid[:, self.slot:end] = keep
        self.slot = end
