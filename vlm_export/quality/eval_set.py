"""The evaluation set: prose for perplexity and KL, prompts and an image for greedy answers, and
how the prose is cut into chunks (llama.cpp's perplexity convention).

    ids:    | chunk 0: n_ctx ids            | chunk 1: n_ctx ids            | ...
            | context (first half) | scored | context (first half) | scored |

In each chunk the first half is context only; the logits at positions half-1 .. n_ctx-2 are scored
against the true next tokens (the second half). With a BOS token the chunk's first id becomes BOS,
as llama-perplexity does. Chunks never overlap, so every scored position has at least half a
chunk of context and no position is scored twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlm_export.errors import VlmExportError

EVAL_DIR = Path(__file__).resolve().parents[2] / "calibration" / "eval"
PROSE = "prose.txt"  # Alice's Adventures in Wonderland, chapters I-III (calibration/README.md)
EVAL_IMAGE = "chelsea.jpg"
# Scored positions of the eval prose per variant in a build: trained LLM weights get the field's usual
# sample; seeded-random ones a token sample that only proves the path runs (their numbers mean nothing).
EVAL_TOKENS = {"trained": 2048, "random": 64}
EVAL_TOKENS_HELP = (f"eval-prose tokens each quantized variant is scored on against fp32 (default {EVAL_TOKENS['trained']} "
                    f"for a trained LLM, {EVAL_TOKENS['random']} for seeded-random weights)")


def check_eval_tokens(given: int | None) -> None:
    """A build's --eval-tokens: None (EVAL_TOKENS by the weights) or enough positions to score.
    Raises VlmExportError below 2 (a KL needs a context position and a scored one)."""
    if given is not None and given < 2:
        raise VlmExportError(f"--eval-tokens {given} is too few to score",
                             f"pass --eval-tokens 2 or more, or leave it out (default {EVAL_TOKENS['trained']} for a trained "
                             f"LLM, {EVAL_TOKENS['random']} for seeded-random weights)")


def random_llm(model: dict) -> bool:
    """Whether a manifest's `model` record has seeded-random LLM weights: quality budgets hold for
    trained weights only, so such a build's variants are measured but not judged."""
    from vlm_export.spec.model_spec import spec_from_dict

    return "llm" in spec_from_dict(model).weights.untrained()


def eval_tokens_for(given: int | None, model: dict) -> int:
    """`given` (a build's --eval-tokens), else EVAL_TOKENS for the LLM's weights in `model`."""
    return given if given is not None else EVAL_TOKENS["random" if random_llm(model) else "trained"]


def prose() -> str:
    path = EVAL_DIR / PROSE
    if not path.is_file():
        raise VlmExportError(f"{path} is missing (the evaluation prose)", "restore calibration/eval/ from the repository")
    return path.read_text()


def eval_image() -> Path | None:
    path = EVAL_DIR / EVAL_IMAGE
    return path if path.is_file() else None


def eval_requests() -> list:
    """The prompts greedy answers are compared on: two text-only, one about the eval image."""
    from vlm_export.runtime.generation import Request

    image = eval_image()
    requests = [Request.ask("What is the capital of France?"), Request.ask("Write a haiku about the sea.")]
    return requests + ([Request.ask("Describe the image.", image)] if image else [])


@dataclass(frozen=True)
class Chunk:
    start: int  # first id of the chunk in the token stream
    context: int  # ids fed before scoring starts (the first half)
    scored: int  # positions scored: the ids after the context, predicted one by one

    @property
    def length(self) -> int:
        return self.context + self.scored

    def ids(self, stream: list[int], bos: int | None) -> list[int]:
        ids = list(stream[self.start:self.start + self.length])
        if bos is not None:
            ids[0] = bos
        return ids


def chunks(available: int, n_ctx: int, tokens: int) -> list[Chunk]:
    """The chunks that score `tokens` positions of a stream of `available` ids; the last chunk
    scores only what is still needed.

    Raises VlmExportError when the stream is too short for `tokens` at this `n_ctx`."""
    if n_ctx < 4:
        raise VlmExportError(f"n_ctx {n_ctx} is too small to score", "use an n_ctx of at least 4")
    context = n_ctx // 2
    per_chunk = n_ctx - context
    most = (available // n_ctx) * per_chunk
    if tokens > most:
        raise VlmExportError(f"{tokens} scored tokens need more text: {available} ids give at most {most} at n_ctx {n_ctx}",
                             "score fewer tokens, or use a smaller n_ctx")
    out, left = [], tokens
    while left > 0:
        scored = min(per_chunk, left)
        out.append(Chunk(len(out) * n_ctx, context, scored))
        left -= scored
    return out
