"""TensorRT engines (`tensorrt_plan`) for the extractors (and a shared trunk), built from their ONNX files on a GPU host.

Engines are specific to the GPU and TensorRT version that build them, so they are built where they are
served: `aigis export --tensorrt-plan` on the GPU machine. Each goes beside the ONNX extractor as a model
of its own, `<extractor>_trt`, so the ONNX models (and the ensembles that use them) stay untouched.
"""

from __future__ import annotations

from pathlib import Path

from aigis import contract

from .configs import tensor
from .repository import publish_version, version_config, versions

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
    sources = [contract.extractor_model(task) for task in tasks]
    if 1 in versions(repo, contract.TRUNK_MODEL):
        sources.insert(0, contract.TRUNK_MODEL)     # a shared trunk's tails take its activations, not images
    for source in sources:
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
        source_config = version_config(repo, source, 1)
        (model_input,), (model_output,) = source_config["input"], source_config["output"]
        dims = tuple(int(d) for d in model_input["dims"])
        profile = builder.create_optimization_profile()
        profile.set_shape(network.get_input(0).name, (1, *dims), (max(1, max_batch_size // 2), *dims),
                          (max_batch_size, *dims))
        config = builder.create_builder_config()
        config.add_optimization_profile(profile)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise RuntimeError(f"{onnx_path}: TensorRT failed to build an engine")
        plan_config = {
            "name": name, "platform": "tensorrt_plan", "version_policy": {"specific": {"versions": [1]}},
            "max_batch_size": max_batch_size,
            "input": [tensor(model_input["name"], model_input["data_type"], list(dims))],
            "output": [tensor(model_output["name"], model_output["data_type"], model_output["dims"])],
            "dynamic_batching": {}, "instance_group": [{"kind": "KIND_GPU", "count": 1}],
        }
        publish_version(repo, name, 1, plan_config, lambda folder, data=bytes(engine): (folder / "model.plan").write_bytes(data))
        lines.append(f"{name}: built {'FP16 ' if fp16 else ''}engine for batch 1..{max_batch_size}")
    return lines
