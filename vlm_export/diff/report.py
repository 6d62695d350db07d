"""Markdown view of a diff report (the JSON is the stable interface)."""

from __future__ import annotations

from vlm_export.quality import table


def _long_context(result: dict) -> str:
    long = result.get("long_context") or {}
    if "skipped" in long:
        return f"skipped: {long['skipped']}"
    parts = [f"{long[k]['mean_kl']:.3g}, {long[k]['top1_agreement']:.3f}" if "mean_kl" in long.get(k, {}) else "-"
             for k in ("text", "image")]
    return f"{long.get('prompt_tokens', '?')} tokens: " + " / ".join(parts)


def markdown(report: dict) -> str:
    lines = [f"# vlm-export diff: {report['model']} (reference: {report['reference']})", "",
             "## Per graph", "", "| graph | candidate | output | max abs diff | mean abs | median abs | cosine | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for graph, results in report["graphs"].items():
        for label, result in results.items():
            for output, s in result["outputs"].items():
                verdict = "FAIL" if output in result["failed_outputs"] else "ok"
                lines.append(f"| {graph} | {label} | {output} | {s['max_abs_diff']:.3g} | {s['mean_abs_diff']:.3g} | "
                             f"{s['median_abs_diff']:.3g} | {s['cosine']:.6f} | {verdict} |")
    for skipped in report.get("not_compared", []):
        lines.append(f"| {skipped['graph']} | {skipped['candidate']} | - | - | - | - | - | not compared: {skipped['reason']} |")
    if report["localisation"]:
        from vlm_export.diff.localize import summary

        lines += ["", "## Per layer (residual stream, relative error vs PyTorch or the fp32 graph)", ""]
        for label, graphs in report["localisation"].items():
            for graph, loc in graphs.items():
                errors = ", ".join(f"{b['block']}: {b['hidden']:.2g}" for b in loc["blocks"])
                lines.append(f"- {label} {graph}: {summary(loc)}" + (f"; per block {errors}" if errors else ""))
    e2e = report["end_to_end"]
    if "skipped" in e2e:
        lines += ["", f"End to end: skipped ({e2e['skipped']})."]
    elif e2e:
        lines += ["", "## End to end (vs the PyTorch reference)", "",
                  "| candidate | " + " | ".join(table.HEADER) + " | greedy prefix agreement | long context (text / image): mean KL, top-1 |",
                  "|---|" + "---|" * (len(table.HEADER) + 2)]
        for label, r in e2e.items():
            budget = (r.get("budget") or {}).get("budget")
            prefix = "-" if r.get("greedy_prefix_agreement") is None else f"{r['greedy_prefix_agreement']:.2f}"
            lines.append(f"| {label} | " + " | ".join(table.cells(r, budget)) + f" | {prefix} | {_long_context(r)} |")
        lines += ["", table.note(list(e2e.values())).replace("against fp32", "against the PyTorch reference")]
    lines += ["", "## Re-run on the device", ""] + [f"    {cmd}" for cmd in report["golden"].values()]
    lines += ["", f"**{'PASSED' if report['passed'] else 'FAILED'}**"]
    return "\n".join(lines) + "\n"
