"""`--target cpu`: ONNX Runtime on any CPU (profile.py: its recipes and options; target.py: the build)."""
