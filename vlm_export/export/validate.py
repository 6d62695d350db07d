"""Every export validates itself: ONNX Runtime vs the PyTorch wrapper on fresh random inputs of
several shapes, compared on valid positions only, against the graph's tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlm_export.model.graph_modules import graph_module
from vlm_export.spec.graph_io import GraphRole, GraphSpec, KvUpdate, make_inputs, valid_positions


def compare(reference: np.ndarray, actual: np.ndarray, valid: np.ndarray | None, seq_axis: int) -> dict:
    ref, act = reference.astype(np.float64), actual.astype(np.float64)
    if valid is not None:
        # valid is (B, L); move the output's sequence axis next to batch and select.
        ref = np.moveaxis(ref, seq_axis, 1)[valid]
        act = np.moveaxis(act, seq_axis, 1)[valid]
    diff = np.abs(ref - act)
    return {
        "max_abs_diff": float(diff.max(initial=0.0)),
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "max_abs_ref": float(np.abs(ref).max(initial=0.0)),
    }


def ort_session(path: Path, providers: list[str] | None = None, threads: int | None = None, low_memory: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if low_memory:  # no second, prepacked copy of every weight (validation runs beside PyTorch)
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def _as_torch(array: np.ndarray, float_dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.to(float_dtype) if tensor.is_floating_point() else tensor


class InputSampler:
    """In-distribution decoder inputs from the fp32 reference: token embeddings and real past K/V."""

    def __init__(self, model):
        self.table = model.model.embed_tokens.weight.detach()
        self.vocab = self.table.shape[0]
        self.prefix = graph_module(model, "decoder", {"kv_update": KvUpdate.FULL_CACHE, "last_logits_only": True})
        self.kv_shape = (model.spec.llm.num_kv_heads, model.spec.llm.head_dim)

    def embeds(self, rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
        ids = torch.from_numpy(rng.integers(0, self.vocab, (batch, seq)))
        return self.table[ids].float().numpy()

    @torch.no_grad()
    def past(self, rng: np.random.Generator, mask: np.ndarray) -> list[np.ndarray]:
        """K/V of a random prefix, run through the reference with this keep-mask (B, P)."""
        batch, length = mask.shape
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        empty = torch.zeros((batch, *self.kv_shape[:1], 0, self.kv_shape[1]), dtype=self.table.dtype)
        num_layers = len(self.prefix.blocks)
        outputs = self.prefix(torch.from_numpy(self.embeds(rng, batch, length)).to(self.table.dtype),
                              torch.from_numpy(mask), torch.from_numpy(positions), *([empty] * 2 * num_layers))
        return [t.float().numpy() for t in outputs[1:]]


def _same_feeds(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _first_rows(graph: GraphSpec, case: dict, known: tuple[dict, tuple] | None) -> tuple[dict, tuple] | None:
    """The vision graph maps each image on its own, so a smaller batch is checked on the first rows of
    the known example, whose PyTorch outputs are those rows: ORT still runs the other batch size, and
    smol's CLIP-L is not run in PyTorch a third time (~2.6 s). None where that does not apply."""
    if known is None or graph.wrapper != GraphRole.VISION or set(case) != {"batch"}:
        return None
    feeds, outputs = known
    if case["batch"] >= next(iter(feeds.values())).shape[0]:
        return None
    rows = case["batch"]
    return {k: v[:rows] for k, v in feeds.items()}, tuple(t[:rows] for t in outputs)


@torch.no_grad()
def validate_graph(wrapper: torch.nn.Module, graph: GraphSpec, path: Path, sampler: InputSampler, seed: int = 0,
                   known: tuple[dict, tuple] | None = None) -> dict:
    """ORT on `path` against `wrapper` on each of `graph.cases` (inputs drawn from `seed`) -> the worst
    max |diff| per output kind and whether it is within the graph's atol + rtol * max |reference|.
    `known`: (feeds, the wrapper's outputs on them), e.g. from the export's trace: a case whose
    drawn feeds are exactly those uses them instead of running the wrapper again, and a vision case
    of a smaller batch takes their first rows (`_first_rows`).

    Raises AssertionError when ORT's output shape differs from PyTorch's."""
    session = ort_session(path, low_memory=True)
    dtype = next(wrapper.parameters()).dtype
    rng = np.random.default_rng(seed)
    worst: dict[str, dict] = {}
    for case in graph.cases:
        rows = _first_rows(graph, case, known)
        feeds = rows[0] if rows else make_inputs(graph, case, rng, sampler)
        if rows:
            expected = rows[1]
        elif known is not None and _same_feeds(feeds, known[0]):
            expected = known[1]
        else:
            expected = wrapper(*(_as_torch(feeds[t.name], dtype) for t in graph.inputs))
            expected = expected if isinstance(expected, tuple) else (expected,)
        actual = session.run([t.name for t in graph.outputs], feeds)
        for spec, ref, act in zip(graph.outputs, expected, actual):
            ref = ref.float().numpy() if ref.is_floating_point() else ref.numpy()
            if ref.shape != act.shape:
                raise AssertionError(f"{graph.name}.{spec.name}: ORT shape {act.shape} != PyTorch {ref.shape}")
            seq_axis = 2 if spec.name.startswith("present") else 1
            stats = compare(ref, act, valid_positions(graph, spec, feeds), seq_axis)
            key = "logits" if spec.name == "logits" else ("present" if spec.name.startswith("present") else spec.name)
            if key not in worst or stats["max_abs_diff"] > worst[key]["max_abs_diff"]:
                worst[key] = stats
    passed = all(s["max_abs_diff"] <= graph.atol + graph.rtol * s["max_abs_ref"] for s in worst.values())
    return {"passed": passed, "cases": list(graph.cases), "outputs": worst, "atol": graph.atol, "rtol": graph.rtol}
