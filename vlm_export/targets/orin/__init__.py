"""`--target orin`: TensorRT for NVIDIA Jetson Orin (compute capability 8.7).

What can be proved without TensorRT is done here (static support check, optimisation profiles,
build plan, a ready-to-run build script); the engine build itself runs wherever `import tensorrt`
works, and an engine is never reported unless it was built (profile.py: its recipes and options;
target.py: the build).
"""
