"""Option types shared by several commands, defined once."""

from typing import Annotated

import typer

ModelArg = Annotated[str, typer.Argument(help="Preset name (see `vlm-export inspect --list`), checkpoint directory, or .gguf file.")]
VisionTowerOpt = Annotated[str | None, typer.Option("--vision-tower", help="Local CLIP directory for checkpoints without the tower (V1).")]
LoraOpt = Annotated[str | None, typer.Option("--lora", help="PEFT LoRA adapter directory, merged at load time.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for random weights.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (by default: a live line on a terminal, otherwise a line per stage start and end).")]
RopeScalingOpt = Annotated[float | None, typer.Option("--rope-scaling", help="Linear RoPE interpolation factor (e.g. 4 for 2k -> 8k).")]
ImageAlphaOpt = Annotated[str | None, typer.Option("--image-alpha", help="Transparent pixels: drop (keep the colour under them, as the official convert('RGB'); default) | composite (blend over the pad colour; recorded in the manifest as a deviation).")]
