"""Triton model configurations of the attribution models, built as dicts in Triton's JSON form.

The same dict is written as the version's config.pbtxt and read back by `aigis models validate`. Triton keeps
one config per model, while our ensembles change their inputs and steps from version to version: the
ensembles' model-level config.pbtxt names the served version, and the steps that change with the version
(classifier, decode) are models of their own per ensemble version (aigis.contract).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aigis import contract, preprocess

CONFIG_FILE = "config.pbtxt"
DECODE_BACKEND = "python"
CPU_ACCELERATORS = ("openvino", "none")


@dataclass(frozen=True)
class TargetOptions:
    """Where and how the ONNX models run: CPU (default), GPU, GPU + TensorRT accelerator in FP16."""

    gpu: bool = False
    tensorrt_fp16: bool = False
    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    instances: int = 1
    # onnxruntime threads per CPU instance. Triton runs an ensemble's extractors at the same time, each
    # in its own instance; onnxruntime's default (a spinning pool of one thread per core in EVERY
    # instance) then oversubscribes the cores. One thread each lets the extractors share them instead.
    # 0 = onnxruntime's default.
    cpu_threads: int = 1
    # CPU instances: Triton's `cpu_execution_accelerator`. "openvino" runs the ONNX models in OpenVINO's
    # CPU runtime (FP32; about twice onnxruntime's speed on the extractors, BENCHMARKS.md); "none" keeps
    # plain onnxruntime.
    cpu_accelerator: str = "openvino"

    def validate(self) -> None:
        if self.tensorrt_fp16 and not self.gpu:
            raise ValueError("--tensorrt-fp16 needs --gpu: TensorRT runs on GPU instances only")
        if not 1 <= self.max_batch_size <= 4096:
            raise ValueError(f"max batch size must be within 1..4096, got {self.max_batch_size}")
        if self.instances < 1:
            raise ValueError(f"instances must be at least 1, got {self.instances}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu threads must be 0 (onnxruntime's default) or more, got {self.cpu_threads}")
        if self.cpu_accelerator not in CPU_ACCELERATORS:
            raise ValueError(f"cpu accelerator must be one of {', '.join(CPU_ACCELERATORS)}, got {self.cpu_accelerator!r}")

    @property
    def runtimes(self) -> list[str]:
        """What will run the ONNX models where they are served (the export checks each)."""
        return ["onnxruntime"] + (["openvino"] if not self.gpu and self.cpu_accelerator == "openvino" else [])


def tensor(name: str, data_type: str, dims: list[int]) -> dict[str, Any]:
    return {"name": name, "data_type": data_type, "dims": [int(d) for d in dims]}


def _onnx_model(name: str, version: int, inputs: list[dict], outputs: list[dict], options: TargetOptions) -> dict:
    config: dict[str, Any] = {
        "name": name,
        "platform": "onnxruntime_onnx",
        "version_policy": {"specific": {"versions": [version]}},
        "max_batch_size": options.max_batch_size,
        "input": inputs,
        "output": outputs,
        "dynamic_batching": {"max_queue_delay_microseconds": options.max_queue_delay_us},
        "instance_group": [{"kind": "KIND_GPU" if options.gpu else "KIND_CPU", "count": options.instances}],
    }
    if not options.gpu and options.cpu_threads:
        # The native onnxruntime backend's parameters (the stand-in backend honours the same ones).
        config["parameters"] = {"intra_op_thread_count": {"string_value": str(options.cpu_threads)},
                                "inter_op_thread_count": {"string_value": "1"}}
    if not options.gpu and options.cpu_accelerator == "openvino":
        config["optimization"] = {"execution_accelerators": {"cpu_execution_accelerator": [{"name": "openvino"}]}}
    if options.tensorrt_fp16:
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
            {"name": "tensorrt", "parameters": {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824"}}]}}
    return config


LABELS_FILE = "labels.txt"   # beside a classifier's config: one class name per line, in PROBS' order


def warmup(inputs: list[dict]) -> list[dict]:
    """One zero-filled batch of one through the model as it loads, so the first real request after a rollout or
    a restart does not pay for the runtime's lazy initialisation."""
    return [{"name": "zeros", "batch_size": 1,
             "inputs": {i["name"]: {"data_type": i["data_type"], "dims": i["dims"], "zero_data": True} for i in inputs}}]


def extractor_config(task: str, crop: int, feature_dim: int, options: TargetOptions,
                     trunk_dims: list[int] | None = None) -> dict:
    """lorax_extractor_<task>: uint8 IMAGES [crop, crop, 3] -> FEATURES [D], or with a shared trunk (its
    activations' `trunk_dims`) the tail TRUNK -> FEATURES [D]; only ever version 1."""
    inputs = ([tensor(contract.IMAGES, "TYPE_UINT8", [crop, crop, 3])] if trunk_dims is None
              else [tensor(contract.TRUNK, "TYPE_FP32", trunk_dims)])
    config = _onnx_model(contract.extractor_model(task), 1, inputs,
                         [tensor(contract.FEATURES, "TYPE_FP32", [feature_dim])], options)
    config["model_warmup"] = warmup(inputs)
    return config


def trunk_config(crop: int, trunk_dims: list[int], options: TargetOptions) -> dict:
    """lorax_trunk: uint8 IMAGES [crop, crop, 3] -> TRUNK activations; only ever version 1, shared by every
    ensemble version."""
    inputs = [tensor(contract.IMAGES, "TYPE_UINT8", [crop, crop, 3])]
    config = _onnx_model(contract.TRUNK_MODEL, 1, inputs, [tensor(contract.TRUNK, "TYPE_FP32", trunk_dims)], options)
    config["model_warmup"] = warmup(inputs)
    return config


def classifier_config(version: int, num_tasks: int, feature_dim: int, options: TargetOptions) -> dict:
    """lorax_classifier_v<version>: the features of tasks 1..version -> LOGITS, PROBS; only ever version 1.
    PROBS names its classes (LABELS_FILE), so Triton's classification extension answers with class names."""
    classes = 2 * num_tasks
    inputs = [tensor(contract.features_input(t), "TYPE_FP32", [feature_dim]) for t in range(num_tasks)]
    probs = {**tensor(contract.PROBS, "TYPE_FP32", [classes]), "label_filename": LABELS_FILE}
    config = _onnx_model(contract.classifier_model(version), 1, inputs,
                         [tensor(contract.LOGITS, "TYPE_FP32", [classes]), probs], options)
    config["model_warmup"] = warmup(inputs)
    return config


def decode_config(version: int, crop: int, options: TargetOptions) -> dict:
    """lorax_decode_v<version>: encoded JPEG/PNG bytes -> the evaluation view, exactly as the client computes
    it; only ever version 1."""
    return {
        "name": contract.decode_model(version),
        "backend": DECODE_BACKEND,
        "version_policy": {"specific": {"versions": [1]}},
        "max_batch_size": options.max_batch_size,
        "input": [tensor(contract.IMAGE_BYTES, "TYPE_STRING", [1])],
        "output": [tensor(contract.IMAGES, "TYPE_UINT8", [crop, crop, 3])],
        "dynamic_batching": {"max_queue_delay_microseconds": options.max_queue_delay_us},
        "instance_group": [{"kind": "KIND_CPU", "count": options.instances}],
        # The decode budget: an upload over either limit is refused from its header, before decoding.
        "parameters": {"crop": {"string_value": str(crop)},
                       "max_pixels": {"string_value": str(preprocess.MAX_PIXELS)},
                       "max_side": {"string_value": str(preprocess.MAX_SIDE)}},
    }


def fused_config(version: int, num_tasks: int, crop: int, manifest: dict, options: TargetOptions) -> dict:
    """lorax_fused version `version`: ensemble version `version` as one ONNX graph, with the ensemble's input,
    outputs and manifest (a client calls either the same way). Its CPU instance runs with the runtime's default
    threads (every core): it is the whole pipeline, not one of several steps sharing the cores. PROBS names its
    classes from the version's own label file (classes change from version to version)."""
    classes = 2 * num_tasks
    inputs = [tensor(contract.IMAGES, "TYPE_UINT8", [crop, crop, 3])]
    probs = {**tensor(contract.PROBS, "TYPE_FP32", [classes]), "label_filename": f"{version}/{LABELS_FILE}"}
    config = _onnx_model(contract.FUSED_MODEL, version, inputs,
                         [tensor(contract.LOGITS, "TYPE_FP32", [classes]), probs], replace(options, cpu_threads=0))
    config["model_warmup"] = warmup(inputs)
    config["parameters"] = {**config.get("parameters", {}),
                            contract.MANIFEST_PARAMETER: {"string_value": json.dumps(manifest, sort_keys=True)}}
    return config


def _step(model: str, version: int, inputs: dict[str, str], outputs: dict[str, str]) -> dict:
    return {"model_name": model, "model_version": version, "input_map": inputs, "output_map": outputs}


def ensemble_config(version: int, tasks: list[str], crop: int, manifest: dict, options: TargetOptions,
                    from_bytes: bool = False, shared_trunk: bool = False) -> dict:
    """lorax (uint8 images) or lorax_bytes (encoded files): every extractor in parallel, then the classifier;
    with a shared trunk, the trunk once first and every extractor (a tail) on its activations.

    Steps pin exact versions, so ensemble version v always means the model after task v. The manifest
    the client reads travels as a config parameter.
    """
    classes = 2 * len(tasks)
    steps = []
    source = contract.IMAGES
    if from_bytes:
        source = "decoded_images"
        steps.append(_step(contract.decode_model(version), 1, {contract.IMAGE_BYTES: contract.IMAGE_BYTES},
                           {contract.IMAGES: source}))
    extractor_input = contract.IMAGES
    if shared_trunk:
        steps.append(_step(contract.TRUNK_MODEL, 1, {contract.IMAGES: source}, {contract.TRUNK: "trunk"}))
        source, extractor_input = "trunk", contract.TRUNK
    for t, task in enumerate(tasks):
        steps.append(_step(contract.extractor_model(task), 1, {extractor_input: source},
                           {contract.FEATURES: f"features_{t}"}))
    steps.append(_step(contract.classifier_model(version), 1,
                       {contract.features_input(t): f"features_{t}" for t in range(len(tasks))},
                       {contract.LOGITS: contract.LOGITS, contract.PROBS: contract.PROBS}))
    image_input = (tensor(contract.IMAGE_BYTES, "TYPE_STRING", [1]) if from_bytes
                   else tensor(contract.IMAGES, "TYPE_UINT8", [crop, crop, 3]))
    return {
        "name": contract.BYTES_ENSEMBLE_MODEL if from_bytes else contract.ENSEMBLE_MODEL,
        "platform": "ensemble",
        "version_policy": {"specific": {"versions": [version]}},
        "max_batch_size": options.max_batch_size,
        "input": [image_input],
        "output": [tensor(contract.PROBS, "TYPE_FP32", [classes]), tensor(contract.LOGITS, "TYPE_FP32", [classes])],
        "ensemble_scheduling": {"step": steps},
        "parameters": {contract.MANIFEST_PARAMETER: {"string_value": json.dumps(manifest, sort_keys=True)}},
    }


# ---- reading and writing ---------------------------------------------------------------------------

def to_pbtxt(config: dict) -> str:
    """Triton's text format, checked against its protobuf schema (a wrong field fails here, not in the server)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    return text_format.MessageToString(message)


def read_config(path: str | Path) -> dict:
    """config.pbtxt -> dict in Triton's JSON form (numbers as ints), as sent in a Load override."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())
    config = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _ints(config)


_INT_FIELDS = {"dims", "max_batch_size", "versions", "model_version", "count", "max_queue_delay_microseconds"}


def _ints(value: Any, key: str = "") -> Any:
    """protobuf's JSON form writes int64 as strings; turn the numeric fields back into ints (strings stay)."""
    if isinstance(value, dict):
        return {k: _ints(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v, key) for v in value]
    if key in _INT_FIELDS and isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def manifest_of(config: dict) -> dict | None:
    text = (config.get("parameters") or {}).get(contract.MANIFEST_PARAMETER, {}).get("string_value")
    return json.loads(text) if text else None
