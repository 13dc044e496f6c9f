"""The embedded Triton server: launcher and the Python-based onnxruntime backend stand-in."""
