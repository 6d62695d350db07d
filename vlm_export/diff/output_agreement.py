"""Agreement of one graph's outputs between two sessions (fp32 reference vs a quantized or compiled
candidate) over held-out feeds: what build reports give per graph."""

from __future__ import annotations

import numpy as np


def _valid(value: np.ndarray, feeds: dict, name: str) -> np.ndarray:
    """Flattened values at real positions: the K/V a static prefill chunk computes for its padding
    slots is garbage by design (masked everywhere), in fp32 and quantized alike."""
    value = value.astype(np.float64)
    if name.startswith("present") and "attention_mask" in feeds:
        keep = feeds["attention_mask"][0, -value.shape[2]:] > 0
        value = value[:, :, keep]
    return value.ravel()


def graph_accuracy(reference, candidate, samples: list[dict]) -> dict:
    """Per output over held-out feeds: worst cosine, max |diff|, and top-1 agreement for logits
    (`reference`, `candidate`: ONNX Runtime sessions of one graph's two versions)."""
    names = [o.name for o in reference.get_outputs()]
    return outputs_agreement([(feeds, dict(zip(names, reference.run(names, feeds))), dict(zip(names, candidate.run(names, feeds))))
                              for feeds in samples])


def outputs_agreement(runs: list[tuple[dict, dict, dict]]) -> dict:
    """(feeds, expected outputs, candidate's outputs) per sample, outputs as {name: array} -> the
    summary `graph_accuracy` gives."""
    result = {}
    for feeds, expected, got in runs:
        for name in expected:
            a, b = _valid(expected[name], feeds, name), _valid(got[name], feeds, name)
            cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
            entry = result.setdefault(name, {"cosine_min": 1.0, "max_abs_diff": 0.0, "top1": []})
            entry["cosine_min"] = min(entry["cosine_min"], cosine)
            entry["max_abs_diff"] = max(entry["max_abs_diff"], float(np.abs(a - b).max()))
            if name == "logits":
                entry["top1"].append(float((expected[name].argmax(-1) == got[name].argmax(-1)).mean()))
    for entry in result.values():
        entry["top1"] = float(np.mean(entry["top1"])) if entry["top1"] else None
    logits = result.get("logits")
    summary = {"samples": len(runs), "outputs": len(result),
               "cosine_min": min(e["cosine_min"] for e in result.values()) if result else None,
               "max_abs_diff": max(e["max_abs_diff"] for e in result.values()) if result else None}
    if logits:
        summary["logits"] = {k: logits[k] for k in ("cosine_min", "max_abs_diff", "top1")}
    return summary
