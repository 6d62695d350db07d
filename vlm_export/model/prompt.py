"""Conversations -> prompt text, in the template the spec names.

`separator` templates reproduce MobileVLM's conversation class (vicuna `v1`, SeparatorStyle.TWO):
    "{system} USER: <image>\\n{prompt} ASSISTANT:"  with "</s>" after each assistant turn.
`jinja` templates are the model's own chat template (e.g. SmolLM2's ChatML from the GGUF).

The rendered prompt remembers where each message's own text lies (`RenderedPrompt.content_spans`):
the tokenizer turns control strings (`</s>`, `<|im_end|>`) into control tokens only where the
template wrote them, so text a user types can never close a turn or open a new one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Self

from vlm_export.errors import VlmExportError
from vlm_export.spec.model_spec import IMAGE_TOKEN, TemplateSpec


@dataclass(frozen=True)
class Message:
    role: str  # "user" | "assistant"
    content: str


def user_turn(prompt: str, with_image: bool) -> Message:
    if IMAGE_TOKEN in prompt:
        raise VlmExportError(f"the prompt contains the reserved marker {IMAGE_TOKEN}", "pass the image with --image instead")
    if "\x00" in prompt:  # C-string tokenizers (tokenizer.onnx's SentencePiece op) stop there: host and device would differ
        raise VlmExportError("the prompt contains a NUL character (U+0000)", "remove it from the prompt")
    return Message("user", f"{IMAGE_TOKEN}\n{prompt}" if with_image else prompt)


class RenderedPrompt(str):
    """Prompt text (a `str`) that also knows the [start, end) character spans of the messages' own
    text, as opposed to what the template wrote around them."""

    content_spans: tuple[tuple[int, int], ...]

    def __new__(cls, text: str, content_spans=()) -> Self:
        prompt = super().__new__(cls, text)
        prompt.content_spans = tuple(content_spans)
        return prompt


def _render_separator(template: TemplateSpec, messages: list[Message]) -> RenderedPrompt:
    # conv_templates["v1"].get_prompt(), SeparatorStyle.TWO: an empty message renders as "ROLE:"
    # with no separator after it (so an empty prompt is "USER:ASSISTANT:").
    seps = (template.sep, template.sep2)
    text, spans = template.system + seps[0], []
    for index, message in enumerate(messages):
        role = template.roles[0] if message.role == "user" else template.roles[1]
        if not message.content:
            text += f"{role}:"
            continue
        text += f"{role}: "
        spans.append((len(text), len(text) + len(message.content)))
        text += message.content + seps[index % 2]
    return RenderedPrompt(text + f"{template.roles[1]}:", spans)


def _apply_jinja(template: TemplateSpec, contents: list[tuple[str, str]], tokenizer) -> str:
    return tokenizer.hf.apply_chat_template(
        [{"role": role, "content": content} for role, content in contents],
        chat_template=template.jinja, add_generation_prompt=True, tokenize=False,
    )


def _render_jinja(template: TemplateSpec, messages: list[Message], tokenizer) -> RenderedPrompt:
    # Render once with a private-use placeholder per message to find where each message's text
    # lands, then put the text in. If the template rewrites message text (strip, escape), the two
    # renderings disagree and the plain rendering is used with no spans: the old behaviour.
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    marked = _apply_jinja(template, [(m.role, mark) for m, mark in zip(messages, marks)], tokenizer)
    plain = _apply_jinja(template, [(m.role, m.content) for m in messages], tokenizer)
    text, spans, position = "", [], 0
    for match in re.finditer("\ue000(\\d+)\ue001", marked):
        content = messages[int(match.group(1))].content
        text += marked[position:match.start()]
        spans.append((len(text), len(text) + len(content)))
        text += content
        position = match.end()
    text += marked[position:]
    return RenderedPrompt(text, spans) if text == plain else RenderedPrompt(plain)


def render_prompt(template: TemplateSpec, messages: list[Message], tokenizer) -> RenderedPrompt:
    """The text the model sees, ending where the assistant's answer starts."""
    if template.kind == "separator":
        return _render_separator(template, messages)
    if template.kind == "jinja":
        return _render_jinja(template, messages, tokenizer)
    raise VlmExportError(f"unknown template kind '{template.kind}'", "use 'separator' or 'jinja'")
