"""Quality against full precision: metrics on hand-made logits, the eval chunks, the all-positions
copy of the inplace decoder, and teacher-forced scoring of tiny models through the loop."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest

from tests.checkpoints import tiny_spec
from tests.graph_edits import scale_matmul_weight
from vlm_export.artifacts import write_manifest
from vlm_export.errors import VlmExportError
from vlm_export.quality.eval_set import Chunk, chunks, prose
from vlm_export.quality.metrics import BUDGETS, Accumulator, Budget, Quality
from vlm_export.quality.scoring import Settings, compare, logits_runner
from vlm_export.runtime.artifact_set import ArtifactSet
from vlm_export.runtime.generation import Generator


# -- metrics ------------------------------------------------------------------------------------
def test_identical_logits_have_zero_kl_and_full_agreement():
    logits = np.random.default_rng(0).normal(size=(5, 7))
    acc = Accumulator()
    acc.add(logits, logits.astype(np.float32), np.arange(5))
    q = acc.result()
    assert q.tokens == 5 and q.mean_kl == pytest.approx(0.0, abs=1e-7) and q.top1_agreement == 1.0
    assert q.perplexity == pytest.approx(q.perplexity_reference, rel=1e-6)


def test_kl_top1_and_perplexity_on_two_positions():
    # position 0: reference (1/2, 1/2), candidate (3/4, 1/4): KL = 1/2 ln(4/3), top-1 agrees (token 0 on both)
    # position 1: reference (3/4, 1/4), candidate (1/4, 3/4): KL = 1/2 ln 3, top-1 differs
    reference = np.log([[0.5, 0.5], [0.75, 0.25]])
    candidate = np.log([[0.75, 0.25], [0.25, 0.75]])
    acc = Accumulator()
    acc.add(reference, candidate, np.array([0, 1]))
    q = acc.result()
    assert q.mean_kl == pytest.approx((0.5 * math.log(4 / 3) + 0.5 * math.log(3)) / 2, rel=1e-9)
    assert q.top1_agreement == 0.5
    assert q.perplexity_reference == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.25)) / 2))
    assert q.perplexity == pytest.approx(math.exp(-(math.log(0.75) + math.log(0.75)) / 2))


def test_uniform_distribution_has_perplexity_v():
    acc = Accumulator()
    acc.add(np.zeros((3, 50)), np.zeros((3, 50)), np.array([1, 7, 49]))
    assert acc.result().perplexity == pytest.approx(50.0)


def test_greedy_and_budget_verdict():
    acc = Accumulator()
    acc.add(np.zeros((1, 4)), np.zeros((1, 4)), np.array([0]))
    acc.add_greedy([1, 2, 3], [1, 2, 3])
    acc.add_greedy([1, 2, 3], [1, 2, 4])
    q = acc.result()
    assert q.greedy_identical == 0.5 and q.greedy_prompts == 2
    assert BUDGETS["int8"].verdict(q).passed
    bad = Quality(tokens=10, perplexity_reference=5.0, perplexity=6.0, mean_kl=0.02, kl_p99=0.1, top1_agreement=0.9)
    verdict = Budget(max_mean_kl=0.01, min_top1=0.95, label="t").verdict(bad)
    assert not verdict.passed and len(verdict.misses) == 2 and "OVER" in verdict.line()
    assert {"npu-int8", "gpu-int8", "gpu-int4", "gpu-fp16"} <= set(BUDGETS)


def test_blockwise_scores_equal_a_direct_float64_computation():
    """The accumulator's blocked, scratch-reusing arithmetic (metrics.position_scores) gives what the
    textbook float64 log-softmax gives, across block edges, call sizes and vocabularies."""
    from vlm_export.quality.metrics import ROWS_PER_BLOCK, log_softmax

    rng = np.random.default_rng(1)
    acc, expected = Accumulator(), []
    for rows, vocab in ((ROWS_PER_BLOCK * 2 + 5, 300), (3, 300), (ROWS_PER_BLOCK, 40)):
        reference = (rng.normal(size=(rows, vocab)) * 4 + 7).astype(np.float32)  # an offset: lse far from 0
        candidate = (reference + rng.normal(size=reference.shape) * 0.3).astype(np.float32)
        targets = rng.integers(0, vocab, rows)
        ref, cand = log_softmax(reference), log_softmax(candidate)
        expected.append(((np.exp(ref) * (ref - cand)).sum(-1), -ref[np.arange(rows), targets],
                         -cand[np.arange(rows), targets], ref.argmax(-1) == cand.argmax(-1)))
        acc.add(reference, candidate, targets)
    kl, nll_ref, nll, same = (np.concatenate(parts) for parts in zip(*expected))
    np.testing.assert_allclose(np.concatenate(acc.kl), kl, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.concatenate(acc.nll_reference), nll_ref, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate(acc.nll), nll, rtol=1e-12)
    assert np.array_equal(np.concatenate(acc.same_top1), same) and kl.min() > 1e-4  # the candidate does differ


# -- the eval set ---------------------------------------------------------------------------------
def test_chunks_score_the_second_half_of_each_chunk():
    plan = chunks(available=100, n_ctx=16, tokens=20)
    assert plan == [Chunk(0, 8, 8), Chunk(16, 8, 8), Chunk(32, 8, 4)]
    scored = [c.start + c.context + i for c in plan for i in range(c.scored)]  # ids predicted, in the stream
    assert scored == list(range(8, 16)) + list(range(24, 32)) + list(range(40, 44))
    assert plan[1].ids(list(range(100)), bos=1) == [1] + list(range(17, 32))  # BOS replaces the chunk's first id
    with pytest.raises(VlmExportError, match="need more text"):
        chunks(available=100, n_ctx=16, tokens=49)  # 6 whole chunks of 16 score at most 48


def test_the_eval_prose_is_long_enough():
    from vlm_export.model.tokenizer import load_tokenizer
    from vlm_export.spec.presets import BUNDLED_TOKENIZER

    text = prose()  # 8,021 tokens under SmolLM2's tokenizer (measured; not bundled with the tests)
    assert text.startswith("CHAPTER I. Down the Rabbit-Hole") and "Gutenberg" not in text and "\r" not in text
    assert len(load_tokenizer(BUNDLED_TOKENIZER).encode_text(text)) >= 4000


# -- scoring through the loop -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inplace(tmp_path_factory):
    from vlm_export.export.pipeline import export_model
    from vlm_export.spec.graph_io import ExportOptions

    out = tmp_path_factory.mktemp("quality") / "inplace"
    export_model(tiny_spec("ldpnet"), out, ExportOptions(layout="inplace"))
    return out


def _stepped(generator, embeds):
    kv = generator.new_cache(1, embeds.shape[0])
    return np.stack([generator.forward(embeds[i:i + 1][None], kv, np.array([[i]]))[0, -1] for i in range(embeds.shape[0])])


def _with_external_weights(source, out):
    """A copy of an artifact set whose decoder keeps its weights in a .data file (the int4
    variants do, and a 1.4B fp32 decoder must)."""
    shutil.copytree(source, out)
    path = out / "decoder_inplace.onnx"
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, location="decoder_inplace.onnx.data",
              size_threshold=1024)
    assert (out / "decoder_inplace.onnx.data").stat().st_size > 100_000  # the weights moved out
    manifest = json.loads((out / "manifest.json").read_text())
    write_manifest(out, {k: v for k, v in manifest.items() if k != "files"})
    return out


@pytest.mark.parametrize("external", [False, True], ids=["inline-weights", "external-data"])
def test_all_positions_copy_matches_one_token_per_call(inplace, external, tmp_path):
    inplace = _with_external_weights(inplace, tmp_path / "external") if external else inplace
    before = sorted(p.name for p in inplace.iterdir())
    with Generator(ArtifactSet.open(inplace), "ort") as generator:
        ids = generator.tokenizer.encode_text(prose())[:24]
        embeds = generator.embed_ids(ids)
        stepped = _stepped(generator, embeds)
        with logits_runner(generator) as runner:
            assert runner is not generator.runners["decoder"] and not generator.runners["decoder"].is_active
            kv = generator.new_cache(1, 24)
            prefill = generator.forward(embeds[None, :10], kv, np.arange(10)[None], runner)[0]
            rest = generator.forward(embeds[None, 10:], kv, np.arange(10, 24)[None], runner)[0]
        assert not generator.runners["decoder"].is_active  # suspended: opened again by its next use only
        again = _stepped(generator, embeds[:3])
        assert generator.runners["decoder"].is_active and np.array_equal(again, stepped[:3])
    assert prefill.shape == (10, stepped.shape[1]) and rest.shape == (14, stepped.shape[1])
    np.testing.assert_allclose(np.concatenate([prefill, rest]), stepped, atol=1e-4)
    with Generator(ArtifactSet.open(inplace), "ort") as generator, logits_runner(generator) as runner:
        kv = generator.new_cache(1, 24)  # the copy computes the lm_head on the rows asked for only
        last = generator.forward(embeds[None, :10], kv, np.arange(10)[None], runner, rows=1)[0]
        tail = generator.forward(embeds[None, 10:], kv, np.arange(10, 24)[None], runner, rows=4)[0]
    assert last.shape == (1, stepped.shape[1]) and tail.shape == (4, stepped.shape[1])
    np.testing.assert_allclose(np.concatenate([last, tail]), stepped[[9, 20, 21, 22, 23]], atol=1e-4)
    assert sorted(p.name for p in inplace.iterdir()) == before  # nothing written beside the artifacts


def test_a_model_against_itself_and_the_pytorch_reference(inplace):
    settings = Settings(tokens=40, call_tokens=16, greedy_tokens=8)
    with Generator(ArtifactSet.open(inplace), "ort") as ort_side, Generator(ArtifactSet.open(inplace), "ort") as same:
        itself = compare(ort_side, same, settings)
        with Generator(ArtifactSet.open(inplace), "torch") as torch_side:
            against_torch = compare(torch_side, ort_side, settings)
    q = itself.quality
    assert q.tokens == 40 and q.mean_kl == 0.0 and q.top1_agreement == 1.0 and q.greedy_identical == 1.0
    assert q.greedy_prompts == 3 and itself.greedy_prefix_agreement == 1.0 and itself.n_ctx == 512  # tiny's context
    assert "skipped" in itself.long_context and "context (512 tokens)" in itself.long_context["skipped"]
    assert against_torch.quality.mean_kl < 1e-6 and against_torch.quality.top1_agreement == 1.0
    assert set(itself.to_dict()) >= set(Quality.__dataclass_fields__) | {"greedy_prefix_agreement", "long_context"}


def test_dynamic_layout_scores_with_its_own_all_logits_decoder(tiny_graphs):
    with Generator(ArtifactSet.open(tiny_graphs), "ort") as a, Generator(ArtifactSet.open(tiny_graphs), "ort") as b:
        with logits_runner(a) as runner:
            assert runner is a.runners["decoder"]
        result = compare(a, b, Settings(tokens=20, greedy_tokens=0))
    assert result.quality.tokens == 20 and result.quality.mean_kl == 0.0 and result.greedy_prefix_agreement is None


def test_static_layout_is_scored_one_token_per_call(tmp_path):
    from vlm_export.export.pipeline import export_model
    from vlm_export.spec.graph_io import ExportOptions

    out = tmp_path / "static"
    export_model(tiny_spec("ldpnet"), out, ExportOptions(layout="static", prefill_chunk=32, kv_buffer=256))  # room for the image prompt
    with Generator(ArtifactSet.open(out), "ort") as a, Generator(ArtifactSet.open(out), "ort") as b:
        with logits_runner(a) as runner:
            assert runner is None
        result = compare(a, b, Settings(tokens=20, greedy_tokens=2))
    assert result.n_ctx == 256 - 32 + 1  # the fixed buffer, less one chunk of front padding
    assert result.quality.tokens == 20 and result.quality.mean_kl == 0.0 and result.quality.top1_agreement == 1.0


def test_float_caches_are_scored_in_larger_calls_with_the_same_values(inplace, tmp_path):
    """Through a float KV cache the call size changes nothing but rounding: 256 ids per call (auto)
    scores as 16 per call does; an int8 cache on either side keeps 16 (each call reads its loss)."""
    from types import SimpleNamespace

    from vlm_export.quality.scoring import CALL_TOKENS, FLOAT_CACHE_CALL_TOKENS, call_tokens_for

    broken = tmp_path / "perturbed"
    shutil.copytree(inplace, broken)
    scale_matmul_weight(broken, "decoder_inplace.onnx", "/lm_head/", -3.0)
    with Generator(ArtifactSet.open(inplace), "ort") as reference, Generator(ArtifactSet.open(broken), "ort") as candidate:
        auto = compare(reference, candidate, Settings(tokens=96, greedy_tokens=0))
        small = compare(reference, candidate, Settings(tokens=96, call_tokens=CALL_TOKENS, greedy_tokens=0))
    assert (auto.call_tokens, small.call_tokens) == (FLOAT_CACHE_CALL_TOKENS, CALL_TOKENS)
    assert auto.quality.mean_kl > 1e-3 and auto.quality.mean_kl == pytest.approx(small.quality.mean_kl, rel=1e-4)
    assert auto.quality.top1_agreement == small.quality.top1_agreement
    float_side, int8_side = SimpleNamespace(kv_dtype=np.dtype(np.float32)), SimpleNamespace(kv_dtype=np.dtype(np.int8))
    assert call_tokens_for(float_side, float_side) == FLOAT_CACHE_CALL_TOKENS
    assert call_tokens_for(float_side, int8_side) == call_tokens_for(int8_side, float_side) == CALL_TOKENS


def test_each_side_is_fed_at_its_own_call_size():
    """An int8-cache candidate is fed 16 ids per call while its float-cache reference takes 256 (so the
    reference's recording is the one every float comparison replays); every position is scored once."""
    from vlm_export.quality.scoring import score_sequence

    class Side:
        def __init__(self):
            self.calls = []

        def start(self, context, capacity):
            return np.zeros((1, 5), np.float32)

        def feed(self, embeds):
            self.calls.append(embeds.shape[0])
            return np.tile(embeds[:, :1], (1, 5)).astype(np.float32)

    reference, candidate, acc = Side(), Side(), Accumulator()
    rows = np.arange(600, dtype=np.float32)[:, None]
    score_sequence((reference, candidate), (rows, rows), [i % 5 for i in range(600)], 100, (256, 16), acc)
    assert reference.calls == [256, 243] and candidate.calls == [16] * 31 + [3]
    assert acc.result().tokens == 500


def test_a_perturbed_candidate_goes_over_its_budget(inplace, tmp_path):
    from vlm_export.quality.scoring import measure

    broken = tmp_path / "perturbed"
    shutil.copytree(inplace, broken)
    scale_matmul_weight(broken, "decoder_inplace.onnx", "/lm_head/", -20.0)
    q = measure(inplace, broken, tokens=24, greedy_tokens=4)
    assert q.mean_kl > 0.01 and q.top1_agreement < 0.95 and q.perplexity_reference != q.perplexity
    verdict = BUDGETS["int8"].verdict(q)
    assert not verdict.passed and "mean KL" in verdict.misses[0]


def test_the_reference_side_is_scored_once_per_process(inplace, tmp_path, monkeypatch):
    """A second candidate against the same reference replays the reference's recorded logits and
    greedy answers (reference_cache.py): the same numbers as scoring it afresh, no reference run."""
    from vlm_export.quality import scoring
    from vlm_export.quality.reference_cache import CACHE, Recording
    from vlm_export.quality.scoring import measure

    broken = tmp_path / "perturbed"
    shutil.copytree(inplace, broken)
    scale_matmul_weight(broken, "decoder_inplace.onnx", "/lm_head/", -3.0)
    CACHE.clear()
    fresh = measure(inplace, broken, tokens=24, greedy_tokens=4)
    assert len(CACHE.logits) == 1 and len(CACHE.answers) == 3  # one eval chunk, three greedy prompts
    recordings = []
    monkeypatch.setattr(scoring, "Recording", lambda side: recordings.append(side) or Recording(side))
    replayed = measure(inplace, broken, tokens=24, greedy_tokens=4)
    assert recordings == [] and replayed == fresh
    itself = measure(inplace, inplace, tokens=24, greedy_tokens=4)  # another candidate, the same recorded reference
    assert recordings == [] and itself.mean_kl == 0.0 and itself.top1_agreement == 1.0
    CACHE.clear()
    assert CACHE.directory is None and not CACHE.logits


def test_a_reference_recorded_ahead_gives_the_same_comparison(inplace, tmp_path, monkeypatch):
    """record_reference computes a later measure's reference side of the eval chunks beforehand (a
    build fills its wait for images with it): that measure then runs no reference chunk and gives
    the numbers scoring afresh gives; a second record finds them all kept."""
    from vlm_export.quality import scoring
    from vlm_export.quality.reference_cache import CACHE, Recording
    from vlm_export.quality.scoring import measure, record_reference

    broken = tmp_path / "perturbed"
    shutil.copytree(inplace, broken)
    scale_matmul_weight(broken, "decoder_inplace.onnx", "/lm_head/", -3.0)
    CACHE.clear()
    fresh = measure(inplace, broken, tokens=300, greedy_tokens=0)
    CACHE.clear()
    assert record_reference(inplace, tokens=300) == 2 and len(CACHE.logits) == 2  # 300 tokens: two chunks of tiny's 512
    recordings = []
    monkeypatch.setattr(scoring, "Recording", lambda side: recordings.append(side) or Recording(side))
    assert measure(inplace, broken, tokens=300, greedy_tokens=0) == fresh and recordings == []
    assert record_reference(inplace, tokens=300) == 0
    CACHE.clear()


def test_a_replayed_reference_opens_no_all_positions_copy(inplace, monkeypatch):
    from vlm_export.quality.reference_cache import CACHE

    settings = Settings(tokens=24, call_tokens=8, greedy_tokens=4)
    CACHE.clear()
    with Generator(ArtifactSet.open(inplace), "ort") as reference, Generator(ArtifactSet.open(inplace), "ort") as candidate:
        first = compare(reference, candidate, settings)
        runner, opened = reference.runners["decoder"], []
        original = runner.all_logits
        monkeypatch.setattr(runner, "all_logits", lambda: (opened.append("reference"), original())[1])
        second = compare(reference, candidate, settings)
    CACHE.clear()
    assert opened == []  # every sequence and greedy answer of the reference was replayed
    assert (second.quality.mean_kl, second.quality.top1_agreement, second.quality.tokens) == \
        (first.quality.mean_kl, first.quality.top1_agreement, first.quality.tokens) == (0.0, 1.0, 24)
