"""Describe a model: its resolved spec and parameter counts (the API behind `vlm-export inspect`)."""

from __future__ import annotations

from vlm_export.model.load import build_on_meta
from vlm_export.spec import resolve_spec
from vlm_export.spec.model_spec import ModelSpec

# parameter_counts() keys -> the part names of WeightsSpec.untrained()
COUNTED_PARTS = {"vision_tower": "vision_tower", "projector": "mm_projector", "llm": "llm"}


def weight_origins(spec: ModelSpec) -> dict[str, str]:
    """Per part: `trained` (from the checkpoint or GGUF) or `seeded-random`."""
    untrained = spec.weights.untrained()
    return {part: "seeded-random" if name in untrained else "trained" for part, name in COUNTED_PARTS.items()}


def _format(spec: ModelSpec, counts: dict[str, int], origins: dict[str, str]) -> str:
    v, llm, t = spec.vision, spec.llm, spec.template
    rope = f"theta {llm.rope_theta:g}" + (f", linear x{llm.rope_scaling_factor:g}" if llm.rope_scaling_factor else "")
    weights = spec.weights.source + (f" ({spec.weights.path})" if spec.weights.path else f" (seed {spec.weights.seed})")
    billions = f"({counts['llm'] / 1e9:.2f} B)"
    lines = [
        f"model          {spec.name}",
        f"weights        {weights}",
        (f"vision tower   {v.name}: ViT {v.image_size}px/{v.patch_size}, width {v.hidden_size}, {v.num_layers} layers, "
         f"{v.num_heads} heads; select layer {v.select_layer} ({v.layers_used} layers run), feature '{v.select_feature}'"),
        f"projector      {spec.projector_type}: {v.num_patches} patch tokens -> {spec.num_image_tokens} visual tokens",
        (f"LLM            LLaMA: hidden {llm.hidden_size}, {llm.num_layers} layers, {llm.num_heads} heads "
         f"({llm.num_kv_heads} KV), FFN {llm.intermediate_size}, vocab {llm.vocab_size}, "
         f"RMSNorm eps {llm.rms_norm_eps:g}, RoPE {rope}, tied embeddings {llm.tie_word_embeddings}"),
        f"context        {llm.max_context} tokens",
        f"tokenizer      {spec.tokenizer.kind}: {spec.tokenizer.path}",
        f"template       {t.name} ({t.kind})",
        f"image aspect   {spec.image_aspect_ratio}",
        f"{'parameters':<42}weights",
        f"  vision tower {counts['vision_tower']:>15,}  {'':<9} {origins['vision_tower']}",
        f"  projector    {counts['projector']:>15,}  {'':<9} {origins['projector']}",
        f"  LLM          {counts['llm']:>15,}  {billions:<9} {origins['llm']}",
        f"  total        {counts['total']:>15,}",
    ]
    lines += [f"note           {n}" for n in spec.notes]
    return "\n".join(lines)


def describe_model(model: str, **resolve_options) -> dict:
    spec = resolve_spec(model, **resolve_options)
    counts = build_on_meta(spec).parameter_counts()
    origins = weight_origins(spec)
    return {"spec": spec.to_dict(), "parameters": counts, "weights": origins, "text": _format(spec, counts, origins)}
