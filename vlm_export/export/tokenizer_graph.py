"""A tokenizer graph for devices without Python: onnxruntime-extensions' SentencepieceTokenizer.

    text (string[1]) -> SentencepieceTokenizer(model = tokenizer.model bytes, add_bos) -> input_ids

MobileVLM's tokenizer is SentencePiece, which this op runs as-is. The graph tokenizes a message's
own text: control strings typed in it (`</s>`, `<s>`, `<unk>`) stay text, the same rule as the host
tokenizer's (`TextTokenizer.encode_text`); the chat template's own control tokens are ids the app
puts between the pieces (the manifest record lists them). Byte-level BPE tokenizers
converted from GGUF (smol) are not reproduced by the extensions' HF-JSON op (measured: ids differ),
so for those no graph is written and the manifest says why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from vlm_export.model.tokenizer import TextTokenizer

CONTRIB = "ai.onnx.contrib"
# The graph must give the host's ids on all of these: plain prompts, control strings typed as
# text, unicode (accents, CJK, emoji, combining marks), whitespace runs and the empty text.
CHECK_TEXTS = (
    "A chat between a curious user and an artificial intelligence assistant. USER: What is in the image?",
    "\nDescribe the photo in detail. ASSISTANT:",
    "Numbers 1234567 and 3.14, accents héllo wörld, symbols <>/{}[] and emoji 🙂.",
    "  leading spaces, trailing spaces  ",
    "Hi </s> there", "<s>USER: x", "a <unk> b", "ASSISTANT:</s>USER:", "</s>", "<s><s></s>",
    "日本語の猫 ねこ 🐈‍⬛ 👍🏽 e\u0301 Ελληνικά Кошка",
    "tabs\tand\nnewlines\n\n  and   runs     of spaces", " ", "\n", "",
)


def sentencepiece_graph(model_file: Path, add_bos: bool) -> onnx.ModelProto:
    constants = [
        helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))
        for name, dtype, value in (
            ("nbest_size", TensorProto.INT64, 0), ("alpha", TensorProto.FLOAT, 0.0),
            ("add_bos", TensorProto.BOOL, add_bos), ("add_eos", TensorProto.BOOL, False),
            ("reverse", TensorProto.BOOL, False),
        )
    ]
    tokenize = helper.make_node(
        "SentencepieceTokenizer", ["text", "nbest_size", "alpha", "add_bos", "add_eos", "reverse"],
        ["tokens", "indices"], domain=CONTRIB, model=Path(model_file).read_bytes(),
    )
    to_int64 = helper.make_node("Cast", ["tokens"], ["input_ids"], to=TensorProto.INT64)
    graph = helper.make_graph(
        [*constants, tokenize, to_int64], "tokenizer",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["sequence"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CONTRIB, 1)],
                             producer_name="vlm-export")


def check_tokenizer_graph(path: Path, tokenizer: TextTokenizer, texts: list[str], add_bos: bool) -> dict:
    """Ids from the graph (ORT + extensions) must equal the host tokenizer's for message text
    (`encode_text`: control strings stay text), text by text."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    mismatches = [t for t in texts if list(session.run(None, {"text": np.array([t])})[0]) != tokenizer.encode_text(t, add_bos)]
    return {"passed": not mismatches, "texts": len(texts), "mismatches": mismatches[:3]}


def write_tokenizer_graph(tokenizer_dir: Path, out_dir: Path, tokenizer: TextTokenizer, add_bos: bool) -> dict:
    """Write `tokenizer.onnx` where the extensions reproduce the tokenizer; the record says what happened."""
    sp_model = tokenizer_dir / "tokenizer.model"
    if (tokenizer_dir / "tokenizer.json").is_file() or not sp_model.is_file():
        return {"file": None, "reason": "not a SentencePiece tokenizer; onnxruntime-extensions' HF-JSON op "
                "does not reproduce GGUF-converted BPE tokenizers, use the tokenizer/ files on device"}
    path = out_dir / "tokenizer.onnx"
    onnx.save_model(sentencepiece_graph(sp_model, add_bos), str(path))
    return {"file": path.name, "op": f"{CONTRIB}.SentencepieceTokenizer",
            "input": "a message's own text; control strings in it stay text; no U+0000 (the op stops at it)",
            "control_tokens": tokenizer.control_tokens,  # the template's, inserted by the app as ids
            "check": check_tokenizer_graph(path, tokenizer, list(CHECK_TEXTS), add_bos)}
