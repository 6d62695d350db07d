"""The runtime's tokenizers without transformers (model/tokenizers_backend.py): proven by the export,
equal to transformers id for id and character for character, and refused where they are not."""

from __future__ import annotations

import json
import random
import shutil
import string
import subprocess
import sys

import pytest

from vlm_export.model.tokenizer import tokenizer_spec_in
from vlm_export.model.tokenizers_backend import CHECK_FILE, SentencePieceBackend, check, proven

PIECES = [*string.ascii_letters, *string.digits, *"  \t\n.,!?'\"<>/", "<s>", "</s>", "<unk>", "é", "日本", "🙂",
          "\u0301", "\u2581", "  ", "\n\n", "<0x0A>"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_graphs):
    from transformers import LlamaTokenizer

    folder = tiny_graphs / "tokenizer"
    return folder, LlamaTokenizer.from_pretrained(str(folder))


def test_the_export_proves_the_sentencepiece_backend_and_the_runtime_uses_it(tiny_graphs):
    record = json.loads((tiny_graphs / "manifest.json").read_text())["tokenizer_graph"]["runtime_tokenizer"]
    assert record["backend"] == "sentencepiece" and record["passed"] and record["mismatches"] == []
    assert proven(tiny_graphs / "tokenizer") and tokenizer_spec_in(tiny_graphs / "tokenizer").kind == "direct"
    code = ("import sys; from vlm_export.runtime.artifact_set import ArtifactSet; "
            "from vlm_export.runtime.generation import Generator, Request; from vlm_export.runtime.sampling import SamplingParams; "
            f"g = Generator(ArtifactSet.open({str(tiny_graphs)!r}), 'ort'); "
            "g.generate([Request.ask('Hi </s> there')], SamplingParams(max_new_tokens=2)); print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.split()[-1] == "False", result.stderr[-2000:]


def test_sentencepiece_backend_equals_transformers_slow_llama_tokenizer(tiny_tokenizer):
    """Random texts of control strings, whitespace runs, accents, CJK, emoji and byte-piece look-alikes,
    in every encode setting the runtime uses, and random ids decoded back."""
    folder, hf = tiny_tokenizer
    ours, rng = SentencePieceBackend(folder), random.Random(0)
    assert len(ours) == len(hf) and ours.unk_token_id == hf.unk_token_id
    for _ in range(400):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 25)))
        for special in (True, False):
            for split in (False, True):
                assert ours(text, special, split)["input_ids"] == hf(text, add_special_tokens=special, split_special_tokens=split)["input_ids"], text
        ids = [rng.randrange(len(hf)) for _ in range(rng.randint(1, 12))]
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("edit", ["legacy false", "bos dropped"])
def test_a_folder_the_backend_does_not_reproduce_keeps_transformers(tiny_tokenizer, tmp_path, edit):
    folder, hf = tiny_tokenizer
    copy = tmp_path / "tokenizer"
    shutil.copytree(folder, copy)
    (copy / CHECK_FILE).unlink()
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.update({"legacy": False} if edit == "legacy false" else {"add_bos_token": False})
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    verdict = check(copy, hf, ["Hello world", "Hi </s> there"], [], None)
    assert not verdict["passed"] and verdict["backend"] == "sentencepiece"
    assert not proven(copy) and tokenizer_spec_in(copy).kind == "sentencepiece"
