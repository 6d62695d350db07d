"""What a generation returns, and the context-length rule, shared by the reference and the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm_export.errors import VlmExportError


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    stop_reason: str = ""  # eos | stop_string | max_new_tokens


def check_context(prompt_tokens: int, max_new_tokens: int, max_context: int, what: str = "the context") -> None:
    if prompt_tokens + max_new_tokens > max_context:
        raise VlmExportError(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds {what} of {max_context}",
            "shorten the prompt or lower --max-new-tokens",
        )
