"""Read an LLM spec and chat template from a GGUF file's metadata (no tensors are read)."""

from __future__ import annotations

from pathlib import Path

from vlm_export.errors import VlmExportError
from vlm_export.spec.model_spec import LLMSpec, TemplateSpec

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    from gguf import GGUFValueType

    value = field.parts[field.data[0]]
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8")
    return value.item() if value.size == 1 else value.tolist()


_READERS: dict[tuple, object] = {}  # (path, size, mtime) -> GGUFReader: one file at a time


def read_gguf_reader(path: Path):
    """gguf-py's reader of `path` (memory-mapped tensors), one per file version and process: its
    constructor parses every metadata field in Python (~5 s for SmolLM2's 49,152-entry vocabulary),
    and one build reads the same GGUF for the spec, the export, a second layout and the weight
    carry-over. Raises VlmExportError for a missing or unreadable file."""
    import gguf.gguf_reader

    path = Path(path)
    if not path.is_file():
        raise VlmExportError(f"GGUF file {path} does not exist", "pass the path of a .gguf file")
    stat = path.stat()
    version = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if version not in _READERS:
        try:
            reader = gguf.gguf_reader.GGUFReader(str(path))  # its home module's name (see model/tokenizer.py)
        except Exception as exc:  # gguf raises ValueError/struct errors on corrupt files
            raise VlmExportError(
                f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})",
                "re-download the file or pass a valid .gguf",
            ) from exc
        _READERS.clear()
        _READERS[version] = reader
    return _READERS[version]


def llm_spec_from_gguf(path: Path) -> tuple[LLMSpec, TemplateSpec | None]:
    reader = read_gguf_reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise VlmExportError(
            f"GGUF file {path} holds a '{arch}' model; only LLaMA-architecture LLMs are supported",
            "use a GGUF of a LLaMA-family model (MobileLLaMA, Vicuna, SmolLM2)",
        )
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    llm = LLMSpec(
        hidden_size=int(_field(reader, f"{arch}.embedding_length")),
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=n_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        vocab_size=int(vocab),
        max_context=int(_field(reader, f"{arch}.context_length", 2048)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings=not has_output,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    jinja = _field(reader, "tokenizer.chat_template")
    template = None
    if jinja:
        template = TemplateSpec(name="gguf_chat_template", kind="jinja", jinja=jinja, add_bos=False)
    return llm, template
