"""lorax_decode: the first step of the `lorax_bytes` ensemble, for thin clients that send encoded files.

Each encoded JPEG/PNG becomes the training evaluation view (aigis.preprocess, the same code the client
library runs), so both ensembles see identical pixels. A request with an unreadable or oversized file gets
an error naming the item; the other requests of the batch are answered.

The pixel budget and side limit come from the config's `parameters` (`max_pixels`, `max_side`), else
aigis.preprocess's defaults; an image over either is refused from its header, before it is decoded.

Code that travels with its version: export copies this file as the version's model.py and aigis/preprocess.py
beside it (PREPROCESS_COPY), and a served version decodes with that copy, so rolling back a version rolls
back its decoding too. Only the tensor names (aigis.contract) and the error root (aigis.errors) still come
from the installed package.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np

from aigis import contract

PREPROCESS_COPY = "lorax_preprocess.py"


def _preprocess() -> ModuleType:
    """The version's own copy of aigis.preprocess when served from a version folder, else the package's."""
    copy = Path(__file__).with_name(PREPROCESS_COPY)
    if not copy.is_file():
        from aigis import preprocess

        return preprocess
    spec = importlib.util.spec_from_file_location("lorax_preprocess", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preprocess = _preprocess()

try:  # only importable inside the Triton Python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None


def int_parameter(config: dict, key: str, default: int) -> int:
    """A positive integer from the model config's `parameters` (absent or empty: `default`)."""
    text = config.get("parameters", {}).get(key, {}).get("string_value", "")
    if not str(text).strip():
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{config.get('name', 'model')}: parameter {key}={text!r} must be a positive integer")
    return value


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.crop = int(config["parameters"]["crop"]["string_value"])
        self.max_pixels = int_parameter(config, "max_pixels", preprocess.MAX_PIXELS)
        self.max_side = int_parameter(config, "max_side", preprocess.MAX_SIDE)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, contract.IMAGE_BYTES).as_numpy().reshape(-1)
            try:
                images = np.stack([preprocess.eval_view_from_bytes(bytes(item), self.crop,
                                                                   name=f"{contract.IMAGE_BYTES}[{i}]",
                                                                   max_pixels=self.max_pixels,
                                                                   max_side=self.max_side)
                                   for i, item in enumerate(data)])
            except preprocess.BadImageError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(contract.IMAGES, images)]))
        return responses

    def finalize(self) -> None:
        pass
