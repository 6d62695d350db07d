"""Quantization passes over exported ONNX graphs."""
