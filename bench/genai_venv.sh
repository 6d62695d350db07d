#!/usr/bin/env bash
# onnxruntime-genai's model builder and runtime for the bench's ort-genai rows, in a venv of their
# own: the builder imports classes only transformers 5.x has (and needs onnx_ir), while vlm-export
# pins transformers 4.57. The bench finds it at bench/cache/genai-venv (or $VLM_EXPORT_GENAI_PYTHON).
#   bash bench/genai_venv.sh [VENV_DIR]
set -euo pipefail
venv=${1:-bench/cache/genai-venv}
python=${PYTHON:-python3}
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet 'torch==2.13.0' 'onnxruntime-genai==0.18.*' 'transformers>=5,<6' onnx onnx_ir numpy safetensors
"$venv/bin/python" -c "import onnxruntime_genai, transformers; print('onnxruntime-genai', onnxruntime_genai.__version__, 'transformers', transformers.__version__)"
