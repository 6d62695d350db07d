"""The one generic exporter: wrapper + GraphSpec -> a clean, checked ONNX file.

torch.onnx.export (TorchScript tracer: predictable names and axes, ~1e-6 vs PyTorch here)
-> onnxscript's constant folding and pattern rewrites, onnx_ir's clean-up passes (dead code, constants lifted to
initializers, duplicate initializers, common subexpressions; weights stay memory-mapped, so a 1.4B
decoder does not need three copies in RAM) -> shape inference -> saved with one external data file
-> onnx.checker(full_check); validated (ORT memory-maps external data: a quicker session than parsing
the weights inline), then `inline_weights` streams the data back into the .onnx where the whole fits
protobuf's 2 GB (no proto of the weights is built in memory: serialising 1.2 GB of CLIP-L inline held
another copy at the export's peak, +1.0 GB on smol), so the artifact keeps the layout every target
expects.

These are `onnxscript.optimizer.optimize_ir`'s passes with one pattern-rewrite rule left out:
SlicesSplit (two Slices of one tensor -> one Split) scans the whole graph per application, 8 s each
on smol's dynamic decoder, ~45 s of its export, and never fires on these graphs (measured on smol's
dynamic and inplace decoders; tests/test_export.py checks that the graphs come out as optimize_ir's).
The other rules stay: merging Unsqueeze pairs lets the folding remove each layer's shape arithmetic
(smol's inplace decoder: 805 nodes with them, 1,109 without, and ORT's RMSNorm fusion then fails).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from vlm_export.onnx_wire import GRAPH_INITIALIZER, MODEL_GRAPH, TENSOR_RAW_DATA, length_delimited
from vlm_export.spec.graph_io import GraphSpec

log = logging.getLogger(__name__)
TWO_GB = 2**31 - 1  # protobuf's limit: graphs past it keep their external data file


@contextlib.contextmanager
def _parameters_kept_out():
    """Yields a dict that, after a TorchScript `torch.onnx.export(..., export_params=False)` inside the
    block, holds the graph's parameters by the names its inputs carry; None where this torch has no
    such hook (then the caller exports them into the proto, as torch does by default).

    torch's exporter copies every parameter (after its own constant folding, e.g. each Linear's
    transposed weight) into a protobuf, serialises it and writes it: ~14 s of smol's export for its
    1.2 GB CLIP-L and two 0.5 GB decoders, and onnx_ir then parsed the same bytes again. With
    export_params=False the parameters are graph inputs instead; the dict is what torch's
    `_model_to_graph` computed them as (torch/onnx/_internal/torchscript_exporter/utils.py, torch 2.13:
    the names it gives them, before its de-duplication keeps one name per equal tensor)."""
    try:
        from torch.onnx._internal.torchscript_exporter import utils as exporter
        original = exporter._model_to_graph
    except (ImportError, AttributeError):
        yield None
        return
    captured: dict = {}

    def model_to_graph(*args, **kwargs):
        graph, params, outputs = original(*args, **kwargs)
        captured.update(params)
        return graph, params, outputs

    exporter._model_to_graph = model_to_graph
    try:
        yield captured
    finally:
        exporter._model_to_graph = original


def _trace_to_onnx(wrapper: torch.nn.Module, graph: GraphSpec, example: dict, path: Path, opset: int) -> tuple[tuple | None, dict | None]:
    """Trace `wrapper` on `example` into ONNX at `path` -> (the wrapper's outputs on `example` as the
    trace computed them (a tuple of tensors), or None where the trace did not call it exactly once;
    the parameters the graph takes as inputs, by name, or None where they are in the file)."""
    args = tuple(torch.from_numpy(example[t.name]) for t in graph.inputs)
    traced = []  # kept as returned: an op on them here would be recorded into the graph
    hook = wrapper.register_forward_hook(lambda module, inputs, output: traced.append(output))
    try:
        with torch.no_grad(), warnings.catch_warnings(), _parameters_kept_out() as parameters:
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(
                wrapper, args, str(path), input_names=[t.name for t in graph.inputs],
                output_names=[t.name for t in graph.outputs], dynamic_axes=graph.dynamic_axes(),
                opset_version=opset, do_constant_folding=True, dynamo=False, export_params=parameters is None,
            )
    finally:
        hook.remove()
    outputs = None if len(traced) != 1 else traced[0] if isinstance(traced[0], tuple) else (traced[0],)
    return outputs, parameters


def attach_parameters(model, parameters: dict, declared: list[str]) -> None:
    """The graph inputs of an `export_params=False` export that are parameters -> initializers holding
    the torch tensors' memory (no copy: written once, by the save). `declared`: the graph's own inputs.

    Raises RuntimeError when an input is neither (the capture missed a parameter)."""
    import onnx_ir as ir

    for value in list(model.graph.inputs):
        if value.name in declared:
            continue
        if value.name not in parameters:
            raise RuntimeError(f"graph input {value.name} is neither declared nor a captured parameter")
        value.const_value = ir.Tensor(parameters[value.name].detach().cpu().contiguous().numpy(), name=value.name)
        model.graph.inputs.remove(value)
        model.graph.register_initializer(value)


def rewrite_rules():
    """onnxscript's default pattern-rewrite rules less SlicesSplit (the module docstring says why).
    The default set is not public in onnxscript 0.7; where it is gone, every rule of
    `optimize_ir` is kept (slower, same graphs)."""
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import slice_split_rule

    default = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    return None if default is None else rewriter.RewriteRuleSet([r for r in default if r is not slice_split_rule])


def fold_and_clean(model) -> None:
    """`onnxscript.optimizer.optimize_ir` (onnxscript 0.7), in place, with `rewrite_rules()`:
    functions inlined; constant folding, pattern rewrites and dead-code removal repeated (twice at
    most, stopping when nothing changes); then onnx_ir's clean-ups."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript import optimizer, rewriter

    rules = rewrite_rules()
    if rules is None:
        optimizer.optimize_ir(model)
        return
    optimizer.inline(model)
    removals = [common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()]
    for _ in range(2):
        changed = [optimizer.fold_constants(model, onnx_shape_inference=True).modified, rewriter.RewritePass(rules)(model).modified]
        changed += [removal(model).modified for removal in removals]
        if not any(changed):
            break
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(), common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass(),
    )(model)


def optimize_and_save(raw: Path, final: Path, parameters: dict | None = None, declared: list[str] = ()) -> None:
    """Fold and clean with onnx_ir; saved with its weights in one external data file (export_graph
    folds them back by streaming: onnx_ir's inline save builds the whole proto in memory and took
    5.5 s on smol's 0.54 GB decoder, and +1.0 GB at the vision export's peak; the two steps take
    1.6-2.3 s and give the same ModelProto)."""
    import onnx_ir as ir
    from onnx_ir.passes import common

    model = ir.load(raw)
    if parameters is not None:
        attach_parameters(model, parameters, list(declared))
    fold_and_clean(model)
    # onnx.shape_inference.infer_shapes_path's defaults, in memory: the initializers stay out of the
    # proto it serialises (on the saved file it took ~11 s of smol's export, reading and writing 1.7 GB)
    # onnx_ir's pass also writes what it infers into the graph's inputs and outputs (a scalar input
    # came back as shape [1]); infer_shapes_path leaves the declared ones alone, and so does this
    declared = {v.name: (v.shape, v.type) for v in (*model.graph.inputs, *model.graph.outputs)}
    common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(model)
    for value in (*model.graph.inputs, *model.graph.outputs):
        value.shape, value.type = declared[value.name]
    model.producer_name = "vlm-export"
    ir.save(model, final, external_data=final.name + ".data")


def export_graph(wrapper: torch.nn.Module, graph: GraphSpec, example: dict, out_dir: Path, opset: int) -> tuple[Path, tuple | None]:
    """`wrapper` traced on `example` (input name -> array) into `out_dir/graph.file`, folded, cleaned,
    shapes inferred and checked -> (that path, the wrapper's outputs on `example` as computed by the
    trace, or None): validation compares ORT with those instead of running PyTorch on them again
    (smol's CLIP-L at batch 2: ~7 s)."""
    final = out_dir / graph.file
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{graph.name}-") as scratch:
        raw = Path(scratch) / graph.file
        outputs, parameters = _trace_to_onnx(wrapper, graph, example, raw, opset)
        optimize_and_save(raw, final, parameters, [t.name for t in graph.inputs])
        del parameters
    onnx.checker.check_model(str(final), full_check=True)
    return final, outputs


def inline_weights(path: Path) -> None:
    """Put a graph's external data back into the .onnx file when the whole fits protobuf's 2 GB
    (the exporter wrote it beside the graph only to keep the export's memory peak down); a larger
    graph keeps its `.data` file. Atomic: the .onnx is replaced, then the .data removed.

    Streamed: the small graph proto is serialised without its initializers, and each initializer is
    written as its metadata followed by a raw_data field whose bytes are copied from the .data file
    (protobuf allows a message's fields in any order and appends repeated ones), so no 1.2 GB proto is
    built in memory (onnx.load + onnx.save_model took 12.5 s on smol's CLIP-L, this ~4 s); the file
    parses to the same ModelProto as onnx.load with the external data (tests/test_export.py)."""
    data = path.with_name(path.name + ".data")
    if not data.is_file() or data.stat().st_size + path.stat().st_size > TWO_GB:
        return
    model = onnx.load(str(path), load_external_data=False)
    pieces = []  # (the initializer's serialised metadata with the raw_data key, offset, length in .data)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            pieces.append((tensor.SerializeToString(), 0, 0))
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        if info.get("location") != data.name:
            raise ValueError(f"{path.name}: initializer {tensor.name} lies in {info.get('location')}, not {data.name}")
        offset, length = int(info.get("offset", 0)), int(info["length"])
        head = onnx.TensorProto()
        head.CopyFrom(tensor)
        head.ClearField("external_data")
        head.ClearField("data_location")
        pieces.append((head.SerializeToString() + length_delimited(TENSOR_RAW_DATA, length), offset, length))
    model.graph.ClearField("initializer")
    graph = model.graph.SerializeToString()
    model.ClearField("graph")
    entries = [(length_delimited(GRAPH_INITIALIZER, len(head) + length), head, offset, length)
               for head, offset, length in pieces]
    graph_size = len(graph) + sum(len(key) + len(head) + length for key, head, _, length in entries)
    partial = path.with_name(path.name + ".inline")
    try:
        with open(partial, "wb", buffering=0) as out, open(data, "rb") as source:  # unbuffered: copies go at the fd's offset
            out.write(model.SerializeToString() + length_delimited(MODEL_GRAPH, graph_size) + graph)
            for key, head, offset, length in entries:
                out.write(key + head)
                _copy_range(source, out, offset, length)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    data.unlink()


def _copy_range(source, out, offset: int, length: int) -> None:
    """`length` bytes of `source` from `offset` appended to `out` (in the kernel where it can)."""
    while length > 0:
        try:
            copied = os.copy_file_range(source.fileno(), out.fileno(), length, offset)
        except OSError:  # another file system or an old kernel: through user space
            source.seek(offset)
            while length > 0:
                block = source.read(min(length, 1 << 24))
                if not block:
                    raise OSError(f"{source.name} ends before the data of an initializer")
                out.write(block)
                offset, length = offset + len(block), length - len(block)
            return
        if copied == 0:
            raise OSError(f"{source.name} ends before the data of an initializer")
        offset, length = offset + copied, length - copied
