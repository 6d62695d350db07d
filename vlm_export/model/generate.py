"""Greedy generation with the PyTorch reference and its KV cache (nanoGPT-sized on purpose).

The shared multi-backend loop (runtime/) is checked against this.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from vlm_export.errors import VlmExportError
from vlm_export.model.mobilevlm import MobileVLMForCausalLM
from vlm_export.model.text_stream import TextStream
from vlm_export.model.tokenizer import TextTokenizer
from vlm_export.results import GenerationResult, check_context
from vlm_export.spec.model_spec import IMAGE_TOKEN_INDEX


@torch.no_grad()
def generate_reference(
    model: MobileVLMForCausalLM,
    tokenizer: TextTokenizer,
    prompt_text: str,
    pixel_values: np.ndarray | None = None,
    max_new_tokens: int = 64,
    on_token: Callable[[str], None] | None = None,
) -> GenerationResult:
    if max_new_tokens < 1:
        raise VlmExportError(f"max_new_tokens {max_new_tokens} is out of range", "pass an integer >= 1")
    ids = tokenizer.tokenize_prompt(prompt_text, add_bos=model.spec.template.add_bos)
    if (IMAGE_TOKEN_INDEX in ids) != (pixel_values is not None):
        raise VlmExportError("the prompt's image markers and the images given do not match", "pass --image once per <image>")
    start = time.perf_counter()
    image_embeds = model.encode_images(torch.from_numpy(pixel_values)) if pixel_values is not None else None
    vision_done = time.perf_counter()
    embeds = model.splice_image_embeds(ids, image_embeds)[None]  # (1, T, C)
    check_context(embeds.shape[1], max_new_tokens, model.spec.llm.max_context)
    out = model(inputs_embeds=embeds, use_cache=True)
    first_token = time.perf_counter()
    stop = set(model.spec.llm.eos_token_ids)
    stream = TextStream(tokenizer.decode, on_text=on_token)  # streams whole characters and words' spaces
    new_ids = stream.ids
    while len(new_ids) < max_new_tokens:
        token = int(out.logits[0, -1].argmax())
        if token in stop:
            break
        stream.push(token)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    end = time.perf_counter()
    decode_steps = max(len(new_ids) - 1, 1)
    return GenerationResult(
        text=stream.finish(),
        token_ids=new_ids,
        prompt_tokens=embeds.shape[1],
        timings={
            "vision_ms": (vision_done - start) * 1e3,
            "ttft_ms": (first_token - start) * 1e3,
            "decode_tok_s": decode_steps / max(end - first_token, 1e-9),
        },
    )
