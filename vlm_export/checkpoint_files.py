"""Find and read the weight files of a Hugging Face-layout checkpoint, safely.

Layouts: `model.safetensors`, `model.safetensors.index.json` + shards, `pytorch_model.bin`,
`pytorch_model.bin.index.json` + shards. `.bin` files load with `weights_only=True` only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from vlm_export.errors import VlmExportError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint, in a stable order."""
    for index_name in INDEX_FILES:
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise VlmExportError(f"{index} is not a valid shard index ({exc})", "restore the checkpoint's index file") from exc
            files = [directory / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise VlmExportError(
                    f"{index} names shard(s) that are missing: {', '.join(missing[:3])}",
                    "download every shard of the checkpoint",
                )
            return files
    for name in SINGLE_FILES:
        if (directory / name).is_file():
            return [directory / name]
    loose = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if loose:
        return loose
    raise VlmExportError(
        f"no weights found in {directory} (looked for *.safetensors and pytorch_model*.bin)",
        "point at a checkpoint directory that holds its weight files",
    )


def _read_safetensors(path: Path, shapes_only: bool):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable (no __iter__): keys() is its listing
                yield key, (tuple(handle.get_slice(key).get_shape()) if shapes_only else handle.get_tensor(key))
    except (SafetensorError, OSError, ValueError) as exc:
        raise VlmExportError(
            f"{path} is truncated or corrupt ({exc})", "re-download this weight file"
        ) from exc


def _read_bin(path: Path, shapes_only: bool):
    import pickle

    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise VlmExportError(
            f"{path} is a pickle that needs more than plain tensors to load, refused for safety ({str(exc).splitlines()[0]})",
            "convert the checkpoint to safetensors with a tool you trust",
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise VlmExportError(f"{path} is truncated or corrupt ({str(exc).splitlines()[0]})", "re-download this weight file") from exc
    if not isinstance(state, dict):
        raise VlmExportError(f"{path} does not hold a state dict", "point at a checkpoint's weight files")
    for key, tensor in state.items():
        yield key, (tuple(tensor.shape) if shapes_only else tensor)


def iter_tensors(files: list[Path], shapes_only: bool = False) -> Iterator[tuple[str, object]]:
    """Yield (name, tensor) -- or (name, shape) -- from every file, one file at a time."""
    for path in files:
        reader = _read_safetensors if path.suffix == ".safetensors" else _read_bin
        yield from reader(path, shapes_only)


def weight_shapes(directory: Path) -> dict[str, tuple]:
    return dict(iter_tensors(weight_files(directory), shapes_only=True))
