"""lorax_decode: the first step of the `lorax_bytes` ensemble, for thin clients that send encoded files.

Each encoded JPEG/PNG becomes the training evaluation view (aigis.preprocess, the same code the client
library runs), so both ensembles see identical pixels. A request with an unreadable file gets an error
naming the item; the other requests of the batch are answered.
"""

from __future__ import annotations

import json

import numpy as np

from aigis import contract, preprocess

try:  # only importable inside the Triton Python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.crop = int(config["parameters"]["crop"]["string_value"])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, contract.IMAGE_BYTES).as_numpy().reshape(-1)
            try:
                images = np.stack([preprocess.eval_view_from_bytes(bytes(item), self.crop,
                                                                   name=f"{contract.IMAGE_BYTES}[{i}]")
                                   for i, item in enumerate(data)])
            except preprocess.BadImageError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(contract.IMAGES, images)]))
        return responses

    def finalize(self) -> None:
        pass
