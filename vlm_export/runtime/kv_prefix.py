"""A KV prefix: the keys and values of a sequence's fixed first token(s), computed once in float and
written into the KV cache before the prefill, so an integer-only NPU never computes that position.

Why: LLaMA-class models give their first token "massive activations" (Sun et al., 2024, arXiv
2402.17762): on smol (SmolLM2-135M) the residual stream of position 0 reaches 24,827 at block 20,
where every other token stays below ~1,000 (median ~120). One per-tensor 16-bit activation range
cannot hold both: calibrated with position 0, a typical token's RMSNorm input gets a step of ~16;
calibrated without it, position 0 saturates and the attention sink every later token reads is wrong.
PrefixQuant (Chen et al., 2024, arXiv 2410.05265) keeps such outlier tokens as a precomputed prefix
of the KV cache; we do the same for the chat template's first token, which every templated prompt
shares (`<|im_start|>` for SmolLM2).

A prompt whose first rows equal the prefix's embeddings (compared exactly as float32) drops them:
the result is the function the float graphs compute (position 0 is causal: its K/V depend on nothing
else), for every templated prompt. Any other sequence (raw text, as the eval prose is scored) gets
the prefix in front, one position earlier: an attention sink, as in PrefixQuant. The float stage the
variant is measured against carries the same prefix, so both sides compute the same function; what
differs from the model without it is the raw-text case only.

File: `kv_prefix.npz` beside the graphs, with `embeds` (P, C) float32 and one (num_kv_heads, P,
head_dim) float32 array per `past_key_values.N.key|value` input; the manifest's `kv_prefix` record
names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm_export.errors import VlmExportError

KV_PREFIX = "kv_prefix.npz"


@dataclass
class KvPrefix:
    embeds: np.ndarray  # (P, C) float32: the embeddings of the prefix's tokens
    values: dict[str, np.ndarray]  # past_key_values.N.key|value -> (num_kv_heads, P, head_dim) float32

    @property
    def length(self) -> int:
        return self.embeds.shape[0]

    def applies(self, prompt: np.ndarray) -> bool:
        """prompt (T, C): does it start with the prefix's tokens (and have at least one more)?"""
        return prompt.shape[0] > self.length and np.array_equal(prompt[:self.length].astype(np.float32), self.embeds)

    def save(self, directory: Path) -> dict:
        """Write `kv_prefix.npz` into `directory`; returns the manifest record."""
        np.savez(directory / KV_PREFIX, embeds=self.embeds, **self.values)
        return {"file": KV_PREFIX, "tokens": self.length}

    @classmethod
    def load(cls, directory: Path, record: dict | None) -> KvPrefix | None:
        """The prefix a manifest's `kv_prefix` record names, or None when it has none.
        Raises VlmExportError when the record names a file that is missing or unreadable."""
        if not record:
            return None
        path = Path(directory) / record["file"]
        try:
            with np.load(path) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError) as exc:
            raise VlmExportError(f"cannot read the KV prefix {path} ({exc})", "rebuild the variant with vlm-export build") from exc
        return cls(arrays.pop("embeds"), arrays)


def compute_prefix(generator, embeds: np.ndarray) -> KvPrefix:
    """The K/V of `embeds` (P, C) as the first positions of a sequence, run by `generator` (a
    Generator on float graphs of the static layout)."""
    session = generator.start([embeds], 1)
    cache = session.cache
    slots = np.flatnonzero(cache.valid[0])  # the prefill writes whole chunks; the prompt's rows are the valid ones
    values = {name: np.ascontiguousarray(cache.values[name][0][:, slots]).astype(np.float32) for name in cache.past_names}
    return KvPrefix(embeds.astype(np.float32), values)
