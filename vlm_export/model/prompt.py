"""Conversations -> prompt text, in the template the spec names.

`separator` templates reproduce MobileVLM's conversation class (vicuna `v1`, SeparatorStyle.TWO):
    "{system} USER: <image>\\n{prompt} ASSISTANT:"  with "</s>" after each assistant turn.
`jinja` templates are the model's own chat template (e.g. SmolLM2's ChatML from the GGUF).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_export.errors import VlmExportError
from vlm_export.spec.model_spec import IMAGE_TOKEN, TemplateSpec


@dataclass(frozen=True)
class Message:
    role: str  # "user" | "assistant"
    content: str


def user_turn(prompt: str, with_image: bool) -> Message:
    if IMAGE_TOKEN in prompt:
        raise VlmExportError(f"the prompt contains the reserved marker {IMAGE_TOKEN}", "pass the image with --image instead")
    return Message("user", f"{IMAGE_TOKEN}\n{prompt}" if with_image else prompt)


def _render_separator(template: TemplateSpec, messages: list[Message]) -> str:
    seps = (template.sep, template.sep2)
    text = template.system + seps[0]
    for index, message in enumerate(messages):
        role = template.roles[0] if message.role == "user" else template.roles[1]
        text += f"{role}: {message.content}{seps[index % 2]}"
    return text + f"{template.roles[1]}:"


def _render_jinja(template: TemplateSpec, messages: list[Message], tokenizer) -> str:
    return tokenizer.hf.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        chat_template=template.jinja,
        add_generation_prompt=True,
        tokenize=False,
    )


def render_prompt(template: TemplateSpec, messages: list[Message], tokenizer) -> str:
    """The text the model sees, ending where the assistant's answer starts."""
    if template.kind == "separator":
        return _render_separator(template, messages)
    if template.kind == "jinja":
        return _render_jinja(template, messages, tokenizer)
    raise VlmExportError(f"unknown template kind '{template.kind}'", "use 'separator' or 'jinja'")
