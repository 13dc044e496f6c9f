"""OpenVINO's CPU runtime, set up in one place for everything that runs the exported ONNX models with it:
the served models (Triton's `cpu_execution_accelerator: openvino`), export's checks and the benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_CORE = None


def core() -> Any:
    """The process's one OpenVINO Core: OpenVINO expects one per process, and a second one can hang or crash
    a later compile_model. Raises ImportError when openvino is not installed."""
    global _CORE
    if _CORE is None:
        import openvino

        _CORE = openvino.Core()
    return _CORE


def compile_cpu(model: str | Path | bytes, threads: int = 0) -> Any:
    """An ONNX model (file or bytes) compiled for the CPU: FP32 always (never bf16, even where the CPU has it),
    no CPU pinning (Triton runs one stub process per instance, and OpenVINO would pin every one of them to the
    same first cores), `threads` inference threads (0 = OpenVINO's default)."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                              "ENABLE_CPU_PINNING": False}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    source = core().read_model(model) if isinstance(model, bytes) else str(model)
    return core().compile_model(source, "CPU", config)
