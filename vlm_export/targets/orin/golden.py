"""Golden files for checking a built TensorRT engine on the Jetson against what was measured here.

The accuracy this machine reports for an orin variant is simulated: ONNX Runtime running the
variant's graphs (fp16, or float32 with Q/DQ), not the engine TensorRT will build from them. So each
variant carries, per graph and optimisation profile, the inputs the generation loop really fed that
graph (recorded on the fp32 graphs answering an eval prompt about the eval image) and the variant's
own outputs on them in ONNX Runtime, plus the Polygraphy line that runs the engine on those inputs
and compares (`check_engines.sh`). An engine that passes computes what the simulation measured, to the
fp16 export's tolerance (the engine runs in fp16 where the simulation ran float32).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from vlm_export.spec.graph_io import ExportOptions, GraphRole, graphs_for
from vlm_export.spec.model_spec import spec_from_dict

GOLDEN_DIR = "golden"
SCRIPT = "check_engines.sh"


def tolerances(model: dict) -> dict[str, tuple[float, float]]:
    """(atol, rtol) per graph role: the fp16 export's own validation tolerance (spec/graph_io.py)."""
    specs = graphs_for(spec_from_dict(model), ExportOptions(dtype="fp16"))
    return {spec.wrapper: (spec.atol or 1e-3, spec.rtol) for spec in specs}


def _profile_feeds(graph: dict, plan: dict, feeds: list[dict]) -> list[tuple[int, str, dict]]:
    """(profile index, golden name, one recorded feed dict) per optimisation profile of the plan:
    prefill calls (empty cache) for the prefill profile, decode steps for the decode profile."""
    names = [p["name"] for p in plan["profiles"]]
    picked = []
    for index, profile in enumerate(names):
        feed = next((f for f in feeds if _fits(profile, f)), None)
        if feed is not None:
            picked.append((index, graph["name"] if profile == "default" else f"{graph['name']}-{profile}", feed))
    return picked


def _fits(profile: str, feed: dict) -> bool:
    """Whether a recorded decoder call belongs to the profile: prefill = an empty cache, decode = not."""
    past = [v for k, v in feed.items() if k.startswith("past_key_values")]
    if profile == "prefill":
        return bool(past) and past[0].shape[2] == 0
    if profile == "decode":
        return bool(past) and past[0].shape[2] > 0
    return True


def write_golden(source: Path, variant: Path, manifest: dict, plans: list[dict]) -> list[str]:
    """Record golden inputs on the fp32 graphs in `source`, run the variant's graphs on them in ONNX
    Runtime, write `variant/golden/<graph>[-profile]/{inputs,outputs}.json` (Polygraphy's JSON) and
    `variant/check_engines.sh`. Returns the Polygraphy command lines, one per engine profile."""
    import onnxruntime as ort
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    from vlm_export.quality.eval_set import eval_requests
    from vlm_export.quantize.calibration import recorded_samples

    requests = eval_requests()
    recorded = recorded_samples(source, requests[-1:], new_tokens=2)  # the image prompt when there is one
    graphs = {g["file"]: g for g in manifest["graphs"]}
    allowed = tolerances(manifest["model"])
    commands = []
    for plan in plans:
        graph = graphs[plan["graph"]]
        session = ort.InferenceSession(str(variant / graph["file"]), providers=["CPUExecutionProvider"])
        types = {t["name"]: np.dtype(t["dtype"]) for t in graph["inputs"]}
        atol, rtol = allowed[GraphRole(graph["wrapper"])]
        for index, name, feed in _profile_feeds(graph, plan, recorded.get(graph["name"], [])):
            inputs = {k: np.asarray(v).astype(types[k]) for k, v in feed.items() if k in types}
            outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))
            folder = variant / GOLDEN_DIR / name
            folder.mkdir(parents=True, exist_ok=True)
            runner = "onnxrt-simulated"
            with G_LOGGER.verbosity(G_LOGGER.WARNING):  # its "[I] Saving ..." lines are noise on the user's screen
                save_json([inputs], str(folder / "inputs.json"))
                RunResults([(runner, [IterationResult(outputs, runner_name=runner)])]).save(str(folder / "outputs.json"))
            commands.append(" ".join([
                "polygraphy", "run", shlex.quote(plan["engine"]), "--model-type", "engine", "--trt",
                "--optimization-profile", str(index), "--load-inputs", f"{GOLDEN_DIR}/{name}/inputs.json",
                "--load-outputs", f"{GOLDEN_DIR}/{name}/outputs.json", "--atol", f"{atol:g}", "--rtol", f"{rtol:g}"]))
    script = variant / SCRIPT
    script.write_text("\n".join([
        "#!/usr/bin/env bash", "# Check the engines built by build_engines.sh against the accuracy measured by vlm-export",
        "# (ONNX Runtime on these graphs); run on the Jetson, in this folder, after build_engines.sh.",
        "set -euo pipefail", 'cd "$(dirname "$0")"', *commands, ""]))
    script.chmod(0o755)
    return commands
