"""Build targets, registered by name. Each is a package with

    profile.py  its recipes (targets/recipe.py: each variant as typed data) and its `Profile`
                dataclass, whose `option()` fields `vlm-export build` takes, with `cli_help()`
                giving their help text; light, so the CLI reads it on start
    target.py   `build(graphs_dir, out, profile) -> report`: its passes, run by the one build loop
                (targets/build_loop.py); `graphs_layouts(profile)`: the decoder layouts it builds
                from, the first preferred (build.py exports or relays out the graphs to match)

Adding a target = one such package and one line in TARGETS; a target's build code is imported
only when that target builds.
"""

from __future__ import annotations

import importlib

from vlm_export.errors import VlmExportError

TARGETS = {"cpu": "vlm_export.targets.cpu", "orin": "vlm_export.targets.orin", "sd888": "vlm_export.targets.sd888"}


def _check(name: str) -> None:
    if name not in TARGETS:
        raise VlmExportError(f"unknown target '{name}'", f"use one of: {', '.join(TARGETS)}")


def profile_module(name: str):
    """The target's profile.py (recipes, Profile, cli_help): no build code is imported."""
    _check(name)
    return importlib.import_module(f"{TARGETS[name]}.profile")


def option_help() -> dict[str, dict[str, str]]:
    """Profile field -> {target: what that option does there}, from each target's `cli_help()`."""
    fields: dict[str, dict[str, str]] = {}
    for name in TARGETS:
        for field, text in profile_module(name).cli_help().items():
            fields.setdefault(field, {})[name] = text
    return fields


def option_flags() -> dict[str, str]:
    """Profile field -> its `build` flag, over every target's `option()` fields."""
    import dataclasses

    from vlm_export.targets.recipe import option_flag

    return {f.name: option_flag(f) for name in TARGETS for f in dataclasses.fields(profile_module(name).Profile)
            if "cli" in f.metadata}


def target_module(name: str):
    """The target's target.py: `build`, `graphs_layouts`, `Profile`, optionally `preflight` (its own
    input checks) and `while_exporting` (work started beside the export)."""
    _check(name)
    return importlib.import_module(f"{TARGETS[name]}.target")
