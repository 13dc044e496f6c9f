"""TensorRT engines (`tensorrt_plan`) for the extractors, built from their ONNX files on a GPU host.

Engines are specific to the GPU and TensorRT version that build them, so they are built where they are
served: `aigis export --tensorrt-plan` on the GPU machine. Each goes beside the ONNX extractor as a model
of its own, `<extractor>_trt`, so the ONNX models (and the ensembles that use them) stay untouched.
"""

from __future__ import annotations

from pathlib import Path

from aigis import contract

from .configs import tensor
from .repository import publish_version, versions

PLAN_SUFFIX = "_trt"


def tensorrt_available() -> str | None:
    """None when engines can be built here, else the reason they cannot."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (pip install 'aigis[gpu]' on a CUDA host)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def build_plans(repo: str | Path, tasks: list[str], max_batch_size: int = 64, fp16: bool = True) -> list[str]:
    """Build one FP16 engine per extractor that lacks one; returns lines describing what was done."""
    reason = tensorrt_available()
    if reason is not None:
        raise RuntimeError(f"cannot build tensorrt_plan engines: {reason}")
    import tensorrt as trt

    repo = Path(repo)
    lines = []
    logger = trt.Logger(trt.Logger.WARNING)
    for task in tasks:
        source = contract.extractor_model(task)
        name = source + PLAN_SUFFIX
        if 1 in versions(repo, name):
            lines.append(f"{name}: engine already built")
            continue
        onnx_path = repo / source / "1" / "model.onnx"
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
        image = network.get_input(0)
        crop = image.shape[1]
        profile = builder.create_optimization_profile()
        profile.set_shape(image.name, (1, crop, crop, 3), (max(1, max_batch_size // 2), crop, crop, 3),
                          (max_batch_size, crop, crop, 3))
        config = builder.create_builder_config()
        config.add_optimization_profile(profile)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise RuntimeError(f"{onnx_path}: TensorRT failed to build an engine")
        feature_dim = network.get_output(0).shape[1]
        plan_config = {
            "name": name, "platform": "tensorrt_plan", "version_policy": {"specific": {"versions": [1]}},
            "max_batch_size": max_batch_size,
            "input": [tensor(contract.IMAGES, "TYPE_UINT8", [crop, crop, 3])],
            "output": [tensor(contract.FEATURES, "TYPE_FP32", [feature_dim])],
            "dynamic_batching": {}, "instance_group": [{"kind": "KIND_GPU", "count": 1}],
        }
        publish_version(repo, name, 1, plan_config, lambda folder, data=bytes(engine): (folder / "model.plan").write_bytes(data))
        lines.append(f"{name}: built {'FP16 ' if fp16 else ''}engine for batch 1..{max_batch_size}")
    return lines
