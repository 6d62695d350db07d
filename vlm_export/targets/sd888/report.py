"""The sd888 build report: artifacts and sizes, node placement, accuracy per variant against fp32,
peak memory while building, and whether each variant fits the phone's memory."""

from __future__ import annotations

from vlm_export.quality import table
from vlm_export.targets.recipe import budget_lines
from vlm_export.targets.sd888.profile import RECIPES

PHONE_RAM_GB = 8.0
# Android, its services and the launcher keep about 2.5 GB resident on an 8 GB phone; what is left
# is what one foreground app can count on (an assumption, stated in every report).
APP_BUDGET_GB = 5.5


def kv_cache_bytes(model: dict, context: int) -> int:
    llm = model["llm"]
    head_dim = llm["hidden_size"] // llm["num_heads"]
    return 2 * llm["num_layers"] * llm["num_kv_heads"] * head_dim * context * 4  # fp32 K and V


def phone_fit(report: dict, model: dict, context: int) -> dict:
    kv = kv_cache_bytes(model, context)
    fits = {}
    for name, record in report["variants"].items():
        if "phone_bytes" not in record:
            continue
        total = record["phone_bytes"] + kv
        fits[name] = {"weights_and_graphs_gb": round(record["phone_bytes"] / 1e9, 3), "kv_cache_gb": round(kv / 1e9, 3),
                      "total_gb": round(total / 1e9, 3), "fits_app_budget": total <= APP_BUDGET_GB * 1e9}
    return {"ram_gb": PHONE_RAM_GB, "app_budget_gb": APP_BUDGET_GB, "context": context,
            "budget_note": "8 GB phone minus ~2.5 GB kept by Android", "variants": fits}


def _accuracy_cells(name: str, record: dict) -> list[str]:
    """The quality columns against the budget the variant's recipe names (shown, never failing the build)."""
    return table.cells(record.get("accuracy_vs_fp32"), table.judged_budget(record, RECIPES[name].budget))


def _placement(name: str, record: dict) -> str:
    if "on_cpu" in record:  # a QNN variant
        on_qnn = [f"{g}: {r['placement']['on_qnn']}/{r['placement']['nodes']}" for g, r in record["graphs"].items()]
        return "HTP " + ", ".join(on_qnn) + "; CPU: " + ", ".join(record["on_cpu"])
    if "xnnpack" in record:
        return "XNNPACK " + ", ".join(f"{g} {n}" for g, n in record["xnnpack"].items())
    return "CPU"


def report_markdown(report: dict) -> str:
    lines = [(f"Snapdragon target {report['soc']} ({report['device']}, HTP v{report['htp_arch']}); "
              f"peak RSS while building {report['peak_rss_mb']} MB"), "",
             "| variant | size MB | on the phone MB | fits 8 GB phone | build s | placement | " + " | ".join(table.HEADER) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(table.HEADER)]
    fit = report["memory"]["variants"]
    for name, record in report["variants"].items():
        if not record.get("built", True):
            lines.append(f"| {name} | NOT built: {record['reason']} |" + " |" * (4 + len(table.HEADER)))
            continue
        phone = f"{record['phone_bytes'] / 1e6:.0f}" if "phone_bytes" in record else "-"
        fits = ("yes" if fit[name]["fits_app_budget"] else "NO") + f" ({fit[name]['total_gb']} GB with KV)" if name in fit else "-"
        lines.append(f"| {name} | {record['bytes'] / 1e6:.0f} | {phone} | {fits} | {record['seconds']} | "
                     f"{_placement(name, record)} | " + " | ".join(_accuracy_cells(name, record)) + " |")
    per_graph = [(n, g, r["accuracy_vs_fp32"]) for n, v in report["variants"].items()
                 for g, r in v.get("graphs", {}).items() if isinstance(r, dict) and "accuracy_vs_fp32" in r]
    per_graph += [(n, "vision (int8 QDQ)", v["vision_accuracy_vs_fp32"]) for n, v in report["variants"].items()
                  if "vision_accuracy_vs_fp32" in v]
    if per_graph:
        lines += ["", "Per graph against fp32 on held-out inputs (worst cosine over outputs, max |diff|, logits top-1):", "",
                  "| variant | graph | cosine min | max abs diff | logits top-1 |", "|---|---|---|---|---|"]
        for variant, graph, acc in per_graph:
            top1 = acc.get("logits", {}).get("top1")
            lines.append(f"| {variant} | {graph} | {acc['cosine_min']:.5f} | {acc['max_abs_diff']:.3g} | "
                         f"{'-' if top1 is None else f'{top1:.3f}'} |")
    simulated = [f"{name}'s end-to-end quality is {v['accuracy_vs_fp32']['measured_on']}." for name, v in report["variants"].items()
                 if (v.get("accuracy_vs_fp32") or {}).get("measured_on")]
    lines += ["", *simulated] if simulated else []
    quality_note = table.note([v.get("accuracy_vs_fp32") for v in report["variants"].values()])
    lines += ["", quality_note] if quality_note else []
    lines += ["", *budget_lines(RECIPES, report["variants"])]
    static = report["variants"].get("fp32-static", {})
    if "kv_prefix" in static:
        prefix = static["kv_prefix"]
        lines += ["", (f"KV prefix: the K/V of the chat template's first {prefix['tokens']} token(s), computed in fp32, are "
                       "written into the cache before the prefill, so the NPU never runs position 0 and its massive "
                       "activations (runtime/kv_prefix.py)." if prefix else
                       "No KV prefix: templated prompts do not start with one shared token; position 0 runs on the NPU.")]
    lines += ["", (f"Phone budget: {report['memory']['app_budget_gb']} GB for the app ({report['memory']['budget_note']}); "
                   f"KV cache counted at {report['memory']['context']} tokens, fp32.")]
    return "\n".join(lines) + "\n"
