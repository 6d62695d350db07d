"""Artifacts on disk: atomic directories, checksums, manifests, verification.

A stage writes into `<out>.partial-<pid>` and renames it to `<out>` only when everything in it
is complete and the manifest (sizes + sha256 of every file) is written last. A directory without
a valid manifest is never taken for a finished artifact set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path

from vlm_export.errors import VlmExportError, is_interruption

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"  # the tokenizer files (and tokenizer.onnx's sources) inside an artifact set


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


FACTS_KEPT = 4096  # files whose facts the cache keeps (~0.6 MB of JSON)


def _hash_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "vlm-export" / "file-facts.json"


def _identity(path: Path) -> str:
    """What changes whenever a file's bytes may have: device, inode, size, mtime and ctime (ns).
    ctime cannot be set back from user space, so a rewrite with a forged mtime still shows. The
    path is not part of it: a build's staging folder renamed into place keeps its files' facts."""
    return _stat_identity(path.stat())


def _stat_identity(st: os.stat_result) -> str:
    return f"{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _read_facts(cache_path: Path) -> dict:
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_facts(cache_path: Path, cache: dict, key: str, facts: dict) -> None:
    """`cache` with `facts` under `key`. One entry per file (device and inode): an older version's
    facts go; past FACTS_KEPT files, the oldest entries go (files are deleted without telling the cache)."""
    live = {k: v for k, v in cache.items() if k.split("|")[:2] != key.split("|")[:2]}
    live = dict(list(live.items())[-(FACTS_KEPT - 1):])
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")  # processes may write at once
        tmp.write_text(json.dumps({**live, key: facts}))
        os.replace(tmp, cache_path)
    except OSError:
        pass


def _remembered(path: Path, kind: str, compute):
    """compute(path), computed once per version of the file and kept in
    $XDG_CACHE_HOME/vlm-export/file-facts.json (default ~/.cache), keyed by `_identity`. An
    unreadable or unwritable cache only costs the computing."""
    cache_path, key = _hash_cache_path(), _identity(path)
    cache = _read_facts(cache_path)
    facts = cache.get(key) if isinstance(cache.get(key), dict) else {}
    if kind in facts:
        return facts[kind]
    value = compute(path)
    _write_facts(cache_path, cache, key, {**facts, kind: value})
    return value


def sha256_remembered(path: Path) -> str:
    """sha256 of `path`, hashed once per version of the file: a one-token `run` would otherwise
    re-read every weight (0.5 GB for smol's int4 set) on each start."""
    return _remembered(path, "sha256", lambda p: sha256(p))


def file_records(directory: Path) -> dict[str, dict]:
    """Size and sha256 of every file below `directory` but the manifest; the digests are remembered
    (the first `verify` or `run` after a build then reads nothing again)."""
    return {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_remembered(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _keeping_facts(path: Path, change) -> None:
    """change() adds or removes a hard link of `path`'s inode, and the facts known of it are kept:
    the link count moves the inode's ctime, not its bytes, so without this every linked weight file
    would be hashed again. (The open descriptor still names the inode once `path` is unlinked.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        before = _stat_identity(os.fstat(fd))
        change()
        after = _stat_identity(os.fstat(fd))
    finally:
        os.close(fd)
    cache_path = _hash_cache_path()
    cache = _read_facts(cache_path)
    if isinstance(cache.get(before), dict):
        _write_facts(cache_path, cache, after, cache[before])


def remove_tree(directory: Path) -> None:
    """shutil.rmtree, keeping the facts of files still linked elsewhere (an assembled variant's
    weights are hard links into its source's)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in [p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()]:
        with contextlib.suppress(OSError):  # a file gone meanwhile: rmtree below has nothing to do
            if path.stat().st_nlink > 1:
                _keeping_facts(path, path.unlink)
    shutil.rmtree(directory, ignore_errors=True)


def link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link an unchanged artifact into another artifact set (no second copy); copy across filesystems.

    ONNX external-data files are always copied: onnx and ONNX Runtime refuse weights in a file with
    several hard links (their guard against hard-link attacks), which would break both sets.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix == ".data":
        shutil.copy2(source, destination)
        return
    try:
        _keeping_facts(source, lambda: os.link(source, destination))
    except OSError:
        shutil.copy2(source, destination)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _as_umask_allows(directory: Path) -> None:
    """Give every file of an artifact set the read/write bits this process's umask allows: onnx 1.23
    writes external data (`.onnx.data`) with mode 0600, which another user deploying the set (a
    service account on a Jetson, adb on a phone) cannot read, while every other file is 0644."""
    mask = os.umask(0)
    os.umask(mask)
    wanted = 0o666 & ~mask
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & wanted) != wanted:
            path.chmod(path.stat().st_mode | wanted)


def write_manifest(directory: Path, manifest: dict) -> dict:
    _as_umask_allows(directory)  # before the file records: a mode change moves the ctime they are keyed by
    manifest = {**manifest, "files": file_records(directory)}
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise VlmExportError(f"{directory} does not exist (or is not a directory)",
                             "pass graphs from `vlm-export export MODEL`, or one variant of `vlm-export build` (engines/TARGET/MODEL/VARIANT)")
    if not path.is_file():
        variants = sorted(p.parent.name for p in Path(directory).glob(f"*/{MANIFEST}"))
        if variants:  # a build's output folder: one artifact set per variant
            raise VlmExportError(f"{directory} is a build output holding the variants {', '.join(variants)}, not one artifact set",
                                 f"pass one variant, e.g. {Path(directory) / variants[-1]}")
        raise VlmExportError(f"{directory} has no {MANIFEST}: not a finished artifact set", "re-run the export/build that makes it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VlmExportError(f"{path} is corrupt ({exc})", "re-run the export/build that makes it") from exc


def _external_locations(model_path: Path) -> list[str]:
    """The external-data file names an ONNX model's tensors point at (the graph parsed without its
    inline weights: milliseconds, where onnx.load took ~2 s on a 1.2 GB CLIP-L)."""
    import onnx

    from vlm_export.onnx_wire import read_without_weights

    model, _ = read_without_weights(model_path)
    return sorted({next((e.value for e in tensor.external_data if e.key == "location"), "")
                   for tensor in onnx.external_data_helper._get_all_tensors(model)
                   if tensor.data_location == onnx.TensorProto.EXTERNAL})


def check_external_data(model_path: Path) -> None:
    """ONNX external-data locations must stay inside the artifact directory (no absolute paths, no `..`,
    no link out). The locations are read once per version of the file; where they lead is checked every time."""
    root = model_path.parent.resolve()
    try:
        locations = _remembered(model_path, "external_data", _external_locations)
    except ValueError as exc:  # onnx_wire: not a protobuf message
        raise VlmExportError(f"{model_path} is not a readable ONNX graph ({exc})", "re-run the export/build") from exc
    for location in locations:
        target = (root / location).resolve()
        if Path(location).is_absolute() or ".." in Path(location).parts or root not in target.parents:
            raise VlmExportError(f"{model_path} points its weights outside the artifact directory ('{location}'), refused",
                                 "re-export the graphs; never load graphs whose external data escape their folder")


def verify(directory: Path, check_hashes: bool = True) -> dict:
    """Every file the manifest lists exists with its size (and sha256); raises naming the first bad one."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, record in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise VlmExportError(f"{path} is missing from the artifact set", "re-run the export/build")
        if path.stat().st_size != record["bytes"] or (check_hashes and sha256_remembered(path) != record["sha256"]):
            raise VlmExportError(f"{path} does not match its manifest checksum (tampered or incomplete)", "re-run the export/build")
    for name in manifest.get("files", {}):
        if name.endswith(".onnx"):
            check_external_data(directory / name)
    for graph in manifest.get("graphs", []):
        if graph.get("qnn"):  # a context binary must be for the SoC the set says it is for
            check_binary(directory / graph["qnn"]["context_binary"], graph["qnn"]["soc"])
    return manifest


def prepare_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise VlmExportError(f"output {out} exists and is not a directory", "choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        if (out / MANIFEST).is_file():  # a finished export (a finished build is the build loop's to judge)
            raise VlmExportError(f"{out} already holds a finished export",
                                 "use it as it is (vlm-export run / verify), pass --force to rebuild it, or choose another --out")
        raise VlmExportError(f"output directory {out} is not empty", "pass --force to replace it or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VlmExportError(f"cannot create {out.parent} ({exc.strerror})", "choose a writable --out") from exc
    if not os.access(out.parent, os.W_OK):
        raise VlmExportError(f"output location {out.parent} is not writable", "choose a writable --out")


STAGE_DIR = ".stage"  # per-stage completion records inside a staging directory


def stage_key(*parts) -> str:
    """A build-cache key: sha256 of the JSON of everything a stage's output depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Staging:
    """A staging directory that remembers finished stages, so an interrupted build resumes.

    A stage is recorded only after its files are complete (key + file sha256); on resume it is
    reused when its key and files still match, and redone otherwise.
    """

    def __init__(self, path: Path):
        self.path = path
        (path / STAGE_DIR).mkdir(parents=True, exist_ok=True)

    def _record_path(self, name: str) -> Path:
        return self.path / STAGE_DIR / f"{name}.json"

    def cached(self, name: str, key: str) -> dict | None:
        record_path = self._record_path(name)
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            return None
        files_ok = all((self.path / f).is_file() and sha256_remembered(self.path / f) == digest for f, digest in record["files"].items())
        return record["result"] if record["key"] == key and files_ok else None

    def remember(self, name: str, key: str, files: list[str], result: dict) -> None:
        # remembered digests: the manifest's file_records then reads these files no second time
        digests = {f: sha256_remembered(self.path / f) for f in files if (self.path / f).is_file()}
        write_json_atomic(self._record_path(name), {"key": key, "files": digests, "result": result})

    def finish(self) -> None:
        shutil.rmtree(self.path / STAGE_DIR, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False):
    """Yield a Staging; on success it replaces `out`. One process at a time writes `out`: a second
    one started meanwhile stops with an error instead of sharing (and wiping) the staging folder.

    Interrupted (Ctrl-C, kill): the staging directory stays, without a manifest (so `verify`
    refuses it), and the next run resumes from its finished stages. Failed (bad validation, full
    disk, any error): it is removed.
    """
    out = Path(out)
    prepare_output(out, force)
    with _writer_lock(out.with_name(f"{out.name}.partial"), out), _staged(out) as staging:
        yield staging


@contextlib.contextmanager
def _staged(out: Path):
    staging = Staging(out.with_name(f"{out.name}.partial"))
    with _InterruptGuard() as guard:
        try:
            yield staging
        except BaseException as exc:
            if is_interruption(exc) or guard.hit:
                raise KeyboardInterrupt from exc  # keep the staging directory: the next run resumes
            _discard(staging.path, exc, out)
            raise
        if guard.hit:  # a library swallowed the KeyboardInterrupt: still never finish
            raise KeyboardInterrupt
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging.path, out)


@contextlib.contextmanager
def _writer_lock(staging: Path, out: Path):
    """An exclusive flock on the staging folder itself for the block: held by the open descriptor, so it
    goes with the process however it ends, and leaves no lock file behind.

    Raises VlmExportError when another process holds it."""
    import fcntl

    staging.mkdir(parents=True, exist_ok=True)
    handle = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VlmExportError(f"another vlm-export process is writing {out} right now",
                                 "wait for it to finish, or pass another output folder") from None
        yield
    finally:
        os.close(handle)


class _InterruptGuard:
    """SIGINT/SIGTERM during a stage raise KeyboardInterrupt *and* are remembered, so an interrupt
    that a library catches and swallows still stops the output from being renamed into place."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.hit, self.previous = False, {}

    def _handler(self, signum, frame):
        self.hit = True
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _discard(staging: Path, exc: BaseException, out: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        raise VlmExportError(f"the disk filled up while writing {out}", "free space and re-run") from exc


# -- QNN context binaries ---------------------------------------------------------------------------
_BINARY_SOC = re.compile(rb"soc_type=([A-Za-z0-9]+);arch=([0-9a-z]+)")


def binary_soc(path: Path) -> tuple[str, str] | None:
    """The SoC and HTP arch a QNN context binary was compiled for (from its embedded config)."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 20)  # the config block sits in the header
    match = _BINARY_SOC.search(head)
    return (match.group(1).decode(), match.group(2).decode()) if match else None


def check_binary(path: Path, soc: str) -> None:
    """The emulator runs a binary built for any SoC; the phone does not. Raises VlmExportError on a
    mismatch or a file that is no context binary."""
    found = binary_soc(path)
    if found is None:
        raise VlmExportError(f"{Path(path).name} is not a QNN context binary (no SoC record in it)", "rebuild it")
    if found[0] != soc:
        raise VlmExportError(f"{Path(path).name} was compiled for {found[0]} (HTP v{found[1]}), not {soc}",
                             f"rebuild with `vlm-export build MODEL --target sd888 --soc {soc}`")
