"""Benchmark reports: JSON (schema vlm-export-bench/1), a Markdown table (and, for a suite with
quality, a second table of speed at equal quality), and a PNG chart (the speed/quality frontier
when the suite has quality)."""

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
             (f"{machine['cpu']}, {machine['physical_cores']} physical / {machine['logical_cores']} logical cores, "
              f"{machine['memory_gb']} GB ({machine.get('pages', 'pages not recorded')}); threads {report['settings']['threads']}; "
              f"measured memory bandwidth {limits['memory_bandwidth_gbs']} GB/s (fp32 GEMV), fp32 matmul "
              f"{limits['fp32_matmul_gflops']} GFLOP/s. ") + gpu_text
             + "Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v) + ".", "",
             (("Median (min-max) over repeats. " if report["settings"].get("rounds", 1) == 1 else
               f"Each value: the median of {report['settings']['rounds']} rounds' medians (min-max over every sample); a round "
               "measures every engine once, in the table's order, so the machine's drift over minutes hits every row alike. ")
              + "Decode = one token after a prompt of the given context; roofline = "
              "bandwidth / (weight bytes + KV bytes read per token); ratios = tok/s over the baseline's; vision speed-up = "
              "PyTorch eager's vision + LDP latency over the engine's."), ""]
    for model in report["models"]:
        lines += [(f"## {model['model']} (decoder {model['decoder_params'] / 1e6:.0f} M parameters; baseline "
                   f"{model['baseline']})"), ""]
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
        loads = [f"{r['engine']} {r['load_average_1m'][0]:.1f}-{r['load_average_1m'][1]:.1f}" for r in model["results"]
                 if r.get("load_average_1m")]
        if loads:
            lines += ["", "Machine load (1-minute load average before-after each row; the engines use "
                      f"{report['settings']['threads']} threads, so more than that means other work shared the cores): "
                      + ", ".join(loads) + "."]
        if model["build_seconds"]:
            lines += ["", "Built during this run: " + ", ".join(f"{k} {v} s" for k, v in model["build_seconds"].items())]
        lines.append("")
        if "quality" in report:
            lines += quality_table(report, model)
    return "\n".join(lines)


def _quality_cells(row: dict) -> list[str]:
    quality = row.get("quality")
    if not quality:
        return [row.get("quality_skipped", "not measured"), "", "", "", ""]
    if quality.get("baseline"):
        return [f"{quality['perplexity']:.2f}", "0 (baseline)", "1 (baseline)", str(quality["tokens"]), ""]
    return [f"{quality['perplexity']:.2f}", f"{quality['mean_kl']:.4f}", f"{quality['top1_agreement']:.3f}",
            str(quality["tokens"]), ""]


def quality_table(report: dict, model: dict) -> list[str]:
    """Speed at equal quality: each row's speed beside its quality against its own full precision,
    and its speed over the llama.cpp row of the same class."""
    contexts = [str(c) for c in report["settings"]["contexts"]]
    settings = report["quality"]
    lines = [f"### {model['model']}: speed at equal quality", "",
             f"Quality: teacher-forced on the eval prose (calibration/eval/prose.txt), {settings['tokens']} scored positions in "
             f"chunks of {settings['n_ctx']} (first half context, second half scored), each engine against ITS OWN full-precision "
             "run (ours: the fp32 variant; llama.cpp: F32 of the same weights; onnxruntime-genai: its own fp32 build). "
             "Peer = the llama.cpp row of the same quality class (" +
             ", ".join(f"{k}: {v}" for k, v in settings["peers"].items()) + "); ratios = tok/s over the peer's. "
             "Budget: quality.metrics.BUDGETS, for our rows.", ""]
    header = (["engine", "class", f"prefill tok/s ({report['settings']['prefill_tokens']})"]
              + [f"decode tok/s @{c}" for c in contexts] + ["peer"] + [f"decode vs peer @{c}" for c in contexts]
              + ["prefill vs peer", "perplexity", "mean KL", "top-1", "tokens", "budget"])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in model["results"]:
        if "skipped" in row:
            lines.append(f"| {row['engine']} | not measured: {row['skipped']} |" + " |" * (len(header) - 2))
            continue
        cells = [row["engine"], row.get("quality_class", "-"), _stat(row["prefill_tok_s"])]
        cells += [_stat(row["decode_tok_s"][c]) for c in contexts]
        ratios = row.get("decode_ratio_vs_peer")
        cells += [row.get("peer", "-")] + [f"{ratios[c]:.2f}x" if ratios else "-" for c in contexts]
        cells += [f"{row['prefill_ratio_vs_peer']:.2f}x" if "prefill_ratio_vs_peer" in row else "-"]
        quality = _quality_cells(row)
        budget = row.get("budget")
        quality[-1] = ("pass" if budget["passed"] else "OVER: " + "; ".join(budget["misses"])) if budget else "-"
        lines.append("| " + " | ".join(cells + quality) + " |")
    mixes = [f"{r['engine']}: " + ", ".join(f"{n} {k}" for k, n in r["gguf_tensor_types"].items())
             + f" ({8 * r['bytes'] / model['decoder_params']:.2f} bits per decoder parameter)"
             for r in model["results"] if r.get("gguf_tensor_types")]
    if mixes:
        fallback = any("Q5_0" in r.get("gguf_tensor_types", {}) for r in model["results"] if r["engine"].endswith("Q4_K_M"))
        lines += ["", "llama.cpp tensor types (count of tensors per type): " + "; ".join(mixes) + "." +
                  (" llama.cpp's K-quants need rows that are multiples of 256; this model's are not (SmolLM2: 576), so its "
                   "Q4_K_M falls back to q5_0/q8_0 for most tensors: not a 4-bit format here." if fallback else "")]
    sources = sorted({r["quality"].get("source") for r in model["results"] if r.get("quality", {}).get("source")})
    if sources:
        lines += ["", "Quality sources: " + "; ".join(sources) + "."]
    agrees = {r["quality"].get("tokenizer_agrees") for r in model["results"] if "tokenizer_agrees" in r.get("quality", {})}
    if agrees:
        lines += ["", "Token ids: every row is fed vlm-export's ids of the eval prose; llama.cpp's own tokenizer gives "
                  + ("the same ids." if agrees == {True} else "other ids on this text (the rows still share ours).")]
    return lines + [""]


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


KL_FLOOR = 1e-5  # where the full-precision baselines (mean KL 0) sit on the log axis


def frontier_chart(report: dict, path: Path) -> Path | None:
    """Decode tok/s (y) against mean KL (x, log): one panel per model and context, every engine a
    labelled point; the full-precision baselines at KL_FLOOR."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    contexts = [str(c) for c in report["settings"]["contexts"]]
    panels = [(m, c) for m in report["models"] for c in contexts]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    markers = {"llama.cpp": "s", "ort-genai": "^"}
    for axis, (model, context) in zip(axes[0], panels):
        for row in model["results"]:
            quality = row.get("quality")
            if "skipped" in row or not quality:
                continue
            x = max(quality["mean_kl"], KL_FLOOR)
            y = row["decode_tok_s"][context]["median"]
            family = row["engine"].partition(":")[0]
            label = row["engine"] + (" (baseline)" if quality.get("baseline") or quality["mean_kl"] == 0 else "")
            axis.scatter([x], [y], marker=markers.get(family, "o"), s=50, label=label)  # the legend tells close points apart
            axis.annotate(row["engine"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        axis.set_xscale("log")
        axis.axvline(KL_FLOOR, color="grey", linewidth=0.5, linestyle=":")
        axis.set_xlabel(f"mean KL vs its own full precision (nats; baselines at {KL_FLOOR:g})")
        axis.set_ylabel("decode tokens/s")
        axis.set_title(f"{model['model']}, decode @{context} ({report['settings']['threads']} threads)")
        axis.grid(True, which="both", linewidth=0.3)
        axis.legend(fontsize=6, loc="best")
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
    # a suite with quality: the speed/quality frontier; else decode tok/s per engine and context
    png = (frontier_chart if "quality" in report else chart)(report, out / f"{stem}.png")
    if png:
        written["chart"] = png
    return written
