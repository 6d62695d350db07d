"""Incremental detokenization: streamed text that never has to be taken back.

Decoding one token at a time is wrong twice over: a SentencePiece piece `▁word` decodes alone as
`word` (the leading space is dropped at the start of a text), and a character whose UTF-8 bytes are
split over several byte-fallback / byte-level tokens decodes as U+FFFD until its last byte arrives.
So each push decodes *all* new ids and emits only the part of that text that can no longer change:

    decoded = decode(ids)                      # the whole answer so far
    held    = trailing U+FFFD run              # an incomplete UTF-8 character (may still complete)
            + longest suffix that begins a stop string   # may still turn out to be a stop string
    emit    decoded[len(emitted) : len(decoded) - len(held)]

`finish()` flushes what is held, so the concatenation of everything emitted equals `text`, the
final answer, byte for byte (the tokenizers' decode is prefix-stable: `TextTokenizer.decode` turns
off Hugging Face's clean-up of spaces, the one step that rewrites earlier text).
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


def _held_suffix(text: str, stop_strings: tuple[str, ...]) -> int:
    """Characters at the end of `text` that may still change: an incomplete character or the start of a stop string."""
    held = len(text) - len(text.rstrip(REPLACEMENT))
    body = text[: len(text) - held]
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(body)), 0, -1):
            if body.endswith(stop[:size]):
                held = max(held, len(text) - len(body) + size)
                break
    return held


class TextStream:
    """Token ids in, stable text out.

    decode: ids (list[int]) -> str, the tokenizer's full decode (special tokens skipped).
    stop_strings: text that ends the answer; it and what follows are never emitted.
    on_text: called with each newly stable piece of text (never an empty string).
    After `finish()`, `text` is the answer and equals the concatenation of the pieces emitted.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: tuple[str, ...] = (),
                 on_text: Callable[[str], None] | None = None):
        self.decode, self.stop_strings, self.on_text = decode, tuple(s for s in stop_strings if s), on_text
        self.ids: list[int] = []
        self.text = ""  # decoded so far, cut at a stop string
        self.emitted = ""
        self.stopped = False

    def push(self, token: int) -> None:
        """Add one generated id; sets `stopped` when the text reaches a stop string."""
        self.ids.append(int(token))
        text = self.decode(self.ids)
        cuts = [text.index(s) for s in self.stop_strings if s in text]
        if cuts:
            text, self.stopped = text[: min(cuts)], True
        self.text = text
        if self.stopped:
            self.finish()
        else:
            self._emit(text[: len(text) - _held_suffix(text, self.stop_strings)])

    def finish(self) -> str:
        """Emit whatever is held back (a stop-string prefix that never completed, an incomplete
        character at the very end) and return the final text."""
        self._emit(self.text)
        return self.text

    def _emit(self, stable: str) -> None:
        if len(stable) <= len(self.emitted) or not stable.startswith(self.emitted):
            return
        piece, self.emitted = stable[len(self.emitted):], stable
        if self.on_text is not None:
            self.on_text(piece)
