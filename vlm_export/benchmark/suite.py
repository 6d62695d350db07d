"""A benchmark suite (bench/suites/*.json): models x engines, measured side by side in one run.

Engines, by name:
    torch             the exported graphs' reference, PyTorch eager (transformers modules), fp32
    torch-cuda        the same reference in fp16 on a CUDA GPU (no export needed)
    ort:fp32|int8|int4    `--target cpu` variants (inplace layout: GroupQueryAttention over an in-place
                      KV buffer; the build's KV cache choice (--kv auto: int8 where the variant keeps
                      its quality budget); MatMulNBits weights for int8, and
                      for int4 vlm-export's int4 kernel where the CPU has it)
    ort-mlas:int4     the int4 variant with `--kernels ort` (ONNX Runtime's MatMulNBits / MLAS)
    ort-concat:fp32|int8|int4  the same with `--layout dynamic` (the KV cache is concatenated every step)
    ort-fp32kv:int8|int4  the inplace variants with `--kv fp32` (the KV cache kept in fp32, not int8)
    ort-static:fp32   the static layout (prefill chunks + fixed KV buffer) in fp32
    llama.cpp:source  the model's own GGUF file (smol: the very file our graphs were made from)
    llama.cpp:F32|Q8_0|Q4_0|Q4_K_M   the reference weights written to GGUF (a GGUF-backed model: its own
                      GGUF dequantized to F32), quantized by llama.cpp itself
    ort-genai:int4|fp32   onnxruntime-genai's own model builder and runtime on the same weights
                      (genai_peer.py; needs the venv of bench/genai_venv.sh)
Artifacts are built when missing (graphs/, engines/, bench/cache/ for GGUF files and genai models).
A suite's optional "quality" block ({"tokens", "n_ctx", "peers"}: row_quality.py) adds to every
row its quality on the eval prose against its own full precision, and ratios to its class's peer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from vlm_export.benchmark.engines import Settings
from vlm_export.errors import VlmExportError
from vlm_export.progress import stage, step
from vlm_export.runtime import huge_pages
from vlm_export.spec.graph_io import Layout

ENGINE_VARIANTS = {"torch": ("",), "torch-cuda": ("",), "ort": ("fp32", "int8", "int4"), "ort-concat": ("fp32", "int8", "int4"),
                   "ort-fp32kv": ("int8", "int4"), "ort-mlas": ("int4",),
                   "ort-static": ("fp32",),
                   "llama.cpp": ("source", "F32", "Q8_0", "Q4_0", "Q4_K_M"), "ort-genai": ("int4", "fp32")}
# "ENGINE/4k": the same engine with 4 KiB pages only (huge pages off), to measure what they bring
SMALL_PAGES = "/4k"


def split_pages(name: str) -> tuple[str, bool]:
    """'ort:int4/4k' -> ('ort:int4', False); 'ort:int4' -> ('ort:int4', True)."""
    return (name[: -len(SMALL_PAGES)], False) if name.endswith(SMALL_PAGES) else (name, True)


def load_suite(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise VlmExportError(f"benchmark suite {path} does not exist", "pass a file from bench/suites/")
    try:
        suite = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VlmExportError(f"benchmark suite {path} is not valid JSON ({exc})", "fix the file") from exc
    names = [split_pages(n)[0] for m in suite.get("models", []) for n in m.get("engines", [])]
    bad = [n for n in names if n.partition(":")[0] not in ENGINE_VARIANTS or n.partition(":")[2] not in ENGINE_VARIANTS[n.partition(":")[0]]]
    if bad:
        raise VlmExportError(f"unknown benchmark engine '{bad[0]}' in {path}",
                             "use " + ", ".join(f"{k}:{'|'.join(v)}" if v != ("",) else k for k, v in ENGINE_VARIANTS.items()))
    known = {f.name for f in fields(Settings)}
    unknown = set(suite.get("settings", {})) - known
    if unknown or not suite.get("models"):
        raise VlmExportError(f"benchmark suite {path}: unknown settings {sorted(unknown)} or no models", f"settings are {sorted(known)}")
    if "quality" in suite:
        quality_settings(suite)
    return suite


def quality_settings(suite: dict):
    """The suite's "quality" block as QualitySettings, or None when it has none."""
    from vlm_export.benchmark.row_quality import QualitySettings

    if "quality" not in suite:
        return None
    block = suite["quality"]
    known = {f.name for f in fields(QualitySettings)}
    if not isinstance(block, dict) or set(block) - known:
        raise VlmExportError(f"benchmark suite {suite.get('name')}: the quality block has unknown keys "
                             f"{sorted(set(block) - known) if isinstance(block, dict) else block}", f"use {sorted(known)}")
    return QualitySettings(**block)


def _decoder_bytes(directory: Path, manifest: dict) -> int:
    files = [g["file"] for g in manifest["graphs"] if g["name"] in ("decoder", "decoder_decode")]
    return sum((directory / f).stat().st_size + ((directory / (f + ".data")).stat().st_size if (directory / (f + ".data")).exists() else 0)
               for f in files)


class Workspace:
    """Builds (once) what each engine name needs for one model, and says how big it is."""

    def __init__(self, model: str, root: Path = Path(".")):
        from vlm_export.spec import resolve_spec

        self.spec = resolve_spec(model)
        self.root = Path(root)
        self.graphs = self.root / "graphs" / self.spec.name
        self.build_seconds: dict[str, float] = {}

    def _graphs(self) -> Path:
        from vlm_export.build import ensure_graphs

        if not (self.graphs / "manifest.json").is_file():
            started = time.perf_counter()
            ensure_graphs(self.spec, self.graphs)
            self.build_seconds["export"] = round(time.perf_counter() - started, 1)
        return self.graphs

    def _cpu_variant(self, variant: str, layout: str = Layout.INPLACE, kv: str = "auto", kernels: str = "auto") -> Path:
        from vlm_export.build import build_model

        differences = [layout] * (layout != Layout.INPLACE) + [f"{kv}kv"] * (kv != "auto") + ["mlas"] * (kernels == "ort")
        folder = "-".join(["cpu", *differences])
        out = self.root / "engines" / folder / self.spec.name
        if not (out / variant / "manifest.json").is_file():
            started = time.perf_counter()
            # the comparison sets (Concat KV, fp32 KV, MLAS): only the variant asked for, beside its fp32 baseline
            options = {"layout": layout} if folder == "cpu" else {"layout": layout, "kv": kv, "kernels": kernels,
                                                                   "variants": ("fp32", variant)}
            build_model(self.spec, "cpu", out, self._graphs(), options, True)
            self.build_seconds[f"build {folder}"] = round(time.perf_counter() - started, 1)
        return out / variant

    def _static(self) -> Path:
        from vlm_export.targets.assemble import export_layout

        out = self.root / "graphs" / f"{self.spec.name}-static"
        if not (out / "manifest.json").is_file():
            started = time.perf_counter()
            export_layout(self._graphs(), out, layout=Layout.STATIC,
                          kv_buffer=min(1024, self.spec.llm.max_context))
            self.build_seconds["export static"] = round(time.perf_counter() - started, 1)
        return out

    def _gguf(self, kind: str, threads: int) -> Path:
        from vlm_export.benchmark.gguf_export import dequantize_gguf, quantize_gguf, write_gguf

        if kind == "source":
            if self.spec.weights.source != "gguf":
                raise VlmExportError(f"{self.spec.name} has no GGUF of its own", "use llama.cpp:F32|Q8_0|Q4_0")
            return Path(self.spec.weights.path)
        folder = self.root / "bench" / "cache" / self.spec.name
        folder.mkdir(parents=True, exist_ok=True)
        f32 = folder / "F32.gguf"
        if not f32.is_file():
            step(f"writing {f32}")
            if self.spec.weights.source == "gguf":  # the model's own GGUF, every tensor dequantized: same weights, same vocabulary
                dequantize_gguf(Path(self.spec.weights.path), f32.with_suffix(".tmp"))
            else:
                from vlm_export.model.load import load_reference

                write_gguf(load_reference(self.spec), f32.with_suffix(".tmp"))
            f32.with_suffix(".tmp").rename(f32)
        if kind == "F32":
            return f32
        target = folder / f"{kind}.gguf"
        if not target.is_file():
            quantize_gguf(f32, target.with_suffix(".tmp"), kind, threads)
            target.with_suffix(".tmp").rename(target)
        return target

    def engine(self, name: str, threads: int) -> tuple[str, Path, int, int]:
        """name -> (backend kind, location, bytes on disk, bytes read per decoded token without the KV)."""
        from vlm_export.artifacts import read_manifest

        family, _, variant = name.partition(":")
        if family == "llama.cpp":
            path = self._gguf(variant, threads)
            return "llama.cpp", path, path.stat().st_size, path.stat().st_size
        if family == "ort-genai":
            from vlm_export.benchmark import genai_peer

            started = time.perf_counter()
            built = (self.root / "bench" / "cache" / self.spec.name / f"genai-{variant}" / "genai_config.json").is_file()
            path = genai_peer.build(self.spec, variant, self.root, threads)
            if not built:
                self.build_seconds[f"build ort-genai {variant}"] = round(time.perf_counter() - started, 1)
            return ("ort-genai", path, *genai_peer.sizes(path))
        if family == "torch-cuda":  # fp16 weights on the GPU; bytes = the decoder's, 2 per parameter
            from vlm_export.benchmark.engines import SPEC_PREFIX
            from vlm_export.benchmark.machine import cuda_available

            if not cuda_available():
                raise VlmExportError("torch-cuda needs a CUDA GPU, and this PyTorch sees none", "run this suite where one is")

            return "torch-cuda", SPEC_PREFIX + self.spec.name, 2 * _decoder_params(self.spec), 2 * _decoder_params(self.spec)
        directory = {"torch": lambda: self._graphs(), "ort": lambda: self._cpu_variant(variant),
                     "ort-concat": lambda: self._cpu_variant(variant, Layout.DYNAMIC),
                     "ort-fp32kv": lambda: self._cpu_variant(variant, kv="fp32"),
                     "ort-mlas": lambda: self._cpu_variant(variant, kernels="ort"),
                     "ort-static": lambda: self._static()}.get(family)
        if directory is None:
            raise VlmExportError(f"unknown benchmark engine '{name}'", "see vlm_export/benchmark/suite.py for the names")
        directory = directory()
        manifest = read_manifest(directory)
        size = sum(f["bytes"] for f in manifest["files"].values())
        return ("torch" if family == "torch" else "ort"), directory, size, _decoder_bytes(directory, manifest)


def _decoder_params(spec) -> int:
    llm = spec.llm
    head = llm.hidden_size // llm.num_heads
    attention = llm.hidden_size * (llm.num_heads + 2 * llm.num_kv_heads) * head + llm.num_heads * head * llm.hidden_size
    return llm.num_layers * (attention + 3 * llm.hidden_size * llm.intermediate_size) + llm.vocab_size * llm.hidden_size


def _kv_bytes_per_token(spec, kind: str, location) -> int:
    """K and V of every layer for one token, at the width the engine stores them: fp16 for llama.cpp
    and torch-cuda, fp32 for onnxruntime-genai's CPU models, the decoder's own past_key_values type for our artifact sets (int8 or fp32)."""
    llm = spec.llm
    width = {"llama.cpp": 2, "torch-cuda": 2, "ort-genai": 4}.get(kind) or _kv_itemsize(Path(location))  # genai on CPU: fp32 KV
    return 2 * llm.num_layers * llm.num_kv_heads * (llm.hidden_size // llm.num_heads) * width


def _kv_itemsize(directory: Path) -> int:
    from vlm_export.artifacts import read_manifest
    from vlm_export.runtime.artifact_set import kv_dtype

    decoder = next(g for g in read_manifest(directory)["graphs"] if g["name"] in ("decoder", "decoder_decode"))
    return kv_dtype(decoder).itemsize


def _measure_in_child(kind: str, location: Path, settings: Settings, timeout: int, huge: bool = True,
                      root: Path = Path(".")) -> dict:
    """A fresh interpreter per engine: its own peak RSS, no warm caches, and a crash (a native
    library's segfault) or a hang becomes a reported row instead of a stuck run."""
    if kind == "ort-genai":  # its own venv's interpreter, its own generate loop
        from vlm_export.benchmark.genai_peer import measure_speed

        try:
            return measure_speed(root, location, settings, timeout)
        except subprocess.TimeoutExpired:
            return {"skipped": f"no result within {timeout} s (killed)"}
        except VlmExportError as exc:
            return {"skipped": exc.one_line()}
    command = [sys.executable, "-m", "vlm_export.benchmark.engines", kind, str(location), json.dumps(asdict(settings))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                              env=huge_pages.environment(enabled=huge))
    except subprocess.TimeoutExpired:
        return {"skipped": f"no result within {timeout} s (killed)"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        if last.startswith("error: "):  # a user-facing reason (a missing extra, a bad engine), already one line
            return {"skipped": last.removeprefix("error: ")}
        return {"skipped": f"engine process failed (exit {done.returncode}): {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def merge_rounds(measured: list[dict]) -> dict:
    """One engine's rounds -> one row: each timing's median is the median of the rounds' medians
    (min, max and sample count over all of them; "rounds" keeps each round's median), peak RSS the
    largest, the load average from the lowest before to the highest after. A round that failed
    makes the row skipped, saying which."""
    if len(measured) == 1:
        return measured[0]
    failed = next((i for i, m in enumerate(measured) if "skipped" in m), None)
    if failed is not None:
        return {"skipped": f"round {failed + 1} of {len(measured)}: {measured[failed]['skipped']}"}

    def merge(values: list):
        first = values[0]
        if isinstance(first, dict) and {"median", "min", "max"} <= set(first):
            return {"median": float(np.median([v["median"] for v in values])), "min": min(v["min"] for v in values),
                    "max": max(v["max"] for v in values), "n": sum(v.get("n", 1) for v in values),
                    "rounds": [v["median"] for v in values]}
        if isinstance(first, dict):
            return {k: merge([v[k] for v in values]) for k in first}
        return first

    merged = {key: merge([m[key] for m in measured]) for key in measured[0]}
    if "peak_rss_mb" in merged:
        merged["peak_rss_mb"] = max(m["peak_rss_mb"] for m in measured)
    merged["load_average_1m"] = [min(m["load_average_1m"][0] for m in measured), max(m["load_average_1m"][1] for m in measured)]
    return merged


def run_suite(suite: dict, root: Path = Path(".")) -> dict:
    """Every engine of `suite` measured side by side; `root`: where graphs/, engines/ and
    bench/cache/ are found or built."""
    with stage(f"benchmark suite {suite['name']}"):
        return _run_suite(suite, root)


def _run_suite(suite: dict, root: Path) -> dict:
    from vlm_export.benchmark.machine import cuda_available, describe, gpu_limits, limits_in_child

    settings = Settings(**{**suite.get("settings", {}), "contexts": tuple(suite.get("settings", {}).get("contexts", Settings.contexts))})
    with stage("measuring this machine's memory bandwidth and matmul throughput"):
        machine_limits = limits_in_child()
        if any(split_pages(n)[0] == "torch-cuda" for m in suite["models"] for n in m["engines"]) and cuda_available():
            step("the GPU's memory bandwidth and fp16 matmul throughput")
            machine_limits["gpu"] = gpu_limits()
    quality = quality_settings(suite)
    report = {"schema": "vlm-export-bench/1", "suite": suite["name"], "machine": describe(), "limits": machine_limits,
              "settings": asdict(settings), "models": []}
    if quality is not None:
        report["quality"] = asdict(quality)
    for entry in suite["models"]:
        workspace = Workspace(entry["model"], root)
        flops_per_token = 2 * _decoder_params(workspace.spec)
        rows, engines = [], []
        for name in entry["engines"]:
            base, huge = split_pages(name)
            try:
                engines.append((name, huge, *workspace.engine(base, settings.threads)))
            except VlmExportError as exc:  # e.g. llama-cpp-python absent: say so in the report, measure the rest
                rows.append({"engine": name, "skipped": exc.one_line()})
        rounds: dict[str, list[dict]] = {name: [] for name, *_ in engines}
        for index in range(settings.rounds):  # every engine once per round, so drift hits all rows alike
            for name, huge, kind, location, _, _ in engines:
                label = f" (round {index + 1} of {settings.rounds})" if settings.rounds > 1 else ""
                with stage(f"{workspace.spec.name}: measuring {name}{label}"):
                    load_before = os.getloadavg()[0]
                    measured = _measure_in_child(kind, location, settings, entry.get("timeout_s", 900), huge, root)
                    # other work on the machine slows every engine, llama.cpp's spinning threads most: say how busy it was
                    measured["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                rounds[name].append(measured)
        for name, huge, kind, location, size, weight_bytes in engines:
            measured = merge_rounds(rounds[name])
            if "skipped" in measured:
                rows.append({"engine": name, **measured})
                continue
            kv = _kv_bytes_per_token(workspace.spec, kind, location)
            limit = machine_limits["gpu"] if kind == "torch-cuda" else machine_limits
            roofline = {c: limit["memory_bandwidth_gbs"] * 1e9 / (weight_bytes + kv * int(c)) for c in measured["decode_tok_s"]}
            if kind == "llama.cpp":
                from vlm_export.benchmark.gguf_export import tensor_types

                measured["gguf_tensor_types"] = tensor_types(location)
            rows.append({"engine": name, "artifact": str(location), "bytes": size, "bytes_read_per_token": weight_bytes,
                         **measured,
                         "decode_roofline_fraction": {c: measured["decode_tok_s"][c]["median"] / roofline[c] for c in roofline},
                         "prefill_matmul_fraction": measured["prefill_tok_s"]["median"] * flops_per_token
                         / (limit["fp16_matmul_gflops" if kind == "torch-cuda" else "fp32_matmul_gflops"] * 1e9)})
        rows.sort(key=lambda row: entry["engines"].index(row["engine"]))
        baseline = next((r for r in rows if r["engine"] == entry.get("baseline") and "skipped" not in r),
                        next((r for r in rows if "skipped" not in r), None))
        for row in rows:
            if "skipped" not in row and baseline is not None:
                row["decode_ratio_vs_baseline"] = {c: row["decode_tok_s"][c]["median"] / baseline["decode_tok_s"][c]["median"]
                                                   for c in row["decode_tok_s"]}
                row["prefill_ratio_vs_baseline"] = row["prefill_tok_s"]["median"] / baseline["prefill_tok_s"]["median"]
        if quality is not None:
            from vlm_export.benchmark.row_quality import attach

            attach(workspace, rows, quality, settings.threads, root)
        torch_row = next((r for r in rows if r["engine"] == "torch" and "skipped" not in r), None)
        for row in rows:  # the vision target is stated against PyTorch eager, whatever the suite's baseline
            if torch_row and row.get("vision_ms") and torch_row.get("vision_ms"):
                row["vision_speedup_vs_torch"] = torch_row["vision_ms"]["median"] / row["vision_ms"]["median"]
        report["models"].append({"model": workspace.spec.name, "baseline": baseline and baseline["engine"],
                                 "decoder_params": flops_per_token // 2, "build_seconds": workspace.build_seconds,
                                 "results": rows})
    return report
