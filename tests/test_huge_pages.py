"""Huge pages for the weights: glibc's tunable, set for the CLI (by re-executing once) and for bench workers."""

import os
import subprocess
import sys

from vlm_export.runtime import huge_pages


def test_environment_adds_or_strips_the_tunable(monkeypatch):
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(huge_pages, "_glibc_has_tunable", lambda: True)
    env = huge_pages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + huge_pages.TUNABLE and huge_pages.active(env)
    off = huge_pages.environment(env, enabled=False)
    assert off["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2" and off[huge_pages.SWITCH] == "0"
    assert not huge_pages.wanted(off)  # an opted-out child does not turn it back on
    assert huge_pages.environment({}, enabled=False).get("GLIBC_TUNABLES") is None


def test_nothing_to_ask_where_the_kernel_gives_huge_pages_anyway(monkeypatch):
    monkeypatch.setattr(huge_pages, "_glibc_has_tunable", lambda: True)
    for mode in ("always", "never", None):
        monkeypatch.setattr(huge_pages, "thp_mode", lambda mode=mode: mode)
        assert not huge_pages.wanted({}) and "GLIBC_TUNABLES" not in huge_pages.environment({})


def test_the_process_re_executes_itself_once_with_the_tunable():
    code = ("import os; from vlm_export.runtime.huge_pages import reexec_if_wanted; reexec_if_wanted(); "
            "print(os.environ.get('GLIBC_TUNABLES', ''))")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", huge_pages.SWITCH)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert (huge_pages.TUNABLE in out.split(":")) == huge_pages.wanted(env)
    env[huge_pages.SWITCH] = "0"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert out == ""
