"""End-to-end agreement through the generation loop: greedy tokens, teacher-forced top-1
agreement and KL divergence per step, and perplexity on a text sample.

Teacher forcing: the reference's greedy continuation is fed to both sides through the loop's
own prefill and decode steps, so every position is compared on the same context. Perplexity
scores the text in one call on a dynamic decoder that returns all logits (`export --logits all`,
the default), one token per call on the others.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlm_export.runtime.artifact_set import ArtifactSet
from vlm_export.runtime.generation import Generator, Request
from vlm_export.runtime.sampling import SamplingParams

EVAL_DIR = Path(__file__).resolve().parents[2] / "calibration" / "eval"


def eval_requests() -> list[Request]:
    images = sorted(EVAL_DIR.glob("*.jpg"))[:1] if EVAL_DIR.is_dir() else []
    requests = [Request.ask("What is the capital of France?"), Request.ask("Write a haiku about the sea.")]
    return requests + ([Request.ask("Describe the image.", images[0])] if images else [])


def eval_text() -> str:
    path = EVAL_DIR / "text.txt"
    return path.read_text() if path.is_file() else "The quick brown fox jumps over the lazy dog."


def full_logits(generator: Generator, embeds: np.ndarray) -> np.ndarray:
    """(T, C) embeddings -> (T, V) logits in one dynamic-decoder call with an empty cache."""
    runner = generator.runners["decoder"]
    llm = generator.spec.llm
    length = embeds.shape[0]
    empty = np.zeros((1, llm.num_kv_heads, 0, llm.head_dim), dtype=generator.float_dtype)
    feeds = {"inputs_embeds": embeds[None].astype(generator.float_dtype), "attention_mask": np.ones((1, length), np.int64),
             "position_ids": np.arange(length, dtype=np.int64)[None]}
    feeds.update({f"past_key_values.{i}.{k}": empty for i in range(llm.num_layers) for k in ("key", "value")})
    return runner.to_numpy(runner.infer(feeds)["logits"])[0].astype(np.float64)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def forced_logits(generator: Generator, request: Request, tokens: list[int]) -> np.ndarray:
    """(len(tokens), V) logits predicting each of `tokens`, fed one by one after the prompt: the
    generation loop's own prefill and decode steps, so it works for either decoder layout."""
    prompt, _ = generator.encode(request, _image_embeds(generator, request))
    kv, logits, positions = generator._prefill([prompt], len(tokens) + 1)
    rows = [logits[0]]
    decoder = generator.decode_graph
    for token in tokens[:-1]:
        embeds = generator._embed_ids([token])[None]
        logits = generator._step(decoder, kv, embeds, np.ones((1, 1), np.int64), positions[:, None])
        positions = positions + 1
        rows.append(logits[0])
    return np.stack(rows).astype(np.float64)


def teacher_forced(reference: Generator, candidate: Generator, request: Request, tokens: list[int]) -> dict:
    if not tokens:
        return {"top1": 1.0, "kl": 0.0}
    ref = _log_softmax(forced_logits(reference, request, tokens))
    cand = _log_softmax(forced_logits(candidate, request, tokens))
    kl = (np.exp(ref) * (ref - cand)).sum(axis=-1)
    return {"top1": float((ref.argmax(-1) == cand.argmax(-1)).mean()), "kl": float(kl.mean())}


def _image_embeds(generator: Generator, request: Request):
    return generator._image_embeds([request.image])[0] if request.image is not None else None


def stepped_logits(generator: Generator, embeds: np.ndarray) -> np.ndarray:
    """(T, C) -> (T, V) logits, one token per call through the loop's own steps: any layout
    (the static and inplace decoders return only the last position's logits)."""
    kv, logits, positions = generator._prefill([embeds[:1]], embeds.shape[0])
    rows = [logits[0]]
    for row in embeds[1:]:
        logits = generator._step(generator.decode_graph, kv, row[None, None], np.ones((1, 1), np.int64), positions[:, None])
        positions = positions + 1
        rows.append(logits[0])
    return np.stack(rows).astype(np.float64)


def perplexity(generator: Generator, text: str) -> float:
    ids = generator.tokenizer.encode(text, add_bos=generator.spec.template.add_bos)
    embeds = generator._embed_ids(ids)
    logits = full_logits(generator, embeds) if generator.layout == "dynamic" else stepped_logits(generator, embeds)
    logp = _log_softmax(logits)
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def agreement(reference: Generator, candidate: Generator, new_tokens: int = 16) -> dict:
    greedy = SamplingParams(max_new_tokens=new_tokens)
    rows = []
    for request in eval_requests():
        expected = reference.generate([request], greedy)[0].token_ids
        got = candidate.generate([request], greedy)[0].token_ids
        same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        rows.append({"greedy_prefix_agreement": same / max(len(expected), 1), "identical": expected == got,
                     **teacher_forced(reference, candidate, request, expected)})
    text = eval_text()
    return {
        "prompts": len(rows),
        "new_tokens": new_tokens,
        "greedy_prefix_agreement": float(np.mean([r["greedy_prefix_agreement"] for r in rows])),
        "identical_outputs": sum(r["identical"] for r in rows),
        "top1_agreement": float(np.mean([r["top1"] for r in rows])),
        "mean_kl": float(np.mean([r["kl"] for r in rows])),
        "perplexity_reference": perplexity(reference, text),
        "perplexity_candidate": perplexity(candidate, text),
    }


def open_generator(directory: Path, backend: str) -> Generator:
    return Generator(ArtifactSet.open(directory, check_hashes=False), backend)


def accuracy_vs_fp32(fp32_dir: Path, variant_dir: Path, new_tokens: int = 16) -> dict:
    """End-to-end agreement of a built variant with fp32 graphs, both on ONNX Runtime (what build reports use)."""
    with open_generator(fp32_dir, "ort") as reference, open_generator(variant_dir, "ort") as candidate:
        return agreement(reference, candidate, new_tokens)
