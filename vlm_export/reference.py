"""One-call reference answers: resolve -> load -> template -> generate (API behind `generate`)."""

from __future__ import annotations

import logging

from vlm_export.model.generate import generate_reference
from vlm_export.model.load import load_reference
from vlm_export.model.preprocess import model_pixels
from vlm_export.model.prompt import render_prompt, user_turn
from vlm_export.model.tokenizer import load_tokenizer
from vlm_export.progress import stage
from vlm_export.results import GenerationResult, check_context
from vlm_export.spec import resolve_spec
from vlm_export.spec.model_spec import IMAGE_TOKEN_INDEX

log = logging.getLogger(__name__)


def answer(model: str, prompt: str, image=None, max_new_tokens: int = 64, on_token=None, **resolve_options) -> GenerationResult:
    """Greedy answer of the PyTorch reference to one user prompt (image: a path or PIL image);
    loading shows as progress stages on stderr (the answer streams through `on_token`)."""
    spec = resolve_spec(model, **resolve_options)
    pixels = model_pixels(image, spec) if image is not None else None
    with stage(f"loading {spec.name} (PyTorch reference)"):
        with stage("loading the tokenizer"):
            tokenizer = load_tokenizer(spec.tokenizer)
        text = render_prompt(spec.template, [user_turn(prompt, with_image=image is not None)], tokenizer)
        ids = tokenizer.tokenize_prompt(text, add_bos=spec.template.add_bos)
        rows = sum(t != IMAGE_TOKEN_INDEX for t in ids) + spec.num_image_tokens * ids.count(IMAGE_TOKEN_INDEX)
        check_context(rows, max_new_tokens, spec.llm.max_context)  # before seconds (a 7B: minutes) of weights
        with stage("loading the weights"):
            reference = load_reference(spec)
    log.debug("prompt text: %r", text)
    return generate_reference(reference, tokenizer, text, pixels, max_new_tokens, on_token)
