"""Progress on stderr: stage lines where stderr is not a terminal, nothing with --quiet, native noise kept off."""

from __future__ import annotations

import os
import re

import pytest

from tests.cli import vlm
from vlm_export import progress


@pytest.fixture(autouse=True)
def shown():
    progress.configure(quiet=False)
    yield
    progress.configure(quiet=False)


def _without_seconds(text: str) -> list[str]:
    return [re.sub(r"\(\d+\.\d s\)$", "(N s)", line) for line in text.splitlines()]


def test_nested_stages_print_start_and_end_lines(capsys):
    with progress.stage("building tiny"):
        progress.step("not a line: steps show on a terminal only")
        with progress.stage("building int4"):
            pass
    assert _without_seconds(capsys.readouterr().err) == [
        "start  building tiny",
        "  start  building int4",
        "  done   building int4 (N s)",
        "done   building tiny (N s)",
    ]


def test_a_failing_stage_says_failed_and_the_error_passes(capsys):
    with pytest.raises(ValueError), progress.stage("exporting decoder.onnx"):
        raise ValueError("boom")
    assert _without_seconds(capsys.readouterr().err)[-1] == "failed exporting decoder.onnx (N s)"


def test_quiet_prints_nothing(capsys):
    progress.configure(quiet=True)
    with progress.stage("building tiny"), progress.stage("building int4"):
        progress.step("quantizing")
    assert capsys.readouterr().err == ""


def test_native_noise_is_dropped_and_the_rest_passed_on(capfd):
    with progress.native_stderr_filtered(stdout=True):
        os.write(2, b"normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.\n")
        os.write(1, b" # LIBNATIVE: No alternate configuration present in libnative_tls.conf or from LIBNATIVE_CONFIG "
                    b"environment variable - using default thread-local behavior.\n")
        os.write(2, b"a real native warning\n")
        os.write(1, b"a real native line on stdout\n")
    captured = capfd.readouterr()
    assert captured.err == "a real native warning\n" and captured.out == "a real native line on stdout\n"


def test_export_shows_stages_and_no_sentencepiece_noise(tmp_path):
    result = vlm("export", "tiny", "--out", tmp_path / "graphs")
    assert result.returncode == 0, result.stderr
    assert _without_seconds(result.stderr) == [
        f"start  exporting tiny (dynamic layout, fp32) to {tmp_path / 'graphs'}",
        "  start  exporting vision.onnx",
        "  done   exporting vision.onnx (N s)",
        "  start  exporting embed.onnx",
        "  done   exporting embed.onnx (N s)",
        "  start  exporting decoder.onnx",
        "  done   exporting decoder.onnx (N s)",
        "  start  writing the tokenizer",
        "  done   writing the tokenizer (N s)",
        f"done   exporting tiny (dynamic layout, fp32) to {tmp_path / 'graphs'} (N s)",
    ]


def test_export_quiet_prints_nothing_on_stderr(tmp_path):
    result = vlm("export", "tiny", "--out", tmp_path / "graphs", "--quiet")
    assert result.returncode == 0 and result.stderr == ""
    assert "wrote" in result.stdout
