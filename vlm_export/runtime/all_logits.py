"""An all-positions copy of an inplace decoder graph, for teacher-forced scoring.

The inplace decoder returns only each row's last logits: a GatherElements picks the last valid
row of the residual stream before the final norm and lm_head (`InPlaceDecoderGraph`). Scoring
needs every position's logits, so the copy bypasses that gather and keeps everything else
(custom ops such as `vlm_export.cpu::Int4MatMul`, the int8 KV attention, the weights):

    blocks.N/Add_1 (B, S, C) --GatherElements(last row)--> (B, 1, C) -> norm -> lm_head -> logits
    blocks.N/Add_1 (B, S, C) --Slice(rows logits_from..S)--------------> norm -> lm_head -> logits (B, S - from, V)

`logits_from` (an input of the copy, (1,) int64; 0 for every position) lets a caller that needs only
the last rows skip the lm_head on the others: scoring prefills each context half through the copy and
keeps its last row, and the lm_head is ~20 % of smol's per-position work (576 x 49,152 of ~150 M MACs).

The copy lies in a temporary directory of its own: the graph file, without weights, and a symlink
to the kernel library, so nothing is written into the artifact directory. The weights stay where
they are: the graph is read without them (onnx_wire.py), inline ones become external data pointing
at their bytes inside the original .onnx file, and ONNX Runtime loads the copy from bytes and reads
them from the artifact directory (`session.model_external_initializers_file_folder_path`; a
symlinked data file is refused as a path that escapes the model's directory). So the copy costs no
second copy of the weights on disk or in the parse (reading and rewriting smol's three decoders in
full took 9 s of a build).
"""

from __future__ import annotations

import tempfile
from collections import deque
from pathlib import Path

import numpy as np

from vlm_export.errors import VlmExportError

LOGITS_FROM = "logits_from"  # the copy's extra input: the first row (along the sequence) whose logits it returns


def _last_row_gather(graph):
    """The GatherElements nearest the `logits` output, walking back through node inputs."""
    producers = {out: node for node in graph.node for out in node.output}
    queue, seen = deque([producers["logits"]]), set()
    while queue:
        node = queue.popleft()
        if node.op_type == "GatherElements":
            return node
        if node.op_type == "GroupQueryAttention":
            continue  # past the last block: no gather on this path
        for name in node.input:
            if name in producers and name not in seen:
                seen.add(name)
                queue.append(producers[name])
    return None


def _prune_dead_nodes(graph) -> None:
    """Drop nodes none of whose outputs is used (the gather's row-index arithmetic), then the
    initializers only they read."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(out in used for out in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def all_logits_graph(source: Path, destination: Path) -> None:
    """Write `source` (an inplace decoder) to `destination` with every position's logits; its weights
    are external data named relative to `source`'s directory (their own data file, or `source`)."""
    import onnx
    import onnx.numpy_helper

    from vlm_export.onnx_wire import as_external, read_without_weights

    model, skipped = read_without_weights(source)
    as_external(model, skipped, source.name)
    graph = model.graph
    gather = _last_row_gather(graph)
    if gather is None:
        raise VlmExportError(f"{source.name}: no last-row GatherElements before the logits",
                             "score this decoder one token per call, or re-export it with the inplace layout")
    data, picked = gather.input[0], gather.output[0]
    ends, axes = f"{LOGITS_FROM}/ends", f"{LOGITS_FROM}/axes"
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array([np.iinfo(np.int64).max]), ends),
                              onnx.numpy_helper.from_array(np.array([1]), axes)])
    graph.input.append(onnx.helper.make_tensor_value_info(LOGITS_FROM, onnx.TensorProto.INT64, [1]))
    graph.node.insert(list(graph.node).index(gather), onnx.helper.make_node(
        "Slice", [data, LOGITS_FROM, ends, axes], [picked], name=f"{LOGITS_FROM}/Slice"))
    graph.node.remove(gather)
    _prune_dead_nodes(graph)
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "logits_rows"  # (B, S - logits_from, V), no longer (B, 1, V)
    onnx.save(model, str(destination))


class AllLogitsCopy:
    """A temporary directory holding the all-positions copy of a decoder record's graph.

        with AllLogitsCopy(directory, record) as (path, record, weights_dir):
            ...  # record: the copy's manifest record; weights_dir: where its external data lies
    """

    def __init__(self, directory: Path, record: dict):
        self.directory, self.record = Path(directory), record
        self.workdir = None

    def __enter__(self) -> tuple[Path, dict, Path | None]:
        self.workdir = tempfile.TemporaryDirectory(prefix="vlm-export-all-logits-")
        work = Path(self.workdir.name)
        library = self.record.get("custom_op_library")
        if library:
            (work / library).symlink_to((self.directory / library).resolve())
        path = work / self.record["file"]
        all_logits_graph(self.directory / self.record["file"], path)
        record = {**self.record, "attrs": {**self.record.get("attrs", {}), "last_logits_only": False},
                  "inputs": [*self.record["inputs"], {"name": LOGITS_FROM, "dtype": "int64", "shape": [1]}]}
        return path, record, self.directory.resolve()

    def __exit__(self, *exc) -> None:
        self.workdir.cleanup()
