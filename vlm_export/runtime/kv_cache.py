"""KV-cache bookkeeping for the three decoder layouts; `feeds()` gives a step's cache inputs.

dynamic: past K/V are whatever the last step returned (backend-native values, never copied
         here); the attention mask grows by the step's length.
static:  one fixed buffer per layer (B, nkv, M, hd) in host memory; a step returns only its new
         entries, which are written at the current slot; the mask is [slot validity | step keep].
inplace: one buffer per layer (B, nkv, C, hd) that the graph itself writes: the ORT runner binds
         it as both past and present, so nothing is copied; rows are right-padded and the
         graph learns each row's length from seqlens_k.
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

    def feeds(self, keep: np.ndarray, positions: np.ndarray) -> dict:
        return {"attention_mask": self.step_mask(keep), "position_ids": positions, **self.values}

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

    def feeds(self, keep: np.ndarray, positions: np.ndarray) -> dict:
        return {"attention_mask": self.step_mask(keep), "position_ids": positions, **self.values}

    def update(self, outputs: dict, keep: np.ndarray) -> None:
        steps = keep.shape[1]
        end = self.slot + steps
        for past, present in zip(self.past_names, self.present_names):
            self.values[past][:, :, self.slot:end] = self.to_numpy(outputs[present])
        self.valid[:, self.slot:end] = keep
        self.slot = end


class InPlaceKV:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, dtype, capacity: int, to_numpy):
        self.past_names, self.present_names = kv_names(num_layers, "past_key_values"), kv_names(num_layers, "present")
        self.values = {n: np.zeros((batch, num_kv_heads, capacity, head_dim), dtype=dtype) for n in self.past_names}
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.capacity = capacity
        self.to_numpy = to_numpy

    @property
    def length(self) -> int:
        return int(self.lengths.max())

    def feeds(self, keep: np.ndarray, positions: np.ndarray) -> dict:
        """`keep` (B, S) must be right-padded (valid rows first); positions follow from the lengths."""
        total = self.lengths + keep.sum(axis=1)
        return {"seqlens_k": (total - 1).astype(np.int32), "total_sequence_length": np.array(total.max(), np.int32),
                **self.values}

    def update(self, outputs: dict, keep: np.ndarray) -> None:
        for past, present in zip(self.past_names, self.present_names):
            if present in outputs:  # a backend that returned a new buffer (PyTorch) rather than writing this one
                self.values[past] = self.to_numpy(outputs[present])
        self.lengths += keep.sum(axis=1)
