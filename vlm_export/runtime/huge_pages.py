"""Transparent huge pages for the weights: a decode step streams every weight once, and with 4 KiB
pages that stream costs a TLB walk per page (measured at the 1.4B shape, 2 cores: int4 decode
+10-17%, an fp32 GEMV 26 -> 31 GB/s).

Most distributions set THP to `madvise`: only memory that asks gets huge pages, and neither ONNX
Runtime's allocator nor llama.cpp's asks. glibc (>= 2.35) asks on every allocator's behalf with the
tunable `glibc.malloc.hugetlb=1`, which it reads once at process start. So the CLI re-executes
itself once with the tunable set, and benchmark workers are started with it. `VLM_EXPORT_HUGE_PAGES=0`
turns this off.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
SWITCH = "VLM_EXPORT_HUGE_PAGES"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The kernel's THP policy: 'always', 'madvise', 'never', or None where there is none."""
    try:
        text = _THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def _glibc_has_tunable() -> bool:
    name, version = platform.libc_ver()
    try:
        return name == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def wanted(env=os.environ) -> bool:
    """True where the tunable would change something: THP on madvise, a glibc that has it, not opted out."""
    return env.get(SWITCH, "1") != "0" and thp_mode() == "madvise" and _glibc_has_tunable()


def active(env=os.environ) -> bool:
    return TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")


def environment(env=os.environ, enabled: bool = True) -> dict:
    """`env` for a child process: with the tunable where it is wanted, or without it (`enabled=False`)."""
    env = dict(env)
    if not enabled:
        kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t != TUNABLE]
        env.pop("GLIBC_TUNABLES", None)
        if kept:
            env["GLIBC_TUNABLES"] = ":".join(kept)
        env[SWITCH] = "0"
    elif wanted(env) and not active(env):
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), TUNABLE]))
    return env


def describe(env=os.environ) -> str:
    mode = thp_mode() or "unavailable"
    return f"THP {mode}" + (f", {TUNABLE}" if active(env) else "")


def reexec_if_wanted() -> None:
    """Replace this process by itself with the tunable set (once: the child sees it set)."""
    if not wanted() or active():
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        os.execve(sys.executable, argv, environment())
    except OSError:
        return  # not fatal: the run goes on with small pages
