"""onnxruntime-genai as a peer row (`ort-genai:int4`): its own model builder and its own runtime on
the same weights, in a venv of its own (its builder needs transformers 5.x; ours pins 4.57):
bench/genai_venv.sh makes it at bench/cache/genai-venv, or VLM_EXPORT_GENAI_PYTHON names another.

    GGUF --transformers (ours)--> bench/cache/MODEL/hf/            (a Hugging Face folder)
         --genai builder -p int4|fp32 -e cpu--> bench/cache/MODEL/genai-int4|genai-fp32/
         --genai runtime (genai_worker.py, in that venv)--> speed, and int4 logits vs fp32 logits
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from vlm_export.errors import VlmExportError
from vlm_export.progress import step

VENV = Path("bench") / "cache" / "genai-venv"
REPOSITORY = Path(__file__).resolve().parents[2]


def genai_python(root: Path) -> Path:
    """The interpreter that has onnxruntime_genai; raises VlmExportError naming the fix if none."""
    named = os.environ.get("VLM_EXPORT_GENAI_PYTHON")
    python = Path(named) if named else Path(root) / VENV / "bin" / "python"
    if not python.is_file():
        raise VlmExportError(f"not measured: onnxruntime-genai's venv is missing ({python})",
                             "run bash bench/genai_venv.sh (or set VLM_EXPORT_GENAI_PYTHON)")
    return python


def worker_environment() -> dict:
    """The genai venv sees the repository (for the numpy-only quality modules), nothing of ours else."""
    return {**os.environ, "PYTHONPATH": str(REPOSITORY)}


def hf_folder(spec, folder: Path) -> Path:
    """A Hugging Face folder of the model's LLM, written by transformers from its GGUF."""
    if spec.weights.source != "gguf":
        raise VlmExportError(f"not measured: ort-genai rows need a GGUF-backed model, and {spec.name} has none",
                             "use the smol model")
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(spec.weights.path)
    step(f"writing a Hugging Face folder from {source.name} for onnxruntime-genai's builder")
    staging = folder.with_name(folder.name + ".tmp")
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(staging)
    staging.rename(folder)
    return folder


def build(spec, precision: str, root: Path, threads: int) -> Path:
    """bench/cache/MODEL/genai-PRECISION, built once by the genai builder (int4: block 32, accuracy level 4)."""
    python = genai_python(root)
    cache = Path(root) / "bench" / "cache" / spec.name
    out = cache / f"genai-{precision}"
    if not (out / "genai_config.json").is_file():
        hf = hf_folder(spec, cache / "hf")
        step(f"onnxruntime-genai's builder: {spec.name} {precision}")
        staging = out.with_name(out.name + ".tmp")
        done = subprocess.run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(staging),
                               "-p", precision, "-e", "cpu", "-c", str(cache / "genai-builder-cache")],
                              capture_output=True, text=True, check=False, env=worker_environment())
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise VlmExportError(f"not measured: onnxruntime-genai's builder failed ({last})", "see bench/genai_venv.sh")
        staging.rename(out)
    _set_threads(out / "genai_config.json", threads)
    return out


def _set_threads(config_path: Path, threads: int) -> None:
    """The suite's thread count as its session options (genai reads them from its config)."""
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != threads:
        options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
        config_path.write_text(json.dumps(config, indent=4))


def sizes(directory: Path) -> tuple[int, int]:
    """(bytes on disk, bytes of the decoder's weights: what a decode step reads)."""
    files = [p for p in Path(directory).iterdir() if p.is_file()]
    graphs = [p for p in files if p.suffix in (".onnx", ".data")]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_size for p in graphs)


def run_worker(root: Path, arguments: list[str], timeout: int) -> dict:
    done = subprocess.run([str(genai_python(root)), "-m", "vlm_export.benchmark.genai_worker", *arguments],
                          capture_output=True, text=True, timeout=timeout, check=False, env=worker_environment())
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise VlmExportError(f"onnxruntime-genai's process failed (exit {done.returncode}): {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_speed(root: Path, directory: Path, settings, timeout: int) -> dict:
    """The same fields as engines.measure, from genai's own generate loop."""
    from dataclasses import asdict

    from vlm_export.benchmark.machine import summary_stats

    raw = run_worker(root, ["speed", str(directory), json.dumps(asdict(settings))], timeout)
    return {"vision_ms": None, "ttft_ms": None,
            "prefill_tok_s": summary_stats([settings.prefill_tokens / t for t in raw["prefill_seconds"]]),
            "decode_tok_s": {c: summary_stats([1 / t for t in times]) for c, times in raw["decode_seconds"].items()},
            "peak_rss_mb": raw["peak_rss_mb"]}
