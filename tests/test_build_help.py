"""`build --help` groups options by target and takes each target's text from its own profile data."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
import typing

import pytest

from vlm_export.targets import TARGETS, option_help, profile_module


@pytest.fixture(scope="module")
def build_help() -> str:
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "vlm_export", "build", "--help"], capture_output=True, text=True, env=env,
                          check=True)
    return done.stdout


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("│", " "))


def test_orin_variants_name_int4(build_help):
    text = _flat(build_help)
    assert "orin: comma-separated subset of fp16,int8,int4 (default fp16,int8,int4)" in text
    assert ("int4 = decoder weights int4 weight-only after AWQ (a GGUF's Q4_1 blocks kept exactly), activations fp16, "
            "TensorRT flags fp16") in text


def test_options_are_grouped_by_target(build_help):
    panels = dict(re.findall(r"╭─ (--target [^─]+?) ─+╮\n(.*?)╰", build_help, re.DOTALL))
    assert set(panels) == {"--target cpu | orin | sd888", "--target cpu", "--target orin", "--target orin | sd888",
                           "--target sd888"}
    assert "--kernels" in panels["--target cpu"] and "--device" in panels["--target orin"]
    assert "--soc" in panels["--target sd888"] and "--max-context" in panels["--target orin | sd888"]


@pytest.mark.parametrize("target", list(TARGETS))
def test_help_describes_real_profile_fields_with_their_defaults(target):
    module = profile_module(target)
    fields = {f.name: f.default for f in dataclasses.fields(module.Profile)}
    described = module.cli_help()
    assert set(described) <= set(fields)
    assert f"default {','.join(fields['variants'])}" in described["variants"]


def test_build_options_are_the_profiles_option_fields():
    """Every Profile field declared with option() is a build option (and nothing else is), each described."""
    from vlm_export.cli.build_cmd import COMMON, build

    declared = {f.name for t in TARGETS for f in dataclasses.fields(profile_module(t).Profile) if "cli" in f.metadata}
    generated = set(inspect.signature(build).parameters) - {p.name for p in COMMON}
    assert generated == declared
    assert declared <= set(option_help())
    assert {"variants", "layout", "kv", "kernels", "device", "vision_on_dla", "soc", "qnn_graphs"} <= declared


def test_a_new_profile_field_is_a_new_option(monkeypatch):
    """A newcomer's profile field becomes an option with no edit to the CLI."""
    from vlm_export.cli import build_cmd
    from vlm_export.targets.cpu import profile
    from vlm_export.targets.recipe import option

    @dataclasses.dataclass(frozen=True)
    class Extended(profile.Profile):
        threads_hint: int | None = option(None)

    monkeypatch.setattr(profile, "Profile", Extended)
    described = profile.cli_help()
    monkeypatch.setattr(profile, "cli_help", lambda: {**described, "threads_hint": "a test option"})
    parameter = build_cmd._signature().parameters["threads_hint"]
    info = typing.get_args(parameter.annotation)[1]
    assert "--threads-hint" in (info.default, *info.param_decls) and info.rich_help_panel == "--target cpu"


def test_starting_the_cli_imports_no_target_build_code():
    """The profiles (pure data) are read to generate `build`'s options; no target's build code, no ONNX."""
    code = ("import sys, vlm_export.cli.app; print(sorted(m for m in sys.modules if m.endswith('.target') "
            "and m.startswith('vlm_export.targets.')), 'onnx' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[] False"
