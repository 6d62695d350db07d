"""Teacher-forced scoring of a candidate against its reference, through the generation loop.

Both sides get the same token ids (the reference's tokenizer; the candidate's must agree) and
each embeds them with its own embed graph; their logits at every scored position go into one
`Accumulator` (metrics.py), streamed call by call so only per-position scalars are kept.

    eval prose -> ids -> chunks of n_ctx (eval_set.py)
    per chunk, on each side:   prefill context half (one call) -> last logits       -> scored
                               scored half through the KV cache, each side at its own
                               ids per call: 16 where it keeps an int8 cache (each call
                               reads the earlier ones' quantized K/V, as decode does:
                               its error shows only here), 256 for a float cache (the
                               same values whatever the call size; llama.cpp's
                               perplexity feeds whole batches too)
                                                                 -> every row's logits -> scored

The reference's recording (reference_cache.py) is keyed by its own call size, so the fp32 side of the
int8-KV screen (a 16-per-call candidate) is the first chunk of every later float-cache comparison.

Logits of every position come from the decoder itself where it returns them (dynamic layout
exported with `--logits all`), from an all-positions copy of it otherwise (inplace layout on ONNX
Runtime: runtime/all_logits.py; on PyTorch: the same module without the last-row gather); a
decoder that can do neither (static layout, TensorRT) is scored one token per call.

Then greedy answers to the eval prompts (identical or not, and the agreeing prefix), and one long
prompt of prose (with and without the eval image), scored the same way where the context allows.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlm_export.errors import VlmExportError
from vlm_export.progress import step
from vlm_export.quality.eval_set import chunks, eval_image, eval_requests, prose
from vlm_export.quality.metrics import Accumulator, Quality
from vlm_export.quality.reference_cache import CACHE, Recording, Replay, identity, key

DEFAULT_N_CTX = 1024
CALL_TOKENS = 16  # ids per decoder call over the scored half where a KV cache is lossy (decode-like: each call reads it)
FLOAT_CACHE_CALL_TOKENS = 256  # where both caches are float: fewer, larger calls (the logits of a call: 256 x V floats)
GREEDY_TOKENS = 32
LONG_PROMPT_TOKENS = 1536  # prose ids in the long-context prompt (plus the template, plus the image)


@dataclass(frozen=True)
class Settings:
    tokens: int  # scored positions on the eval prose
    n_ctx: int | None = None  # None: DEFAULT_N_CTX, or less where the model's context is shorter
    call_tokens: int | None = None  # both sides' ids per call; None: each side's own (side_call_tokens)
    greedy_tokens: int = GREEDY_TOKENS  # 0: no greedy answers
    long_prompt_tokens: int = LONG_PROMPT_TOKENS  # 0: no long-context case

    def __post_init__(self):
        if self.tokens < 1 or (self.call_tokens is not None and self.call_tokens < 1) or self.greedy_tokens < 0 or self.long_prompt_tokens < 0:
            raise VlmExportError(f"invalid scoring settings {self}", "score at least 1 token, at least 1 per call")


@dataclass
class Comparison:
    quality: Quality  # the eval prose, plus the greedy answers
    greedy_prefix_agreement: float | None  # mean share of each greedy answer before the first difference
    n_ctx: int
    long_context: dict = field(default_factory=dict)  # {"prompt_tokens", "text", "image"} or {"skipped": why}
    seconds: float = 0.0
    settings: Settings | None = None
    call_tokens: int | None = None  # ids per call over the scored halves, as used (the fewer of the two sides')

    def to_dict(self) -> dict:
        settings = self.settings
        return {**self.quality.to_dict(), "greedy_prefix_agreement": self.greedy_prefix_agreement, "n_ctx": self.n_ctx,
                "call_tokens": self.call_tokens,
                "greedy_tokens": settings.greedy_tokens if settings else None,
                "long_context": self.long_context, "seconds": round(self.seconds, 1)}


def side_call_tokens(generator) -> int:
    """Ids per call over a scored half for one side: CALL_TOKENS where it keeps its KV cache in an
    integer type (int8: lossy, and its loss grows call by call), else FLOAT_CACHE_CALL_TOKENS."""
    return CALL_TOKENS if np.dtype(generator.kv_dtype).kind in "iu" else FLOAT_CACHE_CALL_TOKENS


def call_tokens_for(reference, candidate) -> int:
    """The fewest ids per call of the two sides (what a comparison reports as its call size)."""
    return min(side_call_tokens(reference), side_call_tokens(candidate))


def n_ctx_for(generator, wanted: int | None = None) -> int:
    """The chunk length a generator can score: at most its model's context (static layout: its
    fixed KV buffer, less one prefill chunk of front padding)."""
    return min(wanted or DEFAULT_N_CTX, generator.max_positions())


@contextmanager
def logits_runner(generator):
    """The runner that gives every position's logits for `generator`'s decode graph while the block
    lasts, or None (then one token per call)."""
    if not generator.layout.returns_every_position:  # its graphs return the last position only
        yield None
        return
    runner = generator.runners[generator.decode_graph]
    if not runner.graph.get("attrs", {}).get("last_logits_only", True):
        yield runner
        return
    with runner.all_logits() as copy:
        yield copy


class LazyLogitsRunner:
    """`logits_runner(generator)`, opened (into `stack`) the first time a side runs: a reference whose
    sequences this process has all scored before is replayed (reference_cache.py) and never builds
    its all-positions copy, an ORT session of the whole fp32 decoder."""

    def __init__(self, generator, stack: ExitStack):
        self.generator, self._stack, self._runner, self._open = generator, stack, None, False
        self.every_position = generator.layout.returns_every_position  # whether get() gives a runner

    def get(self):
        if not self._open:
            self._runner, self._open = self._stack.enter_context(logits_runner(self.generator)), True
        return self._runner


class _Side:
    """One generator's cache, position and logits runner while a sequence is scored."""

    def __init__(self, generator, runner: LazyLogitsRunner):
        self.generator, self._lazy = generator, runner
        self.kv, self.position = None, 0

    @property
    def runner(self):
        return self._lazy.get()

    def start(self, context: np.ndarray, capacity: int) -> np.ndarray:
        """(P, C) context embeddings -> (1, V) logits of its last position (predicting the next id)."""
        g = self.generator
        if g.layout.prefill_graph != g.decode_graph:  # a prefill graph of its own (fixed chunks): the loop's prefill
            session = g.start([context], capacity - context.shape[0])
            self.kv, self.position = session.cache, int(session.positions[0])
            return session.logits[:1]
        self.kv = g.new_cache(1, capacity)
        logits = g.forward(context[None], self.kv, np.arange(context.shape[0])[None], self.runner, rows=1)
        self.position = context.shape[0]
        return logits[0, -1:]

    def feed(self, embeds: np.ndarray) -> np.ndarray:
        """(S, C) embeddings of the next ids -> (S, V) logits, one per position, through the cache."""
        g, count = self.generator, embeds.shape[0]
        if self.runner is not None:
            logits = g.forward(embeds[None], self.kv, (self.position + np.arange(count))[None], self.runner)[0]
            self.position += count
            return logits
        rows = []
        for row in embeds:  # a last-logits decoder: one token per call
            rows.append(g.forward(row[None, None], self.kv, np.array([[self.position]]))[0, -1])
            self.position += 1
        return np.stack(rows)


def _feed(side, embeds: np.ndarray, call_tokens: int) -> np.ndarray:
    """(S, C) -> (S, V) logits, `call_tokens` ids per call."""
    parts = [side.feed(embeds[i:i + call_tokens]) for i in range(0, embeds.shape[0], call_tokens)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def score_sequence(sides: tuple[_Side, _Side], embeds: tuple[np.ndarray, np.ndarray], ids: list[int], context: int,
                   call_tokens: tuple[int, int], accumulator: Accumulator) -> None:
    """Rows `embeds` (T, C) per side, `ids` (T,) the id at each row: the logits at rows
    context-1 .. T-2 are scored against ids[context:] (T - context positions); `call_tokens`: ids
    per call of each side (reference, candidate)."""
    ids = np.asarray(ids, dtype=np.int64)
    total = ids.shape[0]
    if not 0 < context < total or (ids[context:] < 0).any():
        raise ValueError(f"cannot score rows {context}..{total} (an image row among them?)")
    ref, cand = sides
    accumulator.add(ref.start(embeds[0][:context], total), cand.start(embeds[1][:context], total), ids[context:context + 1])
    block = max(call_tokens)  # a multiple of the other (16 and 256), so each side's calls fall where they would alone
    for start in range(context, total - 1, block):
        end = min(start + block, total - 1)
        accumulator.add(_feed(ref, embeds[0][start:end], call_tokens[0]), _feed(cand, embeds[1][start:end], call_tokens[1]),
                        ids[start + 1:end + 1])


def _score_against_reference(reference, candidate, runners, sequence: str | None, embeds, ids, context: int,
                             call_tokens: tuple[int, int], accumulator: Accumulator) -> None:
    """score_sequence with the reference's side replayed when this process already scored the same
    sequence against the same reference (reference_cache.py), recorded otherwise."""
    recorded = CACHE.replay(sequence)
    side = Replay(recorded) if recorded is not None else Recording(_Side(reference, runners[0]))
    if embeds[0] is None:  # a replay reads no embeddings: the reference's were not computed
        embeds = (embeds[1], embeds[1])
    score_sequence((side, _Side(candidate, runners[1])), embeds, ids, context, call_tokens, accumulator)
    if recorded is None:
        CACHE.record(sequence, side.calls)


def _same_ids(reference, candidate, text: str) -> list[int]:
    ids = reference.tokenizer.encode_text(text)
    if candidate.tokenizer.encode_text(text) != ids:
        raise VlmExportError("the candidate's tokenizer gives other ids than the reference's on the eval text",
                             "compare artifact sets of the same model")
    return ids


def greedy(reference, candidate, new_tokens: int, accumulator: Accumulator) -> float | None:
    """Greedy answers to the eval prompts from both sides -> mean agreeing prefix share (the
    reference's answers kept per process: reference_cache.py)."""
    from vlm_export.runtime.sampling import SamplingParams

    if not new_tokens:
        return None
    params, prefixes, reference_id = SamplingParams(max_new_tokens=new_tokens), [], identity(reference, None)
    for request in eval_requests():
        answer = key(reference_id, "greedy", repr(request.messages), str(request.image), new_tokens)
        if answer not in CACHE.answers:
            CACHE.answers[answer] = reference.generate([request], params)[0].token_ids
        expected = CACHE.answers[answer]
        got = candidate.generate([request], params)[0].token_ids
        accumulator.add_greedy(expected, got)
        same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        prefixes.append(same / max(len(expected), 1))
    return float(np.mean(prefixes))


def prompt_rows(generator, request) -> tuple[np.ndarray, list[int]]:
    """A request -> (T, C) prompt embeddings (image spliced in) and the id at each row (-1: image)."""
    from vlm_export.model.prompt import render_prompt
    from vlm_export.spec.model_spec import IMAGE_TOKEN_INDEX

    image = generator.image_embeds(request.image) if request.image is not None else None
    embeds, _ = generator.encode(request, image)
    text = render_prompt(generator.spec.template, request.messages, generator.tokenizer)
    ids = generator.tokenizer.tokenize_prompt(text, add_bos=generator.spec.template.add_bos)
    image_rows = embeds.shape[0] - sum(1 for t in ids if t != IMAGE_TOKEN_INDEX)
    rows = [r for t in ids for r in ([-1] * image_rows if t == IMAGE_TOKEN_INDEX else [t])]
    return embeds, rows


def long_context(reference, candidate, stream: list[int], settings: Settings, runners, call_tokens: tuple[int, int]) -> dict:
    """The first `long_prompt_tokens` ids of prose as one user prompt, with and without the eval
    image; its last min(tokens, half) positions scored through the cache like the chunks."""
    from vlm_export.runtime.generation import Request

    limit = min(n_ctx_for(reference, 1 << 30), n_ctx_for(candidate, 1 << 30))
    if not settings.long_prompt_tokens:
        return {"skipped": "not asked for (long_prompt_tokens 0)"}
    if settings.long_prompt_tokens + 64 > limit:
        return {"skipped": f"the decoder's context ({limit} tokens) is shorter than the long prompt "
                           f"({settings.long_prompt_tokens} tokens of prose and the template)"}
    text = reference.tokenizer.decode(stream[:settings.long_prompt_tokens])
    out = {}
    for label, image in (("text", None), ("image", eval_image())):
        if label == "image" and image is None:
            out[label] = {"skipped": "no eval image"}
            continue
        request = Request.ask(text, image)
        cand_embeds, ids = prompt_rows(candidate, request)
        if len(ids) > limit:
            out[label] = {"skipped": f"{len(ids)} rows exceed the context of {limit}"}
            continue
        scored = min(settings.tokens, len(ids) // 2)
        sequence = key(identity(reference, runners[0].every_position), "long", ids, str(image), len(ids) - scored, call_tokens[0])
        ref_embeds = None
        if not CACHE.holds(sequence):  # recorded sequences were checked against these ids when recorded
            ref_embeds, ref_ids = prompt_rows(reference, request)
            if ref_ids != ids:
                raise VlmExportError("the candidate's tokenizer gives other ids than the reference's on the long prompt",
                                     "compare artifact sets of the same model")
        accumulator = Accumulator()
        _score_against_reference(reference, candidate, runners, sequence, (ref_embeds, cand_embeds), ids,
                                 len(ids) - scored, call_tokens, accumulator)
        out[label] = accumulator.result().to_dict()
        out["prompt_tokens"] = max(out.get("prompt_tokens", 0), len(ids))
    return out


def compare(reference, candidate, settings: Settings) -> Comparison:
    """Two open Generators (any backends, any layouts) -> the candidate's quality against the reference
    (each image file through each vision graph once per process: runtime/image_encoder.py)."""
    from vlm_export.runtime.image_encoder import cached_images

    with cached_images():
        return _compare(reference, candidate, settings)


def _chunk_keys(reference, runner: LazyLogitsRunner, stream: list[int], n_ctx: int, settings: Settings, call: int):
    """(ids, context, the reference-cache key of the reference's side) of each eval-prose chunk."""
    bos = reference.spec.llm.bos_token_id if reference.spec.template.add_bos else None
    reference_id = identity(reference, runner.every_position)
    for chunk in chunks(len(stream), n_ctx, settings.tokens):
        ids = chunk.ids(stream, bos)
        yield ids, chunk.context, key(reference_id, "chunk", ids, chunk.context, call)


def _compare(reference, candidate, settings: Settings) -> Comparison:
    started = time.perf_counter()
    accumulator = Accumulator()
    prefix = greedy(reference, candidate, settings.greedy_tokens, accumulator)  # the loop's own runners
    stream = _same_ids(reference, candidate, prose())
    n_ctx = min(n_ctx_for(reference, settings.n_ctx), n_ctx_for(candidate, settings.n_ctx))
    calls = (settings.call_tokens or side_call_tokens(reference), settings.call_tokens or side_call_tokens(candidate))
    with ExitStack() as stack:
        runners = [LazyLogitsRunner(g, stack) for g in (reference, candidate)]
        plan = list(_chunk_keys(reference, runners[0], stream, n_ctx, settings, calls[0]))
        step(f"scoring {settings.tokens} tokens: {len(plan)} chunk(s) of {n_ctx}, {calls[1]} per call")
        for ids, context, sequence in plan:
            _score_against_reference(reference, candidate, runners, sequence, (reference.embed_ids(ids), candidate.embed_ids(ids)),
                                     ids, context, calls, accumulator)
        long = long_context(reference, candidate, stream, settings, runners, calls)
    return Comparison(accumulator.result(), prefix, n_ctx, long, time.perf_counter() - started, settings, min(calls))


def record_reference(reference_dir: Path, tokens: int, backend: str = "ort") -> int:
    """The reference side of every later `measure(reference_dir, ..., tokens)`'s eval-prose chunks,
    computed now and kept in this process (reference_cache.py): the same calls a comparison makes on
    that side (its own ids per call), for a caller with time to fill before its first comparison (a
    build waiting for the images its calibration needs). Returns the chunks computed (0: all kept)."""
    from vlm_export.runtime.artifact_set import ArtifactSet
    from vlm_export.runtime.generation import Generator

    settings, computed = Settings(tokens), 0
    with Generator(ArtifactSet.open(reference_dir, check_hashes=False), backend, open_on_use=True) as reference, \
            ExitStack() as stack:
        runner = LazyLogitsRunner(reference, stack)
        stream = reference.tokenizer.encode_text(prose())
        call = side_call_tokens(reference)
        for ids, context, sequence in _chunk_keys(reference, runner, stream, n_ctx_for(reference, settings.n_ctx), settings, call):
            if sequence is None or CACHE.holds(sequence):
                continue
            side, embeds = Recording(_Side(reference, runner)), reference.embed_ids(ids)
            side.start(embeds[:context], len(ids))
            _feed(side, embeds[context:len(ids) - 1], call)
            CACHE.record(sequence, side.calls)
            computed += 1
    return computed


def compare_dirs(reference_dir: Path, candidate_dir: Path, settings: Settings, backend: str = "ort") -> Comparison:
    from vlm_export.runtime.artifact_set import ArtifactSet
    from vlm_export.runtime.generation import Generator

    with Generator(ArtifactSet.open(reference_dir, check_hashes=False), backend, open_on_use=True) as reference, \
            Generator(ArtifactSet.open(candidate_dir, check_hashes=False), backend, open_on_use=True) as candidate:
        return compare(reference, candidate, settings)


def measure(reference_dir: Path, candidate_dir: Path, tokens: int, backend: str = "ort", **settings) -> Quality:
    """A built variant against its full-precision baseline over `tokens` scored positions."""
    return compare_dirs(Path(reference_dir), Path(candidate_dir), Settings(tokens, **settings), backend).quality
