"""ONNX Runtime sessions on Qualcomm's QNN execution provider (HTP backend).

`onnxruntime-qnn` is a plug-in EP: it is registered from its shared library and picked per
device, it never shows in `get_available_providers()`. On Linux x86_64 its `libQnnHtp.so`
emulates the Hexagon NPU of the SoC named by `soc_model`, so the very session that runs here
is the one that runs on the phone (where the same options pick the real NPU).

Every session disables the CPU fallback: a graph that does not land entirely on the NPU is an
error, never a silent half-CPU run.
"""

from __future__ import annotations

from pathlib import Path

from vlm_export.errors import VlmExportError, require_module

EP_NAME = "QNNExecutionProvider"

# soc_model ids of the QNN SDK; each checked here by compiling a graph and reading the SoC and
# HTP arch back out of the context binary (soc_type=SM8350;arch=68 for id 30).
SOCS = {
    "SM8350": {"soc_model": "30", "htp_arch": "68", "device": "Snapdragon 888"},
    "SM8650": {"soc_model": "57", "htp_arch": "75", "device": "Snapdragon 8 Gen 3"},
}

_registered = False


def qnn_module():
    global _registered
    module = require_module("onnxruntime_qnn", "qnn", "the QNN (Snapdragon NPU) execution provider")
    if not _registered:
        import onnxruntime as ort

        try:
            ort.register_execution_provider_library(EP_NAME, module.get_library_path())
        except Exception as exc:  # already registered by someone else in this process is fine
            if "already" not in str(exc).lower():
                raise VlmExportError(f"onnxruntime cannot load the QNN EP ({str(exc).splitlines()[0][:160]})",
                                     "install matching onnxruntime and onnxruntime-qnn versions") from exc
        _registered = True
    return module


def check_soc(soc: str) -> dict:
    if soc not in SOCS:
        raise VlmExportError(f"unknown Snapdragon SoC '{soc}'", f"use one of {', '.join(SOCS)}")
    return SOCS[soc]


def session_options(soc: str, threads: int | None = None, context_file: Path | None = None, embed_mode: int = 0):
    """Session options that put every node on the HTP of `soc`; with `context_file`, creating the
    session also compiles the graph into a QNN context binary saved there."""
    import onnxruntime as ort

    module = qnn_module()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if context_file is not None:
        options.add_session_config_entry("ep.context_enable", "1")
        options.add_session_config_entry("ep.context_file_path", str(context_file))
        options.add_session_config_entry("ep.context_embed_mode", str(embed_mode))
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise VlmExportError("onnxruntime-qnn is installed but offers no device", "reinstall 'vlm-export[qnn]'")
    options.add_provider_for_devices(devices, {"backend_path": module.get_qnn_htp_path(),
                                               "soc_model": check_soc(soc)["soc_model"]})
    return options


def create_session(path: Path, soc: str, threads: int | None = None, context_file: Path | None = None, embed_mode: int = 0):
    import onnxruntime as ort

    from vlm_export.progress import native_stderr_filtered

    options = session_options(soc, threads, context_file, embed_mode)
    try:
        with native_stderr_filtered(stdout=True):  # the QNN SDK's " # LIBNATIVE: ..." notice on stdout
            return ort.InferenceSession(str(path), options)
    except Exception as exc:
        first = str(exc).splitlines()[0][:220]
        if "fallback to CPU EP has been explicitly disabled" in first or "finalize" in first.lower():
            raise VlmExportError(f"{Path(path).name} does not run entirely on the QNN HTP of {soc} ({first})",
                                 "see the node list in the build report; quantize the graph (QDQ) and fix its shapes") from exc
        raise VlmExportError(f"onnxruntime-qnn cannot load {Path(path).name} ({first})", "rebuild with `vlm-export build --target sd888`") from exc
