"""Build targets, registered by name; a target module is imported only when asked for.

Adding a target = one module with a `build(graphs_dir, out, options) -> dict` and one line here.
"""

from __future__ import annotations

import importlib

from vlm_export.errors import VlmExportError

TARGETS = {"cpu": "vlm_export.targets.cpu", "orin": "vlm_export.targets.orin", "sd888": "vlm_export.targets.sd888"}


def target_module(name: str):
    if name not in TARGETS:
        raise VlmExportError(f"unknown target '{name}'", f"use one of: {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[name])
