"""`vlm-export doctor`: the real probes on this machine, and what is derived from missing pieces."""

from __future__ import annotations

import subprocess
import sys

import onnxruntime
import pytest

from tests.cli import vlm
from vlm_export import doctor
from vlm_export.doctor import Finding, check_machine, format_report


def test_doctor_lists_onnxruntime_and_every_section():
    result = vlm("doctor")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [l for l in lines if not l.startswith("  ")] == ["installed:", "build:", "run:"]
    # The CLI's fresh process lists the wheel's own providers; this test process may have registered
    # the QNN plug-in already (another test did), so ask a fresh interpreter too.
    fresh = subprocess.run([sys.executable, "-c", "import onnxruntime as o; print(', '.join(o.get_available_providers()))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert f"  ok   onnxruntime   {onnxruntime.__version__}, providers {fresh}" in lines
    assert any(l.startswith("  ok   build --target cpu    fp32, int8, int4") for l in lines)


def _missing(name: str, fix: str) -> callable:
    return lambda: Finding(name, False, f"{name} missing", fix)


def test_missing_compiler_and_qnn_change_what_build_and_run_say(monkeypatch):
    monkeypatch.setitem(doctor.PROBES, "c compiler", _missing("c compiler", "apt-get install gcc, or set CC"))
    monkeypatch.setitem(doctor.PROBES, "qnn", _missing("qnn", "pip install 'vlm-export[qnn]' (Linux x86-64 wheel)"))
    report = check_machine()
    build = {x["name"]: x for x in report["build"]}
    run = {x["name"]: x for x in report["run"]}
    assert build["build --target cpu"]["detail"] == "fp32, int8, int4 on MatMulNBits (--kernels auto falls back)"
    assert "qnn NOT buildable" in build["build --target sd888"]["detail"]
    assert build["build --target sd888"]["fix"] == "pip install 'vlm-export[qnn]' (Linux x86-64 wheel)"
    assert run["run sd888 qnn"]["usable"] is False
    text = format_report(report).splitlines()
    assert "  no   c compiler    c compiler missing -- fix: apt-get install gcc, or set CC" in text
    assert any(l.startswith("  part build --target sd888  cpu-int8, cpu-int4; qnn NOT buildable") for l in text)


@pytest.mark.parametrize("name", list(doctor.PROBES))
def test_every_probe_answers_here(name):
    finding = doctor.PROBES[name]()
    assert finding.name == name and finding.detail
    assert finding.usable or finding.fix  # what is missing always comes with its fix


def _without_torch(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))


def test_runtime_only_install_is_reported_with_the_export_extra(monkeypatch):
    """No PyTorch (`pip install vlm-export` without extras): run stays usable, build does not."""
    _without_torch(monkeypatch)
    report = check_machine()
    installed = {x["name"]: x for x in report["installed"]}
    assert installed["pytorch"]["usable"] is False and installed["pytorch"]["fix"] == "pip install 'vlm-export[export]'"
    assert installed["cuda gpu"]["detail"] == "not probed: PyTorch is not installed"
    assert all(not x["usable"] and x["fix"] == "pip install 'vlm-export[export]'" for x in report["build"])
    assert {x["name"]: x["usable"] for x in report["run"]}["run --backend ort"] is True


def test_commands_that_need_pytorch_name_the_extra(monkeypatch):
    from vlm_export.errors import MissingExtraError, require_export_extra

    require_export_extra("exporting graphs")  # PyTorch is here: nothing raised
    _without_torch(monkeypatch)
    with pytest.raises(MissingExtraError) as caught:
        require_export_extra("exporting graphs")
    assert caught.value.one_line() == ("exporting graphs needs the Python module 'torch', which is not installed "
                                       "-- fix: pip install 'vlm-export[export]'")
