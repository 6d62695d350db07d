"""End-to-end agreement through the generation loop, as build reports and `vlm-export diff` show it:
teacher-forced perplexity, KL divergence and top-1 agreement on the eval prose, greedy answers to
the eval prompts, one long-context prompt (vlm_export/quality/scoring.py does the work)."""

from __future__ import annotations

from pathlib import Path

from vlm_export.quality.eval_set import EVAL_DIR, eval_requests, prose  # noqa: F401  (EVAL_DIR, eval_requests: targets import them here)
from vlm_export.quality.scoring import GREEDY_TOKENS, Settings, compare
from vlm_export.runtime.artifact_set import ArtifactSet
from vlm_export.runtime.generation import Generator


def eval_text() -> str:
    return prose()


def agreement(reference: Generator, candidate: Generator, eval_tokens: int, new_tokens: int = GREEDY_TOKENS) -> dict:
    """`Quality.to_dict()` fields (tokens, perplexity_reference, perplexity, mean_kl, kl_p99,
    top1_agreement, greedy_identical, greedy_prompts) and greedy_prefix_agreement, n_ctx,
    long_context, seconds; `identical_outputs`, `prompts` and `perplexity_candidate` kept for
    readers of the earlier keys."""
    result = compare(reference, candidate, Settings(eval_tokens, greedy_tokens=new_tokens)).to_dict()
    identical = result["greedy_identical"]
    prompts = result["greedy_prompts"]
    return {**result, "identical_outputs": round(identical * prompts) if identical is not None else 0, "prompts": prompts,
            "perplexity_candidate": result["perplexity"]}


def open_generator(directory: Path, backend: str, open_on_use: bool = False) -> Generator:
    return Generator(ArtifactSet.open(directory, check_hashes=False), backend, open_on_use=open_on_use)


def accuracy_vs_fp32(fp32_dir: Path, variant_dir: Path, eval_tokens: int = 16) -> dict:
    """A built variant against its fp32 graphs, both on ONNX Runtime (what build reports use), over
    `eval_tokens` scored positions of the eval prose (see `agreement` for the keys). Sessions open on
    use: the fp32 side replayed from this process's earlier comparison runs none."""
    with open_generator(fp32_dir, "ort", True) as reference, open_generator(variant_dir, "ort", True) as candidate:
        return agreement(reference, candidate, eval_tokens)
