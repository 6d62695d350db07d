"""Bad input through the real CLI: one line on stderr, non-zero exit, no traceback, nothing left
that `verify` accepts."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.checkpoints import write_checkpoint
from tests.cli import message_lines, vlm


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bad"), "ldpnetv2", shards=2)


def broken_copy(checkpoint, tmp_path, edit):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    edit(copy)
    return copy


def _first_shard(ckpt):
    return min(ckpt.glob("model-*.safetensors"))


def _rename_key(ckpt):
    shard = _first_shard(ckpt)
    tensors = load_file(shard)
    name = next(k for k in tensors if k.startswith("model."))
    tensors[name.replace("model.", "transformer.", 1)] = tensors.pop(name)
    save_file(tensors, shard)


def _reshape_key(ckpt):
    shard = _first_shard(ckpt)
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name][:, :-1].clone()
    save_file(tensors, shard)


def _config_edit(**changes):
    def edit(ckpt):
        config = json.loads((ckpt / "config.json").read_text())
        config.update(changes)
        (ckpt / "config.json").write_text(json.dumps(config))
    return edit


CHECKPOINT_CASES = {
    "truncated shard": (lambda c: _first_shard(c).write_bytes(_first_shard(c).read_bytes()[:4096]), "truncated or corrupt"),
    "garbage shard": (lambda c: _first_shard(c).write_bytes(b"\x00" * 64), "truncated or corrupt"),
    "missing config": (lambda c: (c / "config.json").unlink(), "no config.json"),
    "corrupt config": (lambda c: (c / "config.json").write_text("{not json"), "not valid JSON"),
    "wrong key names": (_rename_key, "unexpected weights transformer."),
    "wrong shapes": (_reshape_key, "wrong-shape weights"),
    "unknown mm field": (_config_edit(mm_patch_merge_type="spatial_unpad"), "does not implement: mm_patch_merge_type"),
    "unsupported value": (_config_edit(mm_use_im_start_end=True), "mm_use_im_start_end"),
    "missing tokenizer": (lambda c: (c / "tokenizer.model").unlink(), "no tokenizer"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_export(checkpoint, tmp_path, case):
    edit, message = CHECKPOINT_CASES[case]
    ckpt = broken_copy(checkpoint, tmp_path, edit)
    out = tmp_path / "graphs"
    assert_one_line_error(vlm("export", ckpt, "--out", out), message)
    assert not out.exists() and not (tmp_path / "graphs.partial").exists()


def test_unknown_training_fields_are_ignored(checkpoint, tmp_path):
    ckpt = broken_copy(checkpoint, tmp_path, _config_edit(freeze_mm_mlp_adapter=True, tune_mm_mlp_adapter=False))
    result = vlm("inspect", ckpt)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()  # the checkpoint, read as if the training fields were not there
    assert lines[1] == f"weights        checkpoint ({ckpt})"
    assert "projector      ldpnetv2: 576 patch tokens -> 144 visual tokens" in lines
    assert [line.split()[-1] for line in lines if line.startswith(("  vision tower", "  projector", "  LLM"))] == ["trained"] * 3


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    out = tmp_path_factory.mktemp("g") / "tiny"
    result = vlm("export", "tiny", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "RGBA", "L", "P"])
def test_odd_image_modes_run(graphs, tmp_path, mode):
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    Image.new(mode, (50, 40)).save(path)
    result = vlm("run", graphs, "--image", path, "--prompt", "hi", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    # 207 = tiny's 144 image tokens + 63 of text: the image went in, whatever its mode
    assert "207 prompt tokens, 2 new (max_new_tokens)" in result.stderr


RUN_CASES = {
    "not an image": (lambda t: [(t / "x.png").write_text("text"), t / "x.png"][1], [], "not an image"),
    "huge image": (None, [], "too large"),
    "prompt too long": (None, ["--prompt", "word " * 600], "exceeds the context of 512"),
    "missing extra": (None, ["--prompt", "hi", "--backend", "trt"], "pip install 'vlm-export[trt]'"),
    "unknown provider": (None, ["--prompt", "hi", "--providers", "QNNExecutionProvider"], "not available"),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_bad_run_input(graphs, tmp_path, case):
    make_image, extra, message = RUN_CASES[case]
    args = ["run", graphs, "--max-new-tokens", "2", *extra]
    if case == "huge image":
        Image.new("L", (12000, 16000)).save(tmp_path / "huge.png")  # 192 MP > 2x Pillow's limit
        args += ["--image", tmp_path / "huge.png"]
    elif make_image:
        args += ["--image", make_image(tmp_path)]
    assert_one_line_error(vlm(*args), message)


def test_tampered_artifact_cli(graphs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(graphs, copy)
    with open(copy / "decoder.onnx", "ab") as handle:
        handle.write(b"\x00")
    assert_one_line_error(vlm("run", copy, "--prompt", "hi"), "decoder.onnx does not match its manifest")
    assert_one_line_error(vlm("verify", copy), "tampered or incomplete")


def test_export_unknown_preset_and_options(tmp_path):
    assert_one_line_error(vlm("export", "mobilevlm-9b", "--out", tmp_path / "o"), "unknown model 'mobilevlm-9b'")
    assert_one_line_error(vlm("export", "tiny", "--dtype", "int3", "--out", tmp_path / "o"), "unsupported dtype 'int3'")
    assert_one_line_error(vlm("export", "tiny", "--layout", "static", "--kv-buffer", "4096", "--out", tmp_path / "o"),
                          "exceeds the model context")
    assert not (tmp_path / "o").exists()


def test_full_disk_during_export(tmp_path, monkeypatch):
    from vlm_export.cli.app import app
    from vlm_export.export import pipeline

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "export_graph", full)
    result = CliRunner().invoke(app, ["export", "tiny", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "disk filled up" in result.output
    assert not list(tmp_path.iterdir())


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(vlm("export", "tiny", "--out", Path(blocker) / "sub"), "")


def test_run_without_prompt_or_image_is_refused(tiny_graphs):
    assert_one_line_error(vlm("run", tiny_graphs), "no --prompt and no --image: nothing to answer", 'pass --prompt "..."')
    assert_one_line_error(vlm("run", tiny_graphs, "--prompt", "hi", "--threads", "0"),
                          "--threads 0: a session needs at least one thread")


def test_a_build_folder_or_a_missing_one_is_named_as_such(tmp_path):
    for variant in ("fp32", "int4"):
        (tmp_path / "cpu" / variant).mkdir(parents=True)
        (tmp_path / "cpu" / variant / "manifest.json").write_text("{}")
    assert_one_line_error(vlm("verify", tmp_path / "cpu"),
                          f"{tmp_path / 'cpu'} is a build output holding the variants fp32, int4, not one artifact set",
                          f"fix: pass one variant, e.g. {tmp_path / 'cpu' / 'int4'}")
    assert_one_line_error(vlm("verify", tmp_path / "nothing"), f"{tmp_path / 'nothing'} does not exist")
    assert_one_line_error(vlm("run", tmp_path / "nothing", "--prompt", "hi"), "does not exist",
                          "one variant of `vlm-export build`")


def test_a_batch_timing_line_gives_every_row(tiny_graphs):
    result = vlm("run", tiny_graphs, "--prompt", "hi", "--prompt", "a longer second question?", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    timing = [line for line in result.stderr.splitlines() if line.startswith("[ort]")]
    assert len(timing) == 1 and "2 requests: [0] " in timing[0] and ", [1] " in timing[0]
    assert timing[0].count("new (") == 2
