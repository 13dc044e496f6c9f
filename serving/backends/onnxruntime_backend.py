"""A Python-based Triton backend named `onnxruntime`: serves `platform: "onnxruntime_onnx"` models.

NVIDIA's container serves these configs with its native C++ onnxruntime backend; the server from the
nvidia-pytriton wheel has none. Installed as `<backend-directory>/onnxruntime/model.py`, this file
makes the same repository load unchanged on the local server (one stub process per instance).

What it honours from config.pbtxt: the explicitly listed inputs and outputs (names, data types, dims,
`reshape`), `max_batch_size`, `default_model_filename`, the instance kind (CUDA execution provider on
KIND_GPU when onnxruntime has it, CPU otherwise), `optimization { graph { level } }`, the native
backend's parameters `intra_op_thread_count`, `inter_op_thread_count`, `execution_mode`, and the CPU
execution accelerator `openvino` (`optimization { execution_accelerators { cpu_execution_accelerator:
[{ name: "openvino" }] } }`): on CPU instances the model then runs in OpenVINO's CPU runtime, in FP32,
with `intra_op_thread_count` threads -- what the native backend does through onnxruntime's OpenVINO
execution provider.

Batching: all requests of one execute() call whose non-batch shapes agree are concatenated along
axis 0 into ONE session run and the outputs are split back, so dynamic batching pays off. A request
that is wrong gets its own error response; the others in the batch are still answered.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# ONNX tensor element types as onnxruntime names them -> numpy dtypes; strings are object arrays.
_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}

# The native backend's `optimization { graph { level } }`: -1 basic, 1 extended, 2 none, else all.
_GRAPH_LEVELS = {
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


class _BadRequest(Exception):
    """Raised for one request's inputs; becomes that request's error response."""


class _TensorSpec:
    """One input or output as config.pbtxt declares it."""

    def __init__(self, entry, batching):
        self.name = entry["name"]
        self.dtype = np.dtype(pb_utils.triton_string_to_numpy(entry["data_type"]))
        self.dims = [int(d) for d in entry.get("dims", [])]
        reshape = entry.get("reshape")
        # The model sees `reshape.shape` where the client sends `dims` (and the other way round
        # for outputs); an empty reshape means a scalar per batch item.
        self.model_dims = None if reshape is None else [int(d) for d in reshape.get("shape", [])]
        self.batching = batching
        self.optional = bool(entry.get("optional", False))


class _OrtSession:
    """An onnxruntime session: `inputs`/`outputs` map names to numpy dtypes, `input_names` holds one set of
    names per model input; run(names, feeds) -> arrays."""

    def __init__(self, path, options, providers):
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [{node.name} for node in self.session.get_inputs()]
        self.inputs = {node.name: _numpy_dtype(node.type) for node in self.session.get_inputs()}
        self.outputs = {node.name: _numpy_dtype(node.type) for node in self.session.get_outputs()}

    def run(self, names, feeds):
        return self.session.run(names, feeds)


class _OpenVinoSession:
    """The same model compiled by OpenVINO for the CPU (aigis.openvino_cpu: FP32, unpinned)."""

    def __init__(self, path, threads):
        from aigis.openvino_cpu import compile_cpu

        self.model = compile_cpu(path, threads or 0)
        self.request = self.model.create_infer_request()
        # A port may carry several tensor names (OpenVINO keeps internal ones beside the ONNX name): map each.
        self.input_names = [set(port.get_names()) for port in self.model.inputs]
        self.inputs = {name: np.dtype(port.get_element_type().to_dtype())
                       for port in self.model.inputs for name in port.get_names()}
        self.outputs = {name: np.dtype(port.get_element_type().to_dtype())
                        for port in self.model.outputs for name in port.get_names()}

    def run(self, names, feeds):
        results = self.request.infer(feeds)
        # The request reuses its output buffers on the next call: copy.
        return [np.array(results[self.model.output(name)], copy=True) for name in names]


def _numpy_dtype(onnx_type):
    dtype = _ORT_TO_NUMPY.get(onnx_type)
    return None if dtype is None else np.dtype(dtype)


class TritonPythonModel:
    """initialize() opens the session, execute() runs batches, finalize() releases the session."""

    def initialize(self, args):
        self.model_name = args["model_name"]
        self.config = json.loads(args["model_config"])
        self.max_batch_size = int(self.config.get("max_batch_size", 0))
        self.batching = self.max_batch_size > 0

        self.inputs = [_TensorSpec(entry, self.batching) for entry in self.config.get("input", [])]
        self.outputs = [_TensorSpec(entry, self.batching) for entry in self.config.get("output", [])]
        if not self.inputs or not self.outputs:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': config.pbtxt must list every input and output explicitly "
                "(the onnxruntime stand-in backend does not auto-complete configs)"
            )

        model_path = self._model_file(args)
        accelerator = self._cpu_accelerator(args)
        runtime = accelerator or "onnxruntime"
        try:
            if accelerator == "openvino":
                self.session = _OpenVinoSession(model_path, self._int_parameter("intra_op_thread_count"))
            else:
                self.session = _OrtSession(model_path, self._session_options(), self._providers(args))
        except ImportError as error:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': config.pbtxt asks for the {runtime} CPU execution accelerator but "
                f"it is not installed ({error}); `pip install openvino` or export with --cpu-accelerator none"
            ) from None
        except Exception as error:  # both runtimes raise several exception types
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': {runtime} cannot open {model_path}: {error}"
            ) from None
        self._check_signature()
        self.output_names = [spec.name for spec in self.outputs]

    # -- initialize helpers ---------------------------------------------------------------------------

    def _model_file(self, args):
        """<model dir>/<version>/<default_model_filename or model.onnx>; an external .data file beside
        it is found by onnxruntime through the path recorded in the graph."""
        model_dir = Path(args["model_repository"])
        version = args["model_version"]
        filename = self.config.get("default_model_filename") or "model.onnx"
        path = model_dir / version / filename
        if not path.is_file():
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}' version {version}: {path} not found "
                f"(an onnxruntime_onnx model needs <model>/<version>/{filename})"
            )
        return path

    def _providers(self, args):
        kind = args.get("model_instance_kind", "CPU")
        if kind == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(args.get("model_instance_device_id", "0") or 0)
            return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _cpu_accelerator(self, args):
        """'openvino' when the config names it and this is a CPU instance, else None (plain onnxruntime)."""
        if args.get("model_instance_kind", "CPU") == "GPU":
            return None
        accelerators = self.config.get("optimization", {}).get("execution_accelerators", {})
        names = [entry.get("name", "") for entry in accelerators.get("cpu_execution_accelerator", [])]
        unknown = [name for name in names if name != "openvino"]
        if unknown:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': unknown CPU execution accelerator {unknown[0]!r} (only 'openvino')"
            )
        return "openvino" if names else None

    def _int_parameter(self, key):
        entry = self.config.get("parameters", {}).get(key, {})
        text = entry.get("string_value", "").strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': parameter {key} must be an integer, got {text!r}"
            ) from None

    def _session_options(self):
        options = ort.SessionOptions()
        intra = self._int_parameter("intra_op_thread_count")
        if intra is not None:
            options.intra_op_num_threads = intra
        inter = self._int_parameter("inter_op_thread_count")
        if inter is not None:
            options.inter_op_num_threads = inter
        if self._int_parameter("execution_mode") == 1:
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        level = self.config.get("optimization", {}).get("graph", {}).get("level")
        if level is not None:
            options.graph_optimization_level = _GRAPH_LEVELS.get(
                int(level), ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            )
        return options

    def _check_signature(self):
        """Fail the load, not the first request, when config.pbtxt and model.onnx disagree."""
        model_inputs, model_outputs = self.session.inputs, self.session.outputs  # name -> numpy dtype or None
        problems = []
        for kind, specs, nodes in (("input", self.inputs, model_inputs), ("output", self.outputs, model_outputs)):
            for spec in specs:
                if spec.name not in nodes:
                    problems.append(f"{kind} {spec.name} is not in model.onnx (it has {sorted(nodes)})")
                    continue
                model_dtype = nodes[spec.name]
                if model_dtype is not None and model_dtype != spec.dtype:
                    problems.append(f"{kind} {spec.name}: config says {spec.dtype}, model.onnx has {model_dtype}")
        declared = {spec.name for spec in self.inputs}
        for names in self.session.input_names:
            if not names & declared:
                problems.append(f"model.onnx input {sorted(names)[0]} is not declared in config.pbtxt")
        if problems:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': config.pbtxt does not match model.onnx: " + "; ".join(problems)
            )

    # -- execute ------------------------------------------------------------------------------------

    def execute(self, requests):
        """One response per request, in order; compatible requests share one session run."""
        responses = [None] * len(requests)
        groups = {}  # non-batch shapes of every input -> [(request index, feeds, batch size)]
        for index, request in enumerate(requests):
            try:
                feeds, batch_size = self._feeds(request)
            except _BadRequest as error:
                responses[index] = self._error(str(error), pb_utils.TritonError.INVALID_ARG)
                continue
            key = tuple((name, array.shape[1:] if self.batching else array.shape) for name, array in sorted(feeds.items()))
            groups.setdefault(key, []).append((index, feeds, batch_size))

        for members in groups.values():
            if self.batching and len(members) > 1:
                try:
                    for (index, _, _), outputs in zip(members, self._run_batched(members)):
                        responses[index] = self._response(outputs)
                    continue
                except Exception:
                    pass  # find out which request is at fault by running them one at a time
            for index, feeds, batch_size in members:
                try:
                    responses[index] = self._response(self._run(feeds, batch_size))
                except _BadRequest as error:
                    responses[index] = self._error(str(error), pb_utils.TritonError.INVALID_ARG)
                except Exception as error:
                    # The request passed every check against the config, so a failure now is the server's.
                    responses[index] = self._error(f"inference failed: {error}", pb_utils.TritonError.INTERNAL)
        return responses

    def _feeds(self, request):
        """The request's inputs as the model wants them, plus its batch size (1 when not batching)."""
        feeds = {}
        batch_size = None
        for spec in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                if spec.optional:
                    continue
                raise _BadRequest(f"missing input {spec.name}")
            array = tensor.as_numpy()
            if array.dtype != spec.dtype and not (spec.dtype == np.object_ and array.dtype == np.object_):
                raise _BadRequest(f"input {spec.name}: expected {spec.dtype}, got {array.dtype}")
            expected_rank = len(spec.dims) + (1 if self.batching else 0)
            if array.ndim != expected_rank:
                raise _BadRequest(f"input {spec.name}: expected rank {expected_rank}, got shape {list(array.shape)}")
            item_shape = array.shape[1:] if self.batching else array.shape
            for want, got in zip(spec.dims, item_shape):
                if want >= 0 and want != got:
                    raise _BadRequest(f"input {spec.name}: expected dims {spec.dims}, got shape {list(array.shape)}")
            if self.batching:
                if batch_size is None:
                    batch_size = array.shape[0]
                elif array.shape[0] != batch_size:
                    raise _BadRequest(f"inputs disagree on the batch size ({batch_size} vs {array.shape[0]})")
            if spec.model_dims is not None:
                leading = (array.shape[0],) if self.batching else ()
                try:
                    array = array.reshape(leading + tuple(spec.model_dims))
                except ValueError:
                    raise _BadRequest(f"input {spec.name}: cannot reshape {list(array.shape)} to {spec.model_dims}") from None
            if array.dtype == np.object_:
                # Triton hands BYTES as bytes objects; onnxruntime string tensors want str.
                array = np.vectorize(lambda item: item.decode("utf-8") if isinstance(item, bytes) else item, otypes=[np.object_])(array)
            feeds[spec.name] = array
        return feeds, (batch_size or 1)

    def _run(self, feeds, batch_size):
        outputs = self.session.run(self.output_names, feeds)
        return [self._to_client(spec, array, batch_size) for spec, array in zip(self.outputs, outputs)]

    def _run_batched(self, members):
        """Concatenate the members' inputs along the batch axis, run once, split the outputs back."""
        names = members[0][1].keys()
        feeds = {name: np.concatenate([feed[name] for _, feed, _ in members], axis=0) for name in names}
        total = sum(size for _, _, size in members)
        if total > self.max_batch_size:
            raise _BadRequest("combined batch too large")  # dynamic batching never does this
        outputs = self.session.run(self.output_names, feeds)
        for spec, array in zip(self.outputs, outputs):
            if array.ndim == 0 or array.shape[0] != total:
                raise ValueError(f"output {spec.name} has no batch axis of size {total}: {list(array.shape)}")
        bounds = np.cumsum([size for _, _, size in members])[:-1]
        split = [np.split(array, bounds, axis=0) for array in outputs]
        return [
            [self._to_client(spec, parts[k], size) for spec, parts in zip(self.outputs, split)]
            for k, (_, _, size) in enumerate(members)
        ]

    def _to_client(self, spec, array, batch_size):
        """Shape an output as config.pbtxt declares it (undoing `reshape`), C-contiguous for Triton."""
        if spec.model_dims is not None and sum(d < 0 for d in spec.dims) <= 1:
            leading = (batch_size,) if self.batching else ()
            array = array.reshape(leading + tuple(spec.dims))
        if array.dtype == np.object_:
            array = np.array([str(item).encode("utf-8") for item in array.ravel()], dtype=np.object_).reshape(array.shape)
        return pb_utils.Tensor(spec.name, np.ascontiguousarray(array))

    def _response(self, tensors):
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _error(self, message, code):
        """An error response: INVALID_ARG when the request is at fault, INTERNAL when the server is."""
        return pb_utils.InferenceResponse(
            output_tensors=[],
            error=pb_utils.TritonError(f"model '{self.model_name}': {message}", code),
        )

    def finalize(self):
        """Release the session (and its memory) before the stub exits."""
        self.session = None
