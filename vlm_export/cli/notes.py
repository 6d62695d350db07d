"""Lines the CLI prints beside an answer so that it is not taken for more than it is."""

from __future__ import annotations

from pathlib import Path

import typer

from vlm_export.spec.model_spec import ModelSpec


def note_random_vision(spec: ModelSpec, image: str | None) -> None:
    """On stderr, one line when an image was asked about and the model's vision tower or projector
    is seeded-random (the `smol` demo, the random presets): such answers are meaningless."""
    note = spec.random_image_note() if image else None
    if note:
        typer.echo(note, err=True)


def artifact_spec(directory: Path) -> ModelSpec:
    """The model spec an artifact set's manifest records (its `model`, weights origin included)."""
    from vlm_export.artifacts import read_manifest
    from vlm_export.spec.model_spec import spec_from_dict

    return spec_from_dict(read_manifest(directory)["model"])
