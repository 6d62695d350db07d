"""Next-token selection on host logits: greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlm_export.errors import VlmExportError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # HF semantics: > 1 discourages repeats
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise VlmExportError("max_new_tokens must be at least 1", "pass --max-new-tokens 1 or more")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise VlmExportError("invalid sampling settings", "temperature >= 0, 0 < top-p <= 1, top-k >= 0, repetition penalty > 0")


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    if penalty == 1.0 or seen.size == 0:
        return logits
    logits = logits.copy()
    picked = logits[seen]
    logits[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def sample_token(logits: np.ndarray, seen: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits (V,) float -> token id."""
    logits = apply_repetition_penalty(logits.astype(np.float64), seen, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    logits = logits / params.temperature
    if params.top_k:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        cut = order[np.searchsorted(cumulative, params.top_p) + 1:]  # keep the smallest set reaching top_p
        probs[cut] = 0.0
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
