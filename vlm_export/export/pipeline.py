"""`export_model`: spec -> reference -> every graph of a layout -> validated -> manifest, atomically."""

from __future__ import annotations

import copy
import gc
import logging
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from vlm_export.artifacts import atomic_directory, write_manifest
from vlm_export.errors import VlmExportError
from vlm_export.export.graph_specs import ExportOptions, GraphSpec, graphs_for, make_inputs
from vlm_export.export.onnx_export import export_graph
from vlm_export.export.tokenizer_graph import write_tokenizer_graph
from vlm_export.export.validate import InputSampler, validate_graph
from vlm_export.model.graph_modules import graph_module
from vlm_export.model.load import load_reference
from vlm_export.model.tokenizer import load_tokenizer
from vlm_export.model.mobilevlm import MobileVLMForCausalLM
from vlm_export.runtime.artifact_set import TOKENIZER_DIR
from vlm_export.spec import ModelSpec

log = logging.getLogger(__name__)


def make_wrapper(model: MobileVLMForCausalLM, graph: GraphSpec) -> torch.nn.Module:
    return graph_module(model, graph.wrapper, graph.attrs)


def release_vision(*models: MobileVLMForCausalLM) -> None:
    """The vision tower is ~1.2 GB in fp32; the decoder export of a 1.4B model needs the room."""
    for model in models:
        model.model.vision_tower.to("meta")
        model.model.mm_projector.to("meta")
    gc.collect()


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export_model(spec: ModelSpec, out: Path, opts: ExportOptions, force: bool = False, progress=None) -> dict:
    """Export every graph of `opts.layout`; raise (leaving nothing behind) if any validation fails."""
    if opts.layout == "static" and opts.kv_buffer > spec.llm.max_context:
        raise VlmExportError(f"--kv-buffer {opts.kv_buffer} exceeds the model context {spec.llm.max_context}",
                             "lower --kv-buffer")
    start = time.perf_counter()
    graphs = graphs_for(spec, opts)
    reference = load_reference(spec)
    # fp16 graphs are exported from a half copy but validated against the fp32 reference, so the
    # reported error is the whole fp16 error (RMSNorm and softmax already compute in fp32).
    model = copy.deepcopy(reference).half() if opts.dtype == "fp16" else reference
    sampler = InputSampler(reference)
    records, failures = [], []
    with atomic_directory(Path(out), force) as staging:
        for graph in graphs:
            if progress:
                progress(f"exporting {graph.file}")
            t0 = time.perf_counter()
            wrapper = make_wrapper(model, graph)
            example = make_inputs(graph, graph.cases[0], np.random.default_rng(0), sampler)
            path = export_graph(wrapper, graph, example, staging, opts.opset)
            exported = time.perf_counter() - t0
            if progress:
                progress(f"validating {graph.file} against PyTorch")
            reference_wrapper = wrapper if model is reference else make_wrapper(reference, graph)
            validation = validate_graph(reference_wrapper, graph, path, sampler)
            log.info("%s: exported in %.1f s, validation %s", graph.file, exported, validation)
            records.append({**graph.to_dict(), "export_seconds": round(exported, 2), "validation": validation})
            if not validation["passed"]:
                failures.append(graph.name)
            if graph.wrapper == "vision":
                release_vision(model, reference)
        if failures:
            details = "; ".join(
                f"{r['name']} " + ", ".join(f"{k} max|diff| {v['max_abs_diff']:.2e}" for k, v in r["validation"]["outputs"].items())
                for r in records if r["name"] in failures
            )
            raise VlmExportError(f"validation against PyTorch failed: {details}", "report this with --debug output")
        # The tokenizer travels with the graphs: a device-side run needs neither the checkpoint nor the GGUF.
        tokenizer = load_tokenizer(spec.tokenizer)
        tokenizer.hf.save_pretrained(str(staging / TOKENIZER_DIR))
        tokenizer_graph = write_tokenizer_graph(staging / TOKENIZER_DIR, staging, tokenizer, spec.template.add_bos)
        if tokenizer_graph["file"] and not tokenizer_graph["check"]["passed"]:
            raise VlmExportError(f"tokenizer.onnx gives other ids than the tokenizer: {tokenizer_graph['check']['mismatches']}",
                                 "report this with --debug output")
        manifest = write_manifest(staging, {
            "kind": "vlm-export graphs",
            "model": spec.to_dict(),
            "options": opts.__dict__,
            "opset": opts.opset,
            "versions": _versions(),
            "graphs": records,
            "tokenizer_graph": tokenizer_graph,
            "export_seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mb": round(peak_rss_mb()),
        })
    return manifest
