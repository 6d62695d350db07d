"""Next-token selection on host logits: greedy, temperature, top-k, top-p, repetition penalty.

Parameter ranges follow Hugging Face's `generate` (and llama.cpp's sampler): top-k 0 = off and a
top-k at or above the vocabulary keeps every token; top-p 1 = off; repetition penalty 1 = off.
Every value outside a parameter's range is refused when `SamplingParams` is built, before any
graph runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlm_export.errors import VlmExportError

# (name, CLI flag, is the value valid, what is valid): checked in this order, first failure reported.
_RANGES = (
    ("max_new_tokens", "--max-new-tokens", lambda v: v >= 1, "an integer >= 1"),
    ("temperature", "--temperature", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = greedy)"),
    ("top_k", "--top-k", lambda v: v >= 0, "an integer >= 0 (0 = off; >= the vocabulary = every token)"),
    ("top_p", "--top-p", lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    ("repetition_penalty", "--repetition-penalty", lambda v: math.isfinite(v) and v > 0, "a finite number > 0 (1 = off)"),
    ("seed", "--seed", lambda v: v is None or v >= 0, "an integer >= 0"),
)


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
        for name, flag, valid, expected in _RANGES:
            value = getattr(self, name)
            if not valid(value):  # NaN fails every comparison, so it lands here too
                raise VlmExportError(f"{flag} {value} is out of range", f"pass {flag} as {expected}")


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    if penalty == 1.0 or seen.size == 0:
        return logits
    logits = logits.copy()
    seen = seen[(seen >= 0) & (seen < logits.size)]
    picked = logits[seen]
    with np.errstate(over="ignore"):  # a tiny penalty overflows to +-inf, which sampling handles
        logits[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def _probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """(V,) float64 logits -> (V,) probabilities after temperature, top-k and top-p."""
    logits = np.where(np.isnan(logits), -np.inf, logits)
    top = logits.max()
    if not np.isfinite(top):  # a penalty or a model overflowed: the extreme logits share all the mass
        probs = (logits == top).astype(np.float64)
    else:
        # Subtract the maximum before dividing: a tiny temperature must not overflow to inf - inf.
        with np.errstate(over="ignore"):  # a subnormal temperature sends the others to -inf: exp = 0
            probs = np.exp((logits - top) / params.temperature)
    if 0 < params.top_k < probs.size:
        kth = np.partition(probs, -params.top_k)[-params.top_k]
        probs = np.where(probs < kth, 0.0, probs)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        cut = order[np.searchsorted(cumulative, params.top_p) + 1:]  # keep the smallest set reaching top_p
        probs[cut] = 0.0
        probs /= probs.sum()
    return probs


def sample_token(logits: np.ndarray, seen: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits (V,) float -> token id."""
    logits = apply_repetition_penalty(logits.astype(np.float64), seen, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    probs = _probabilities(logits, params)
    return int(rng.choice(probs.size, p=probs))
