"""`build --help` groups options by target and takes each target's text from its own profile data."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys

import pytest

from vlm_export.targets import TARGETS, option_help, target_module


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
    assert "int4 = decoder weights int4 weight-only, activations fp16, TensorRT flags fp16" in text


def test_options_are_grouped_by_target(build_help):
    panels = dict(re.findall(r"╭─ (--target [^─]+?) ─+╮\n(.*?)╰", build_help, re.DOTALL))
    assert set(panels) == {"--target cpu | orin | sd888", "--target cpu", "--target orin", "--target orin | sd888",
                           "--target sd888"}
    assert "--kernels" in panels["--target cpu"] and "--device" in panels["--target orin"]
    assert "--soc" in panels["--target sd888"] and "--max-context" in panels["--target orin | sd888"]


@pytest.mark.parametrize("target", list(TARGETS))
def test_help_describes_real_profile_fields_with_their_defaults(target):
    module = target_module(target)
    fields = {f.name: f.default for f in dataclasses.fields(module.Profile)}
    described = module.cli_help()
    assert set(described) <= set(fields)
    assert f"default {','.join(fields['variants'])}" in described["variants"]


def test_every_target_option_of_build_is_described():
    from vlm_export.cli.build_cmd import OPTION_FIELDS, build

    described = option_help()
    common = {"model", "target", "graphs", "out", "force", "strict", "vision_tower", "lora", "seed", "quiet", "image_alpha"}
    for name in inspect.signature(build).parameters:
        if name not in common:
            assert OPTION_FIELDS.get(name, name) in described, name


def test_starting_the_cli_imports_no_target():
    code = "import sys, vlm_export.cli.app; print(sorted(m for m in sys.modules if m.startswith('vlm_export.targets.')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
