"""The one generation loop, shared by every backend and every decoder layout.

    image -> preprocess -> vision graph ----------------------+
    prompt -> template -> ids (image marker) -> embed graph -> splice -> prefill -> decode ...

How a batch is packed into prefill calls, which graph takes them and what the KV cache is are the
decoder layout's (spec/layouts/): this loop asks the layout, never compares layout names.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vlm_export.errors import VlmExportError
from vlm_export.model.prompt import Message, render_prompt, user_turn
from vlm_export.model.text_stream import TextStream
from vlm_export.results import GenerationResult
from vlm_export.runtime.all_logits import LOGITS_FROM
from vlm_export.runtime.artifact_set import ArtifactSet, kv_dtype
from vlm_export.runtime.image_encoder import ImageEncoder, vision_identity
from vlm_export.runtime.kv_prefix import KvPrefix
from vlm_export.runtime.sampling import SamplingParams, sample_token
from vlm_export.spec.layouts import KVCache, layout_of
from vlm_export.spec.model_spec import IMAGE_TOKEN_INDEX

OnToken = Callable[[int, str], None]  # (row, new text)


@dataclass
class Request:
    messages: list[Message]
    image: object = None  # path or PIL image

    @classmethod
    def ask(cls, prompt: str, image=None) -> Request:
        return cls([user_turn(prompt, with_image=image is not None)], image)


class Generator:
    def __init__(self, artifacts: ArtifactSet, backend: str = "ort", open_on_use: bool = False, **runner_options):
        """`open_on_use`: every graph's session is created when first run (scoring: a replayed side
        runs none of them); by default the text graphs' are created now, so that a load error shows
        before any work and the first answer's timings are the graphs' own."""
        self.artifacts, self.spec = artifacts, artifacts.spec
        self.tokenizer = artifacts.tokenizer()
        self.runners = artifacts.runners(backend, **runner_options)
        for name, runner in self.runners.items():
            if open_on_use:
                runner.open_on_use()
            elif name != "vision":  # on the first image: a text-only answer skips its session (1.3 s for smol's)
                runner.activate()
        self.layout = layout_of(artifacts.layout)  # the decoder layout: packing, graphs, KV cache
        self.decode_graph = self.layout.decode_graph
        decoder = artifacts.graphs[self.decode_graph]
        self.float_dtype = np.dtype(decoder["inputs"][0]["dtype"])
        # the K/V buffers' own type: int8 where the graph keeps an int8 cache (cpu int8/int4 variants)
        self.kv_dtype = kv_dtype(decoder)
        self.timings: dict[str, float] = {}
        self._decoder_seconds = 0.0
        self.image_encoder = ImageEncoder(lambda: self.runners.get("vision"), self.spec, self.float_dtype,
                                          vision_identity(artifacts, backend, runner_options))
        # the K/V of the template's first token, computed in float at build time (runtime/kv_prefix.py)
        self.kv_prefix = KvPrefix.load(artifacts.directory, artifacts.manifest.get("kv_prefix")) if artifacts.directory else None

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- inputs -----------------------------------------------------------------------------
    def _image_embeds(self, images: list) -> list[np.ndarray]:
        return self.image_encoder(images)  # an image file's embeddings once per process (image_encoder.py)

    def _embed_ids(self, ids: list[int]) -> np.ndarray:
        embed = self.runners["embed"]
        out = embed.infer({"input_ids": np.asarray([ids], dtype=np.int64)})
        return embed.to_numpy(out["inputs_embeds"])[0]

    def encode(self, request: Request, image_embeds: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Request -> (T, C) prompt embeddings with the image spliced in, and the text ids seen."""
        text = render_prompt(self.spec.template, request.messages, self.tokenizer)
        ids = self.tokenizer.tokenize_prompt(text, add_bos=self.spec.template.add_bos)
        if (IMAGE_TOKEN_INDEX in ids) != (image_embeds is not None):
            raise VlmExportError("the conversation's <image> markers and the image given do not match",
                                 "give one image with the turn that mentions it")
        pieces, start = [], 0
        for pos in [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]:
            if pos > start:
                pieces.append(self._embed_ids(ids[start:pos]))
            pieces.append(image_embeds)
            start = pos + 1
        if start < len(ids):
            pieces.append(self._embed_ids(ids[start:]))
        text_ids = np.asarray([t for t in ids if t != IMAGE_TOKEN_INDEX], dtype=np.int64)
        return np.concatenate(pieces).astype(self.float_dtype), text_ids

    # -- decoder steps ---------------------------------------------------------------------
    def _step(self, name: str, kv, embeds, keep: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self._run(self.runners[name], kv, embeds, keep, positions)[:, -1].astype(np.float32)  # (B, V)

    def _run(self, runner, kv, embeds, keep: np.ndarray, positions: np.ndarray, extra: dict | None = None) -> np.ndarray:
        """One decoder call: (B, S', V) logits as the graph returns them (S' = S or 1); `kv` updated."""
        feeds = {"inputs_embeds": embeds, **kv.feeds(keep, positions), **(extra or {})}
        started = time.perf_counter()
        outputs = runner.infer(feeds)
        self._decoder_seconds += time.perf_counter() - started
        kv.update(outputs, keep)
        return runner.to_numpy(outputs["logits"])

    # -- a public session API for teacher-forced scoring (vlm_export/quality/scoring.py) -----------
    def embed_ids(self, ids: list[int]) -> np.ndarray:
        """Token ids -> (T, C) embeddings from the embed graph."""
        return self._embed_ids(list(ids))

    def image_embeds(self, image) -> np.ndarray:
        """One image (path or PIL image) -> (144, C) embeddings from the vision graph."""
        return self._image_embeds([image])[0]

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KV cache of this layout for `capacity` positions (dynamic: grows, capacity unused)."""
        decoder = self.artifacts.graphs[self.decode_graph]
        return self.layout.new_cache(self.spec.llm, batch, self.kv_dtype, capacity, decoder,
                                     self.runners[self.decode_graph].to_numpy)

    def max_positions(self) -> int:
        """The longest sequence one cache holds: the model's context (static layout: its fixed KV
        buffer less one prefill chunk of front padding)."""
        positions = self.layout.max_positions(self.artifacts.graphs, self.spec.llm.max_context)
        return positions - (self.kv_prefix.length if self.kv_prefix else 0)  # the prefix's slots are taken

    def start(self, prompts: list[np.ndarray], max_new_tokens: int) -> DecodeSession:
        """The loop's own prefill of a batch: `prompts` (T_i, C) embeddings per row (`encode`,
        `embed_ids`) -> a DecodeSession holding the KV cache, each row's last logits and next position.
        Raises VlmExportError when the longest prompt + max_new_tokens exceeds the model's context
        (or the static layout's KV buffer)."""
        kv, logits, positions = self._prefill(prompts, max_new_tokens)
        return DecodeSession(self, kv, logits, positions)

    def forward(self, embeds: np.ndarray, kv, positions: np.ndarray, runner=None, rows: int | None = None) -> np.ndarray:
        """(B, S, C) embeddings at (B, S) positions, no padding, through `kv` -> (B, S', V) float32
        logits: S' = S from a decoder that returns every position, 1 from one that returns the last.
        `runner`: another runner of the decode graph's inputs (an all-positions copy); default the
        decode graph's own. `rows`: only the last `rows` positions' logits are wanted (S' <= rows; an
        all-positions copy then skips the lm_head on the others)."""
        runner = runner or self.runners[self.decode_graph]
        keep = np.ones(embeds.shape[:2], dtype=np.int64)
        extra = {}
        if LOGITS_FROM in runner.input_names:
            extra[LOGITS_FROM] = np.array([embeds.shape[1] - rows if rows else 0], dtype=np.int64)
        logits = self._run(runner, kv, embeds.astype(self.float_dtype, copy=False), keep, positions, extra)
        return (logits[:, -rows:] if rows else logits).astype(np.float32, copy=False)

    def _prefill(self, prompts: list[np.ndarray], max_new_tokens: int):
        # A KV prefix (runtime/kv_prefix.py) fills the first slots; a prompt that starts with its tokens
        # drops them, any other gets them in front (an attention sink, as the float stage it was made from)
        prefix = self.kv_prefix
        shift = prefix.length if prefix else 0
        prompts = [p[shift if prefix.applies(p) else 0:] if prefix else p for p in prompts]
        plan = self.layout.pack([p.astype(self.float_dtype, copy=False) for p in prompts], max_new_tokens + shift,
                                self.spec.llm.max_context, self.artifacts.graphs)
        kv = self.new_cache(len(prompts), plan.capacity)
        if prefix:
            kv.write_prefix(prefix.values)
        for start in range(0, plan.embeds.shape[1], plan.step):
            sl = slice(start, start + plan.step)
            logits = self._step(plan.graph, kv, plan.embeds[:, sl], plan.keep[:, sl], plan.positions[:, sl] + shift)
        return kv, logits, plan.lengths + shift

    # -- the loop --------------------------------------------------------------------------------
    def generate(self, requests: list[Request], params: SamplingParams = SamplingParams(),
                 on_token: OnToken | None = None) -> list[GenerationResult]:
        if self.layout.fixed_batch and len(requests) > 1:
            # NPU graphs have a fixed batch of 1: run the requests one after another.
            results = []
            for row, request in enumerate(requests):
                shifted = (lambda _r, text, row=row: on_token(row, text)) if on_token else None
                results += self.generate([request], params, shifted)
            return results
        start = time.perf_counter()
        images = [r.image for r in requests if r.image is not None]
        image_embeds = iter(self._image_embeds(images))
        vision_done = time.perf_counter()
        encoded = [self.encode(r, next(image_embeds) if r.image is not None else None) for r in requests]
        prompts, seen = [e[0] for e in encoded], [e[1] for e in encoded]
        session = self.start(prompts, params.max_new_tokens)
        logits = session.logits
        prefill_done = time.perf_counter()
        rng = np.random.default_rng(params.seed)
        stops = set(self.spec.llm.eos_token_ids)
        stop_strings = params.stop_strings + self.spec.template.stop_strings
        streams = [TextStream(self.tokenizer.decode, stop_strings, (lambda text, row=row: on_token(row, text)) if on_token else None)
                   for row in range(len(requests))]
        done = [""] * len(requests)
        first_token_at, steps = None, 0
        self._decoder_seconds = 0.0
        while True:
            tokens = np.zeros(len(requests), dtype=np.int64)
            for row, stream in enumerate(streams):
                if done[row]:
                    continue
                token = sample_token(logits[row], np.concatenate([seen[row], stream.ids]).astype(np.int64), params, rng)
                tokens[row] = token
                if token in stops:
                    done[row] = "eos"
                else:
                    stream.push(token)
                    if stream.stopped:
                        done[row] = "stop_string"
                    elif len(stream.ids) >= params.max_new_tokens:
                        done[row] = "max_new_tokens"
                if done[row]:
                    stream.finish()  # a row that is done flushes the text it held back
            first_token_at = first_token_at or time.perf_counter()
            if all(done):
                break
            logits = session.step(tokens)
            steps += 1
        end = time.perf_counter()
        decode_seconds = max(end - first_token_at, 1e-9)
        prompt_tokens = max(p.shape[0] for p in prompts)
        timings = {
            "vision_ms": (vision_done - start) * 1e3,
            "ttft_ms": (first_token_at - start) * 1e3,
            "prefill_tok_s": prompt_tokens * len(prompts) / max(prefill_done - vision_done, 1e-9),
            "decode_tok_s": steps / decode_seconds,
            # Share of decode time spent outside the decoder graph (embedding, sampling, bookkeeping).
            "loop_overhead_pct": 100.0 * (1 - self._decoder_seconds / decode_seconds) if steps else 0.0,
        }
        self.timings = timings
        return [GenerationResult(s.finish(), s.ids, p.shape[0], timings, reason) for s, p, reason in zip(streams, prompts, done)]


class DecodeSession:
    """A batch past its prefill, decoded one token per row per step: the generation loop's own
    prefill-then-step, public for the bench, calibration and scoring (`Generator.start`).

        session = generator.start([embeds], max_new_tokens)   # embeds: (T, C) per row
        session.logits                                         # (B, V) float32, each row's last logits
        session.step(token_ids)                                # (B,) ids -> the next (B, V) logits

    `cache` is the layout's KV cache (spec/layouts/; the inplace decoder writes into its
    arrays), `positions` (B,) int64 each row's next position. Stepping past the `max_new_tokens`
    given to `start` overruns a fixed cache: the decoder graph raises.
    """

    def __init__(self, generator: Generator, cache, logits: np.ndarray, positions: np.ndarray):
        self._generator = generator
        self.cache = cache
        self.logits = logits
        self.positions = positions

    @property
    def batch(self) -> int:
        return int(self.positions.shape[0])

    def step(self, token_ids) -> np.ndarray:
        """One token per row (ints, (B,)) through the embed graph and the decoder -> (B, V) float32."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(self.batch, 1)
        embeds = self._generator.runners["embed"].infer({"input_ids": ids})["inputs_embeds"]  # stays backend-native
        return self.step_embeds(embeds)

    def step_embeds(self, embeds) -> np.ndarray:
        """(B, 1, C) embeddings (numpy or the backend's own tensors) -> (B, V) float32 logits."""
        generator = self._generator
        keep = np.ones((self.batch, 1), np.int64)
        self.logits = generator._step(generator.decode_graph, self.cache, embeds, keep, self.positions[:, None])
        self.positions = self.positions + 1
        return self.logits
