"""Tokenizers behind one small interface: SentencePiece, Hugging Face dirs, GGUF-embedded.

Ids of the image marker (IMAGE_TOKEN_INDEX) are produced by `tokenize_prompt`, exactly as the
official `tokenizer_image_token`: each text chunk tokenized on its own, BOS kept only once.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from vlm_export.errors import VlmExportError
from vlm_export.spec.model_spec import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, TokenizerSpec

log = logging.getLogger(__name__)


@dataclass
class TextTokenizer:
    hf: object  # a transformers PreTrainedTokenizer(Fast)

    @functools.cached_property
    def vocab_size(self) -> int:
        return len(self.hf)  # ~5 ms for fast tokenizers: computed once

    def encode(self, text: str, add_bos: bool) -> list[int]:
        return list(self.hf(text, add_special_tokens=add_bos)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        # A stand-in tokenizer can be smaller than a random model's vocabulary: show those as unk.
        unk = self.hf.unk_token_id if self.hf.unk_token_id is not None else 0
        size = self.vocab_size
        safe = [i if 0 <= i < size else unk for i in ids]
        return self.hf.decode(safe, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    def tokenize_prompt(self, prompt: str, add_bos: bool = True) -> list[int]:
        """Prompt text with `<image>` markers -> ids with IMAGE_TOKEN_INDEX at each marker."""
        ids: list[int] = []
        for index, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
            if index:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(self.encode(chunk, add_bos=add_bos and index == 0))
        return ids


def load_tokenizer(spec: TokenizerSpec) -> TextTokenizer:
    path = Path(spec.path) if spec.path else None
    try:
        if spec.kind == "sentencepiece":
            from transformers import LlamaTokenizer

            config_dir = path.parent
            if (config_dir / "tokenizer_config.json").is_file():
                hf = LlamaTokenizer.from_pretrained(str(config_dir))
            else:
                hf = LlamaTokenizer(vocab_file=str(path), legacy=True)
        elif spec.kind == "hf":
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(path))
        elif spec.kind == "gguf":
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            raise VlmExportError(f"unknown tokenizer kind '{spec.kind}'", "use sentencepiece, hf or gguf")
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise VlmExportError(f"cannot load tokenizer {path} ({str(exc).splitlines()[0]})", "restore the checkpoint's tokenizer files") from exc
    return TextTokenizer(hf)
