import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoints import tiny_spec, write_checkpoint
from vlm_export.errors import VlmExportError
from vlm_export.model.load import load_reference
from vlm_export.spec import resolve_spec


def _forward_runs(model):
    image = model.encode_images(torch.randn(1, 3, 336, 336))
    embeds = model.splice_image_embeds([1, 9, -200, 10], image)[None]
    assert torch.isfinite(model(inputs_embeds=embeds).logits).all()


def test_v2_sharded_safetensors_bf16(v2_checkpoint):
    spec = resolve_spec(str(v2_checkpoint))
    assert spec.projector_type == "ldpnetv2" and spec.vision.hidden_size == 64 and spec.tokenizer.kind == "sentencepiece"
    model = load_reference(spec)
    shard = min(v2_checkpoint.glob("model-*.safetensors"))
    for name, tensor in load_file(shard).items():
        torch.testing.assert_close(model.state_dict()[name], tensor.float())
    _forward_runs(model)


def test_v1_bin_with_separate_vision_tower(v1_checkpoint):
    ckpt, clip = v1_checkpoint
    with pytest.raises(VlmExportError, match="--vision-tower"):
        resolve_spec(str(ckpt))
    model = load_reference(resolve_spec(str(ckpt), vision_tower=str(clip)))
    reference = load_reference(tiny_spec("ldpnet").replace(weights=tiny_spec("ldpnet").weights.__class__(seed=1)))
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)
    _forward_runs(model)


@pytest.fixture()
def scratch_checkpoint(tmp_path):
    return write_checkpoint(tmp_path, "ldpnetv2", fmt="safetensors", shards=2)


def _edit_shard(ckpt, edit):
    from safetensors.torch import load_file, save_file

    shard = min(ckpt.glob("model-*.safetensors"))
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)


def test_missing_weights_are_named(scratch_checkpoint):
    _edit_shard(scratch_checkpoint, lambda t: t.pop(min(k for k in t if "layers" in k)))
    with pytest.raises(VlmExportError, match="missing weights model"):
        load_reference(resolve_spec(str(scratch_checkpoint)))


def test_unexpected_and_wrong_shape_weights(scratch_checkpoint):
    _edit_shard(scratch_checkpoint, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(VlmExportError, match="unexpected weights model.extra.weight"):
        load_reference(resolve_spec(str(scratch_checkpoint)))


def test_wrong_shape_weights(scratch_checkpoint):
    def shrink(t):
        key = min(k for k in t if k.endswith("mlp.gate_proj.weight"))
        t[key] = t[key][:-1].clone()
    _edit_shard(scratch_checkpoint, shrink)
    with pytest.raises(VlmExportError, match="wrong-shape weights"):
        load_reference(resolve_spec(str(scratch_checkpoint)))


def test_truncated_safetensors(scratch_checkpoint):
    shard = min(scratch_checkpoint.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(VlmExportError, match="truncated or corrupt"):
        resolve_spec(str(scratch_checkpoint))


def test_missing_shard(scratch_checkpoint):
    sorted(scratch_checkpoint.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(VlmExportError, match="missing"):
        resolve_spec(str(scratch_checkpoint))


def test_missing_tokenizer(scratch_checkpoint):
    (scratch_checkpoint / "tokenizer.model").unlink()
    with pytest.raises(VlmExportError, match="no tokenizer"):
        resolve_spec(str(scratch_checkpoint))


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(VlmExportError, match="no config.json"):
        resolve_spec(str(tmp_path))


def test_unknown_projector_in_config(scratch_checkpoint):
    config = json.loads((scratch_checkpoint / "config.json").read_text())
    config["mm_projector_type"] = "qformer"
    (scratch_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(VlmExportError, match="unknown projector type 'qformer'"):
        resolve_spec(str(scratch_checkpoint))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bin_pickle_with_code_is_refused(tmp_path, v1_checkpoint):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(v1_checkpoint[0], ckpt)
    for f in ckpt.glob("pytorch_model*"):
        f.unlink()
    torch.save({"model.norm.weight": torch.ones(64), "evil": _Evil()}, ckpt / "pytorch_model.bin", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(VlmExportError, match="refused for safety"):
        resolve_spec(str(ckpt), vision_tower=str(v1_checkpoint[1]))


def test_lora_adapter_is_merged(tmp_path):
    from peft import LoraConfig, get_peft_model

    spec = tiny_spec("ldpnet")
    base = load_reference(spec)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    embeds = torch.randn(1, 7, 64)
    with torch.no_grad():
        expected = peft_model(inputs_embeds=embeds).logits
    lora_spec = spec.replace(weights=spec.weights.__class__(lora_path=str(tmp_path / "adapter")))
    merged = load_reference(lora_spec)
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs_embeds=embeds).logits, expected, atol=1e-4, rtol=1e-4)
    # the vision export's model (LLM dropped): the adapter's q/v_proj also match CLIP's, merged the same
    tower_only = load_reference(lora_spec, llm=False).model.vision_tower.state_dict()
    assert tower_only.keys() == merged.model.vision_tower.state_dict().keys()
    assert all(torch.equal(v, merged.model.vision_tower.state_dict()[k]) for k, v in tower_only.items())


def _set_config(ckpt, **changes):
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))


def test_v2_tower_comes_from_its_clip_config(scratch_checkpoint):
    clip = json.loads((scratch_checkpoint.parent / "clip" / "config.json").read_text())
    clip["num_attention_heads"], clip["hidden_act"], clip["layer_norm_eps"] = 2, "gelu", 1e-6  # not hidden // 64
    (scratch_checkpoint.parent / "clip" / "config.json").write_text(json.dumps(clip))
    vision = resolve_spec(str(scratch_checkpoint)).vision
    assert (vision.num_heads, vision.hidden_act, vision.layer_norm_eps) == (2, "gelu", 1e-6)


def test_v2_tower_without_any_config_is_refused(scratch_checkpoint):
    _set_config(scratch_checkpoint, mm_vision_tower="someone/custom-clip")
    with pytest.raises(VlmExportError, match="no CLIP config for the vision tower.*num_attention_heads.* -- fix: pass --vision-tower"):
        resolve_spec(str(scratch_checkpoint))
    spec = resolve_spec(str(scratch_checkpoint), vision_tower=str(scratch_checkpoint.parent / "clip"))  # the fix works
    assert spec.vision.num_heads == json.loads((scratch_checkpoint.parent / "clip" / "config.json").read_text())["num_attention_heads"]


def test_v2_tower_config_that_does_not_fit_the_weights_is_refused(scratch_checkpoint):
    _set_config(scratch_checkpoint, mm_vision_tower="openai/clip-vit-large-patch14-336")  # the published config: 1024 wide
    with pytest.raises(VlmExportError, match="does not fit the checkpoint's tower weights: hidden_size 1024 \\(weights: 64\\)"):
        resolve_spec(str(scratch_checkpoint))
