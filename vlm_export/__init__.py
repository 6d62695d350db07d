"""vlm-export: MobileVLM-class vision-language models to fast edge artifacts.

Data flow (one direction): spec -> model (PyTorch reference) -> export -> targets -> runtime.
"""

__version__ = "0.1.0"
