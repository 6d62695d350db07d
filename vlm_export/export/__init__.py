"""Exporters: thin wrappers per graph + declarative graph specs + one generic ONNX exporter."""
