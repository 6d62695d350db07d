"""The onnxruntime-genai peer, measured by its own runtime. This file runs under the genai venv's
interpreter (bench/genai_venv.sh: onnxruntime-genai with transformers 5.x, which our venv does not
pin), with the repository on PYTHONPATH; it imports only numpy, onnxruntime_genai and the
numpy-only quality modules, never the rest of vlm_export.

    speed MODEL_DIR SETTINGS_JSON     -> {"prefill_seconds": [...], "decode_seconds": {"128": [...]}}
    quality REQUEST_JSON              -> {"quality": Quality.to_dict()}

Decode at context L = one `generate_next_token()` (its greedy search included) after an L-token
prompt; prefill = one `append_tokens` of the whole prompt on a fresh generator.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def _model(directory: str):
    """Its CPU provider; threads come from its genai_config.json (genai_peer.build sets them)."""
    import onnxruntime_genai as og

    config = og.Config(directory)
    config.clear_providers()  # the CPU provider only
    model = og.Model(config)
    return og, model


def _generator(og, model, max_length: int):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    return og.Generator(model, params)


def speed(directory: str, settings: dict) -> dict:
    og, model = _model(directory)
    rng = np.random.default_rng(0)
    vocab = json.loads((Path(directory) / "genai_config.json").read_text())["model"]["vocab_size"]
    longest = max([*settings["contexts"], settings["prefill_tokens"]]) + settings["decode_steps"] + 8

    def tokens(n: int) -> np.ndarray:
        return rng.integers(300, vocab, n).astype(np.int32)

    prompt, prefill = tokens(settings["prefill_tokens"]), []
    for index in range(settings["warmup"] + settings["repeats"]):
        generator = _generator(og, model, longest)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        elapsed = time.perf_counter() - start
        if index >= settings["warmup"]:
            prefill.append(elapsed)
        del generator
    decode = {}
    for context in settings["contexts"]:
        generator = _generator(og, model, longest)
        generator.append_tokens(tokens(context))
        times = []
        for _ in range(settings["decode_steps"]):
            start = time.perf_counter()
            generator.generate_next_token()
            times.append(time.perf_counter() - start)
        decode[str(context)] = times[settings["warmup"]:] or times
        del generator
    return {"prefill_seconds": prefill, "decode_seconds": decode, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return 0


def _chunk_logits(og, model, ids: list[int], context: int, scored: int, call_tokens: int) -> np.ndarray:
    """Teacher-forced like quality/scoring.py: the context half in one call, then the scored ids
    `call_tokens` per call through its KV cache; -> (scored, V) logits predicting ids[context:].
    (Its prompt calls return every position's logits: (1, S, V).)"""
    generator = _generator(og, model, len(ids) + 1)
    generator.append_tokens(np.asarray(ids[:context], dtype=np.int32))
    rows = [np.asarray(generator.get_output("logits"), dtype=np.float32)[0, -1:]]
    feed = ids[context:context + scored - 1]
    for start in range(0, len(feed), call_tokens):
        generator.append_tokens(np.asarray(feed[start:start + call_tokens], dtype=np.int32))
        rows.append(np.asarray(generator.get_output("logits"), dtype=np.float32)[0])
    del generator
    return np.concatenate(rows)


def quality(request: dict) -> dict:
    from vlm_export.quality.eval_set import chunks
    from vlm_export.quality.metrics import Accumulator

    og, reference = _model(request["reference"])
    _, candidate = _model(request["candidate"])
    ids, accumulator = request["ids"], Accumulator()
    for chunk in chunks(len(ids), request["n_ctx"], request["tokens"]):
        chunk_ids = chunk.ids(ids, request.get("bos"))
        targets = np.asarray(chunk_ids[chunk.context:chunk.context + chunk.scored])
        accumulator.add(_chunk_logits(og, reference, chunk_ids, chunk.context, chunk.scored, request["call_tokens"]),
                        _chunk_logits(og, candidate, chunk_ids, chunk.context, chunk.scored, request["call_tokens"]), targets)
    return {"quality": accumulator.result().to_dict()}


def main(argv: list[str] | None = None) -> None:
    args = argv or sys.argv[1:]
    if args[0] == "speed":
        print(json.dumps(speed(args[1], json.loads(args[2]))))
    elif args[0] == "quality":
        print(json.dumps(quality(json.loads(Path(args[1]).read_text()))))
    else:
        raise SystemExit(f"unknown command {args[0]!r}: speed MODEL_DIR SETTINGS_JSON | quality REQUEST_JSON")


if __name__ == "__main__":
    main()
