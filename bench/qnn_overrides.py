"""Which weights need 16 bits on the Hexagon HTP? Quantize one static decoder graph for QNN with each
candidate override list, compile it for the SoC, and measure it against fp32 on held-out feeds
recorded from the generation loop (the per-graph half of the sd888 build report).

    python bench/qnn_overrides.py engines/sd888/smol/fp32-static --graph decoder_decode \
        --candidates per-tensor per-channel "per-channel:/lm_head/"
    (a candidate: per-tensor | per-channel, then optionally ":" and comma-separated name patterns of
    weights kept 16-bit)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    import onnxruntime as ort

    from vlm_export.diff.end_to_end import eval_requests
    from vlm_export.diff.output_agreement import graph_accuracy
    from vlm_export.errors import VlmExportError
    from vlm_export.quantize.calibration import calibration_requests, calibration_set, recorded_samples
    from vlm_export.quantize.qnn_qdq import quantize_for_qnn
    from vlm_export.runtime.runners import qnn_ep

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("static", type=Path, help="fp32 static-layout graphs (an sd888 build's fp32-static/)")
    parser.add_argument("--graph", default="decoder_decode")
    parser.add_argument("--candidates", nargs="+", default=["per-tensor", "per-channel", "per-channel:/lm_head/"])
    parser.add_argument("--soc", default="SM8350")
    parser.add_argument("--out", type=Path, default=Path("bench/reports/qnn-overrides.json"))
    args = parser.parse_args()

    images, prompts = calibration_set()
    samples = recorded_samples(args.static, calibration_requests(images, prompts))[args.graph]
    held_out = recorded_samples(args.static, eval_requests(), new_tokens=4)[args.graph]
    source = args.static / f"{args.graph}.onnx"
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    rows = []
    for candidate in args.candidates:
        granularity, _, names = candidate.partition(":")
        patterns = tuple(p for p in names.split(",") if p)
        with tempfile.TemporaryDirectory() as work:
            qdq = Path(work) / source.name
            started = time.perf_counter()
            info = quantize_for_qnn(source, qdq, samples, patterns, per_channel=granularity == "per-channel")
            size = sum(p.stat().st_size for p in Path(work).iterdir())
            try:
                accuracy = graph_accuracy(reference, qnn_ep.create_session(qdq, args.soc), held_out)
            except VlmExportError as exc:  # e.g. a 16-bit weight layout the HTP has no kernel for
                accuracy = {"error": exc.one_line()}
        rows.append({"candidate": candidate, "weights": info["weights"], "weights_16bit": list(patterns), "matched_weights": len(info["weights_16bit"]), "qdq_bytes": size,
                     "seconds": round(time.perf_counter() - started, 1), **accuracy})
        print(json.dumps(rows[-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"graph": str(source), "soc": args.soc, "calibration_samples": len(samples),
                                    "held_out_samples": len(held_out), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
