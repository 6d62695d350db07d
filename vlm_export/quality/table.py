"""The quality columns every build report prints, and the budget verdict beside them, so a
number reads the same in the cpu, sd888 and orin reports and in `vlm-export diff`."""

from __future__ import annotations

from vlm_export.quality.metrics import BUDGETS, Quality, Verdict

HEADER = ["ppl (baseline)", "mean KL", "KL p99", "top-1", "greedy identical", "budget"]


def has_quality(accuracy: dict | None) -> bool:
    """A record written by quality/scoring (a stage cached by an older build has other keys)."""
    return bool(accuracy) and all(k in accuracy for k in ("perplexity", "perplexity_reference", "mean_kl", "kl_p99",
                                                           "top1_agreement", "tokens"))


def verdict(accuracy: dict | None, budget: str | None) -> Verdict | None:
    if budget not in BUDGETS or not has_quality(accuracy):
        return None
    return BUDGETS[budget].verdict(Quality.from_dict(accuracy))


def judged_budget(record: dict, budget: str | None) -> str | None:
    """`budget` where the build judged the variant `record` against it (its `quality_budget` is set),
    else None: seeded-random LLM weights are measured, never judged, in every target's table."""
    return budget if record.get("quality_budget") else None


def cells(accuracy: dict | None, budget: str | None, missing: str = "-") -> list[str]:
    """The HEADER cells for one variant's `accuracy_vs_fp32` record."""
    if not has_quality(accuracy):
        return [missing] * len(HEADER)
    q = Quality.from_dict(accuracy)
    greedy = "-" if q.greedy_identical is None else f"{round(q.greedy_identical * q.greedy_prompts)}/{q.greedy_prompts}"
    judged = verdict(accuracy, budget)
    if judged is None:
        status = "-"
    else:
        status = f"ok ({budget})" if judged.passed else f"OVER ({budget}): {'; '.join(judged.misses)}"
    return [f"{q.perplexity:.2f} ({q.perplexity_reference:.2f})", f"{q.mean_kl:.3g}", f"{q.kl_p99:.3g}",
            f"{q.top1_agreement:.3f}", greedy, status]


def note(accuracies: list) -> str:
    """One line under a table: what the quality columns are, over how many tokens."""
    tokens = sorted({a["tokens"] for a in accuracies if has_quality(a)})
    if not tokens:
        return ""
    return (f"Quality against fp32: teacher-forced on {'/'.join(map(str, tokens))} scored tokens of "
            "calibration/eval/prose.txt (ppl: variant, baseline in brackets; KL in nats), greedy identical: eval prompts "
            "answered token for token alike; budgets: vlm_export/quality/metrics.py BUDGETS (each variant judged in the budget column; `build --strict` fails on a miss).")
