"""The shared generation loop on `tiny`: every backend and layout gives the reference's greedy ids."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.checkpoints import tiny_spec
from vlm_export.errors import VlmExportError
from vlm_export.export.pipeline import export_model
from vlm_export.model.generate import generate_reference
from vlm_export.model.load import load_reference
from vlm_export.model.preprocess import load_image, preprocess_image
from vlm_export.model.prompt import Message, render_prompt, user_turn
from vlm_export.model.tokenizer import load_tokenizer
from vlm_export.runtime.artifact_set import ArtifactSet
from vlm_export.runtime.generation import Generator, Request
from vlm_export.runtime.sampling import SamplingParams
from vlm_export.spec.graph_io import ExportOptions

GREEDY_32 = SamplingParams(max_new_tokens=32)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    export_model(tiny_spec("ldpnet"), root / "dynamic", ExportOptions())
    export_model(tiny_spec("ldpnet"), root / "static", ExportOptions(layout="static", prefill_chunk=32, kv_buffer=320))
    export_model(tiny_spec("ldpnet"), root / "inplace", ExportOptions(layout="inplace"), reuse=root / "dynamic")
    return root


def reference_ids(prompt: str, image) -> list[int]:
    spec = tiny_spec("ldpnet")
    tokenizer = load_tokenizer(spec.tokenizer)
    text = render_prompt(spec.template, [user_turn(prompt, image is not None)], tokenizer)
    pixels = preprocess_image(load_image(image), spec.vision) if image else None
    return generate_reference(load_reference(spec), tokenizer, text, pixels, 32).token_ids


@pytest.mark.parametrize("layout", ["dynamic", "static", "inplace"])
@pytest.mark.parametrize("backend", ["ort", "torch"])
@pytest.mark.parametrize("with_image", [True, False])
def test_greedy_matches_reference(graphs, photo, layout, backend, with_image):
    image = photo if with_image else None
    with Generator(ArtifactSet.open(graphs / layout), backend) as generator:
        result = generator.generate([Request.ask("What is in the image?", image)], GREEDY_32)[0]
    expected = reference_ids("What is in the image?", image)
    assert len(expected) >= 8 and result.token_ids == expected


@pytest.mark.parametrize("layout", ["dynamic", "inplace"])
def test_inline_weights_read_by_reference_give_the_same_answer(graphs, photo, layout, monkeypatch):
    """A graph whose weights lie inline is opened with them as external data inside its own file
    (ort_runner.weights_by_reference): every session here takes that way, and the image answer
    equals the PyTorch reference's, as the graphs opened whole do."""
    from vlm_export.runtime.runners import ort_runner

    opened, original = [], ort_runner.weights_by_reference
    monkeypatch.setattr(ort_runner, "BY_REFERENCE_BYTES", 0)
    monkeypatch.setattr(ort_runner, "weights_by_reference", lambda path: opened.append(path.name) or original(path))
    with Generator(ArtifactSet.open(graphs / layout), "ort") as generator:
        result = generator.generate([Request.ask("What is in the image?", photo)], GREEDY_32)[0]
    assert result.token_ids == reference_ids("What is in the image?", photo)
    assert {"vision.onnx", "embed.onnx"} <= set(opened) and any(name.startswith("decoder") for name in opened)
    model, folder = original(graphs / layout / "vision.onnx")
    assert isinstance(model, bytes) and folder == graphs / layout


@pytest.mark.parametrize("layout", ["dynamic", "static", "inplace"])
def test_batch_equals_one_by_one(graphs, photo, layout):
    requests = [Request.ask("What is in the image?", photo), Request.ask("A much longer text-only question, about cats and dogs?")]
    with Generator(ArtifactSet.open(graphs / layout)) as generator:
        together = generator.generate(requests, GREEDY_32)
        alone = [generator.generate([r], GREEDY_32)[0] for r in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_inplace_buffers_are_written_where_they_are(graphs):
    """ORT writes present K/V into the very arrays fed as past (no copy), only at the step's slots."""
    with Generator(ArtifactSet.open(graphs / "inplace")) as generator:
        prompt, _ = generator.encode(Request.ask("hello"), None)
        session = generator.start([prompt], 4)
        kv = session.cache
        buffers = dict(kv.values)
        before = {n: b.copy() for n, b in buffers.items()}
        session.step_embeds(prompt[None, :1])
    length = prompt.shape[0]
    for name, buffer in buffers.items():
        assert kv.values[name] is buffer  # the same array: nothing was returned, it was written in place
        assert not np.array_equal(buffer[:, :, length], before[name][:, :, length])
        np.testing.assert_array_equal(buffer[:, :, :length], before[name][:, :, :length])
    assert kv.length == length + 1


def test_inplace_binding_follows_the_cache_it_is_given(graphs):
    """The runner keeps one IO binding per KV cache it was last handed: two caches stepped in
    turn give each cache's own logits, and logits returned earlier are not overwritten later."""
    with Generator(ArtifactSet.open(graphs / "inplace")) as generator:
        prompts = [generator.encode(Request.ask(q), None)[0] for q in ("hello", "A longer question about cats?")]
        tokens = generator.embed_ids(list(range(5, 11)))

        def steps(kv, start, picks):
            return [generator.forward(tokens[None, i:i + 1], kv, np.array([[start + i]]))[0, -1] for i in picks]

        alone = []
        for prompt in prompts:
            kv = generator.new_cache(1, 128)
            generator.forward(prompt[None], kv, np.arange(prompt.shape[0])[None])
            alone.append(steps(kv, prompt.shape[0], range(6)))
        caches = []
        for prompt in prompts:
            caches.append(generator.new_cache(1, 128))
            generator.forward(prompt[None], caches[-1], np.arange(prompt.shape[0])[None])
        turns = [[], []]
        for i in range(6):  # a, b, a, b, ...: the binding is rebuilt at every switch
            for which, (kv, prompt) in enumerate(zip(caches, prompts)):
                turns[which] += steps(kv, prompt.shape[0], [i])
    for mine, expected in zip(turns, alone):
        np.testing.assert_allclose(np.stack(mine), np.stack(expected), rtol=1e-5, atol=1e-5)
    assert not np.allclose(alone[0][0], alone[0][1])  # each step's logits were kept, not one buffer


def test_sampling_is_reproducible_with_a_seed(graphs):
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=7)
    with Generator(ArtifactSet.open(graphs / "dynamic")) as generator:
        first = generator.generate([Request.ask("hello")], params)[0].token_ids
        second = generator.generate([Request.ask("hello")], params)[0].token_ids
        other = generator.generate([Request.ask("hello")], SamplingParams(16, 0.9, 50, 0.9, 1.2, seed=8))[0].token_ids
    assert first == second and first != other


def test_streaming_pieces_add_up_and_stop_strings_cut(graphs):
    pieces = []
    with Generator(ArtifactSet.open(graphs / "dynamic")) as generator:
        result = generator.generate([Request.ask("hello")], GREEDY_32, on_token=lambda row, text: pieces.append(text))[0]
        assert "".join(pieces) == result.text and result.text
        stop = result.text[len(result.text) // 2:][:2]
        cut = generator.generate([Request.ask("hello")], SamplingParams(32, stop_strings=(stop,)))[0]
    assert cut.stop_reason == "stop_string" and stop not in cut.text and result.text.startswith(cut.text)


def test_multi_turn_chat(graphs):
    turns = [Message("user", "Hi"), Message("assistant", "Hello."), Message("user", "How are you?")]
    with Generator(ArtifactSet.open(graphs / "dynamic")) as generator:
        result = generator.generate([Request(turns)], SamplingParams(8))[0]
    assert result.prompt_tokens > 40 and len(result.token_ids) == 8


def test_prompt_beyond_static_buffer_is_refused(graphs):
    with Generator(ArtifactSet.open(graphs / "static")) as generator, pytest.raises(VlmExportError, match="static KV buffer"):
        generator.generate([Request.ask("hello " * 100)], SamplingParams(200))


def test_tampered_artifact_is_refused(graphs, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(graphs / "dynamic", copy)
    data = bytearray((copy / "embed.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "embed.onnx").write_bytes(bytes(data))
    with pytest.raises(VlmExportError, match="embed.onnx does not match its manifest"):
        ArtifactSet.open(copy)


def test_kv_cache_decode_equals_recompute(graphs):
    """Logits from cached decode steps equal a fresh prefill over the whole sequence."""
    artifacts = ArtifactSet.open(graphs / "dynamic")
    with Generator(artifacts) as generator:
        result = generator.generate([Request.ask("hello")], SamplingParams(6))[0]
        prompt, _ = generator.encode(Request.ask("hello"), None)
        extended = np.concatenate([prompt, generator.embed_ids(result.token_ids[:-1])])
        logits = generator.start([extended], 1).logits
    assert int(np.argmax(logits[0])) == result.token_ids[-1]


def test_cli_run_end_to_end(graphs, photo):
    cmd = [sys.executable, "-m", "vlm_export", "run", str(graphs / "dynamic"), "--image", str(photo),
           "--prompt", "What is this?", "--max-new-tokens", "4"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "TTFT" in result.stderr and "decode" in result.stderr and "4 new" in result.stderr


def test_cli_run_refuses_incomplete_directory(tmp_path):
    (tmp_path / "decoder.onnx").write_bytes(b"x")
    result = subprocess.run([sys.executable, "-m", "vlm_export", "run", str(tmp_path), "--prompt", "hi"], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "no manifest.json" in result.stderr and "Traceback" not in result.stderr


def test_external_data_outside_the_directory_is_refused(graphs, tmp_path):
    import shutil

    import onnx

    from vlm_export.artifacts import write_manifest

    copy = tmp_path / "copy"
    shutil.copytree(graphs / "dynamic", copy)
    model = onnx.load(str(copy / "embed.onnx"))
    onnx.save_model(model, str(copy / "embed.onnx"), save_as_external_data=True, location="embed.data", size_threshold=0)
    patched = onnx.load(str(copy / "embed.onnx"), load_external_data=False)
    for tensor in patched.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../etc/passwd"
    onnx.save_model(patched, str(copy / "embed.onnx"))
    manifest = json.loads((copy / "manifest.json").read_text())
    write_manifest(copy, {k: v for k, v in manifest.items() if k != "files"})  # checksums consistent again
    with pytest.raises(VlmExportError, match="outside the artifact directory"):
        ArtifactSet.open(copy)


def test_cli_verify(graphs):
    result = subprocess.run([sys.executable, "-m", "vlm_export", "verify", str(graphs / "static")], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0 and result.stdout.startswith("ok:")
