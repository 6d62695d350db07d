"""Bench at equal quality: every speed row gets its quality on the eval prose, each engine against
ITS OWN full-precision run, and the ratios against the llama.cpp row of the same quality class.

    ort:*, ort-mlas:*   the build report's `accuracy_vs_fp32` (quality/scoring.py's numbers) when it
                        carries them; else quality.scoring.measure against the fp32 variant (cached)
    llama.cpp:*         teacher-forced logits vs llama.cpp F32 of the same weights (llama_quality.py)
    ort-genai:int4      its int4 logits vs its own fp32 build, through its own runtime (genai_worker.py)

Every number goes through quality.metrics (Accumulator, Quality, BUDGETS); results are cached
under bench/cache/quality/, keyed by the hashes of the files compared and the eval ids, so a
re-run does not recompute them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vlm_export.errors import VlmExportError
from vlm_export.progress import stage, step
from vlm_export.quality.metrics import BUDGETS, Quality
from vlm_export.quality.scoring import FLOAT_CACHE_CALL_TOKENS

# the quality class of an engine name's variant: ours by name, llama.cpp's by its format
LLAMA_CLASSES = {"F32": "fp32", "Q8_0": "int8", "source": "int4", "Q4_0": "int4", "Q4_K_M": "int4"}
BASELINE_CLASS = "fp32"


@dataclass(frozen=True)
class QualitySettings:
    """A suite's "quality" block: what is scored, and each class's llama.cpp peer."""

    tokens: int = 2048
    n_ctx: int = 1024
    peers: dict = field(default_factory=lambda: {"fp32": "llama.cpp:F32", "int8": "llama.cpp:Q8_0", "int4": "llama.cpp:source"})

    def __post_init__(self):
        if self.tokens < 1 or self.n_ctx < 4 or set(self.peers) - {"fp32", "int8", "int4"}:
            raise VlmExportError(f"invalid quality settings {self}", "tokens >= 1, n_ctx >= 4, peers per class fp32|int8|int4")


def quality_class(name: str) -> str:
    family, _, variant = name.partition(":")
    variant = variant.split("/")[0]
    return LLAMA_CLASSES.get(variant, variant) if family == "llama.cpp" else variant


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class QualityCache:
    """bench/cache/quality/KEY.json: one scored comparison each."""

    def __init__(self, root: Path):
        self.folder = Path(root) / "bench" / "cache" / "quality"

    def get(self, key: str) -> dict | None:
        path = self.folder / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, key: str, record: dict) -> dict:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{key}.json").write_text(json.dumps(record, indent=1))
        return record


class EvalIds:
    """The eval prose as token ids from our tokenizer: the same ids for every row of a model."""

    def __init__(self, spec, root: Path):
        from vlm_export.quality.eval_set import prose

        self.spec, self.text = spec, prose()
        self.text_sha = hashlib.sha256(self.text.encode()).hexdigest()
        self.path = Path(root) / "bench" / "cache" / spec.name / f"eval-ids-{self.text_sha[:16]}.json"
        self._ids: list[int] | None = None

    @property
    def ids(self) -> list[int]:
        if self._ids is None:
            if self.path.is_file():
                self._ids = json.loads(self.path.read_text())
            else:
                from vlm_export.model.tokenizer import load_tokenizer

                self._ids = load_tokenizer(self.spec.tokenizer).encode_text(self.text)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text(json.dumps(self._ids))
        return self._ids

    @property
    def bos(self) -> int | None:
        return self.spec.llm.bos_token_id if self.spec.template.add_bos else None


def _baseline_quality(quality: dict) -> dict:
    """The full-precision row itself: its own perplexity, nothing lost."""
    return {"tokens": quality["tokens"], "perplexity_reference": quality["perplexity_reference"],
            "perplexity": quality["perplexity_reference"], "mean_kl": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0,
            "baseline": True}


# -- our rows ---------------------------------------------------------------------------------------
def _ours(row: dict, settings: QualitySettings, cache: QualityCache) -> dict:
    variant_dir = Path(row["artifact"])
    reference_dir = variant_dir.parent / "fp32"
    variant = variant_dir.name
    report = variant_dir.parent / "report.json"
    if report.is_file():
        record = json.loads(report.read_text()).get("variants", {}).get(variant, {}).get("accuracy_vs_fp32") or {}
        comparable = record.get("tokens", 0) >= settings.tokens and record.get("n_ctx") == settings.n_ctx
        if comparable and {"perplexity", "mean_kl", "top1_agreement"} <= set(record):  # else: scored here, as many tokens as the peers
            return {**Quality.from_dict(record).to_dict(), "n_ctx": record.get("n_ctx"), "source": f"build report ({report})"}
    if not (reference_dir / "manifest.json").is_file():
        raise VlmExportError(f"not measured: no fp32 variant beside {variant_dir}", "build the fp32 variant too")
    key = _key("ours", _sha256(reference_dir / "manifest.json"), _sha256(variant_dir / "manifest.json"),
               settings.tokens, settings.n_ctx)
    cached = cache.get(key)
    if cached is None:
        from vlm_export.quality.scoring import measure

        step(f"scoring {variant_dir} against {reference_dir} ({settings.tokens} tokens)")
        quality = measure(reference_dir, variant_dir, settings.tokens, n_ctx=settings.n_ctx, greedy_tokens=0,
                          long_prompt_tokens=0)
        cached = cache.put(key, {**quality.to_dict(), "n_ctx": settings.n_ctx,
                                 "source": "quality.scoring.measure vs the fp32 variant"})
    return cached


# -- llama.cpp rows ---------------------------------------------------------------------------------
def _llama_cpp(rows: list[dict], reference: Path, eval_ids: EvalIds, settings: QualitySettings, threads: int,
               cache: QualityCache) -> dict[str, dict]:
    """engine name -> quality, every candidate against `reference` (F32) in one process."""
    ref_sha = _sha256(reference)
    keys = {r["engine"]: _key("llama.cpp", ref_sha, _sha256(Path(r["artifact"])), eval_ids.text_sha, settings.tokens,
                              settings.n_ctx) for r in rows}
    found = {name: cache.get(key) for name, key in keys.items()}
    missing = [r for r in rows if found[r["engine"]] is None]
    if missing:
        step(f"llama.cpp: scoring {', '.join(r['engine'] for r in missing)} against F32 ({settings.tokens} tokens)")
        with tempfile.TemporaryDirectory() as work:
            request = Path(work) / "request.json"
            request.write_text(json.dumps({"reference": str(reference), "candidates": [r["artifact"] for r in missing],
                                           "ids": eval_ids.ids, "tokens": settings.tokens, "n_ctx": settings.n_ctx,
                                           "threads": threads, "bos": eval_ids.bos, "text": eval_ids.text}))
            done = subprocess.run([sys.executable, "-m", "vlm_export.benchmark.llama_quality", str(request)],
                                  capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            return {r["engine"]: {"skipped": f"not measured: llama.cpp's scoring process failed (exit {done.returncode}): {last}"}
                    for r in missing} | {n: q for n, q in found.items() if q is not None}
        result = json.loads(done.stdout.strip().splitlines()[-1])
        agrees = result["tokenizer_agrees"]
        for row in missing:
            record = result["quality"][row["artifact"]]
            found[row["engine"]] = cache.put(keys[row["engine"]], {
                **record, "n_ctx": settings.n_ctx, "tokenizer_agrees": agrees,
                "source": "llama.cpp logits_all vs llama.cpp F32, vlm-export's token ids"})
    return found


# -- onnxruntime-genai ------------------------------------------------------------------------------
def _genai(row: dict, reference: Path, eval_ids: EvalIds, settings: QualitySettings, cache: QualityCache,
           root: Path) -> dict:
    from vlm_export.benchmark.genai_peer import run_worker

    candidate = Path(row["artifact"])
    key = _key("ort-genai", *[_sha256(p) for d in (reference, candidate) for p in sorted(d.glob("*.onnx*"))],
               eval_ids.text_sha, settings.tokens, settings.n_ctx, FLOAT_CACHE_CALL_TOKENS)
    cached = cache.get(key)
    if cached is None:
        step(f"onnxruntime-genai: scoring {candidate.name} against {reference.name} ({settings.tokens} tokens)")
        with tempfile.TemporaryDirectory() as work:
            request = Path(work) / "request.json"
            request.write_text(json.dumps({"reference": str(reference), "candidate": str(candidate), "ids": eval_ids.ids,
                                           "tokens": settings.tokens, "n_ctx": settings.n_ctx, "bos": eval_ids.bos,
                                           "call_tokens": FLOAT_CACHE_CALL_TOKENS}))
            result = run_worker(root, ["quality", str(request)], timeout=3600)
        cached = cache.put(key, {**result["quality"], "n_ctx": settings.n_ctx,
                                 "source": f"onnxruntime-genai int4 vs its own fp32 build through its runtime, context "
                                           f"half in one call, then {FLOAT_CACHE_CALL_TOKENS} ids per call (as quality.scoring for "
                                           "float KV caches); "
                                           "vlm-export's token ids"})
    return cached


def attach(workspace, rows: list[dict], settings: QualitySettings, threads: int, root: Path) -> None:
    """Adds "quality" (or "quality_skipped"), "quality_class", peer ratios and, for our rows, the budget verdict."""
    measured = [r for r in rows if "skipped" not in r]
    if not measured:
        return
    cache, eval_ids = QualityCache(root), EvalIds(workspace.spec, root)
    with stage(f"{workspace.spec.name}: quality on the eval prose ({settings.tokens} tokens, n_ctx {settings.n_ctx})"):
        by_family: dict[str, list[dict]] = {}
        for row in measured:
            by_family.setdefault(row["engine"].partition(":")[0], []).append(row)
        results: dict[str, dict] = {}
        for family, members in by_family.items():
            try:
                if family == "llama.cpp":
                    reference = workspace.engine("llama.cpp:F32", threads)[1]
                    results |= _llama_cpp(members, reference, eval_ids, settings, threads, cache)
                elif family == "ort-genai":
                    reference = workspace.engine("ort-genai:fp32", threads)[1]
                    results |= {r["engine"]: _genai(r, reference, eval_ids, settings, cache, root) for r in members}
                elif family.startswith("ort"):
                    results |= {r["engine"]: _ours(r, settings, cache) for r in members if quality_class(r["engine"]) != BASELINE_CLASS}
            except VlmExportError as exc:
                results |= {r["engine"]: {"skipped": exc.one_line()} for r in members}
        _baselines(measured, results)
    for row in measured:
        record = results.get(row["engine"])
        if record is None:
            row["quality_skipped"] = "not measured: nothing to compare it with in this suite"
        elif "skipped" in record:
            row["quality_skipped"] = record["skipped"]
        else:
            row["quality"] = record
    _peer_ratios(measured, settings)


def _baselines(rows: list[dict], results: dict[str, dict]) -> None:
    """A full-precision row of ours gets its perplexity from any scored sibling (same fp32 run)."""
    for row in rows:
        if quality_class(row["engine"]) != BASELINE_CLASS or row["engine"] in results and "skipped" not in results[row["engine"]]:
            continue
        family = row["engine"].partition(":")[0]
        siblings = [results[r["engine"]] for r in rows if r["engine"].partition(":")[0] == family and r is not row
                    and "skipped" not in results.get(r["engine"], {"skipped": 1})]
        if family == "llama.cpp" and row["engine"] in results:
            continue
        if siblings:
            results[row["engine"]] = {**_baseline_quality(siblings[0]), "source": siblings[0].get("source")}


def _peer_ratios(rows: list[dict], settings: QualitySettings) -> None:
    by_name = {r["engine"]: r for r in rows}
    for row in rows:
        klass = quality_class(row["engine"])
        row["quality_class"] = klass
        if row["engine"].startswith("ort") and not row["engine"].startswith("ort-genai") and klass in BUDGETS and "quality" in row:
            row["budget"] = BUDGETS[klass].verdict(Quality.from_dict(row["quality"])).to_dict()
        peer = by_name.get(settings.peers.get(klass, ""))
        if peer is None:
            continue
        row["peer"] = peer["engine"]
        row["decode_ratio_vs_peer"] = {c: row["decode_tok_s"][c]["median"] / peer["decode_tok_s"][c]["median"]
                                       for c in row["decode_tok_s"]}
        row["prefill_ratio_vs_peer"] = row["prefill_tok_s"]["median"] / peer["prefill_tok_s"]["median"]
