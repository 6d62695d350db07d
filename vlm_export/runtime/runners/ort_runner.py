"""ONNX Runtime runner: any execution provider, IO binding so KV tensors stay OrtValues."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from vlm_export.artifacts import check_binary
from vlm_export.errors import VlmExportError
from vlm_export.runtime.runners.base import Runner
from vlm_export.spec.graph_io import GraphRole, KvUpdate


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def check_providers(providers: list[str]) -> None:
    missing = [p for p in providers if p not in available_providers()]
    if missing:
        raise VlmExportError(
            f"execution provider(s) {', '.join(missing)} not available in this onnxruntime build "
            f"(available: {', '.join(available_providers())})",
            "install an onnxruntime build with that provider, or pass --providers CPUExecutionProvider",
        )


# ONNX Runtime fuses a blocked DequantizeLinear feeding a MatMul (orin's int4 weight-only form) into
# MatMulNBits, which by default (accuracy level 4) quantizes the activations to int8. TensorRT's int4
# weight-only GEMM keeps fp16 activations, so every session here asks for float ones (level 1): on a
# Q4_1 weight the fused default was 0.4 % off x @ W, level 1 matches it to float rounding. Graphs
# that carry MatMulNBits themselves (the cpu variants) keep their own accuracy_level attribute.
SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def session_options():
    """onnxruntime.SessionOptions with this project's `SESSION_CONFIG`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return options


def register_kernels(options, library: Path) -> None:
    """The variant's own kernels (vlm_export/kernels) in this session. They cut each call into parts
    that the session's own thread pool runs, so the session's intra-op thread count is theirs."""
    if not library.is_file():
        raise VlmExportError(f"{library} is missing (the variant's kernel library)", "rebuild the variant with vlm-export build")
    try:
        options.register_custom_ops_library(str(library.resolve()))
    except Exception as exc:  # ORT's own error types; the library says why (CPU, ORT version)
        raise VlmExportError(f"cannot load the kernel library {library.name}: {str(exc).splitlines()[0][:200]}",
                             "rebuild the variant on this kind of machine, or with --kernels ort") from exc


BY_REFERENCE_BYTES = 32 << 20  # graph files from this size up are opened with their weights by reference


def weights_by_reference(path: Path) -> tuple[bytes | str, Path | None]:
    """What InferenceSession opens for the graph file `path`: when its weights lie inline, its proto
    without them, each large initializer pointing at its own bytes inside `path` as external data,
    and the folder they are resolved in (path's); else the path itself and None. ONNX Runtime then
    reads each weight from the file once, instead of parsing the whole proto and copying every weight
    out of it (smol's CLIP-L: session 1.0 s instead of 2.8 s; its dynamic-int8 copy 0.37 s instead
    of 0.82 s). The same file, the same values: only how they are read changes."""
    from vlm_export.onnx_wire import as_external, read_without_weights

    model, skipped = read_without_weights(path)
    if not skipped:
        return str(path), None
    as_external(model, skipped, path.name)
    return model.SerializeToString(), path.parent


class OrtRunner(Runner):
    def __init__(self, graph: dict, path: Path, providers: list[str] | None = None, threads: int | None = None,
                 weights_dir: Path | None = None):
        super().__init__(graph)
        self.path = Path(path)
        self.weights_dir = weights_dir  # external data read from there, not beside the graph (an all-logits copy)
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self.qnn = graph.get("qnn")  # built for a Snapdragon NPU: {"soc": ..., "context_binary": ...}
        self.session = None
        # inplace layout: present.N.* is written into the memory of past_key_values.N.* (bound to both)
        in_place = graph.get("attrs", {}).get("kv_update") == KvUpdate.IN_PLACE
        self.shared = {n: n.replace("present.", "past_key_values.", 1) for n in self.output_names
                       if in_place and n.startswith("present.")}
        self.shared_inputs = frozenset(self.shared.values())
        self.fresh_outputs = [n for n in self.output_names if n not in self.shared]
        self._bound = None  # (IO binding, the cache arrays bound in it)

    def activate_impl(self) -> None:
        import onnxruntime as ort

        if self.qnn:
            from vlm_export.runtime.runners import qnn_ep

            check_binary(self.path.parent / self.qnn["context_binary"], self.qnn["soc"])
            self.session = qnn_ep.create_session(self.path, self.qnn["soc"], self.threads)
            return
        check_providers(self.providers)
        options = session_options()
        options.log_severity_level = 3
        # The embedding lookup is a Gather: a thread pool of its own would only spin beside the
        # decoder's between steps (each session has its own pool).
        threads = 1 if self.graph.get("wrapper") == GraphRole.EMBED else self.threads
        if threads:
            options.intra_op_num_threads = threads
        if self.graph.get("custom_op_library"):
            register_kernels(options, self.path.parent / self.graph["custom_op_library"])
        model, folder = str(self.path), self.weights_dir
        if folder is not None:  # from bytes, so the data's folder can be named
            model = self.path.read_bytes()
        elif self.path.stat().st_size >= BY_REFERENCE_BYTES:
            model, folder = weights_by_reference(self.path)
        if folder is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        try:
            self.session = ort.InferenceSession(model, options, providers=self.providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise VlmExportError(f"onnxruntime cannot load {self.path} ({str(exc).splitlines()[0][:200]})",
                                 "re-export the graphs; check `vlm-export verify`") from exc

    def deactivate_impl(self) -> None:
        self.session = None
        self._bound = None

    def infer_impl(self, feeds: dict) -> dict:
        import onnxruntime as ort

        binding = self._binding_for(feeds)
        for name, value in feeds.items():
            if name in self.shared_inputs:
                continue  # bound once for as long as the cache's arrays are these
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.fresh_outputs:  # re-bound: a new buffer each call, so earlier results stay valid
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.fresh_outputs, binding.get_outputs()))  # the shared buffers were written where they are

    def _binding_for(self, feeds: dict):
        """The IO binding with the KV cache's arrays bound as both past and present. Kept while
        the caller passes the same arrays (one cache through a whole generation): wrapping and
        binding 2 x layers buffers on every decode step cost ~1 ms of a ~10 ms step on smol."""
        import onnxruntime as ort

        arrays = [feeds[past] for past in self.shared.values()]
        if self._bound is not None and all(a is b for a, b in zip(arrays, self._bound[1])):
            return self._bound[0]  # (the previous cache stays referenced until another one comes)
        binding = self.session.io_binding()
        for name in self.fresh_outputs:  # first, so that get_outputs() lists them first
            binding.bind_output(name, "cpu")
        for (present, past), array in zip(self.shared.items(), arrays):
            value = ort.OrtValue.ortvalue_from_numpy(array)  # no copy; keeps `array` alive
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self._bound = (binding, arrays)
        return binding

    def to_numpy(self, value) -> np.ndarray:
        return value.numpy() if hasattr(value, "numpy") else np.asarray(value)

    @contextmanager
    def all_logits(self):
        """Inplace decoders: a copy of the graph without its last-row gather, in a temporary
        directory (runtime/all_logits.py). This runner's own session is closed meanwhile, so a
        large model is not held twice, and opened again only when it is next used."""
        if self.graph.get("attrs", {}).get("kv_update") != KvUpdate.IN_PLACE or self.qnn:
            yield None
            return
        from vlm_export.runtime.all_logits import AllLogitsCopy

        self.suspend()  # opened again by its next infer(), if one comes
        with AllLogitsCopy(self.path.parent, self.graph) as (path, record, weights_dir), \
                OrtRunner(record, path, self.providers, self.threads, weights_dir) as runner:
            yield runner


def make_runner(graph: dict, directory: Path, options: dict) -> OrtRunner:
    return OrtRunner(graph, Path(directory) / graph["file"], options.get("providers"), options.get("threads"))
