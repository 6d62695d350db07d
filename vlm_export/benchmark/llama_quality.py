"""Quality of llama.cpp rows: every candidate GGUF against the F32 GGUF of the same weights,
teacher-forced on the eval prose with the scoring module's chunks (quality/eval_set.py), through
the one `Accumulator` (quality/metrics.py).

    ids (given: the same ids as our rows) -> chunks of n_ctx, first half context, second half scored
    per chunk: F32.eval(ids) -> logits at every position --+
               candidate.eval(ids) -> logits ------------+--> Accumulator per candidate

Every model is loaded once and fed the same chunk in turn, so the F32 logits are never stored.
Runs in its own process (`python -m vlm_export.benchmark.llama_quality REQUEST_JSON`): a native
crash becomes a row that says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from vlm_export.errors import require_module
from vlm_export.quality.eval_set import chunks
from vlm_export.quality.metrics import Accumulator


def score(reference: Path, candidates: list[Path], ids: list[int], tokens: int, n_ctx: int, threads: int,
          bos: int | None = None, text: str | None = None) -> dict:
    """-> {"quality": {candidate path: Quality.to_dict()}, "tokenizer_agrees": bool or None (does
    llama.cpp's own tokenizer give `ids` for `text`?)}. A candidate equal to `reference` is scored
    against itself (mean KL 0, its own perplexity)."""
    llama_cpp = require_module("llama_cpp", "bench", "the llama.cpp comparison")

    def load(path: Path):
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=threads,
                               n_threads_batch=threads, verbose=False)

    models = {Path(p): load(Path(p)) for p in dict.fromkeys([reference, *candidates])}
    accumulators = {Path(p): Accumulator() for p in candidates}
    try:
        ref = models[Path(reference)]
        plan = chunks(len(ids), n_ctx, tokens)
        for chunk in plan:
            chunk_ids = chunk.ids(ids, bos)
            targets = np.asarray(chunk_ids[chunk.context:chunk.context + chunk.scored])
            rows = slice(chunk.context - 1, chunk.context - 1 + chunk.scored)  # logits that predict the targets
            logits = {}
            for path, model in models.items():
                model.reset()
                model.eval(chunk_ids)
                logits[path] = np.array(model.scores[rows], dtype=np.float32)  # (scored, V)
            for path, accumulator in accumulators.items():
                accumulator.add(logits[Path(reference)], logits[path], targets)
        agrees = None if text is None else ref.tokenize(text.encode(), add_bos=False, special=False) == list(ids)
        return {"quality": {str(p): a.result().to_dict() for p, a in accumulators.items()},
                "tokenizer_agrees": agrees, "chunks": len(plan)}
    finally:
        for model in models.values():
            model.close()


def main(argv: list[str] | None = None) -> None:
    """REQUEST_JSON: a file with reference, candidates, ids, tokens, n_ctx, threads, bos, text."""
    request = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    print(json.dumps(score(Path(request["reference"]), [Path(p) for p in request["candidates"]], request["ids"],
                           request["tokens"], request["n_ctx"], request["threads"], request.get("bos"),
                           request.get("text"))))


if __name__ == "__main__":
    main()
