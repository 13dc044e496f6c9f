"""The served `mem_protect` model: protect-on-upload with a frozen surrogate from a protection job.

Triton's Python backend loads this class from the version folder's model.py (a two-line shim written by
aigis.protection.served). Each version folder holds its own copy of the job's artefact (`surrogate/`) and
the settings it protects with (`settings.json`), so a version is self-contained and rolling back restores
exactly the protection it gave. It protects through the Protection interface (method.py): whichever method
the job used.

Batch-aware: every request is a batch of image-caption pairs; the requests of one execute() call whose
images share a size are protected together in one call (per-image MEM: one trigger search + PGD against the
frozen surrogate), and the answers are split back. A bad request gets its own error; the others are served.

Uploads arrive as raw pixels, so nothing is decoded here; an image over the pixel budget or side limit
(config parameters `max_pixels`, `max_side`, else aigis.preprocess's defaults) is refused with INVALID_ARG
before any protection work, as the decode step refuses an oversized file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aigis import contract, preprocess
from aigis.export.decode_model import int_parameter

try:  # only importable inside the Triton Python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported outside a stub, e.g. for documentation
    pb_utils = None

SURROGATE_DIR = "surrogate"
SETTINGS_FILE = "settings.json"


class _BadRequest(Exception):
    """One request's inputs are wrong; becomes that request's error response."""


class TritonPythonModel:
    """Protection of each request's image-caption pairs as the version's job protected its own."""

    def initialize(self, args: dict) -> None:
        import torch

        from aigis.protection.method import load_protection

        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        config = json.loads(args.get("model_config") or "{}")
        self.max_pixels = int_parameter(config, "max_pixels", preprocess.MAX_PIXELS)
        self.max_side = int_parameter(config, "max_side", preprocess.MAX_SIDE)
        self.version = str(args["model_version"])
        kind = args.get("model_instance_kind", "CPU")
        if kind == "GPU" and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{int(args.get('model_instance_device_id', 0))}")
        else:
            self.device = torch.device("cpu")
        recorded = json.loads((version_dir / SETTINGS_FILE).read_text())
        self.max_caption_chars = int(recorded.get("max_caption_chars", 1000))
        # every member of an ensemble job: the noise is made against all of them, as the job made it
        self.protection = load_protection(version_dir / SURROGATE_DIR, recorded["settings"])
        for model in self.protection.surrogates:
            model.to(self.device).eval()
            for parameter in model.parameters():
                parameter.requires_grad_(False)

    def execute(self, requests: list) -> list:
        parsed: list[tuple[np.ndarray, list[str], tuple[int, ...]] | Exception] = []
        for request in requests:
            try:
                parsed.append(self._read(request))
            except _BadRequest as exc:
                parsed.append(exc)

        # Group the good requests by image size: one MEM pass per group.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(parsed):
            if not isinstance(item, Exception):
                groups.setdefault(item[0].shape[1:], []).append(i)
        answers: dict[int, tuple[np.ndarray, list[str]] | Exception] = {
            i: item for i, item in enumerate(parsed) if isinstance(item, Exception)}
        for members in groups.values():
            images = np.concatenate([parsed[i][0] for i in members])
            captions = [c for i in members for c in parsed[i][1]]
            try:
                answer = self.protection.protect(images, captions, device=self.device)
                protected, triggered = answer.images, answer.captions
            except Exception as exc:  # a failure of the group fails its requests, not the model
                for i in members:
                    answers[i] = exc
                continue
            start = 0
            for i in members:
                count = parsed[i][0].shape[0]
                answers[i] = (protected[start:start + count], triggered[start:start + count])
                start += count

        responses = []
        for i in range(len(requests)):
            answer = answers[i]
            if isinstance(answer, Exception):
                code = pb_utils.TritonError.INVALID_ARG if isinstance(answer, _BadRequest) else pb_utils.TritonError.INTERNAL
                responses.append(pb_utils.InferenceResponse(output_tensors=[],
                                                            error=pb_utils.TritonError(str(answer), code)))
                continue
            images, captions = answer
            texts = np.array([c.encode("utf-8") for c in captions], dtype=np.object_).reshape(parsed[i][2])
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(contract.PROTECTED_IMAGES, np.ascontiguousarray(images, dtype=np.uint8)),
                pb_utils.Tensor(contract.PROTECTED_CAPTIONS, texts),
            ]))
        return responses

    def _read(self, request) -> tuple[np.ndarray, list[str], tuple[int, ...]]:
        images = pb_utils.get_input_tensor_by_name(request, contract.PROTECT_IMAGES).as_numpy()
        raw = pb_utils.get_input_tensor_by_name(request, contract.PROTECT_CAPTIONS).as_numpy()
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise _BadRequest(f"{contract.PROTECT_IMAGES}: expected uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
        problem = preprocess.size_problem(images.shape[2], images.shape[1], self.max_pixels, self.max_side)
        if problem:
            raise _BadRequest(f"{contract.PROTECT_IMAGES}: {problem}")
        captions = []
        for i, value in enumerate(raw.reshape(-1)):
            try:
                text = value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)
            except UnicodeDecodeError as exc:
                raise _BadRequest(f"{contract.PROTECT_CAPTIONS}[{i}]: not UTF-8 ({exc})") from exc
            if len(text) > self.max_caption_chars:
                raise _BadRequest(f"{contract.PROTECT_CAPTIONS}[{i}]: {len(text)} characters, "
                                  f"more than {self.max_caption_chars}")
            captions.append(text)
        if len(captions) != images.shape[0]:
            raise _BadRequest(f"{len(captions)} captions for {images.shape[0]} images")
        problem = self.protection.upload_problem(images.shape[1], images.shape[2])
        if problem:
            raise _BadRequest(f"{contract.PROTECT_IMAGES}: {problem}")
        return images, captions, tuple(raw.shape)

    def finalize(self) -> None:
        self.protection = None
