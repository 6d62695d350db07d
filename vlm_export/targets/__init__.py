"""Build targets, registered by name; a target module is imported only when asked for.

Adding a target = one module with a `Profile` dataclass, `build(graphs_dir, out, profile) -> dict`
and `cli_help()` (its options' `build --help` text), and one line here.
"""

from __future__ import annotations

import importlib

from vlm_export.errors import VlmExportError

TARGETS = {"cpu": "vlm_export.targets.cpu", "orin": "vlm_export.targets.orin", "sd888": "vlm_export.targets.sd888"}


def option_help() -> dict[str, dict[str, str]]:
    """Profile field -> {target: what that option does there}, from each target's `cli_help()`
    (imports every target: for `build --help` only)."""
    fields: dict[str, dict[str, str]] = {}
    for name in TARGETS:
        for field, text in target_module(name).cli_help().items():
            fields.setdefault(field, {})[name] = text
    return fields


def target_module(name: str):
    if name not in TARGETS:
        raise VlmExportError(f"unknown target '{name}'", f"use one of: {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[name])
