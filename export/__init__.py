"""Export to ONNX and the versioned Triton model repository."""
