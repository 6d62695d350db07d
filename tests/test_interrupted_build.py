"""Ctrl-C during an export leaves nothing `verify` accepts; the same command resumes from the finished stages."""

import json
import signal
import subprocess
import sys
import time


def vlm(*args):
    return [sys.executable, "-m", "vlm_export", *args]


def test_interrupt_then_resume(tmp_path):
    out = tmp_path / "tiny"
    process = subprocess.Popen(vlm("export", "tiny", "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "tiny.partial" / ".stage" / "vision.json"
    deadline = time.time() + 120
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert marker.exists(), "the vision stage never finished"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and not out.exists()
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted") and "Traceback" not in stderr
    refused = subprocess.run(vlm("verify", str(tmp_path / "tiny.partial")), capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "no manifest.json" in refused.stderr

    resumed = subprocess.run(vlm("export", "tiny", "--out", str(out)), capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "vision.onnx" in resumed.stdout and "cached" in resumed.stdout.split("vision.onnx")[1].splitlines()[0]
    assert "  cached vision.onnx (unchanged inputs" in resumed.stderr  # the progress lines say so as it happens
    verified = subprocess.run(vlm("verify", str(out)), capture_output=True, text=True, check=False)
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"ok: {out} — {len(files)} files, ") and "checksums match" in verified.stdout
    assert not (tmp_path / "tiny.partial").exists()


def test_a_second_writer_of_the_same_output_is_refused(tmp_path):
    """Two exports or builds into one folder would share (and wipe) one staging folder: the second is
    refused with a one-line error while the first runs, and the first finishes untouched."""
    import pytest

    from vlm_export.artifacts import atomic_directory
    from vlm_export.errors import VlmExportError

    out = tmp_path / "graphs"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from vlm_export.artifacts import atomic_directory\n"
        f"with atomic_directory(Path({str(out)!r})) as staging:\n"
        "    (staging.path / 'first.txt').write_text('1'); print('in', flush=True); time.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "in"
        with pytest.raises(VlmExportError, match="another vlm-export process is writing .*graphs right now"), \
                atomic_directory(out):
            pass
        assert (tmp_path / "graphs.partial" / "first.txt").read_text() == "1"  # left as the first writer had it
    finally:
        holder.kill()
        holder.wait()
    with atomic_directory(out, force=True) as staging:  # the holder is gone: its lock went with it
        (staging.path / "second.txt").write_text("2")
    assert (out / "second.txt").read_text() == "2"
