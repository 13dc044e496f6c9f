"""What the client learns from the served model's configuration: the manifest and the input it takes.

The class names, task order and crop size travel with the model (in its config's manifest parameter),
so a client never needs a local copy of the training run to interpret the probabilities it gets back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aigis import contract

from .errors import ManifestError


@dataclass(frozen=True)
class Manifest:
    """The parts of a version's manifest that the client needs to interpret answers."""

    tasks: tuple[str, ...]
    class_names: tuple[str, ...]
    crop: int
    version: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> "Manifest":
        """Parse and check a manifest; a wrong one must fail here, not as nonsense labels later.

        Only tasks, class_names, crop and version are read; other keys (training details, metrics) are
        kept in `raw` and otherwise ignored, so richer manifests stay readable.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{source}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object")
        tasks = data.get("tasks")
        if isinstance(tasks, list):  # tolerate task entries ({"name": ..., ...}) as well as plain names
            tasks = [t.get("name") if isinstance(t, dict) else t for t in tasks]
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ManifestError(f"{source}: 'tasks' must be a non-empty list of names, got {data.get('tasks')!r}")
        names = data.get("class_names") or contract.class_names(tasks)
        if list(names) != contract.class_names(tasks):
            raise ManifestError(f"{source}: class_names {names} do not follow the task order {tasks}")
        crop = data.get("crop")
        if isinstance(crop, (list, tuple)) and len(crop) == 2 and crop[0] == crop[1]:
            crop = crop[0]
        if not isinstance(crop, int) or crop <= 0:
            raise ManifestError(f"{source}: 'crop' must be a positive integer, got {crop!r}")
        version = data.get("version")
        return cls(
            tasks=tuple(tasks),
            class_names=tuple(names),
            crop=crop,
            version=None if version is None else str(version),
            raw=data,
        )


@dataclass(frozen=True)
class TensorSpec:
    """One input as the config declares it (dims exclude the batch dimension; -1 = any size)."""

    name: str
    datatype: str                 # Triton datatype: "UINT8", "BYTES", "FP32", ...
    dims: tuple[int, ...]

    def batch_shape(self, count: int) -> list[int]:
        """The shape to send for `count` items of a BYTES input: [N] or [N, 1] as the config says."""
        return [count] + [1] * len(self.dims)


@dataclass(frozen=True)
class ServedModel:
    """A served model as the client sees it: its inputs, outputs, batch limit and parameters."""

    name: str
    inputs: dict[str, TensorSpec]
    input_name: str               # the image input this client feeds (IMAGES or IMAGE_BYTES)
    max_batch_size: int           # 0 = the model does not batch
    output_names: tuple[str, ...]
    parameters: dict[str, str]
    versions: tuple[str, ...] | None = None   # the versions its config serves (None: whichever is latest)
    source: str = field(default="", compare=False)   # the endpoint whose config this is

    @property
    def input_datatype(self) -> str:
        return self.inputs[self.input_name].datatype

    @property
    def takes_bytes(self) -> bool:
        return self.input_datatype == "BYTES"

    @classmethod
    def from_config(cls, config: dict[str, Any], expected_inputs: tuple[str, ...]) -> "ServedModel":
        """Read a model config (tritonclient's as_json form) and find the image input we feed."""
        config = config.get("config", config)
        name = str(config.get("name", "?"))
        inputs = {}
        for item in config.get("input", []):
            datatype = str(item.get("data_type", "TYPE_INVALID")).removeprefix("TYPE_")
            inputs[item["name"]] = TensorSpec(
                name=item["name"],
                datatype="BYTES" if datatype == "STRING" else datatype,
                dims=tuple(int(d) for d in item.get("dims", [])),
            )
        chosen = next((n for n in expected_inputs if n in inputs), None)
        if chosen is None:
            raise ManifestError(f"model {name!r} has inputs {sorted(inputs)}, expected one of {list(expected_inputs)}")
        parameters = {
            key: str(value.get("string_value", "")) for key, value in (config.get("parameters") or {}).items()
        }
        pinned = ((config.get("version_policy") or {}).get("specific") or {}).get("versions")
        return cls(
            name=name,
            inputs=inputs,
            input_name=chosen,
            max_batch_size=int(config.get("max_batch_size", 0) or 0),
            output_names=tuple(item["name"] for item in config.get("output", [])),
            parameters=parameters,
            versions=tuple(str(v) for v in pinned) if pinned else None,
        )

    def manifest(self) -> Manifest | None:
        text = self.parameters.get(contract.MANIFEST_PARAMETER)
        if not text:
            return None
        return Manifest.from_json(text, source=f"model {self.name!r} parameter {contract.MANIFEST_PARAMETER!r}")
