"""Compile, check and load the kernel library (C sources beside this file)."""

from __future__ import annotations

import contextlib
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


_BUILT: dict[tuple, Path] = {}  # `_key()` -> this process's first build of the library


def sources_digest() -> str:
    """sha256 of the kernel's C sources and headers, in name order (hex)."""
    import hashlib

    files = sorted(SOURCES) + sorted(p.name for p in SOURCE_DIR.glob("*.h"))
    return hashlib.sha256(b"".join((SOURCE_DIR / name).read_bytes() for name in files)).hexdigest()


_COMPILING: dict[tuple, object] = {}  # key -> Future of a compile_soon() still running


def _key() -> tuple:
    """What a built library depends on: the compiler, the sources and their flags."""
    return compiler(), sources_digest(), repr(SOURCES)


def compile_library(directory: Path) -> Path:
    """Builds the library into `directory` (written beside, then renamed: never half a library).
    Compiled once per process and sources: a build's int8 and int4 variants, and the tests, get a
    copy of the first (~2 s of compiler each); one `compile_soon` started is waited for.

    Raises VlmExportError when the kernels cannot be built here (`unavailable_reason`) or the
    compiler fails."""
    reason = unavailable_reason()
    if reason:
        raise VlmExportError(reason, "build with --kernels ort (ONNX Runtime's MatMulNBits)")
    key = _key()
    pending = _COMPILING.pop(key, None)
    if pending is not None:
        with contextlib.suppress(Exception):  # its failure is this call's to report, compiling again
            pending.result()
    return _install(Path(directory), key)


def compile_soon() -> None:
    """Starts compiling the library on a thread of its own (the compilers are processes: they run
    beside whatever this process does), so that a later `compile_library` only copies it. A cpu
    build calls it as it starts: its first quantized variant waited ~2 s for the compiler."""
    if unavailable_reason() is not None:
        return
    key = _key()
    if key in _COMPILING or (key in _BUILT and _BUILT[key].is_file()):
        return
    import atexit
    from concurrent.futures import ThreadPoolExecutor

    folder = Path(tempfile.mkdtemp(prefix="vlm-export-kernels-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    pool = ThreadPoolExecutor(1, thread_name_prefix="vlm-export-compile")
    _COMPILING[key] = pool.submit(_install, folder, key)
    pool.shutdown(wait=False)


def _install(directory: Path, key: tuple) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        partial = Path(scratch) / LIBRARY
        built = _BUILT.get(key)
        if built is not None and built.is_file():
            shutil.copyfile(built, partial)
        else:
            _compile(Path(scratch), partial)
        os.replace(partial, directory / LIBRARY)
    if _BUILT.get(key) is None or not _BUILT[key].is_file():
        _BUILT[key] = _keep(directory / LIBRARY)
    return directory / LIBRARY


def _keep(library: Path) -> Path:
    """A copy of `library` in this process's own temporary folder (removed at exit), so that later
    builds copy it from there whatever happens to the folder it was built in."""
    import atexit

    folder = Path(tempfile.mkdtemp(prefix="vlm-export-kernels-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    shutil.copyfile(library, folder / LIBRARY)
    return folder / LIBRARY


def _compile(scratch: Path, library: Path) -> None:
    """The sources compiled side by side (one compiler process each), then linked into `library`."""
    objects = [str(scratch / (source + ".o")) for source in SOURCES]
    jobs = [subprocess.Popen([compiler(), "-O3", "-fPIC", "-std=gnu11", *flags, "-c", str(SOURCE_DIR / source), "-o", obj],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for (source, flags), obj in zip(SOURCES.items(), objects)]
    failed = [err for job in jobs for _, err in [job.communicate()] if job.returncode != 0]
    if failed:
        _fail(failed[0])
    _run([compiler(), "-shared", "-o", str(library), *objects, "-lm", "-lpthread"])


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        _fail(done.stderr)


def _fail(stderr: str) -> None:
    first = (stderr.strip().splitlines() or ["no output"])[0]
    raise VlmExportError(f"compiling the int4 kernel failed: {first[:200]}", "build with --kernels ort, or fix the C compiler")


def ship_library(library: Path, directory: Path, record: dict) -> None:
    """Puts the built `library` in the variant's `directory` (unless it was built there) and names it
    in the graph's manifest `record`, so that the runtime registers it for that graph."""
    if Path(library).resolve() != (Path(directory) / LIBRARY).resolve():
        shutil.copyfile(library, Path(directory) / LIBRARY)
    record["custom_op_library"] = LIBRARY
