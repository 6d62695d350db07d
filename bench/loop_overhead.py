"""Measure the generation loop on exported artifacts: TTFT, prefill and decode speed, and the
share of each decode step spent outside the decoder graph (the Python loop's own overhead).

    python bench/loop_overhead.py graphs/mobilevlm-1.7b --new-tokens 64 --repeats 3

Writes bench/reports/loop-<model>.json and prints a Markdown row. Speeds are for this machine
only; compare ratios measured in the same run.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="ort")
    args = parser.parse_args()
    artifacts = ArtifactSet.open(args.artifacts, check_hashes=False)
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_strings=())
    runs = []
    options = {"threads": physical_cores()} if args.backend == "ort" else {}
    with Generator(artifacts, args.backend, **options) as generator:
        request = Request.ask("Describe the image in detail.", PHOTO)
        generator.generate([request], SamplingParams(max_new_tokens=2))  # warm-up
        for _ in range(args.repeats):
            result = generator.generate([request], params)[0]
            runs.append({**generator.timings, "new_tokens": len(result.token_ids), "prompt_tokens": result.prompt_tokens})
    summary = {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                   "max": max(r[k] for r in runs)} for k in runs[0]}
    report = {"artifacts": str(args.artifacts), "model": artifacts.spec.name, "layout": artifacts.layout,
              "backend": args.backend, "threads": physical_cores(), "machine": platform.processor() or platform.machine(),
              "runs": runs, "summary": summary}
    out = Path(__file__).resolve().parent / "reports" / f"loop-{artifacts.spec.name}-{artifacts.layout}.json"
    out.write_text(json.dumps(report, indent=2))
    s = summary
    print("| model | layout | vision ms | TTFT ms | prefill tok/s | decode tok/s | loop overhead % |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {artifacts.spec.name} | {artifacts.layout} | {s['vision_ms']['median']:.0f} | {s['ttft_ms']['median']:.0f} | "
          f"{s['prefill_tok_s']['median']:.0f} | {s['decode_tok_s']['median']:.2f} | {s['loop_overhead_pct']['median']:.2f} |")


if __name__ == "__main__":
    main()
