"""Tokenizers behind one small interface: SentencePiece, Hugging Face dirs, GGUF-embedded.

Ids of the image marker (IMAGE_TOKEN_INDEX) are produced by `tokenize_prompt`, exactly as the
official `tokenizer_image_token`: each text chunk tokenized on its own, BOS kept only once.

One rule for control strings (`</s>`, `<s>`, `<unk>`, `<|im_end|>`: the tokenizer's special added
tokens): they become control tokens only where the chat template wrote them. Inside a message's
own text they stay text (llama.cpp's default for user content), so "Hi </s> there" typed by a user
is the SentencePiece pieces of those characters, exactly what `tokenizer.onnx` gives on a device.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from vlm_export.errors import VlmExportError
from vlm_export.model.tokenizers_backend import proven
from vlm_export.spec.model_spec import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, TokenizerSpec

log = logging.getLogger(__name__)


@dataclass
class TextTokenizer:
    hf: object  # a transformers PreTrainedTokenizer(Fast), or a tokenizers_backend.BACKENDS one (that API without transformers)

    @functools.cached_property
    def vocab_size(self) -> int:
        return len(self.hf)  # ~5 ms for fast tokenizers: computed once

    def encode(self, text: str, add_bos: bool) -> list[int]:
        """Template text -> ids; control strings in it become control tokens (Hugging Face's default)."""
        return list(self.hf(text, add_special_tokens=add_bos)["input_ids"])

    def encode_text(self, text: str, add_bos: bool = False) -> list[int]:
        """A message's own text -> ids; control strings in it stay text."""
        return list(self.hf(text, add_special_tokens=add_bos, split_special_tokens=True)["input_ids"])

    @functools.cached_property
    def control_tokens(self) -> dict[str, int]:
        """Control strings -> ids: the special added tokens (`<s>`, `</s>`, `<unk>`, `<|im_end|>`, ...)."""
        return {t.content: i for i, t in self.hf.added_tokens_decoder.items() if t.special and t.content}

    @functools.cached_property
    def _leading_specials(self) -> list[int]:
        return list(self.hf("", add_special_tokens=True)["input_ids"])  # BOS, where the tokenizer adds one

    @functools.cached_property
    def _control_pattern(self) -> re.Pattern | None:
        # Longest first, so `<|im_end|>` wins over any shorter control string it contains.
        names = sorted(self.control_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, names))) if names else None

    def _control_matches(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, id) of every control string in `text`, leftmost-longest, not overlapping."""
        if self._control_pattern is None:
            return []
        return [(m.start(), m.end(), self.control_tokens[m.group()]) for m in self._control_pattern.finditer(text)]

    def _encode_chunk(self, text: str, spans: list[tuple[int, int]], add_bos: bool) -> list[int]:
        matches = self._control_matches(text)
        in_content = [any(s < e2 and s2 < e for s2, e2 in spans) for s, e, _ in matches]
        if not any(in_content):
            return self.encode(text, add_bos)  # no control string typed by the user: Hugging Face's own ids
        # Split where the template wrote control strings (Hugging Face splits there too), and
        # tokenize every run between them with control strings kept as text.
        ids, start = (list(self._leading_specials) if add_bos else []), 0
        for (begin, end, token), typed in zip(matches, in_content):
            if typed:
                continue
            ids += self.encode_text(text[start:begin]) + [token]
            start = end
        return ids + self.encode_text(text[start:])

    def decode(self, ids: list[int]) -> str:
        # A stand-in tokenizer can be smaller than a random model's vocabulary: show those as unk.
        unk = self.hf.unk_token_id if self.hf.unk_token_id is not None else 0
        size = self.vocab_size
        safe = [i if 0 <= i < size else unk for i in ids]
        # No clean-up of spaces: it rewrites text already decoded (" 'm" -> "'m"), so a streamed
        # answer could not equal the final one. (MobileVLM's LLaMA tokenizer has it off already.)
        return self.hf.decode(safe, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def tokenize_prompt(self, prompt: str, add_bos: bool = True) -> list[int]:
        """Prompt text with `<image>` markers -> ids with IMAGE_TOKEN_INDEX at each marker.

        `prompt` from `render_prompt` (a RenderedPrompt) knows which spans are message text: control
        strings there stay text. A plain `str` is all template text (Hugging Face's behaviour)."""
        content_spans = getattr(prompt, "content_spans", ())
        ids: list[int] = []
        offset = 0
        for index, chunk in enumerate(str(prompt).split(IMAGE_TOKEN)):
            if index:
                ids.append(IMAGE_TOKEN_INDEX)
            end = offset + len(chunk)
            spans = [(max(s, offset) - offset, min(e, end) - offset) for s, e in content_spans if s < end and offset < e]
            ids.extend(self._encode_chunk(chunk, spans, add_bos=add_bos and index == 0))
            offset = end + len(IMAGE_TOKEN)
        return ids


_LOADED: dict[tuple, TextTokenizer] = {}  # per process: a build opens the same tokenizer ~8 times (~1 s each)


def _files_key(path: Path | None) -> tuple:
    """The tokenizer folder's file versions (name, size, mtime; a model file's folder holds its
    tokenizer_config.json): a file rewritten in place is loaded again."""
    if path is None or not path.exists():
        return ()
    folder = path if path.is_dir() else path.parent
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


@contextlib.contextmanager
def _parsed_gguf():
    """transformers' GGUF tokenizer loader parses the whole file with gguf-py twice (once for the
    config, once for the vocabulary: ~5 s each for SmolLM2's 49,152 entries, all in Python). Within
    this block `gguf.GGUFReader`, which transformers 4.57 imports at call time, hands out this
    process's parsed reader of the same file version instead (spec/gguf_meta.read_gguf_reader, the
    one the spec and the weights were read with); any other use gets the real class."""
    import gguf

    from vlm_export.spec.gguf_meta import read_gguf_reader

    original = gguf.GGUFReader

    def parsed(path, *args, **kwargs):
        return original(path, *args, **kwargs) if args or kwargs else read_gguf_reader(Path(path))

    gguf.GGUFReader = parsed
    try:
        yield
    finally:
        gguf.GGUFReader = original


def tokenizer_spec_in(directory: Path) -> TokenizerSpec:
    """How the runtime loads the tokenizer an export saved in `directory` (its `tokenizer/` folder)."""
    # A saved fast tokenizer (tokenizer.json) is authoritative; GGUF-born ones also write a stray
    # tokenizer.model that the slow LLaMA tokenizer cannot read. Where the export proved a backend
    # without transformers equal to it on this folder, that one is used (tokenizers_backend.py).
    if proven(directory):
        return TokenizerSpec(kind="direct", path=str(directory))
    if (directory / "tokenizer.model").is_file() and not (directory / "tokenizer.json").is_file():
        return TokenizerSpec(kind="sentencepiece", path=str(directory / "tokenizer.model"))
    return TokenizerSpec(kind="hf", path=str(directory))


def load_tokenizer(spec: TokenizerSpec) -> TextTokenizer:
    """The tokenizer a spec names (kept per process while its files are unchanged: callers share it
    and must not change its settings). Raises VlmExportError when its files cannot be read."""
    path = Path(spec.path) if spec.path else None
    key = (spec.kind, str(path), _files_key(path))
    if key not in _LOADED:
        _LOADED[key] = _load(spec, path)
    return _LOADED[key]


def _load(spec: TokenizerSpec, path: Path | None) -> TextTokenizer:
    try:
        if spec.kind == "sentencepiece":
            from transformers import LlamaTokenizer

            config_dir = path.parent
            if (config_dir / "tokenizer_config.json").is_file():
                hf = LlamaTokenizer.from_pretrained(str(config_dir))
            else:
                hf = LlamaTokenizer(vocab_file=str(path), legacy=True)
        elif spec.kind == "direct":  # a folder the export proved equal to transformers (tokenizers_backend.py)
            from vlm_export.model.tokenizers_backend import open_proven

            hf = open_proven(path)
        elif spec.kind == "hf":
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(path))
        elif spec.kind == "gguf":
            from transformers import AutoTokenizer

            with _parsed_gguf():
                hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            raise VlmExportError(f"unknown tokenizer kind '{spec.kind}'", "use sentencepiece, hf, direct or gguf")
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise VlmExportError(f"cannot load tokenizer {path} ({str(exc).splitlines()[0]})", "restore the checkpoint's tokenizer files") from exc
    return TextTokenizer(hf)
