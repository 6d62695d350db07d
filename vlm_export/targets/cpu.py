"""`--target cpu`: ONNX Runtime on any CPU. Variants, each a complete artifact set `vlm-export run` takes:

    fp32/  the exported graphs as they are
    int8/  decoder MatMuls -> MatMulNBits 8-bit (block 32, accuracy level 4)
    int4/  decoder MatMuls -> MatMulNBits 4-bit (block 32, accuracy level 4)

Vision and embedding graphs stay fp32 here; each variant's accuracy against fp32 is measured
end to end and written to the build report.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vlm_export.artifacts import MANIFEST, atomic_directory, stage_key, write_json_atomic
from vlm_export.errors import VlmExportError
from vlm_export.quantize.weight_only import WeightOnlyConfig, quantize_weights
from vlm_export.targets.assemble import assemble_variant

VARIANTS = {"fp32": None, "int8": WeightOnlyConfig(bits=8), "int4": WeightOnlyConfig(bits=4)}


@dataclass(frozen=True)
class Profile:
    variants: tuple[str, ...] = ("fp32", "int8", "int4")
    eval_tokens: int = 16

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise VlmExportError(f"unknown CPU variant(s) {', '.join(unknown)}", f"use {', '.join(VARIANTS)}")
        if "fp32" not in self.variants:
            raise VlmExportError("the fp32 variant is the accuracy baseline of the others", "keep fp32 in --variants")


def _variant(graphs: Path, out: Path, name: str, config: WeightOnlyConfig | None, manifest: dict) -> dict:
    rewrites = {} if config is None else {"decoder": lambda g, src, dst: quantize_weights(src, dst / g["file"], config)}
    return assemble_variant(graphs, out, manifest, rewrites, target="cpu", variant=name)


def build(graphs: Path, out: Path, profile: Profile, force: bool = False, progress=None) -> dict:
    from vlm_export.artifacts import verify
    from vlm_export.diff.end_to_end import accuracy_vs_fp32

    progress = progress or (lambda text: None)
    manifest = verify(graphs)
    report = {"target": "cpu", "graphs": str(graphs), "variants": {},
              "message": f"run a variant with: vlm-export run {out / profile.variants[-1]} --prompt ..."}
    with atomic_directory(out, force) as staging:
        for name in profile.variants:
            key = stage_key(manifest["files"], name, VARIANTS[name] and VARIANTS[name].__dict__)
            record = staging.cached(name, key)
            if record is None:
                shutil.rmtree(staging.path / name, ignore_errors=True)  # leftovers of an interrupted attempt
                progress(f"building {name}")
                started = time.perf_counter()
                built = _variant(graphs, staging.path / name, name, VARIANTS[name], manifest)
                record = {"seconds": round(time.perf_counter() - started, 1),
                          "bytes": sum(f["bytes"] for f in built["files"].values())}
                if name != "fp32":
                    progress(f"measuring {name} against fp32")
                    record["accuracy_vs_fp32"] = accuracy_vs_fp32(staging.path / "fp32", staging.path / name, profile.eval_tokens)
                staging.remember(name, key, [f"{name}/{MANIFEST}"], record)
            report["variants"][name] = record
        staging.finish()
        write_json_atomic(staging.path / "report.json", report)
        (staging.path / "report.md").write_text(report_markdown(report))
    return report


def report_markdown(report: dict) -> str:
    lines = ["| variant | size MB | build s | greedy prefix agreement | identical | top-1 agreement | mean KL | ppl |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in report["variants"].items():
        acc = v.get("accuracy_vs_fp32")
        cells = [f"{acc['greedy_prefix_agreement']:.2f}", f"{acc['identical_outputs']}/{acc['prompts']}",
                 f"{acc['top1_agreement']:.3f}", f"{acc['mean_kl']:.2e}",
                 f"{acc['perplexity_candidate']:.2f}"] if acc else ["baseline"] * 4 + ["-"]
        lines.append(f"| {name} | {v['bytes'] / 1e6:.0f} | {v['seconds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

