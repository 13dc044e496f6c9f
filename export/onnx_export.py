"""PyTorch -> ONNX for the served pieces, and the check that the ONNX model computes what PyTorch does.

An extractor is the backbone with one adapter merged in, preceded by the uint8 -> normalised-float
input step, so the graph takes the client's uint8 NHWC images directly. With a shared trunk, the trunk
takes the images and each task's extractor is only its tail, taking the trunk's activations. The classifier takes the T
feature tensors and returns logits and their softmax. A fused version is all of these in one graph.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from aigis import contract
from aigis.errors import ExportError

OPSET = 18
# A published model may differ from PyTorch by at most RTOL * (FLOOR + max|PyTorch output|): 0.1 % of the
# output's scale, with a floor for outputs near zero (float32 reassociation in onnxruntime's fused kernels
# stays orders of magnitude below this). `aigis export --rtol` changes RTOL for one export.
RTOL = 1e-3
FLOOR = 0.1


class ExportCheckError(ExportError):
    """An exported model disagrees with PyTorch beyond the tolerance: it is not published."""


@dataclass(frozen=True)
class Check:
    """How far one exported model is from PyTorch on one kind of input."""

    model: str
    inputs: str            # "random" or "real images"
    count: int
    max_abs_diff: float
    scale: float           # max |PyTorch output|
    rtol: float = RTOL
    runtime: str = "onnxruntime"

    @property
    def tolerance(self) -> float:
        return self.rtol * (FLOOR + self.scale)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def __str__(self) -> str:
        return (f"{self.model}: max |{self.runtime} - torch| = {self.max_abs_diff:.2e} on {self.count} {self.inputs} "
                f"(tolerance {self.tolerance:.1e})")


class _ClassifierGraph(nn.Module):
    """(FEATURES_0, ..., FEATURES_{T-1}) -> (LOGITS, PROBS)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, *features: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.classifier(*features)
        return logits, torch.softmax(logits, dim=1)


class FusedVersion(nn.Module):
    """A whole ensemble version as one module: uint8 IMAGES -> (trunk ->) every task's extractor -> classifier ->
    (LOGITS, PROBS), what the ensemble computes step by step."""

    def __init__(self, trunk: nn.Module | None, extractors: list[nn.Module], classifier: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.extractors = nn.ModuleList(extractors)
        self.classifier = classifier

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        source = self.trunk(images) if self.trunk is not None else images
        logits = self.classifier(*[extractor(source) for extractor in self.extractors])
        return logits, torch.softmax(logits, dim=1)


def _to_onnx_bytes(module: nn.Module, example: tuple[Tensor, ...], input_names: list[str],
                   output_names: list[str]) -> bytes:
    buffer = io.BytesIO()
    dynamic = {name: {0: "N"} for name in input_names + output_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # tracer chatter about constants; the numerical check below decides
        torch.onnx.export(module.eval(), example, buffer, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return buffer.getvalue()


def extractor_onnx(extractor: nn.Module, crop: int) -> bytes:
    """uint8 IMAGES [N, crop, crop, 3] -> float32 FEATURES [N, D] (`extractor` is a merged copy; may be adapted)."""
    return _image_model_onnx(extractor, crop, contract.FEATURES)


def trunk_onnx(trunk: nn.Module, crop: int) -> bytes:
    """uint8 IMAGES [N, crop, crop, 3] -> float32 TRUNK activations (`trunk` is a copy; may be adapted)."""
    return _image_model_onnx(trunk, crop, contract.TRUNK)


def tail_onnx(tail: nn.Module, trunk_example: Tensor) -> bytes:
    """float32 TRUNK activations -> float32 FEATURES [N, D]: one task's tail, its adapter merged in."""
    return _to_onnx_bytes(tail, (trunk_example[:2].contiguous(),), [contract.TRUNK], [contract.FEATURES])


def _fix_input_size(modules: list[nn.Module | None], crop: int) -> None:
    """Position embeddings for this crop, computed once, as constants (backbones that have them)."""
    for module in modules:
        backbone = getattr(module, "backbone", None)
        if hasattr(backbone, "fix_input_size"):
            backbone.fix_input_size(crop)


def _image_model_onnx(module: nn.Module, crop: int, output: str) -> bytes:
    _fix_input_size([module], crop)
    example = torch.randint(0, 256, (2, crop, crop, 3), dtype=torch.uint8)
    return _to_onnx_bytes(module, (example,), [contract.IMAGES], [output])


def fused_onnx(fused: FusedVersion, crop: int) -> bytes:
    """uint8 IMAGES [N, crop, crop, 3] -> LOGITS, PROBS (`fused` holds copies; its backbones may be adapted)."""
    _fix_input_size([fused.trunk, *fused.extractors], crop)
    example = torch.randint(0, 256, (2, crop, crop, 3), dtype=torch.uint8)
    return _to_onnx_bytes(fused, (example,), [contract.IMAGES], [contract.LOGITS, contract.PROBS])


def classifier_onnx(classifier: nn.Module, num_tasks: int, feature_dim: int) -> bytes:
    example = tuple(torch.randn(2, feature_dim) for _ in range(num_tasks))
    names = [contract.features_input(t) for t in range(num_tasks)]
    return _to_onnx_bytes(_ClassifierGraph(classifier), example, names, [contract.LOGITS, contract.PROBS])


def session(model: bytes | str | Path):
    """A CPU onnxruntime session (one intra-op thread pool sized by onnxruntime)."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def run_onnx(model: bytes, names: list[str], feeds: dict[str, np.ndarray], runtime: str = "onnxruntime") -> list[np.ndarray]:
    """Run an ONNX model once on the CPU with the runtime that will serve it: onnxruntime or openvino (FP32)."""
    if runtime == "onnxruntime":
        return session(model).run(names, feeds)
    if runtime == "openvino":
        from aigis.openvino_cpu import compile_cpu

        try:
            compiled = compile_cpu(model)
        except ImportError as error:
            raise RuntimeError(f"OpenVINO is not installed ({error}): `pip install openvino`, "
                               "or export with --cpu-accelerator none") from None
        results = compiled.create_infer_request().infer(feeds)
        return [np.array(results[compiled.output(name)]) for name in names]
    raise ValueError(f"unknown runtime {runtime!r}")


def check_extractor(name: str, onnx_model: bytes, extractor: nn.Module, images: np.ndarray, inputs: str,
                    rtol: float = RTOL, runtime: str = "onnxruntime") -> Check:
    """Compare FEATURES of the ONNX extractor and the PyTorch one on uint8 NHWC `images`."""
    return check_one_to_one(name, onnx_model, extractor, (contract.IMAGES, contract.FEATURES), images, inputs, rtol,
                            runtime)


def check_one_to_one(name: str, onnx_model: bytes, module: nn.Module, names: tuple[str, str], batch: np.ndarray,
                     inputs: str, rtol: float = RTOL, runtime: str = "onnxruntime") -> Check:
    """Compare the one output of an ONNX model and of the PyTorch module on `batch` (names: (input, output))."""
    batch = np.ascontiguousarray(batch)
    with torch.no_grad():
        expected = module(torch.from_numpy(batch)).numpy()
    got = run_onnx(onnx_model, [names[1]], {names[0]: batch}, runtime)[0]
    return Check(name, inputs, len(batch), float(np.abs(got - expected).max()), float(np.abs(expected).max()), rtol,
                 runtime)


def check_classifier(name: str, onnx_model: bytes, classifier: nn.Module, features: list[np.ndarray],
                     inputs: str, rtol: float = RTOL, runtime: str = "onnxruntime") -> Check:
    """Compare LOGITS and PROBS (each against its own scale) of the ONNX classifier and the PyTorch one."""
    with torch.no_grad():
        logits = classifier(*[torch.from_numpy(f) for f in features])
    feeds = {contract.features_input(t): f for t, f in enumerate(features)}
    return _check_logits_and_probs(name, onnx_model, logits, feeds, inputs, rtol, runtime)


def check_fused(name: str, onnx_model: bytes, fused: FusedVersion, images: np.ndarray, inputs: str,
                rtol: float = RTOL, runtime: str = "onnxruntime") -> Check:
    """Compare LOGITS and PROBS of a fused version's graph and of the PyTorch modules on uint8 NHWC `images`."""
    images = np.ascontiguousarray(images)
    with torch.no_grad():
        logits, _ = fused(torch.from_numpy(images))
    return _check_logits_and_probs(name, onnx_model, logits, {contract.IMAGES: images}, inputs, rtol, runtime)


def _check_logits_and_probs(name: str, onnx_model: bytes, logits: Tensor, feeds: dict[str, np.ndarray], inputs: str,
                            rtol: float, runtime: str) -> Check:
    expected = {contract.LOGITS: logits.numpy(), contract.PROBS: torch.softmax(logits, 1).numpy()}
    got = dict(zip(expected, run_onnx(onnx_model, list(expected), feeds, runtime)))
    # Report the output that is relatively furthest off.
    worst = max(expected, key=lambda k: np.abs(got[k] - expected[k]).max() / (FLOOR + np.abs(expected[k]).max()))
    return Check(f"{name} ({worst})", inputs, len(logits), float(np.abs(got[worst] - expected[worst]).max()),
                 float(np.abs(expected[worst]).max()), rtol, runtime)


def require(checks: list[Check]) -> None:
    bad = [c for c in checks if not c.ok]
    if bad:
        raise ExportCheckError("refusing to publish: " + "; ".join(str(c) for c in bad))
