"""Accuracy of a built variant against the fp32 graphs, end to end through the generation loop:
greedy token agreement and first-token top-1 agreement on the evaluation prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlm_export.runtime.artifact_set import ArtifactSet
from vlm_export.runtime.generation import Generator, Request
from vlm_export.runtime.sampling import SamplingParams

EVAL_DIR = Path(__file__).resolve().parents[2] / "calibration" / "eval"
EVAL_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "Describe the image.")


def eval_requests() -> list[Request]:
    images = sorted(EVAL_DIR.glob("*.jpg"))[:1] if EVAL_DIR.is_dir() else []
    requests = [Request.ask(p) for p in EVAL_PROMPTS[:2]]
    return requests + [Request.ask(EVAL_PROMPTS[2], images[0])] if images else requests


def _greedy(directory: Path, requests, new_tokens: int) -> list[list[int]]:
    with Generator(ArtifactSet.open(directory, check_hashes=False), "ort") as generator:
        return [generator.generate([r], SamplingParams(max_new_tokens=new_tokens))[0].token_ids for r in requests]


def token_agreement(reference: list[int], candidate: list[int]) -> float:
    """Share of reference positions reproduced before the first divergence (prefix agreement)."""
    if not reference:
        return 1.0
    same = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        same += 1
    return same / len(reference)


def compare_to_fp32(fp32_dir: Path, variant_dir: Path, new_tokens: int = 16) -> dict:
    requests = eval_requests()
    reference, candidate = _greedy(fp32_dir, requests, new_tokens), _greedy(variant_dir, requests, new_tokens)
    agreements = [token_agreement(r, c) for r, c in zip(reference, candidate)]
    return {
        "prompts": len(requests),
        "new_tokens": new_tokens,
        "greedy_prefix_agreement": float(np.mean(agreements)),
        "first_token_agreement": float(np.mean([bool(r) and bool(c) and r[0] == c[0] for r, c in zip(reference, candidate)])),
        "identical_outputs": sum(r == c for r, c in zip(reference, candidate)),
    }
