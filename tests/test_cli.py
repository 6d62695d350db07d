"""End-to-end through the real `vlm-export` entry point (subprocess: exit codes and stderr as users see them)."""

import re

import pytest

from tests.cli import vlm

COMMANDS = ["inspect", "generate", "export", "build", "run", "verify", "doctor"]




@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_works(command):
    result = vlm(*([command] if command else []), "--help")
    assert result.returncode == 0 and "Usage" in result.stdout


def test_inspect_published_shape():
    out = vlm("inspect", "mobilevlm-1.7b", check=True).stdout
    assert "18,936,832" in out and "(1.36 B)" in out and "vicuna_v1" in out


def test_inspect_checkpoint(v2_checkpoint):
    out = vlm("inspect", str(v2_checkpoint), check=True).stdout
    assert "ldpnetv2" in out and "checkpoint" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "mobilevlm-42b"], "unknown model 'mobilevlm-42b'"),
        (["inspect", "/"], "no config.json"),
        (["generate", "tiny", "--image", "/nonexistent.png"], "does not exist"),
        (["generate", "tiny", "--max-new-tokens", "600"], "exceeds the context of 512"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    result = vlm(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    # one line of error, after the progress lines of what had started (generate: its tokenizer)
    progress = [line for line in lines[:-1] if line.lstrip().startswith(("start ", "done ", "failed "))]
    assert progress == lines[:-1] and lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in result.stderr


def test_debug_shows_traceback():
    result = vlm("--debug", "inspect", "mobilevlm-42b")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_generate_tiny_with_real_photo(photo):
    result = vlm("generate", "tiny", "--image", str(photo), "--prompt", "What is this?", "--max-new-tokens", "5", "--no-stream")
    assert result.returncode == 0, result.stderr
    assert "[torch reference] prompt" in result.stderr and "5 new tokens" in result.stderr
    stages = [re.sub(r" \(\d+\.\d s\)$", "", line) for line in result.stderr.splitlines() if line.lstrip().startswith(("start", "done"))]
    assert stages == ["start  loading tiny (PyTorch reference)", "  start  loading the tokenizer", "  done   loading the tokenizer",
                      "  start  loading the weights", "  done   loading the weights", "done   loading tiny (PyTorch reference)"]
    quiet = vlm("generate", "tiny", "--prompt", "Hi", "--max-new-tokens", "1", "--no-stream", "--quiet")
    assert quiet.returncode == 0 and not any(line.lstrip().startswith(("start", "done")) for line in quiet.stderr.splitlines())


@pytest.mark.parametrize("code, status, stderr", [(3, 3, ""), (None, 0, ""), ("stopped: why", 1, "stopped: why\n")])
def test_the_quick_exit_keeps_what_a_normal_exit_does(code, status, stderr):
    """exit_now skips the interpreter's teardown but still runs the atexit handlers and flushes
    buffered output, with SystemExit's meaning of the code."""
    import subprocess
    import sys

    script = ("import atexit; from vlm_export.cli.entry import exit_now; atexit.register(lambda: print('handler ran'))\n"
              f"print('buffered', end=' '); exit_now({code!r})")
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (status, "buffered handler ran\n", stderr)
