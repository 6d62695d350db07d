"""Build plans for TensorRT: optimisation profiles per graph, precision, workspace for the Orin
module, timing cache, DLA placement, and the trtexec / polygraphy command lines that realise them."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from vlm_export.spec.graph_io import GraphRole, Layout

# Jetson Orin modules: unified memory, the workspace TensorRT may use while building/running,
# and DLA cores (Orin Nano has none).
DEVICES = {
    "agx-orin-64gb": {"memory_gb": 64, "workspace_mb": 8192, "dla_cores": 2},
    "agx-orin-32gb": {"memory_gb": 32, "workspace_mb": 4096, "dla_cores": 2},
    "orin-nx-16gb": {"memory_gb": 16, "workspace_mb": 2048, "dla_cores": 2},
    "orin-nx-8gb": {"memory_gb": 8, "workspace_mb": 1024, "dla_cores": 1},
    "orin-nano-8gb": {"memory_gb": 8, "workspace_mb": 1024, "dla_cores": 0},
}
COMPUTE_CAPABILITY = "8.7"


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int


def _axis_ranges(graph: dict, profile: str, batch: int, max_prompt: int, max_context: int) -> dict[str, AxisRange]:
    prompt_opt = max(1, max_prompt // 4)
    if graph["wrapper"] != GraphRole.DECODER:
        return {"batch": AxisRange(1, 1, batch), "sequence": AxisRange(1, prompt_opt, max_prompt)}
    if profile == "prefill":  # the whole prompt at once, empty cache
        return {"batch": AxisRange(1, 1, batch), "sequence": AxisRange(1, prompt_opt, max_prompt),
                "past_sequence": AxisRange(0, 0, 0), "total_sequence": AxisRange(1, prompt_opt, max_prompt)}
    context_opt = max(2, max_context // 4)  # one token against a cache of up to max_context - 1
    return {"batch": AxisRange(1, 1, batch), "sequence": AxisRange(1, 1, 1),
            "past_sequence": AxisRange(1, context_opt - 1, max_context - 1), "total_sequence": AxisRange(2, context_opt, max_context)}


def profiles_for(graph: dict, batch: int, max_prompt: int, max_context: int) -> list[dict]:
    """[{"name", "shapes": {input: {"min", "opt", "max"}}}]; static graphs get one fixed profile."""
    names = ["prefill", "decode"] if graph["wrapper"] == GraphRole.DECODER and graph["attrs"].get("layout") == Layout.DYNAMIC else ["default"]
    profiles = []
    for name in names:
        ranges = _axis_ranges(graph, name, batch, max_prompt, max_context)
        shapes = {}
        for tensor in graph["inputs"]:
            dims = tensor["shape"]
            shapes[tensor["name"]] = {
                point: [d if isinstance(d, int) else getattr(ranges[d], point) for d in dims] for point in ("min", "opt", "max")
            }
        profiles.append({"name": name, "shapes": shapes})
    return profiles


def _shape_arg(profile: dict, point: str) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, s[point]))}" for name, s in profile["shapes"].items())


def builder_settings(plan: dict) -> dict:
    """What one engine's build is told, for trtexec, polygraphy and the in-process build alike:
    {"strongly_typed": bool (the graph's own tensor types, no precision flags), "flags": [...]
    (builder precision flags), "precision_constraints": "obey" | None, "fp32_layers": [names]}.
    A strongly typed build takes no precision flags (TensorRT refuses them there)."""
    strongly_typed = bool(plan.get("strongly_typed"))
    layers = [] if strongly_typed else list(plan.get("fp32_layers", []))
    return {"strongly_typed": strongly_typed,
            "flags": [] if strongly_typed else [p for p in plan["precisions"] if p != "fp32"],
            "precision_constraints": "obey" if layers else None, "fp32_layers": layers}


def _precision_args(plan: dict, strongly_typed: str, constraints: str, layers) -> list[str]:
    settings = builder_settings(plan)
    parts = [strongly_typed] if settings["strongly_typed"] else [f"--{p}" for p in settings["flags"]]
    if settings["fp32_layers"]:
        parts += [constraints, layers(settings["fp32_layers"])]
    return parts


def trtexec_command(graph_file: str, engine_file: str, plan: dict) -> str:
    parts = ["trtexec", f"--onnx={graph_file}", f"--saveEngine={engine_file}", f"--memPoolSize=workspace:{plan['workspace_mb']}M",
             f"--timingCacheFile={plan['timing_cache']}"]
    parts += _precision_args(plan, "--stronglyTyped", "--precisionConstraints=obey",
                             lambda names: shlex.quote("--layerPrecisions=" + ",".join(f"{n}:fp32" for n in names)))
    for profile in plan["profiles"]:  # each min/opt/max triple adds one optimisation profile
        parts += [f"--minShapes={_shape_arg(profile, 'min')}", f"--optShapes={_shape_arg(profile, 'opt')}",
                  f"--maxShapes={_shape_arg(profile, 'max')}"]
    if plan.get("dla_core") is not None:
        parts += [f"--useDLACore={plan['dla_core']}", "--allowGPUFallback"]
    return " ".join(parts)


def polygraphy_command(graph_file: str, engine_file: str, plan: dict) -> str:
    parts = ["polygraphy", "convert", graph_file, "--convert-to", "trt", "-o", engine_file,
             "--pool-limit", f"workspace:{plan['workspace_mb']}M", "--save-timing-cache", plan["timing_cache"]]
    parts += _precision_args(plan, "--strongly-typed", "--precision-constraints obey",
                             lambda names: "--layer-precisions " + " ".join(shlex.quote(f"{n}:float32") for n in names))
    for profile in plan["profiles"]:
        for point, flag in (("min", "--trt-min-shapes"), ("opt", "--trt-opt-shapes"), ("max", "--trt-max-shapes")):
            parts += [flag] + [f"{name}:[{','.join(map(str, s[point]))}]" for name, s in profile["shapes"].items()]
    if plan.get("dla_core") is not None:
        parts += ["--use-dla", "--allow-gpu-fallback"]
    return " ".join(parts)
