import gguf
import pytest

from vlm_export.errors import VlmExportError
from vlm_export.spec import resolve_spec


def test_gguf_of_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(VlmExportError, match="'gpt2' model; only LLaMA"):
        resolve_spec(str(path))


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(VlmExportError, match="not a readable GGUF"):
        resolve_spec(str(path))
