"""Compile, check and load the kernel library (C sources beside this file)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from vlm_export.errors import VlmExportError

LIBRARY = "libvlm_export_cpu_kernels.so"
DOMAIN = "vlm_export.cpu"
SOURCE_DIR = Path(__file__).parent
# Only the kernel is built for AVX-512; the op glue checks the CPU before anything runs it.
SOURCES = {"int4_matmul.c": ["-mavx512f", "-mavx512bw", "-mavx512vnni", "-mfma"], "attention.c": ["-mavx512f", "-mfma"],
           "ort_custom_op.c": []}
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")


def compiler() -> str | None:
    """$CC when set (and only it), else cc, gcc or clang."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def unavailable_reason() -> str | None:
    """Why the kernels cannot be built or run on this machine, or None when they can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the int4 kernel is x86-64 Linux only (this is {platform.system()} {platform.machine()})"
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    missing = [f for f in CPU_FLAGS if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}, which the int4 kernel needs"
    if compiler() is None:
        named = f"$CC={os.environ['CC']}" if os.environ.get("CC") else "cc, gcc or clang"
        return f"no C compiler ({named}) to build the int4 kernel"
    return None


def compile_library(directory: Path) -> Path:
    """Builds the library into `directory` (written beside, then renamed: never half a library)."""
    reason = unavailable_reason()
    if reason:
        raise VlmExportError(reason, "build with --kernels ort (ONNX Runtime's MatMulNBits)")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        objects = []
        for source, flags in SOURCES.items():
            objects.append(str(Path(scratch) / (source + ".o")))
            _run([compiler(), "-O3", "-fPIC", "-std=gnu11", *flags, "-c", str(SOURCE_DIR / source), "-o", objects[-1]])
        partial = Path(scratch) / LIBRARY
        _run([compiler(), "-shared", "-o", str(partial), *objects, "-lm", "-lpthread"])
        os.replace(partial, directory / LIBRARY)
    return directory / LIBRARY


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no output"])[0]
        raise VlmExportError(f"compiling the int4 kernel failed: {first[:200]}", "build with --kernels ort, or fix the C compiler")


def ship_library(library: Path, directory: Path, record: dict) -> None:
    """Puts the built `library` in the variant's `directory` (unless it was built there) and names it
    in the graph's manifest `record`, so that the runtime registers it for that graph."""
    if Path(library).resolve() != (Path(directory) / LIBRARY).resolve():
        shutil.copyfile(library, Path(directory) / LIBRARY)
    record["custom_op_library"] = LIBRARY
