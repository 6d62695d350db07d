"""Parity with the official MobileVLM pipeline, written out here independently of vlm_export:
`process_images` + `expand2square`, `conv_templates["v1"]`, `tokenizer_image_token`, and greedy
`generate` over inputs_embeds (Hugging Face's LlamaForCausalLM with the checkpoint's LLM weights;
the image features spliced where IMAGE_TOKEN_INDEX stands). Synthetic V1 and V2 checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_export.model.load import load_reference
from vlm_export.model.preprocess import model_pixels
from vlm_export.model.prompt import render_prompt, user_turn
from vlm_export.model.tokenizer import load_tokenizer
from vlm_export.reference import answer
from vlm_export.spec import resolve_spec

IMAGE_TOKEN_INDEX = -200
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# -- the official pipeline, as mobilevlm/conversation.py, utils.py and model/mobilevlm.py write it ---
def official_prompt(question: str | None, with_image: bool) -> str:
    message = ("<image>\n" + question) if with_image else question
    ret = SYSTEM + " "
    for i, (role, msg) in enumerate([("USER", message), ("ASSISTANT", None)]):
        ret += role + ": " + msg + [" ", "</s>"][i % 2] if msg else role + ":"
    return ret


def official_tokenizer_image_token(prompt: str, hf_tokenizer) -> list[int]:
    chunks = [hf_tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == hf_tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    separated = [e for sub in zip(chunks, [[IMAGE_TOKEN_INDEX] * (offset + 1)] * len(chunks)) for e in sub][:-1]
    for x in separated:
        ids.extend(x[offset:])
    return ids


def official_expand2square(image, background):
    width, height = image.size
    if width == height:
        return image
    result = Image.new(image.mode, (max(width, height),) * 2, background)
    result.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


def official_process_images(image_file, aspect: str | None) -> np.ndarray:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                   image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    image = Image.open(image_file).convert("RGB")
    if aspect == "pad":
        image = official_expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    return processor.preprocess(image, return_tensors="np")["pixel_values"]


def official_generate(ckpt, ids: list[int], pixels: np.ndarray | None, max_new_tokens: int, **options) -> list[int]:
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_json_file(str(ckpt / "config.json"))
    llm = LlamaForCausalLM(config).eval()
    files = sorted(ckpt.glob("*.safetensors")) or sorted(ckpt.glob("pytorch_model*.bin"))
    tensors = {k: v for f in files for k, v in (load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)).items()}
    state = {k: v.float() for k, v in tensors.items() if not k.startswith(("model.vision_tower", "model.mm_projector"))}
    llm.load_state_dict(state, strict=True)
    embed = llm.get_input_embeddings()
    pieces, start = [], 0
    for pos in [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX] + [len(ids)]:
        pieces.append(embed(torch.tensor(ids[start:pos])))
        if pos < len(ids):  # the image features: the model's own vision tower + projector
            reference = load_reference(resolve_spec(str(ckpt), **options))
            pieces.append(reference.encode_images(torch.from_numpy(pixels))[0])
        start = pos + 1
    embeds = torch.cat(pieces)[None]
    with torch.no_grad():
        out = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                           max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[0].tolist()


# -- the images the issue names: RGB photo, RGBA with a transparent third, 8-bit grey, a thin strip ---
@pytest.fixture(scope="module")
def images(tmp_path_factory, photo):
    root = tmp_path_factory.mktemp("parity-images")
    rgb = Image.open(photo).convert("RGB")
    rgba = rgb.convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[:, : rgba.size[0] // 3] = 0  # the colour under these pixels is kept by convert("RGB")
    rgba.putalpha(Image.fromarray(alpha))
    paths = {"rgb": root / "rgb.jpg", "rgba": root / "rgba.png", "grey": root / "grey.png", "thin": root / "thin.png"}
    rgb.save(paths["rgb"])
    rgba.save(paths["rgba"])
    rgb.convert("L").save(paths["grey"])
    rgb.crop((0, 100, 400, 112)).save(paths["thin"])
    return paths


@pytest.mark.parametrize("kind", ["rgb", "rgba", "grey", "thin"])
@pytest.mark.parametrize("aspect", ["pad", None])
def test_preprocessing_matches_official(images, v2_checkpoint, kind, aspect):
    spec = resolve_spec(str(v2_checkpoint)).replace(image_aspect_ratio=aspect or "square")
    np.testing.assert_array_equal(model_pixels(images[kind], spec), official_process_images(images[kind], aspect))


def test_missing_aspect_key_means_no_padding(tmp_path, v1_checkpoint):
    import json
    import shutil

    ckpt, clip = v1_checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["image_aspect_ratio"]
    (copy / "config.json").write_text(json.dumps(config))
    assert resolve_spec(str(copy), vision_tower=str(clip)).image_aspect_ratio == "square"
    assert resolve_spec(str(ckpt), vision_tower=str(clip)).image_aspect_ratio == "pad"


@pytest.mark.parametrize("question", ["What is in the image?", ""])
@pytest.mark.parametrize("with_image", [True, False])
def test_prompt_ids_match_official(v2_checkpoint, question, with_image):
    spec = resolve_spec(str(v2_checkpoint))
    tokenizer = load_tokenizer(spec.tokenizer)
    prompt = render_prompt(spec.template, [user_turn(question, with_image)], tokenizer)
    assert str(prompt) == official_prompt(question, with_image)
    assert tokenizer.tokenize_prompt(prompt) == official_tokenizer_image_token(official_prompt(question, with_image), tokenizer.hf)


@pytest.mark.parametrize("which", ["v1", "v2"])
@pytest.mark.parametrize("kind", ["rgb", "rgba", None])
def test_greedy_tokens_match_official(images, v1_checkpoint, v2_checkpoint, which, kind):
    ckpt, options = (v1_checkpoint[0], {"vision_tower": str(v1_checkpoint[1])}) if which == "v1" else (v2_checkpoint, {})
    image = images[kind] if kind else None
    question = "What is in the image?"
    ours = answer(str(ckpt), question, image=image, max_new_tokens=12, **options)
    spec = resolve_spec(str(ckpt), **options)
    ids = official_tokenizer_image_token(official_prompt(question, image is not None), load_tokenizer(spec.tokenizer).hf)
    pixels = official_process_images(image, spec.image_aspect_ratio) if image else None
    official = official_generate(ckpt, ids, pixels, 12, **options)
    assert len(ours.token_ids) >= 4 and ours.token_ids == official[: len(ours.token_ids)]
