"""The reference LLM's very weights as a llama.cpp GGUF (F32), then quantized by llama.cpp itself to
the bit width being compared (Q8_0 with our int8, Q4_0 with our int4: both block 32).

llama.cpp applies RoPE to interleaved pairs where Hugging Face LLaMA rotates halves, so q/k
projection rows are permuted as llama.cpp's own converter does; the logits then agree with the
reference (checked in tests on a tiny model). The vocabulary is synthetic (the random-weight
presets have no trained tokenizer): `<unk> <s> </s>`, the 256 byte tokens, then placeholders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlm_export.errors import VlmExportError, require_module

# llama_ftype values (LLAMA_FTYPE_MOSTLY_*). Q4_K_M's K-quants need rows that are multiples of 256:
# on narrower models (SmolLM2's 576) llama.cpp falls back to q5_0/q8_0 for most tensors.
QUANT_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}


def _permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _vocab(size: int) -> tuple[list[bytes], list[int]]:
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [2, 3, 3] + [6] * 256  # unknown, control, control, byte
    tokens += [f"tok{i}".encode() for i in range(len(tokens), size)]
    types += [1] * (size - len(types))  # normal
    return tokens[:size], types[:size]


def write_gguf(model, path: Path) -> Path:
    """`model`: the MobileVLM reference (its LLM part is written)."""
    gguf = require_module("gguf", "dev", "writing GGUF files")
    llm = model.spec.llm
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(llm.max_context)
    writer.add_embedding_length(llm.hidden_size)
    writer.add_block_count(llm.num_layers)
    writer.add_feed_forward_length(llm.intermediate_size)
    writer.add_head_count(llm.num_heads)
    writer.add_head_count_kv(llm.num_kv_heads)
    writer.add_rope_dimension_count(llm.head_dim)
    writer.add_rope_freq_base(float(llm.rope_theta))
    writer.add_layer_norm_rms_eps(float(llm.rms_norm_eps))
    writer.add_file_type(0)  # all F32
    tokens, types = _vocab(llm.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(llm.num_layers):
        for hf, ours in names.items():
            weight = state[f"model.layers.{i}.{hf}.weight"]
            if ours == "attn_q":
                weight = _permute_rotary(weight, llm.num_heads)
            elif ours == "attn_k":
                weight = _permute_rotary(weight, llm.num_kv_heads)
            writer.add_tensor(f"blk.{i}.{ours}.weight", np.ascontiguousarray(weight))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not llm.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize_gguf(source: Path, destination: Path, kind: str, threads: int) -> Path:
    llama_cpp = require_module("llama_cpp", "bench", "llama.cpp comparisons")
    if kind not in QUANT_TYPES:
        raise VlmExportError(f"unknown llama.cpp quantization '{kind}'", f"use {', '.join(QUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.nthread = threads
    params.allow_requantize = True  # a source that is itself quantized (then dequantized) is expected
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), params)
    if status != 0:
        raise VlmExportError(f"llama.cpp could not quantize {source.name} to {kind} (status {status})", "check the GGUF file")
    return destination


def dequantize_gguf(source: Path, destination: Path) -> Path:
    """`source` (any llama.cpp quantization) -> `destination` with every tensor in F32 and the same
    metadata (architecture, tokenizer, chat template): the quality baseline of its llama.cpp rows,
    and the input llama.cpp requantizes from."""
    gguf = require_module("gguf", "dev", "reading GGUF files")
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(source))
    architecture = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(destination), architecture)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue  # the header is the writer's; the file type changes
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)  # (rows, cols) numpy order
        writer.add_tensor(tensor.name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return destination


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each llama.cpp type a GGUF holds (a K-quant on rows that are not
    multiples of 256 falls back to q5_0/q8_0: this shows it)."""
    gguf = require_module("gguf", "dev", "reading GGUF files")
    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))
