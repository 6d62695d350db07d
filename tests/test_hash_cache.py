"""`verify` hashes each file once per version: a rewrite is caught even with its mtime forged."""

from __future__ import annotations

import os

import pytest

from vlm_export import artifacts
from vlm_export.artifacts import verify, write_manifest
from vlm_export.errors import VlmExportError


@pytest.fixture
def artifact_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "set"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"a" * 4096)
    write_manifest(out, {"kind": "test"})
    return out


def test_second_verify_reads_no_file(artifact_dir, monkeypatch):
    verify(artifact_dir)
    monkeypatch.setattr(artifacts, "sha256", lambda path: pytest.fail(f"re-hashed {path}"))
    monkeypatch.setattr(artifacts, "_external_locations", lambda path: pytest.fail(f"re-parsed {path}"))
    verify(artifact_dir)


def test_rewrite_with_forged_mtime_is_caught(artifact_dir):
    verify(artifact_dir)
    path = artifact_dir / "weights.bin"
    before = path.stat()
    path.write_bytes(b"b" * 4096)  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same mtime; ctime moves regardless
    with pytest.raises(VlmExportError, match="does not match its manifest checksum"):
        verify(artifact_dir)


def test_unwritable_cache_still_verifies(artifact_dir, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file where the cache folder should be
    assert verify(artifact_dir)["kind"] == "test"


def test_a_written_manifest_and_a_renamed_folder_need_no_hashing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    staging = tmp_path / "set.partial"
    staging.mkdir()
    (staging / "weights.bin").write_bytes(b"w" * 4096)
    write_manifest(staging, {"kind": "test"})  # hashes once, and remembers
    staging.rename(tmp_path / "set")  # as a finished build is moved into place
    monkeypatch.setattr(artifacts, "sha256", lambda path: pytest.fail(f"re-hashed {path}"))
    assert verify(tmp_path / "set")["kind"] == "test"


def test_linking_and_unlinking_keep_the_remembered_digest(artifact_dir, tmp_path, monkeypatch):
    from vlm_export.artifacts import link_or_copy, remove_tree

    verify(artifact_dir)
    other = tmp_path / "other"
    link_or_copy(artifact_dir / "weights.bin", other / "weights.bin")  # moves the inode's ctime
    write_manifest(other, {"kind": "test"})
    hashed = []
    monkeypatch.setattr(artifacts, "sha256", lambda path: hashed.append(path) or pytest.fail(f"re-hashed {path}"))
    remove_tree(other)  # unlinking moves it again
    assert not other.exists() and verify(artifact_dir)["kind"] == "test" and hashed == []


def test_a_forged_mtime_is_still_caught_after_a_link(artifact_dir, tmp_path):
    from vlm_export.artifacts import link_or_copy

    verify(artifact_dir)
    link_or_copy(artifact_dir / "weights.bin", tmp_path / "twin" / "weights.bin")
    path = artifact_dir / "weights.bin"
    before = path.stat()
    path.write_bytes(b"c" * 4096)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(VlmExportError, match="does not match its manifest checksum"):
        verify(artifact_dir)


def test_an_artifact_set_is_readable_as_the_umask_allows(tmp_path):
    """onnx writes external data with mode 0600; a finished set's files get the umask's read bits."""
    import os

    from vlm_export.artifacts import write_manifest

    data, script = tmp_path / "decoder.onnx.data", tmp_path / "lib.so"
    data.write_bytes(b"weights")
    data.chmod(0o600)
    script.write_bytes(b"\x7fELF")
    script.chmod(0o755)
    mask = os.umask(0o022)
    try:
        write_manifest(tmp_path, {"kind": "test"})
    finally:
        os.umask(mask)
    assert data.stat().st_mode & 0o777 == 0o644 and script.stat().st_mode & 0o777 == 0o755
