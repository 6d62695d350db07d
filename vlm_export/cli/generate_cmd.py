"""`vlm-export generate MODEL --prompt TEXT [--image IMG]`: greedy answer from the PyTorch reference."""

from __future__ import annotations

from typing import Annotated

import typer

from vlm_export.cli.errors import handles_errors
from vlm_export.cli.notes import note_random_vision
from vlm_export.cli.options import ImageAlphaOpt, LoraOpt, ModelArg, QuietOpt, RopeScalingOpt, SeedOpt, VisionTowerOpt


@handles_errors
def generate(
    model: ModelArg = "smol",
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The user's message.")] = "What is the capital of France?",
    image: Annotated[str | None, typer.Option("--image", help="Image file to ask about.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help=">= 1; checked with the sampling settings (one-line error).")] = 64,
    stream: Annotated[bool, typer.Option("--stream/--no-stream")] = True,
    vision_tower: VisionTowerOpt = None,
    lora: LoraOpt = None,
    seed: SeedOpt = 0,
    rope_scaling: RopeScalingOpt = None,
    image_alpha: ImageAlphaOpt = None,
    quiet: QuietOpt = False,
):
    """Answer a prompt (optionally about an image) with the PyTorch reference model, greedily."""
    from vlm_export.errors import require_export_extra

    require_export_extra("the PyTorch reference model")
    from vlm_export.progress import configure
    from vlm_export.reference import answer
    from vlm_export.runtime.sampling import SamplingParams
    from vlm_export.spec import resolve_spec

    SamplingParams(max_new_tokens=max_new_tokens)  # refuses an out-of-range value as `run` does
    configure(quiet=quiet)  # loading smol's weights takes seconds, a 7B preset's minutes: say so
    on_token = (lambda text: typer.echo(text, nl=False)) if stream else None
    result = answer(
        model, prompt, image=image, max_new_tokens=max_new_tokens, on_token=on_token,
        vision_tower=vision_tower, lora=lora, seed=seed, rope_scaling_factor=rope_scaling, image_alpha=image_alpha,
    )
    typer.echo("" if stream else result.text)
    note_random_vision(resolve_spec(model, vision_tower=vision_tower), image)
    t = result.timings
    typer.echo(
        f"[torch reference] prompt {result.prompt_tokens} tok, vision {t['vision_ms']:.0f} ms, "
        f"TTFT {t['ttft_ms']:.0f} ms, decode {t['decode_tok_s']:.1f} tok/s, {len(result.token_ids)} new tokens",
        err=True,
    )
