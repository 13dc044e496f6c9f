"""A tiny stand-in model repository for the client tests, plus the client's checks that need no server.

The repository mirrors the real attribution layout (aigis.contract names): one ONNX extractor per task
(uint8 IMAGES -> FEATURES), an ONNX classifier (FEATURES_0.. -> LOGITS, PROBS), the `lorax` ensemble
carrying the manifest, a Python-backend decode step and the `lorax_bytes` ensemble, a stand-in
`mem_protect`, and `lorax_slow` (sleeps; for deadlines). Built with onnx.helper only -- no torch.
The other client test modules import this one (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from aigis import contract, preprocess

TASKS = ["alpha", "beta"]
CROP = 16
FEATURE_DIM = 4
MAX_BATCH = 64
VERSION = "7"          # the manifest's version string
SLOW_MODEL = "lorax_slow"


# ---- ONNX models ---------------------------------------------------------------------------------
def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def extractor_graph(seed: int) -> onnx.GraphProto:
    """uint8 [N, CROP, CROP, 3] -> tanh(flatten(x / 255 - 0.5) @ W + b): a different W per task."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.05, size=(CROP * CROP * 3, FEATURE_DIM)).astype(np.float32)
    bias = rng.normal(0, 0.1, size=(FEATURE_DIM,)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["IMAGES"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("Sub", ["xs", "half"], ["xc"]),
        helper.make_node("Flatten", ["xc"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["hb"]),
        helper.make_node("Tanh", ["hb"], [contract.FEATURES]),
    ]
    inits = [
        numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(bias, "b"),
    ]
    return helper.make_graph(
        nodes,
        "extractor",
        [helper.make_tensor_value_info(contract.IMAGES, TensorProto.UINT8, ["N", CROP, CROP, 3])],
        [helper.make_tensor_value_info(contract.FEATURES, TensorProto.FLOAT, ["N", FEATURE_DIM])],
        inits,
    )


def classifier_graph(seed: int) -> onnx.GraphProto:
    """Concat(FEATURES_0..) @ W + b -> LOGITS, softmax -> PROBS."""
    rng = np.random.default_rng(seed)
    num_classes = 2 * len(TASKS)
    weight = rng.normal(0, 2.0, size=(FEATURE_DIM * len(TASKS), num_classes)).astype(np.float32)
    bias = rng.normal(0, 0.2, size=(num_classes,)).astype(np.float32)
    feature_names = [contract.features_input(t) for t in range(len(TASKS))]
    nodes = [
        helper.make_node("Concat", feature_names, ["features"], axis=1),
        helper.make_node("MatMul", ["features", "W"], ["z"]),
        helper.make_node("Add", ["z", "b"], [contract.LOGITS]),
        helper.make_node("Softmax", [contract.LOGITS], [contract.PROBS], axis=1),
    ]
    return helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", FEATURE_DIM]) for n in feature_names],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", num_classes]) for n in (contract.LOGITS, contract.PROBS)],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )


# ---- config.pbtxt --------------------------------------------------------------------------------
def _tensor(name: str, dtype: str, dims: list[int]) -> str:
    return f'{{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }}'


def _config(name: str, head: str, inputs: list[str], outputs: list[str], tail: str = "") -> str:
    sep = ",\n  "
    return (
        f'name: "{name}"\n{head}\nmax_batch_size: {MAX_BATCH}\n'
        f"input [\n  {sep.join(inputs)}\n]\noutput [\n  {sep.join(outputs)}\n]\n{tail}"
    )


def _parameter(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value: {{ string_value: {json.dumps(value)} }} }}\n'


def manifest() -> dict:
    return {
        "format": "aigis-standin-1",
        "tasks": TASKS,
        "class_names": contract.class_names(TASKS),
        "crop": CROP,
        "version": VERSION,
    }


_PROBS_OUT = _tensor(contract.PROBS, "TYPE_FP32", [2 * len(TASKS)])
_LOGITS_OUT = _tensor(contract.LOGITS, "TYPE_FP32", [2 * len(TASKS)])
_IMAGES_IN = _tensor(contract.IMAGES, "TYPE_UINT8", [CROP, CROP, 3])
_CPU = "instance_group [ { kind: KIND_CPU count: 1 } ]\n"


def _ensemble_steps(source: str, first_step: str = "") -> str:
    steps = [first_step] if first_step else []
    for t, task in enumerate(TASKS):
        steps.append(
            f'{{ model_name: "{contract.extractor_model(task)}" model_version: -1 '
            f'input_map {{ key: "{contract.IMAGES}" value: "{source}" }} '
            f'output_map {{ key: "{contract.FEATURES}" value: "features_{t}" }} }}'
        )
    feature_maps = " ".join(
        f'input_map {{ key: "{contract.features_input(t)}" value: "features_{t}" }}' for t in range(len(TASKS))
    )
    steps.append(
        f'{{ model_name: "{contract.classifier_model(1)}" model_version: -1 {feature_maps} '
        f'output_map {{ key: "{contract.PROBS}" value: "{contract.PROBS}" }} '
        f'output_map {{ key: "{contract.LOGITS}" value: "{contract.LOGITS}" }} }}'
    )
    return "ensemble_scheduling {\n  step [\n    " + ",\n    ".join(steps) + "\n  ]\n}\n"


DECODE_PY = '''
import json
import numpy as np
import triton_python_backend_utils as pb_utils
from aigis import preprocess


class TritonPythonModel:
    """Stand-in decode step: encoded files -> centre-cropped uint8 images, errors name the item."""

    def initialize(self, args):
        self.crop = int(json.loads(args["model_config"])["parameters"]["crop"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "IMAGE_BYTES").as_numpy().reshape(-1)
            try:
                images = np.stack([
                    preprocess.eval_view_from_bytes(bytes(d), self.crop, name=f"IMAGE_BYTES[{i}]")
                    for i, d in enumerate(data)
                ])
            except preprocess.BadImageError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("IMAGES", images)]))
        return responses
'''

PROTECT_PY = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Stand-in mem_protect: inverts the pixels and tags the caption (real model: MEM noise + trigger)."""

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGES").as_numpy()
            captions = pb_utils.get_input_tensor_by_name(request, "CAPTIONS").as_numpy()
            tagged = np.array([c.decode("utf-8") + " [protected]" for c in captions.reshape(-1)], dtype=object)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("PROTECTED_IMAGES", (255 - images).astype(np.uint8)),
                pb_utils.Tensor("PROTECTED_CAPTIONS", tagged.reshape(captions.shape)),
            ]))
        return responses
'''

SLOW_PY = '''
import json
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Answers uniform probabilities after a delay: a server that is too slow for a deadline."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.delay = float(config["parameters"]["delay_s"]["string_value"])

    def execute(self, requests):
        time.sleep(self.delay)
        responses = []
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, "IMAGES").as_numpy().shape[0]
            probs = np.full((n, %d), 1.0 / %d, dtype=np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("PROBS", probs)]))
        return responses
''' % (2 * len(TASKS), 2 * len(TASKS))


def _python_model(root: Path, name: str, source: str, config: str) -> None:
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "1" / "model.py").write_text(textwrap.dedent(source))
    (root / name / "config.pbtxt").write_text(config)


def build_repository(root: Path, extras: bool = True) -> Path:
    """Write the stand-in repository; extras=False leaves only the image ensemble and its steps."""
    root.mkdir(parents=True, exist_ok=True)
    onnx_head = 'platform: "onnxruntime_onnx"'
    for t, task in enumerate(TASKS):
        name = contract.extractor_model(task)
        _save(extractor_graph(seed=100 + t), root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(
            _config(name, onnx_head, [_IMAGES_IN], [_tensor(contract.FEATURES, "TYPE_FP32", [FEATURE_DIM])], _CPU)
        )
    _save(classifier_graph(seed=7), root / contract.classifier_model(1) / "1" / "model.onnx")
    (root / contract.classifier_model(1) / "config.pbtxt").write_text(
        _config(
            contract.classifier_model(1),
            onnx_head,
            [_tensor(contract.features_input(t), "TYPE_FP32", [FEATURE_DIM]) for t in range(len(TASKS))],
            [_LOGITS_OUT, _PROBS_OUT],
            _CPU,
        )
    )
    manifest_text = json.dumps(manifest())
    _ensemble(root, contract.ENSEMBLE_MODEL, [_IMAGES_IN], contract.IMAGES, manifest_text)
    if not extras:
        return root
    _python_model(
        root,
        contract.decode_model(1),
        DECODE_PY,
        _config(
            contract.decode_model(1),
            'backend: "python"',
            [_tensor(contract.IMAGE_BYTES, "TYPE_STRING", [1])],
            [_IMAGES_IN],
            _CPU + _parameter("crop", str(CROP)),
        ),
    )
    decode_step = (
        f'{{ model_name: "{contract.decode_model(1)}" model_version: -1 '
        f'input_map {{ key: "{contract.IMAGE_BYTES}" value: "{contract.IMAGE_BYTES}" }} '
        f'output_map {{ key: "{contract.IMAGES}" value: "decoded" }} }}'
    )
    # No manifest on the bytes ensemble: the client must fall back to the image ensemble's.
    _ensemble(
        root, contract.BYTES_ENSEMBLE_MODEL, [_tensor(contract.IMAGE_BYTES, "TYPE_STRING", [1])], "decoded",
        None, decode_step,
    )
    _python_model(
        root,
        contract.PROTECT_MODEL,
        PROTECT_PY,
        _config(
            contract.PROTECT_MODEL,
            'backend: "python"',
            [_tensor(contract.PROTECT_IMAGES, "TYPE_UINT8", [-1, -1, 3]), _tensor(contract.PROTECT_CAPTIONS, "TYPE_STRING", [1])],
            [_tensor(contract.PROTECTED_IMAGES, "TYPE_UINT8", [-1, -1, 3]), _tensor(contract.PROTECTED_CAPTIONS, "TYPE_STRING", [1])],
            _CPU,
        ),
    )
    _python_model(
        root,
        SLOW_MODEL,
        SLOW_PY,
        _config(
            SLOW_MODEL, 'backend: "python"', [_IMAGES_IN], [_PROBS_OUT],
            _CPU + _parameter("delay_s", "1.5") + _parameter(contract.MANIFEST_PARAMETER, manifest_text),
        ),
    )
    return root


def _ensemble(root: Path, name: str, inputs: list[str], source: str, manifest_text: str | None, first: str = "") -> None:
    tail = _ensemble_steps(source, first)
    if manifest_text is not None:
        tail = _parameter(contract.MANIFEST_PARAMETER, manifest_text) + tail
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "config.pbtxt").write_text(_config(name, 'platform: "ensemble"', inputs, [_PROBS_OUT, _LOGITS_OUT], tail))


ALL_MODELS = [contract.ENSEMBLE_MODEL, contract.BYTES_ENSEMBLE_MODEL, contract.PROTECT_MODEL, SLOW_MODEL]


# ---- the in-process reference --------------------------------------------------------------------
class Reference:
    """The same ONNX files run in-process with onnxruntime: what the server must answer."""

    def __init__(self, root: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        load = lambda name: ort.InferenceSession(str(root / name / "1" / "model.onnx"), options)  # noqa: E731
        self.extractors = [load(contract.extractor_model(task)) for task in TASKS]
        self.classifier = load(contract.classifier_model(1))

    def probs(self, images: np.ndarray) -> np.ndarray:
        feeds = {
            contract.features_input(t): session.run(None, {contract.IMAGES: images})[0]
            for t, session in enumerate(self.extractors)
        }
        return self.classifier.run([contract.PROBS], feeds)[0]


# ---- test data -----------------------------------------------------------------------------------
def random_images(count: int, seed: int = 0, size: int = CROP) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """PNG files larger than the crop (and one JPEG), so the client must decode and centre-crop."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        image = rng.integers(0, 256, size=(CROP + 7 + i % 5, CROP + 3 + i % 3, 3), dtype=np.uint8)
        path = folder / (f"img_{i:03d}.jpg" if i == 0 else f"img_{i:03d}.png")
        Image.fromarray(image).save(path, quality=90) if i == 0 else path.write_bytes(png_bytes(image))
        paths.append(path)
    return paths


# ---- tests that need no server -------------------------------------------------------------------
from aigis.client import InvalidInputError, Manifest, ManifestError  # noqa: E402
from aigis.client.attribution import AttributionCodec  # noqa: E402
from aigis.client.images import ImagePreparer  # noqa: E402
from aigis.client.manifest import ServedModel  # noqa: E402
from aigis.client.results import attributions  # noqa: E402


def _served_ensemble() -> ServedModel:
    config = {
        "config": {
            "name": contract.ENSEMBLE_MODEL,
            "max_batch_size": MAX_BATCH,
            "input": [{"name": contract.IMAGES, "data_type": "TYPE_UINT8", "dims": [str(CROP), str(CROP), "3"]}],
            "output": [{"name": contract.PROBS}, {"name": contract.LOGITS}],
            "parameters": {contract.MANIFEST_PARAMETER: {"string_value": json.dumps(manifest())}},
        }
    }
    return ServedModel.from_config(config, AttributionCodec.expected_inputs())


def test_client_preprocessing_of_a_file_is_the_training_evaluation_view(tmp_path):
    """What the client sends for a file is center_crop(load_image(path), crop), byte for byte."""
    served = _served_ensemble()
    codec = AttributionCodec(served, served.manifest(), max_batch_size=8)
    paths = write_images(tmp_path, 4, seed=3)
    request = codec.request([codec.prepare(p) for p in paths])[contract.IMAGES]
    expected = np.stack([preprocess.center_crop(preprocess.load_image(p), CROP) for p in paths])
    assert request.dtype == np.uint8 and request.shape == (4, CROP, CROP, 3)
    assert request.tobytes() == expected.tobytes()
    # bytes are decoded the same way as the file they came from
    assert np.array_equal(codec.prepare(paths[1].read_bytes()).payload, expected[1])


def test_small_images_are_upscaled_like_training(tmp_path):
    path = tmp_path / "small.png"
    path.write_bytes(png_bytes(random_images(1, size=CROP - 6)[0]))
    pixels = ImagePreparer(CROP).pixels(path)
    assert np.array_equal(pixels, preprocess.center_crop(preprocess.load_image(path), CROP))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((CROP, CROP, 3), np.float32), r"images\[1\]: dtype float32, expected uint8"),
        (np.zeros((CROP, CROP), np.uint8), r"images\[1\]: shape \[16, 16\], expected \[H, W, 3\]"),
        (np.zeros((CROP + 1, CROP, 3), np.uint8), r"images\[1\]: size 17x16, the model expects 16x16"),
        (b"not an image", r"images\[1\]: not a readable image"),
    ],
)
def test_bad_inputs_are_named(bad, message):
    served = _served_ensemble()
    codec = AttributionCodec(served, served.manifest(), max_batch_size=8)
    with pytest.raises(InvalidInputError, match=message):
        codec.prepare_all([random_images(1)[0], bad])


def test_corrupt_file_is_named(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(png_bytes(random_images(1)[0])[:40])
    with pytest.raises(InvalidInputError, match="broken.png: not a readable image"):
        ImagePreparer(CROP).pixels(path)


def test_manifest_is_checked():
    assert Manifest.from_json(json.dumps(manifest())).class_names == tuple(contract.class_names(TASKS))
    with pytest.raises(ManifestError, match="class_names"):
        Manifest.from_json(json.dumps({**manifest(), "class_names": ["a", "b", "c", "d"]}))
    with pytest.raises(ManifestError, match="crop"):
        Manifest.from_json(json.dumps({**manifest(), "crop": 0}))


def test_results_follow_the_class_order():
    probs = np.array([[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1]], np.float32)
    beta_real, alpha_real = attributions(probs, Manifest.from_json(json.dumps(manifest())), "3")
    assert (beta_real.label, beta_real.generator, beta_real.is_fake) == ("real/beta", None, False)
    assert beta_real.fake_score == pytest.approx(0.3)
    assert alpha_real.label == "real/alpha" and alpha_real.model_version == "3"
    probs = np.array([[0.1, 0.2, 0.1, 0.6]], np.float32)
    (beta,) = attributions(probs, Manifest.from_json(json.dumps(manifest())), "3")
    assert (beta.label, beta.generator, beta.is_fake, beta.fake_score) == ("fake/beta", "beta", True, pytest.approx(0.8))
