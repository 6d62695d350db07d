"""AWQ (Lin et al., 2024, "AWQ: Activation-aware Weight Quantization", arXiv 2306.00978): per input
channel scales that protect the weights of salient channels before low-bit weight-only quantization.

A weight column that multiplies a large activation matters more than one that multiplies a small one,
yet round-to-nearest gives both the same relative error. Scaling input channel j of the weights up by
s_j (and its activation down by s_j) shrinks that channel's error relative to its output:

    s = mean|x| ** alpha,  normalised so that sqrt(max(s) min(s)) = 1       (the paper's scale search)
    alpha = argmin over a grid in [0, 1) of  sum_k || X (Q(W_k diag(s)) diag(s)^-1 - W_k) ||^2

where X are calibration activations and Q the variant's own quantizer (here 4-bit min/max blocks of
32, `quantize/blocks.py`). alpha = 0 is plain round-to-nearest, so the search never does worse on the
calibration rows. As in the reference implementation the scales of the projections an RMSNorm feeds
(q/k/v, gate/up) are folded into the norm's weight (`smooth.fold_scales`); o_proj and down_proj keep
round-to-nearest here. The grid (20 points) follows the paper's code (`n_grid = 20`).

Weights that arrive quantized in exactly the variant's format (a GGUF's Q4_1 blocks of 32) are
carried over bit for bit instead: any scale would move them off the grid they were quantized on.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from vlm_export.errors import VlmExportError
from vlm_export.quantize.blocks import GgufBlocks, quantize_asymmetric
from vlm_export.quantize.smooth import channel_statistics, drop_unused_initializers, fold_scales, norm_groups

GRID = 20
ROWS = 512  # calibration rows per norm output the search is scored on
MIN_SCALE = 1e-4


def _rtn(weight: np.ndarray, bits: int, block: int) -> np.ndarray:
    """weight (K, N) -> its min/max round-to-nearest blocks along K, dequantized (K, N)."""
    return quantize_asymmetric(weight.T, bits, block).dequantize().T


def search_scale(rows: np.ndarray, mean_abs: np.ndarray, weights: list[np.ndarray], bits: int, block: int,
                 grid: int = GRID) -> tuple[np.ndarray, float, float, float]:
    """rows (R, K) float32 activations, mean_abs (K,), weights [(K, N_i)] read by those activations ->
    (scale (K,), alpha, error at alpha = 0, error at the chosen alpha); errors are the squared output
    error relative to the outputs' squared norm, summed over the weights."""
    x = rows.astype(np.float32)
    reference = [x @ w for w in weights]
    total = sum(float(np.square(r).sum()) for r in reference) or 1.0
    best = (np.ones_like(mean_abs), 0.0, np.inf)
    baseline = np.inf
    for alpha in np.arange(grid) / grid:
        scale = np.maximum(mean_abs, MIN_SCALE) ** alpha
        scale = (scale / np.sqrt(scale.max() * scale.min())).astype(np.float32)
        error = sum(float(np.square(x @ (_rtn(w * scale[:, None], bits, block) / scale[:, None]) - r).sum())
                    for w, r in zip(weights, reference)) / total
        baseline = error if alpha == 0 else baseline
        if error < best[2]:
            best = (scale, float(alpha), error)
    return best[0], best[1], baseline, best[2]


def _held_exactly(weights: list[np.ndarray], source: GgufBlocks | None, bits: int, block: int) -> bool:
    if source is None:
        return False
    found = [source.find(w.T) for w in weights]
    return all(f is not None and f.bits <= bits and f.block == block for f in found)


def awq_scales(source: Path, destination: Path, samples: list[dict], weights_from: GgufBlocks | None = None,
               bits: int = 4, block: int = 32, skip: tuple[str, ...] = ("/lm_head/",)) -> dict:
    """Write `source` (a float32 decoder graph) to `destination` with AWQ scales folded into each
    RMSNorm and the MatMul weights it feeds (see the module docstring). `samples`: calibration feed
    dicts of the graph; `weights_from`: the model's GGUF blocks (groups they hold exactly are left
    alone); `skip`: name fragments of MatMuls that stay float (their norm is left alone too).
    Returns what was done, with the calibration error before and after (mean over groups).
    Raises VlmExportError when `samples` is empty."""
    if not samples:
        raise VlmExportError(f"no calibration samples for AWQ on {source.name}", "check the calibration folder")
    started = time.perf_counter()
    model = onnx.load(str(source))
    initializers = {i.name: i for i in model.graph.initializer}
    groups, exact = [], 0
    for group in norm_groups(model, skip):
        weights = [numpy_helper.to_array(initializers[m.input[1]]) for m in group[2]]
        if _held_exactly(weights, weights_from, bits, block):
            exact += 1
        else:
            groups.append((group, weights))
    stats = channel_statistics(source, [g[0].output[0] for g, _ in groups], samples, keep_rows=ROWS)
    alphas, before, after = [], [], []
    for group, weights in groups:
        found = stats[group[0].output[0]]
        scale, alpha, baseline, error = search_scale(found.rows, found.mean_abs, weights, bits, block)
        alphas.append(alpha)
        before.append(baseline)
        after.append(error)
        if alpha > 0:
            fold_scales(model, group, scale)
    drop_unused_initializers(model)
    onnx.save_model(model, str(destination), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=destination.name + ".data", size_threshold=1024)
    mean = lambda values: round(float(np.mean(values)), 6) if values else None
    return {"awq_norm_groups": len(groups), "awq_groups_held_exactly": exact, "awq_alpha_mean": mean(alphas),
            "awq_calibration_error_rtn": mean(before), "awq_calibration_error": mean(after),
            "awq_seconds": round(time.perf_counter() - started, 1)}
