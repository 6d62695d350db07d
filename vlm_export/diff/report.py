"""Markdown view of a diff report (the JSON is the stable interface)."""

from __future__ import annotations


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
        lines += ["", "## End to end (vs the PyTorch reference, greedy)", "",
                  "| candidate | greedy prefix agreement | identical | top-1 agreement | mean KL | ppl ref | ppl cand |",
                  "|---|---|---|---|---|---|---|"]
        for label, r in e2e.items():
            lines.append(f"| {label} | {r['greedy_prefix_agreement']:.2f} | {r['identical_outputs']}/{r['prompts']} | "
                         f"{r['top1_agreement']:.3f} | {r['mean_kl']:.2e} | {r['perplexity_reference']:.2f} | "
                         f"{r['perplexity_candidate']:.2f} |")
    lines += ["", "## Re-run on the device", ""] + [f"    {cmd}" for cmd in report["golden"].values()]
    lines += ["", f"**{'PASSED' if report['passed'] else 'FAILED'}**"]
    return "\n".join(lines) + "\n"
