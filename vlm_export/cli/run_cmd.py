"""`vlm-export run ARTIFACTS`: answer a prompt (about an image) with exported artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vlm_export.cli.errors import handles_errors
from vlm_export.cli.notes import artifact_spec, note_random_vision


@handles_errors
def run(
    artifacts: Annotated[Path, typer.Argument(help="An artifact set (has manifest.json): graphs from `vlm-export export`, or one variant of `vlm-export build` (engines/cpu/smol/int4).")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="User message; repeat for a batch (default with --image: \"Describe the image.\").")] = None,
    image: Annotated[str | None, typer.Option("--image", help="Image for every prompt (omit for text-only).")] = None,
    backend: Annotated[str, typer.Option("--backend", help="torch | torch-cuda | ort | trt")] = "ort",
    providers: Annotated[str | None, typer.Option("--providers", help="ORT providers, comma-separated, in priority order.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Intra-op threads (default: physical cores).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help=">= 1; checked with the sampling settings (one-line error).")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream")] = True,
):
    """Run the generation loop on exported artifacts; prints the answer, then a one-line timing summary."""
    from vlm_export.runtime.runners import keep_transformers_off_torch

    keep_transformers_off_torch(backend)
    from vlm_export.errors import VlmExportError

    if threads is not None and threads < 1:
        raise VlmExportError(f"--threads {threads}: a session needs at least one thread", "pass --threads 1 or more, or leave it out (physical cores)")
    if not prompt:
        if image is None:
            raise VlmExportError("no --prompt and no --image: nothing to answer", 'pass --prompt "..." (and --image PATH for a question about an image)')
        prompt = ["Describe the image."]
    from vlm_export.runtime.api import run_prompts
    from vlm_export.runtime.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    streaming = stream and len(prompt) == 1
    on_token = (lambda _row, text: typer.echo(text, nl=False)) if streaming else None
    results, timings = run_prompts(artifacts, prompt, image=image, backend=backend,
                                   providers=providers.split(",") if providers else None, threads=threads,
                                   params=params, on_token=on_token)
    for index, result in enumerate(results):
        if streaming:
            typer.echo("")
        else:
            typer.echo(("" if len(results) == 1 else f"[{index}] ") + result.text)
    note_random_vision(artifact_spec(artifacts), image)
    typer.echo(
        f"[{backend}] vision {timings['vision_ms']:.0f} ms | TTFT {timings['ttft_ms']:.0f} ms | "
        f"prefill {timings['prefill_tok_s']:.1f} tok/s | decode {timings['decode_tok_s']:.1f} tok/s | "
        f"{_tokens_line(results)}",
        err=True,
    )


def _tokens_line(results) -> str:
    """One request: its counts and stop reason; a batch: each row's (the rows stop at different steps)."""
    if len(results) == 1:
        r = results[0]
        return f"{r.prompt_tokens} prompt tokens, {len(r.token_ids)} new ({r.stop_reason})"
    rows = ", ".join(f"[{i}] {r.prompt_tokens} prompt / {len(r.token_ids)} new ({r.stop_reason})" for i, r in enumerate(results))
    return f"{len(results)} requests: {rows}"
