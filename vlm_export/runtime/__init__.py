"""Run artifacts: runners (torch | ort | trt) behind one interface, and one generation loop."""
