"""Benchmark reports: JSON (schema vlm-export-bench/1), a Markdown table, and a PNG chart."""

from __future__ import annotations

from pathlib import Path

from vlm_export.artifacts import write_json_atomic


def _stat(entry: dict | None, digits: int = 1) -> str:
    if not entry:
        return "-"
    return f"{entry['median']:.{digits}f} ({entry['min']:.{digits}f}-{entry['max']:.{digits}f})"


def markdown(report: dict) -> str:
    machine, limits = report["machine"], report["limits"]
    contexts = [str(c) for c in report["settings"]["contexts"]]
    gpu = limits.get("gpu")
    gpu_text = (f"GPU {gpu['device']}: memory bandwidth {gpu['memory_bandwidth_gbs']} GB/s (fp16 GEMV), fp16 matmul "
                f"{gpu['fp16_matmul_gflops']} GFLOP/s (the limits of torch-cuda rows). " if gpu else "")
    lines = [f"# Benchmark `{report['suite']}`", "",
             f"{machine['cpu']}, {machine['physical_cores']} physical / {machine['logical_cores']} logical cores, "
             f"{machine['memory_gb']} GB ({machine.get('pages', 'pages not recorded')}); threads {report['settings']['threads']}; "
             f"measured memory bandwidth {limits['memory_bandwidth_gbs']} GB/s (fp32 GEMV), fp32 matmul "
             f"{limits['fp32_matmul_gflops']} GFLOP/s. " + gpu_text +
             "Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v) + ".", "",
             "Median (min-max) over repeats. Decode = one token after a prompt of the given context; roofline = "
             "bandwidth / (weight bytes + KV bytes read per token); ratios = tok/s over the baseline's; vision speed-up = "
             "PyTorch eager's vision + LDP latency over the engine's.", ""]
    for model in report["models"]:
        lines += [f"## {model['model']} (decoder {model['decoder_params'] / 1e6:.0f} M parameters; baseline "
                  f"{model['baseline']})", ""]
        header = (["engine", "size MB", "peak RSS MB", "vision ms", "TTFT ms", f"prefill tok/s ({report['settings']['prefill_tokens']})"]
                  + [f"decode tok/s @{c}" for c in contexts] + [f"roofline @{c}" for c in contexts]
                  + ["prefill % of matmul"] + [f"decode ratio @{c}" for c in contexts]
                  + ["prefill ratio", "vision speed-up vs torch"])
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in model["results"]:
            if "skipped" in row:
                lines.append(f"| {row['engine']} | skipped: {row['skipped']} |" + " |" * (len(header) - 2))
                continue
            cells = [row["engine"], f"{row['bytes'] / 1e6:.0f}", str(row["peak_rss_mb"]), _stat(row["vision_ms"], 0),
                     _stat(row["ttft_ms"], 0), _stat(row["prefill_tok_s"])]
            cells += [_stat(row["decode_tok_s"][c]) for c in contexts]
            cells += [f"{100 * row['decode_roofline_fraction'][c]:.0f}%" for c in contexts]
            cells += [f"{100 * row['prefill_matmul_fraction']:.0f}%"]
            cells += [f"{row.get('decode_ratio_vs_baseline', {}).get(c, float('nan')):.2f}x" for c in contexts]
            cells += [f"{row.get('prefill_ratio_vs_baseline', float('nan')):.2f}x",
                      f"{row['vision_speedup_vs_torch']:.2f}x" if row.get("vision_speedup_vs_torch") else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        if model["build_seconds"]:
            lines += ["", "Built during this run: " + ", ".join(f"{k} {v} s" for k, v in model["build_seconds"].items())]
        lines.append("")
    return "\n".join(lines)


def chart(report: dict, path: Path) -> Path | None:
    """Decode tok/s per engine and context, one panel per model, the roofline as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = report["models"]
    figure, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    contexts = [str(c) for c in report["settings"]["contexts"]]
    for axis, model in zip(axes[0], models):
        rows = [r for r in model["results"] if "skipped" not in r]
        width = 0.8 / max(len(rows), 1)
        for index, row in enumerate(rows):
            values = [row["decode_tok_s"][c]["median"] for c in contexts]
            axis.bar([i + index * width for i in range(len(contexts))], values, width, label=row["engine"])
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(contexts))], [f"context {c}" for c in contexts])
        axis.set_ylabel("decode tokens/s")
        axis.set_title(f"{model['model']} ({report['machine']['cpu'][:40]}, {report['settings']['threads']} threads)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_reports(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{report['suite']}"
    write_json_atomic(out / f"{stem}.json", report)
    (out / f"{stem}.md").write_text(markdown(report))
    written = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    png = chart(report, out / f"{stem}.png")
    if png:
        written["chart"] = png
    return written
