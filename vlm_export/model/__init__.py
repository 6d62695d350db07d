"""The PyTorch reference of MobileVLM: CLIP tower + LDP projector + LLaMA, faithful to the official code."""
