"""Measure the generation loop on one or more artifact sets side by side, in one run:
vision latency, TTFT, prefill and decode speed, and the share of each decode step spent outside
the decoder graph (the Python loop's own overhead). Speeds are reported with ratios to the first
artifact set, since these machines are noisy.

    python bench/loop_overhead.py engines/cpu/smol/fp32 engines/cpu/smol/int8 engines/cpu/smol/int4
    python bench/loop_overhead.py graphs/mobilevlm-1.7b --new-tokens 32 --repeats 2

Writes bench/reports/loop-<model>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

from vlm_export.runtime.api import physical_cores
from vlm_export.runtime.artifact_set import ArtifactSet
from vlm_export.runtime.generation import Generator, Request
from vlm_export.runtime.sampling import SamplingParams

PHOTO = Path(__file__).resolve().parent.parent / "calibration" / "eval" / "chelsea.jpg"
KEYS = ("vision_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s", "loop_overhead_pct")


def measure(directory: Path, new_tokens: int, repeats: int, backend: str) -> dict:
    artifacts = ArtifactSet.open(directory)  # refuses a tampered or incomplete set, like run and diff
    options = {"threads": physical_cores()} if backend == "ort" else {}
    request = Request.ask("Describe the image in detail.", PHOTO)
    runs = []
    with Generator(artifacts, backend, **options) as generator:
        generator.generate([request], SamplingParams(max_new_tokens=2))  # warm-up
        for _ in range(repeats):
            # decode tok/s is per step; a run may stop early at eos
            result = generator.generate([request], SamplingParams(max_new_tokens=new_tokens))[0]
            runs.append({**{k: generator.timings[k] for k in KEYS}, "new_tokens": len(result.token_ids)})
    summary = {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                   "max": max(r[k] for r in runs)} for k in KEYS}
    return {"artifacts": str(directory), "model": artifacts.spec.name, "layout": artifacts.layout,
            "variant": artifacts.manifest.get("variant", artifacts.manifest.get("options", {}).get("dtype")),
            "runs": runs, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="ort")
    args = parser.parse_args()
    results = [measure(d, args.new_tokens, args.repeats, args.backend) for d in args.artifacts]
    report = {"schema": 1, "backend": args.backend, "threads": physical_cores(),
              "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
              "results": results}
    out = Path(__file__).resolve().parent / "reports" / f"loop-{results[0]['model']}.json"
    out.write_text(json.dumps(report, indent=2))
    base = results[0]["summary"]["decode_tok_s"]["median"]
    print("| artifacts | layout | vision ms | TTFT ms | prefill tok/s | decode tok/s (min-max) | vs first | loop overhead % |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["summary"]
        print(f"| {r['artifacts']} | {r['layout']} | {s['vision_ms']['median']:.0f} | {s['ttft_ms']['median']:.0f} | "
              f"{s['prefill_tok_s']['median']:.0f} | {s['decode_tok_s']['median']:.1f} ({s['decode_tok_s']['min']:.1f}-"
              f"{s['decode_tok_s']['max']:.1f}) | {s['decode_tok_s']['median'] / base:.2f}x | {s['loop_overhead_pct']['median']:.2f} |")


if __name__ == "__main__":
    main()
