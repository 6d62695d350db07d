"""CLIP vision tower as MobileVLM uses it: features of `hidden_states[select_layer]`, CLS dropped.

Only the layers up to the selected one run (the official code runs them all and discards the
rest); the full CLIPVisionModel is kept so checkpoint keys load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from vlm_export.spec.model_spec import VisionSpec


def clip_config(spec: VisionSpec) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_act=spec.hidden_act,
        layer_norm_eps=spec.layer_norm_eps,
        attn_implementation="eager",
    )


class CLIPVisionTower(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.spec = spec
        self.vision_tower = CLIPVisionModel(clip_config(spec))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.vision_tower.vision_model
        hidden = vm.pre_layrnorm(vm.embeddings(pixel_values))  # (B, 1 + N, D) = hidden_states[0]
        for layer in vm.encoder.layers[: self.spec.layers_used]:
            hidden = layer(hidden, None, None)[0]
        if self.spec.select_feature == "patch":
            hidden = hidden[:, 1:]  # drop CLS -> (B, N, D)
        return hidden
