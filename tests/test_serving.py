"""The embedded Triton server, end to end: the real tritonserver binary, real gRPC, no mocks.

One server (module fixture) serves the inference, batching, control and binding tests; the lifecycle
tests at the bottom start their own servers because they break or stop them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from aigis.scratch import OWNER_FILE
from aigis.serving.control import ModelControl, ModelControlError, wait_ready
from aigis.serving.server import LaunchError, TritonServer, descendants, is_alive, process_group_members
from polling import poll

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

IN_FEATURES, OUT_FEATURES = 6, 3


# ---- a tiny model repository ------------------------------------------------------------------------


def write_model(
    repo: Path,
    name: str,
    *,
    seed: int = 0,
    input_dims: str = str(IN_FEATURES),
    output_dims: str = str(OUT_FEATURES),
    max_batch_size: int = 64,
    queue_delay_us: int = 500,
    write_onnx: bool = True,
    cpu_accelerator: str | None = None,
    extra_input: bool = False,
) -> Path:
    """tanh(X @ W + b) with a dynamic batch axis, weights in an external model.onnx.data file.

    extra_input: the graph adds a second input Z to b, which config.pbtxt does not declare."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((IN_FEATURES, OUT_FEATURES)).astype(np.float32)
    bias = rng.standard_normal(OUT_FEATURES).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["XW"]),
            helper.make_node("Add", ["XW", "Z" if extra_input else "B"], ["S"]),
            helper.make_node("Tanh", ["S"], ["Y"]),
        ],
        name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", IN_FEATURES])]
        + ([helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["batch", OUT_FEATURES])] if extra_input else []),
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", OUT_FEATURES])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version_dir = repo / name / "1"
    version_dir.mkdir(parents=True)
    if write_onnx:
        onnx.save(model, str(version_dir / "model.onnx"), save_as_external_data=True,
                  all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    (repo / name / "config.pbtxt").write_text(f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ {input_dims} ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ {output_dims} ] }} ]
{f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}" if max_batch_size else ""}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
""")
    if cpu_accelerator:
        with open(repo / name / "config.pbtxt", "a") as config:
            config.write(f'optimization {{ execution_accelerators {{ cpu_execution_accelerator: '
                         f'[ {{ name: "{cpu_accelerator}" }} ] }} }}\n')
    return version_dir / "model.onnx"


def reference(model_path: Path, x: np.ndarray) -> np.ndarray:
    """In-process onnxruntime with default options: what the server must reproduce bit for bit."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(["Y"], {"X": x})[0]


def infer(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("X", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor]).as_numpy("Y")


def batch(rows: int, seed: int, features: int = IN_FEATURES) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_model(root, "tiny", seed=0)
    write_model(root, "tiny_b", seed=1)                          # loaded later through ModelControl
    write_model(root, "tiny_var", seed=2, input_dims="-1")       # config looser than the model
    write_model(root, "tiny_slowq", seed=3, queue_delay_us=200_000)  # batches concurrent requests
    write_model(root, "tiny_nobatch", seed=4, max_batch_size=0,       # batch axis left to the model
                input_dims=f"-1, {IN_FEATURES}", output_dims=f"-1, {OUT_FEATURES}")
    write_model(root, "tiny_openvino", seed=5, cpu_accelerator="openvino")
    write_model(root, "unknown_accelerator", cpu_accelerator="fastcpu")
    write_model(root, "undeclared_input", extra_input=True)
    write_model(root, "undeclared_input_openvino", extra_input=True, cpu_accelerator="openvino")
    write_model(root, "no_file", write_onnx=False)
    write_model(root, "bad_config")
    (root / "bad_config" / "config.pbtxt").write_text('name: "bad_config"\nplatform: "onnxruntime_onnx"\ninput [ {{ oops')
    return root


@pytest.fixture(scope="module")
def shared_server(repo):
    with TritonServer(repo, models=["tiny", "tiny_var", "tiny_slowq", "tiny_nobatch", "tiny_openvino"],
                      http=True) as running:
        yield running


@pytest.fixture()
def server(shared_server):
    """The shared server, started again if a test stopped it."""
    return shared_server if shared_server.is_running() else shared_server.start()


@pytest.fixture()
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as connection:
        yield connection


# ---- inference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 5])
def test_grpc_output_is_bit_identical_to_in_process_onnxruntime(repo, client, rows):
    x = batch(rows, seed=rows)
    served = infer(client, "tiny", x)
    expected = reference(repo / "tiny" / "1" / "model.onnx", x)
    assert served.dtype == np.float32 and served.shape == (rows, OUT_FEATURES)
    assert np.array_equal(served, expected)


def test_a_model_without_triton_batching_is_served_as_is(repo, client):
    x = batch(7, seed=13)
    served = infer(client, "tiny_nobatch", x)
    assert np.array_equal(served, reference(repo / "tiny_nobatch" / "1" / "model.onnx", x))


def test_the_openvino_cpu_accelerator_serves_what_onnxruntime_computes(repo, client):
    """cpu_execution_accelerator "openvino": the same model.onnx, run by OpenVINO in FP32, batched by Triton."""
    for rows in (1, 6):
        x = batch(rows, seed=40 + rows)
        served = infer(client, "tiny_openvino", x)
        expected = reference(repo / "tiny_openvino" / "1" / "model.onnx", x)
        assert served.dtype == np.float32 and served.shape == (rows, OUT_FEATURES)
        assert np.abs(served - expected).max() < 1e-5
    with pytest.raises(InferenceServerException, match="tiny_openvino"):   # bad input: its own error
        infer(client, "tiny_openvino", batch(2, seed=7, features=IN_FEATURES + 1))
    x = batch(2, seed=44)                                                   # and the model keeps serving
    assert np.abs(infer(client, "tiny_openvino", x) - reference(repo / "tiny_openvino" / "1" / "model.onnx", x)).max() < 1e-5


def test_concurrent_requests_from_threads_all_succeed(repo, server):
    model_path = repo / "tiny" / "1" / "model.onnx"
    failures: list[str] = []
    done = []

    def worker(worker_id: int) -> None:
        with grpcclient.InferenceServerClient(server.grpc_url) as connection:
            for k in range(15):
                x = batch(1 + (k + worker_id) % 4, seed=100 * worker_id + k)
                try:
                    if not np.array_equal(infer(connection, "tiny", x), reference(model_path, x)):
                        failures.append(f"worker {worker_id} request {k}: wrong output")
                    done.append(1)
                except InferenceServerException as error:
                    failures.append(f"worker {worker_id} request {k}: {error}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and len(done) == 60


def test_dynamic_batching_runs_concurrent_requests_as_one_batch(repo, server, client):
    """16 requests in flight at once reach execute() together and come back split correctly."""
    model_path = repo / "tiny_slowq" / "1" / "model.onnx"
    inputs = [batch(1 + k % 3, seed=500 + k) for k in range(16)]
    results: dict[int, object] = {}
    finished = threading.Semaphore(0)

    def make_callback(k: int):
        def callback(result, error):
            results[k] = error if error is not None else result.as_numpy("Y")
            finished.release()
        return callback

    for k, x in enumerate(inputs):
        tensor = grpcclient.InferInput("X", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        client.async_infer("tiny_slowq", [tensor], callback=make_callback(k))
    for _ in inputs:
        assert finished.acquire(timeout=30)
    for k, x in enumerate(inputs):
        assert isinstance(results[k], np.ndarray), results[k]
        assert np.array_equal(results[k], reference(model_path, x)), f"request {k}"
    expected = sum(len(x) for x in inputs)
    stats = poll(lambda: client.get_inference_statistics("tiny_slowq").model_stats[0],
                 lambda now: now.inference_count >= expected)
    assert stats.inference_count == expected
    assert stats.execution_count < len(inputs)   # some execute() calls served several requests


def test_errors_say_whose_fault_and_the_model_keeps_serving(repo, client):
    # A request the config refuses is the caller's fault: INVALID_ARGUMENT.
    with pytest.raises(InferenceServerException, match="tiny") as refused:
        infer(client, "tiny", batch(2, seed=7, features=IN_FEATURES - 1))
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    # tiny_var's config accepts any feature count, the graph wants exactly IN_FEATURES: the request kept the
    # server's promise and the server broke it, so the runtime's failure is INTERNAL (ServerError at the client).
    with pytest.raises(InferenceServerException, match="tiny_var") as failed:
        infer(client, "tiny_var", batch(2, seed=7, features=IN_FEATURES - 1))
    assert failed.value.status() == "StatusCode.INTERNAL"
    from aigis.client.errors import ServerError as ClientServerError, from_triton

    assert isinstance(from_triton(failed.value, "tiny_var"), ClientServerError)
    x = batch(3, seed=8)
    assert np.array_equal(infer(client, "tiny_var", x), reference(repo / "tiny_var" / "1" / "model.onnx", x))


# ---- model control ------------------------------------------------------------------------------


def test_load_and_unload_without_restart(repo, server, client):
    with server.control() as control:
        assert not control.is_ready("tiny_b")
        control.load("tiny_b")
        assert control.is_ready("tiny_b")
        x = batch(4, seed=9)
        assert np.array_equal(infer(client, "tiny_b", x), reference(repo / "tiny_b" / "1" / "model.onnx", x))
        assert ("tiny_b", "1", "READY") in [(r.name, r.version, r.state) for r in control.index()]
        assert "tiny_b" in control.loaded()

        control.unload("tiny_b")
        assert not control.is_ready("tiny_b")
        with pytest.raises(InferenceServerException):
            infer(client, "tiny_b", x)
        assert "tiny_b" not in control.loaded()
        assert control.is_ready("tiny")              # the others were not touched


def test_load_with_a_config_override(server, client):
    with server.control() as control:
        config = {
            "name": "tiny_b", "platform": "onnxruntime_onnx", "max_batch_size": 2,
            "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [IN_FEATURES]}],
            "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [OUT_FEATURES]}],
        }
        assert control.config("tiny_b" if control.is_ready("tiny_b") else "tiny")["max_batch_size"] == 64
        control.load("tiny_b", config=config)
        try:
            assert control.config("tiny_b")["max_batch_size"] == 2
            infer(client, "tiny_b", batch(2, seed=10))
            with pytest.raises(InferenceServerException, match="batch"):
                infer(client, "tiny_b", batch(3, seed=11))
        finally:
            control.unload("tiny_b")


@pytest.mark.parametrize("name, words", [("no_file", "model.onnx not found"), ("bad_config", ""),
                                         ("unknown_accelerator", "unknown CPU execution accelerator 'fastcpu'"),
                                         ("undeclared_input", "model.onnx input Z is not declared"),
                                         ("undeclared_input_openvino", "model.onnx input Z is not declared")])
def test_a_broken_model_fails_to_load_with_an_error_naming_it(server, name, words):
    with server.control() as control:
        with pytest.raises(ModelControlError, match=f"'{name}'") as caught:
            control.load(name)
        assert words in str(caught.value)
        assert control.is_ready("tiny")


def test_wait_ready_times_out_on_a_port_nobody_serves():
    from aigis.serving.server import free_port

    start = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_ready(f"127.0.0.1:{free_port()}", timeout=0.5)
    assert time.monotonic() - start < 5


# ---- a locked control plane ---------------------------------------------------------------------------


def test_repository_control_needs_the_key_and_inference_does_not(repo, tmp_path):
    """The attack of loading a model whose files carry code: refused over gRPC and HTTP without the key, and
    the code never runs; with the key, control works. Inference needs no key."""
    import base64
    import json
    import urllib.error
    import urllib.request

    marker = tmp_path / "payload-ran"
    payload = f"open({str(marker)!r}, 'w').write('ran')\nclass TritonPythonModel:\n    def execute(self, r): return []\n"
    config = json.dumps({"name": "evil", "backend": "python", "max_batch_size": 0,
                         "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [1]}],
                         "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [1]}]})
    body = json.dumps({"parameters": {"config": config,
                                      "file:1/model.py": base64.b64encode(payload.encode()).decode()}}).encode()
    with TritonServer(repo, models=["tiny"], control_key="s3cret-key", http=True) as server:
        request = urllib.request.Request(f"http://{server.http_url}/v2/repository/models/evil/load", data=body,
                                         method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 403
        with grpcclient.InferenceServerClient(server.grpc_url) as anyone:
            with pytest.raises(InferenceServerException, match="restricted"):
                anyone.load_model("evil", config=config, files={"file:1/model.py": payload.encode()})
            with pytest.raises(InferenceServerException, match="restricted"):
                anyone.get_model_repository_index()
            with pytest.raises(InferenceServerException, match="restricted"):
                anyone.update_log_settings({"log_file": str(tmp_path / "elsewhere.log")})
            x = batch(2, seed=21)                                 # inference stays open
            assert np.array_equal(infer(anyone, "tiny", x), reference(repo / "tiny" / "1" / "model.onnx", x))
        with ModelControl(server.grpc_url, control_key="wrong") as wrong:
            with pytest.raises(ModelControlError, match="refuses repository control without its key"):
                wrong.load("tiny_b")
        with server.control() as control:
            control.load("tiny_b")
            assert "tiny_b" in control.loaded()
            control.unload("tiny_b")
        time.sleep(0.5)
    assert not marker.exists()


def test_by_default_there_is_no_http_endpoint_and_a_random_key(repo):
    # Also: the start removes the work folder a killed server left behind, and the stop removes its own.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left_behind = Path(tempfile.mkdtemp(prefix="aigis-triton-"))
    (left_behind / "backends").mkdir()
    (left_behind / OWNER_FILE).write_text(f"{dead.stdout.strip()} 1\n")
    with TritonServer(repo, models=["tiny"]) as server:
        listening = _listening_addresses(server.pid)
        assert {port for _, port in listening} == {server.grpc_port, server.metrics_port}
        assert len(server.control_key) >= 32
        with grpcclient.InferenceServerClient(server.grpc_url) as anyone:
            with pytest.raises(InferenceServerException, match="restricted"):
                anyone.get_model_repository_index()
        with server.control() as control:
            assert "tiny" in control.loaded()
        work = Path(server.log_path).parent
        assert (work / OWNER_FILE).read_text().split()[0] == str(os.getpid())
        assert not left_behind.exists()
    assert not work.exists()


# ---- endpoints and binding ------------------------------------------------------------------------


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
        except OSError:
            continue
        if match:
            inodes.add(match.group(1))
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:   # 0A = LISTEN
                address, port = local.split(":")
                raw = bytes.fromhex(address)   # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = ipaddress.ip_address(raw)
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped                       # ::ffff:127.0.0.1 is 127.0.0.1
                found.add((str(ip), int(port, 16)))
    return found


def test_server_listens_on_127_0_0_1_only(server):
    listening = _listening_addresses(server.pid)
    assert {port for _, port in listening} >= {server.grpc_port, server.http_port, server.metrics_port}
    assert {address for address, _ in listening} == {"127.0.0.1"}
    assert server.grpc_url == f"127.0.0.1:{server.grpc_port}"


def test_http_and_metrics_endpoints_answer(server):
    import urllib.request

    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        assert b"nv_inference_request_success" in response.read()


# ---- lifecycle: servers of their own ---------------------------------------------------------------


def _stub_pids(server: TritonServer) -> list[int]:
    return [pid for pid in descendants(server.pid)
            if b"triton_python_backend_stub" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_startup_with_a_broken_model_raises_naming_it_and_leaves_nothing(repo):
    server = TritonServer(repo, models=["no_file"], startup_timeout=60)
    with pytest.raises(LaunchError) as caught:
        server.start()
    message = str(caught.value)
    assert "model 'no_file' failed to load" in message and "model.onnx not found" in message
    assert "last lines of the server log" in message
    assert not server.is_running() and server.pid is None


def test_a_requested_abort_cuts_a_start_short_and_leaves_nothing(repo):
    abort = threading.Event()
    server = TritonServer(repo, models=["tiny"], startup_timeout=60, abort=abort)
    abort.set()  # e.g. SIGTERM to `aigis serve` while it restarts tritonserver
    started = time.monotonic()
    with pytest.raises(LaunchError, match="start aborted"):
        server.start()
    assert time.monotonic() - started < 10 and not server.is_running() and server.pid is None


def test_a_server_whose_launcher_is_killed_does_not_outlive_it(repo):
    """SIGKILL leaves the launcher no chance to stop tritonserver: the kernel's parent-death signal (set by
    setpriv before tritonserver's exec) does it."""
    from aigis.serving.processes import parent_death_prefix

    if not parent_death_prefix():
        pytest.skip("no setpriv with --pdeathsig on this host: a killed launcher leaves tritonserver running")
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from aigis.serving.server import TritonServer; "
         f"s = TritonServer({str(repo)!r}, models=['tiny']).start(); print(s.pid, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        pid = int(launcher.stdout.readline())
        assert is_alive(pid)
        launcher.kill()
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 30
        while is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not is_alive(pid), "tritonserver outlived its killed launcher"
    finally:
        launcher.kill()


def test_stop_ends_the_server_and_every_stub(server):
    pid, stubs = server.pid, _stub_pids(server)
    assert len(stubs) == 5                # one per loaded model instance
    assert server.stop() == 0
    assert not server.is_running()
    assert not any(is_alive(p) for p in [pid, *stubs])
    assert process_group_members(pid) == []


def test_stubs_are_reaped_even_when_the_server_crashes(repo):
    server = TritonServer(repo, models=["tiny"]).start()
    pid, stubs = server.pid, _stub_pids(server)
    assert stubs
    os.kill(pid, signal.SIGKILL)         # the stub outlives a crashed server unless we clean up
    server.stop()
    assert not any(is_alive(p) for p in [pid, *stubs])
    assert process_group_members(pid) == []


def test_aigis_serve_runs_until_sigterm_then_stops_cleanly(repo, tmp_path):
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "aigis.cli", "serve", "--repo", str(repo), "--grpc-port", "0",
               "--metrics-port", "0", "--load", "tiny", "--log", str(log), "--control-key-file", str(tmp_path / "key")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        text = "".join(lines)
        assert "model    tiny (versions 1)" in text, text
        grpc_url = re.search(r"gRPC\s+(\S+)", text).group(1)
        server_pid = int(re.search(r"\(pid (\d+)\)", text).group(1))
        with grpcclient.InferenceServerClient(grpc_url) as connection:
            x = batch(2, seed=12)
            assert np.array_equal(infer(connection, "tiny", x), reference(repo / "tiny" / "1" / "model.onnx", x))
        stubs = [p for p in descendants(server_pid)]
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
        assert process.returncode == 0, text + rest
        assert "stopped (tritonserver exit status 0; 0 restarts)" in rest
        assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600 and f"written to {tmp_path / 'key'}" in text
        assert not any(is_alive(p) for p in [server_pid, *stubs])
        assert log.exists() and "successfully loaded 'tiny'" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_control_keys_are_never_empty_and_stay_on_this_host(tmp_path, monkeypatch):
    from aigis.serving.control import default_key_file, read_control_key, write_key_file

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("AIGIS_CONTROL_KEY", raising=False)
    written = write_key_file(default_key_file("127.0.0.1:8123"), "local-key")
    assert written.stat().st_mode & 0o777 == 0o600
    assert read_control_key("127.0.0.1:8123") == "local-key"
    assert read_control_key("elsewhere.example:8123") is None     # the local file is never sent to another host
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ModelControlError, match="is empty"):
        read_control_key("127.0.0.1:8123", tmp_path / "empty")
    monkeypatch.setenv("AIGIS_CONTROL_KEY", "  ")
    with pytest.raises(ModelControlError, match="is empty"):
        read_control_key("127.0.0.1:8123")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        write_key_file(tmp_path / "link", "k")                   # never written through a symbolic link
