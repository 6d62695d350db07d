"""`export_model`: spec -> reference -> every graph of a layout -> validated -> manifest, atomically."""

from __future__ import annotations

import copy
import gc
import json
import logging
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from vlm_export.artifacts import TOKENIZER_DIR, atomic_directory, link_or_copy, sha256_remembered, stage_key, write_manifest
from vlm_export.errors import VlmExportError
from vlm_export.export.onnx_export import export_graph, inline_weights
from vlm_export.export.tokenizer_graph import write_tokenizer_graph
from vlm_export.export.validate import InputSampler, validate_graph
from vlm_export.model.graph_modules import graph_module
from vlm_export.model.load import load_reference
from vlm_export.model.mobilevlm import MobileVLMForCausalLM
from vlm_export.model.preprocess import preprocessing_record
from vlm_export.model.tokenizer import load_tokenizer
from vlm_export.progress import native_stderr_filtered, note, stage, step
from vlm_export.spec import ModelSpec
from vlm_export.spec.graph_io import ExportOptions, GraphRole, GraphSpec, graphs_for, make_inputs
from vlm_export.spec.layouts import layout_of

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


def weights_fingerprint(spec: ModelSpec) -> list:
    """What identifies the weights without hashing gigabytes: path, size and mtime of each source."""
    paths = [p for p in (spec.weights.path, spec.weights.vision_tower_path, spec.weights.lora_path) if p]
    files = [f for p in map(Path, paths) for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return [spec.weights.seed] + [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


EXPORT_KIND = "vlm-export graphs"  # manifest["kind"] of an export (a build's artifact sets say "vlm-export build")
KEEP_BYTES = 1 << 30  # an LLM-only reference this small stays loaded for the process's next export of it


class _KeptReference:
    """The last LLM-only fp32 reference an export loaded, for the next export of the same spec and
    weight files in this process: a build from graphs of another layout exports the decoder again
    in its own (a cpu build from dynamic graphs; an orin or sd888 build, whose fp32 and static sources are
    exports too: smol, ~3 s of GGUF dequantisation and set-up saved each). Exports only read it. Kept
    only under KEEP_BYTES of parameters, so a 1.4B model is never held beside what follows."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.key, self.model = None, None

    def get(self, spec: ModelSpec):
        key = json.dumps([spec.to_dict(), weights_fingerprint(spec)], sort_keys=True, default=str)
        if self.key != key:
            self.clear()
            gc.collect()
            model = load_reference(spec, vision=False, llm=True)
            if sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta) <= KEEP_BYTES:
                self.key, self.model = key, model
            return model
        return self.model


KEPT = _KeptReference()


class _LazyReference:
    """Loads the reference (and its fp16 copy) only if some graph is not cached, and only the part
    the graph needs: the vision graph's model has no LLM weights (smol: 0.5 GB less at the
    export's peak, which is the vision tower's trace), the others' no vision tower. Graphs export
    vision first, so a full export loads each part once."""

    def __init__(self, spec: ModelSpec, dtype: str):
        self.spec, self.dtype, self._models, self._vision = spec, dtype, None, None

    def get(self, graph: GraphSpec):
        vision = graph.wrapper == GraphRole.VISION
        if self._models is None or self._vision != vision:
            self._models = None
            if vision:
                KEPT.clear()  # no LLM beside the tower's trace, the export's memory peak
            gc.collect()
            reference = load_reference(self.spec, vision=True, llm=False) if vision else KEPT.get(self.spec)
            self._vision = vision
            # fp16 graphs are exported from a half copy but validated against the fp32 reference, so
            # the reported error is the whole fp16 error (RMSNorm and softmax compute in fp32).
            model = copy.deepcopy(reference).half() if self.dtype == "fp16" else reference
            self._models = (reference, model, None if vision else InputSampler(reference))  # the tower takes pixels only
        return self._models


def _export_one(models: _LazyReference, graph: GraphSpec, staging: Path, opts: ExportOptions) -> dict:
    step("loading the PyTorch reference")
    reference, model, sampler = models.get(graph)
    step("tracing and writing ONNX")
    t0 = time.perf_counter()
    wrapper = make_wrapper(model, graph)
    example = make_inputs(graph, graph.cases[0], np.random.default_rng(0), sampler)
    path, traced = export_graph(wrapper, graph, example, staging, opts.opset)
    exported = time.perf_counter() - t0
    step("validating against PyTorch")
    reference_wrapper = wrapper if model is reference else make_wrapper(reference, graph)
    known = (example, traced) if model is reference and traced is not None else None  # an fp16 trace is not the reference
    validation = validate_graph(reference_wrapper, graph, path, sampler, known=known)
    log.info("%s: exported in %.1f s, validation %s", graph.file, exported, validation)
    if graph.wrapper == GraphRole.VISION:
        release_vision(model, reference)
    del wrapper, reference_wrapper, model, reference
    gc.collect()
    if not validation["passed"]:
        details = ", ".join(f"{k} max|diff| {v['max_abs_diff']:.2e}" for k, v in validation["outputs"].items())
        raise VlmExportError(f"validation against PyTorch failed: {graph.name} {details}", "report this with --debug output")
    return {**graph.to_dict(), "export_seconds": round(exported, 2), "validation": validation}


def _write_tokenizer(spec: ModelSpec, staging: Path) -> dict:
    """The tokenizer travels with the graphs: a device-side run needs neither the checkpoint nor the GGUF."""
    tokenizer = load_tokenizer(spec.tokenizer)
    tokenizer.hf.save_pretrained(str(staging / TOKENIZER_DIR))
    with native_stderr_filtered():  # the SentencePiece op logs LOG(INFO) lines on fd 2 when checked
        record = write_tokenizer_graph(staging / TOKENIZER_DIR, staging, tokenizer, spec.template.add_bos)
    if record["file"] and not record["check"]["passed"]:
        raise VlmExportError(f"tokenizer.onnx gives other ids than the tokenizer: {record['check']['mismatches']}",
                             "report this with --debug output")
    return {**record, "runtime_tokenizer": _prove_tokenizers_backend(spec, staging / TOKENIZER_DIR)}


def _prove_tokenizers_backend(spec: ModelSpec, directory: Path) -> dict:
    """Whether the runtime may tokenize `directory` without transformers (model/tokenizers_backend.py:
    `tokenizers` or `sentencepiece` alone): compared with what transformers loads from the same folder on
    the tokenizer graph's check texts, a page of the eval prose, the template's control strings and
    chat renderings; the result is written into the folder (CHECK_FILE), which the runtime reads."""
    from vlm_export.export.tokenizer_graph import CHECK_TEXTS
    from vlm_export.model.tokenizer import tokenizer_spec_in
    from vlm_export.model.tokenizers_backend import CHECK_FILE, check
    from vlm_export.quality.eval_set import prose

    (directory / CHECK_FILE).unlink(missing_ok=True)  # an interrupted export's: prove again
    hf = load_tokenizer(tokenizer_spec_in(directory)).hf  # what the runtime loads from this folder otherwise
    controls = " ".join(t.content for t in hf.added_tokens_decoder.values())
    texts = [*CHECK_TEXTS, prose()[:3000], controls, f"x{controls.replace(' ', 'y')}z"]
    conversations = [
        [{"role": "user", "content": "What is in the image?\n<image>"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi </s> there " + controls}],
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
         {"role": "user", "content": ""}],
    ]
    result = check(directory, hf, texts, conversations, spec.template.jinja)
    (directory / CHECK_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return {**result, "backend": result["backend"] if result["passed"] else "transformers"}


def _reuse_tokenizer(source: Path, staging: Path) -> dict:
    """The tokenizer files and record of an earlier export of the same model (loading smol's from
    its GGUF again costs ~15 s): linked, as the graphs are."""
    from vlm_export.artifacts import read_manifest

    for path in sorted((source / TOKENIZER_DIR).rglob("*")):
        if path.is_file():
            link_or_copy(path, staging / path.relative_to(source))
    record = read_manifest(source)["tokenizer_graph"]
    if record.get("file"):
        link_or_copy(source / record["file"], staging / record["file"])
    return {**record, "reused_from": str(source)}


def reusable_graphs(source: Path | None, spec: ModelSpec, opts: ExportOptions, versions: dict) -> dict[str, dict]:
    """Graphs of an earlier export that this one would export identically (same model, dtype,
    opset and versions, same graph spec): e.g. vision and embed when only the decoder layout differs."""
    if source is None:
        return {}
    from vlm_export.artifacts import verify

    manifest = verify(source)
    same = (manifest["model"] == json.loads(json.dumps(spec.to_dict())) and manifest["versions"] == versions
            and manifest["options"].get("dtype") == opts.dtype and manifest["opset"] == opts.opset)
    return {g["file"]: {**g, "reused_from": str(source)} for g in manifest["graphs"]} if same else {}


def _reuse(record: dict, graph: GraphSpec, source: Path, staging: Path) -> dict | None:
    """The earlier record if its graph spec is this one's (JSON-normalised), with its files linked."""
    if record is None or {k: record.get(k) for k in graph.to_dict()} != json.loads(json.dumps(graph.to_dict())):
        return None
    for name in (graph.file, graph.file + ".data"):
        if (source / name).is_file():
            link_or_copy(source / name, staging / name)
    return record


def export_model(spec: ModelSpec, out: Path, opts: ExportOptions, force: bool = False,
                 reuse: Path | None = None, on_graph=None) -> dict:
    """Export every graph of `opts.layout`, each validated; resumes the stages an interrupted run
    finished; takes unchanged graphs from the export in `reuse` instead of exporting them again.
    `on_graph(record, folder, sha256)`: called as each graph is exported and validated, with its
    manifest record, the (staging) folder its file lies in and the file's digest, e.g. to start work
    on it while the next graph exports."""
    layout_of(opts.layout).check_export(spec, opts)
    with stage(f"exporting {spec.name} ({opts.layout} layout, {opts.dtype}) to {out}"):
        return _export_model(spec, Path(out), opts, force, reuse, on_graph)


def _export_model(spec: ModelSpec, out: Path, opts: ExportOptions, force: bool, reuse: Path | None, on_graph=None) -> dict:
    start = time.perf_counter()
    versions = _versions()
    base_key = (spec.to_dict(), opts.__dict__, versions, weights_fingerprint(spec))
    models = _LazyReference(spec, opts.dtype)
    earlier = reusable_graphs(reuse, spec, opts, versions)
    records = []
    with atomic_directory(Path(out), force) as staging:
        for graph in graphs_for(spec, opts):
            key = stage_key(base_key, graph.to_dict())
            record = staging.cached(graph.name, key)
            if record is not None:
                note(f"cached {graph.file} (unchanged inputs: the interrupted run's finished stage)")
                records.append({**record, "cached": True})
                continue
            record = _reuse(earlier.get(graph.file), graph, Path(reuse or "."), staging.path)
            if record is not None:
                step(f"{graph.file}: the same graph as in {reuse}, linked")
                staging.remember(graph.name, key, [graph.file, graph.file + ".data"], record)
                records.append(record)
                continue
            with stage(f"exporting {graph.file}"):
                record = _export_one(models, graph, staging.path, opts)
            # measured: done on a thread beside the next graph's export it made the export no
            # quicker (53.6 / 51.1 s against 53.0 / 45.2 s in line, back to back): the copy and the
            # next graph's writes share the disk
            inline_weights(staging.path / graph.file)  # validated on the external data (export_graph's docstring)
            staging.remember(graph.name, key, [graph.file, graph.file + ".data"], record)
            if on_graph is not None:
                on_graph(record, staging.path, sha256_remembered(staging.path / graph.file))
            records.append(record)
        if earlier:  # the same model, export and tool versions: the same tokenizer
            step(f"tokenizer: the same as in {reuse}, linked")
            tokenizer_graph = _reuse_tokenizer(Path(reuse), staging.path)
        else:
            with stage("writing the tokenizer"):
                tokenizer_graph = _write_tokenizer(spec, staging.path)
        staging.finish()
        manifest = write_manifest(staging.path, {
            "kind": EXPORT_KIND,
            "model": spec.to_dict(),
            "options": opts.__dict__,
            "opset": opts.opset,
            "versions": versions,
            "graphs": records,
            "tokenizer_graph": tokenizer_graph,
            "preprocessing": preprocessing_record(spec),  # incl. each deliberate deviation from the official pipeline
            "export_seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mb": round(peak_rss_mb()),
        })
    return manifest
