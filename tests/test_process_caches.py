"""What a process computes once and reuses (image embeddings, tokenizers, a suspended session), and
that each is computed again when what it depends on changes."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from vlm_export.model.tokenizer import load_tokenizer, tokenizer_spec_in
from vlm_export.runtime import image_encoder
from vlm_export.runtime.artifact_set import ArtifactSet
from vlm_export.runtime.generation import Generator
from vlm_export.runtime.image_encoder import ImageEncoder, cached_images, image_embeds


@pytest.fixture
def counted_vision(monkeypatch):
    """Count the images that really go through a vision graph; the process cache starts empty."""
    monkeypatch.setattr(image_encoder, "_KEPT", type(image_encoder._KEPT)())
    ran, original = [], ImageEncoder.run
    monkeypatch.setattr(ImageEncoder, "run", lambda self, images: (ran.extend(images), original(self, images))[1])
    return ran


def test_an_image_file_goes_through_a_vision_graph_once(tiny_graphs, photo, tmp_path, counted_vision):
    image = tmp_path / "cat.png"
    shutil.copy(photo, image)
    with Generator(ArtifactSet.open(tiny_graphs), "ort") as first, Generator(ArtifactSet.open(tiny_graphs), "ort") as second:
        first.image_embeds(image)
        first.image_embeds(image)  # outside cached_images(): every image runs (`run` and the bench time it)
        assert counted_vision == [image, image]
        counted_vision.clear()
        with cached_images():
            a = first.image_embeds(image)
            b = second.image_embeds(str(image))  # another generator of the same graphs, the path as a string
            c = image_embeds(tiny_graphs, image)  # the build's vision check: no generator
            assert counted_vision == [image] and np.array_equal(a, b) and np.array_equal(a, c) and a.shape == (144, 64)
            with pytest.raises(ValueError):
                a[0, 0] = 1.0  # shared: read-only
            os.utime(image, ns=(0, 10**9))  # the file changed (as far as anyone can tell): computed again
            again = first.image_embeds(image)
            assert counted_vision == [image, image] and np.array_equal(again, a)


def test_another_vision_graph_does_not_reuse_the_embeddings(tiny_graphs, photo, tmp_path, counted_vision):
    copy = tmp_path / "graphs"
    shutil.copytree(tiny_graphs, copy)
    manifest = ArtifactSet.open(copy).manifest
    manifest["files"][manifest["graphs"][0]["file"]]["sha256"] = "0" * 64  # what a re-export would change
    artifacts = ArtifactSet(copy, manifest, ArtifactSet.open(copy).spec)
    with cached_images(), Generator(ArtifactSet.open(tiny_graphs), "ort") as first, Generator(artifacts, "ort") as second:
        first.image_embeds(photo)
        second.image_embeds(photo)
    assert len(counted_vision) == 2


def test_a_tokenizer_is_loaded_once_until_its_files_change(tiny_graphs, tmp_path):
    directory = tmp_path / "tokenizer"
    shutil.copytree(tiny_graphs / "tokenizer", directory)
    spec = tokenizer_spec_in(directory)
    first = load_tokenizer(spec)
    assert load_tokenizer(spec) is first
    some_file = next(p for p in sorted(directory.iterdir()) if p.is_file())
    os.utime(some_file, ns=(0, 10**9))
    reloaded = load_tokenizer(spec)
    assert reloaded is not first and reloaded.encode_text("a cat") == first.encode_text("a cat")


def test_a_suspended_session_opens_again_only_when_used(tiny_graphs):
    from vlm_export.runtime.runners.ort_runner import make_runner

    artifacts = ArtifactSet.open(tiny_graphs)
    runner = make_runner(artifacts.graphs["embed"], tiny_graphs, {}).activate()
    assert runner.suspend() is True and not runner.is_active
    out = runner.infer({"input_ids": np.array([[1, 2, 3]], dtype=np.int64)})  # reopened by its use
    assert runner.is_active and runner.to_numpy(out["inputs_embeds"]).shape == (1, 3, 64)
    runner.deactivate()  # closed for good: no reopening
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer({"input_ids": np.array([[1]], dtype=np.int64)})


def test_a_recording_runner_sees_every_image_even_when_cached(tiny_graphs, photo, counted_vision):
    """Calibration and golden files record each graph's feeds through the loop: the vision graph's
    must not be answered from the process's cache."""
    from vlm_export.quantize.calibration import recorded_samples
    from vlm_export.runtime.generation import Request

    with cached_images():
        with Generator(ArtifactSet.open(tiny_graphs), "ort") as generator:
            generator.image_embeds(photo)  # now cached
        recorded = recorded_samples(tiny_graphs, [Request.ask("Describe the image.", photo)], new_tokens=1)
    assert len(recorded["vision"]) == 1 and recorded["vision"][0]["pixel_values"].shape[0] == 1


def test_a_prefetch_computes_images_beside_and_the_loop_takes_its_answers(tiny_graphs, photo, tmp_path, counted_vision, monkeypatch):
    """Prefetch runs each image once on its own thread; a generator of a set with the same vision
    graph gets those embeddings (waiting for one still running), equal to its own; closing it drops
    the images not started."""
    import threading

    images = []
    for name in ("a.png", "b.png", "c.png"):
        images.append(tmp_path / name)
        shutil.copy(photo, images[-1])
    release, original = threading.Event(), ImageEncoder.run
    seen_threads = []

    def slow_run(self, batch):  # the prefetch's first image waits until the loop has asked for it
        if batch:
            seen_threads.append(threading.current_thread().name)
        if batch and batch[0] == images[0] and not release.is_set():
            release.wait(5)
        return original(self, batch)

    monkeypatch.setattr(ImageEncoder, "run", slow_run)  # `original` counts (counted_vision)
    with cached_images(), Generator(ArtifactSet.open(tiny_graphs), "ort") as generator:
        with image_encoder.Prefetch.of_set(tiny_graphs, images[:2]) as prefetch:
            threading.Timer(0.5, release.set).start()
            first = generator.image_embeds(images[0])  # pending: waits for the prefetch's answer
            second = generator.image_embeds(images[1])
        assert counted_vision == images[:2] and all(t.startswith("vlm-export-images") for t in seen_threads)
        assert prefetch._runner is not None and not prefetch._runner.is_active
        own = original(ImageEncoder(lambda: generator.runners["vision"], generator.spec, np.float32, None), [images[0]])[0]
        assert np.array_equal(first, own) and np.array_equal(second, own)
        counted_vision.clear()
        generator.image_embeds(images[2])  # never prefetched: the generator's own run
        assert counted_vision == [images[2]] and not image_encoder._PENDING


def test_sessions_that_open_on_use_open_only_when_run(tiny_graphs):
    """Scoring opens its generators so: a side that is replayed creates no session; one that runs
    opens each graph at its first call, and an all-positions copy set aside beside a never-opened
    decoder leaves it to open on use as well."""
    from vlm_export.runtime.generation import Request
    from vlm_export.runtime.sampling import SamplingParams

    with Generator(ArtifactSet.open(tiny_graphs), "ort", open_on_use=True) as generator:
        assert not any(r.is_active for r in generator.runners.values())
        decoder = generator.runners[generator.decode_graph]
        assert decoder.suspend() is False  # what all_logits() does first: nothing to close, still opens on use
        answer = generator.generate([Request.ask("hello")], SamplingParams(max_new_tokens=2))[0]
        assert len(answer.token_ids) >= 1 and decoder.is_active and generator.runners["embed"].is_active
        assert not generator.runners["vision"].is_active  # a text-only answer
