"""Launch the real `tritonserver` binary shipped in the nvidia-pytriton wheel, with no container.

The wheel brings the server, its shared libraries and the Python backend, but no onnxruntime backend.
`TritonServer` therefore builds a backend directory of its own: the Python backend (library, utils and
the stub built for the running interpreter) plus a Python-based backend named `onnxruntime`
(`backends/onnxruntime_backend.py`), so repositories written for NVIDIA's GPU container, with
`platform: "onnxruntime_onnx"`, load here unchanged. See docs/design.md and triton-local.md.

`triton_flags` holds the flags that decide what any tritonserver of this project serves and exposes (ports,
the control header, the restricted protocols); the Kubernetes manifests in deploy/ are tested against it.

Only the standard library is imported at module level; tritonclient is imported when waiting for
readiness, psutil when looking for the server's processes, boto3 for an S3 repository.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from aigis.errors import ServingError
from aigis.scratch import owned_tempdir

from .processes import (STUB_NAME, descendants, is_alive, is_triton_process, parent_death_prefix,  # noqa: F401
                        process_group_members)

if TYPE_CHECKING:
    from aigis.serving.control import ModelControl
    from aigis.objectstore import S3Repository

ONNXRUNTIME_BACKEND_SOURCE = Path(__file__).with_name("backends") / "onnxruntime_backend.py"
# The header a control request carries its key in (gRPC clients send it as "triton-grpc-protocol-<header>"),
# and the protocols it guards: loading models (which can carry code), the repository index, system shared
# memory, traces and logging. Inference, health, metadata, model configs and statistics stay open.
CONTROL_HEADER = "aigis-control-key"
RESTRICTED_PROTOCOLS = ("model-repository", "shared-memory", "trace", "logging")
# Triton's own default ports, which `aigis serve` and the Kubernetes manifests in deploy/ keep.
GRPC_PORT, HTTP_PORT, METRICS_PORT = 8001, 8000, 8002


class LaunchError(ServingError):
    """The server could not start, or died; the message carries the tail of its log."""


@dataclass(frozen=True)
class TritonDistribution:
    """Where the pieces of the server live inside the installed nvidia-pytriton wheel."""

    binary: Path          # pytriton/tritonserver/bin/tritonserver
    libs_dir: Path        # site-packages/nvidia_pytriton.libs (libtritonserver, libcudart, ...)
    python_backend: Path  # pytriton/tritonserver/backends/python (libtriton_python.so + utils)
    stub: Path            # python_backend_stubs/<major.minor>/triton_python_backend_stub
    cache_dir: Path       # pytriton/tritonserver/caches


def find_triton() -> TritonDistribution:
    """Locate the server inside the installed nvidia-pytriton wheel (without importing pytriton)."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError("nvidia-pytriton is not installed: pip install 'aigis[serve]'")
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    dist = TritonDistribution(
        binary=root / "bin" / "tritonserver",
        libs_dir=package.parent / "nvidia_pytriton.libs",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / python_version / STUB_NAME,
        cache_dir=root / "caches",
    )
    for path in (dist.binary, dist.libs_dir, dist.python_backend / "libtriton_python.so", dist.cache_dir):
        if not path.exists():
            raise LaunchError(f"incomplete nvidia-pytriton install: {path} is missing")
    if not dist.stub.exists():
        raise LaunchError(f"nvidia-pytriton has no Python backend stub for Python {python_version} ({dist.stub})")
    return dist


def prepare_backend_dir(dest: str | Path, dist: TritonDistribution | None = None) -> Path:
    """Fill `dest` with `python/` (backend + stub for this Python) and `onnxruntime/model.py`.

    The wheel's own backends/python has no stub, and Triton looks for the stub beside the backend
    library, so the files are copied into a directory we own.
    """
    dist = dist or find_triton()
    dest = Path(dest)
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(dist.python_backend / name, python_dir / name)
    shutil.copy2(dist.stub, python_dir / STUB_NAME)
    ort_dir = dest / "onnxruntime"
    ort_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ONNXRUNTIME_BACKEND_SOURCE, ort_dir / "model.py")
    return dest


def server_environment(dist: TritonDistribution, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the server and its stubs.

    LD_LIBRARY_PATH: the wheel's libraries (else the stub fails on libcudart and the server hangs)
    and this interpreter's libpython (so the stub embeds the same Python). PATH: this interpreter's
    bin first, because the stub takes its sys.path from the first `python3` on PATH.
    """
    env = dict(os.environ if base is None else base)
    lib_dirs = [str(dist.libs_dir)]
    libpython_dir = sysconfig.get_config_var("LIBDIR")
    if libpython_dir:
        lib_dirs.append(str(libpython_dir))
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", os.defpath)])
    return env


def check_control_key(key: str) -> str:
    """`key` unchanged, or LaunchError: Triton's flag syntax (PROTOCOLS:HEADER=KEY) has no escaping."""
    if any(c.isspace() or c in ",:=" for c in key):
        raise LaunchError("a control key cannot hold whitespace or any of , : =")
    return key


def triton_flags(
    repository: str,
    *,
    host: str,
    grpc_port: int,
    metrics_port: int,
    control_key: str,
    models: Sequence[str] | None,
    http_port: int | None = None,
    exit_timeout_s: int,
    log_verbose: int = 0,
) -> list[str]:
    """The tritonserver flags that decide what a server serves and exposes, for any Triton of this release.

    One place for these facts: `TritonServer` adds what the embedded server needs on top (its backend
    directory, caches, shared-memory prefix), and tests/test_deploy.py checks that the Kubernetes Deployment in
    deploy/ runs NVIDIA's container with exactly these flags. `http_port=None` turns HTTP off; a non-empty
    `control_key` locks RESTRICTED_PROTOCOLS behind the CONTROL_HEADER header on gRPC (and on HTTP when it is
    on); `models=None` loads every model of the repository.
    """
    args = [
        f"--model-repository={repository}",
        "--model-control-mode=explicit",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={host}",
        f"--metrics-port={metrics_port}",
        # Ready = able to serve. With strict readiness one model that failed a later load through the control
        # API would mark the whole server unready (and a liveness probe on readiness would restart it).
        "--strict-readiness=false",
        # Every config the export writes is complete. Auto-completion would start an extra Python stub per
        # python-backend model and load (and a 1 s health pause after it): 1.3 s per model a rollout loads.
        "--disable-auto-complete-config",
        f"--exit-timeout-secs={exit_timeout_s}",
        f"--log-verbose={log_verbose}",
    ]
    if http_port is not None:
        args += [f"--http-address={host}", f"--http-port={http_port}"]
    else:
        args.append("--allow-http=false")
    if check_control_key(control_key):
        guarded = f"{','.join(RESTRICTED_PROTOCOLS)}:{CONTROL_HEADER}={control_key}"
        args.append(f"--grpc-restricted-protocol={guarded}")
        if http_port is not None:
            args.append(f"--http-restricted-api={guarded}")
    if models is None:
        args.append("--load-model=*")
    else:
        args += [f"--load-model={name}" for name in models]
    return args


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (another process may still take it before we bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _client_host(host: str) -> str:
    """Address a local client should dial for a server bound to `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


# ---- the server --------------------------------------------------------------------------------


class TritonServer:
    """One `tritonserver` process on a model repository, explicit model control.

    Use as a context manager (`with TritonServer(repo, models=["m"]) as server: ...`) or call
    start() / stop(). `models=None` loads every model in the repository, `[]` loads none (load them
    later with `server.control()`). Ports left as None are picked free. The repository is a folder or an
    `s3://BUCKET/PREFIX` URL (aigis.objectstore: checked with boto3 at every start, read by tritonserver).

    Repository control (load, unload, the index), shared memory, traces and logging need `control_key`
    (a random one when None; "" runs the control plane open, for closed test hosts only); inference stays
    open on the bound address. The HTTP endpoint is off unless `http=True`.
    """

    def __init__(
        self,
        model_repository: str | Path,
        models: Sequence[str] | None = None,
        *,
        host: str = "127.0.0.1",
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        log_path: str | Path | None = None,
        log_verbose: int = 0,
        startup_timeout: float = 60.0,
        stop_timeout: float = 20.0,
        extra_args: Sequence[str] = (),
        control_key: str | None = None,
        http: bool = False,
        abort: threading.Event | None = None,
    ) -> None:
        from aigis.objectstore import is_s3_url

        # A folder, or an s3://bucket/prefix URL that tritonserver reads itself (aigis.objectstore).
        self.model_repository: Path | str = (str(model_repository) if is_s3_url(model_repository)
                                             else Path(model_repository).resolve())
        self._s3: S3Repository | None = None
        self.models = None if models is None else list(models)
        self.host = host
        self.control_key = check_control_key(secrets.token_urlsafe(32) if control_key is None else control_key)
        self.http = http
        self._requested_ports = (grpc_port, http_port if http else None, metrics_port)
        self.grpc_port, self.http_port, self.metrics_port = self._requested_ports
        self._user_log_path = None if log_path is None else Path(log_path).resolve()
        self.log_path: Path | None = self._user_log_path
        self.log_verbose = log_verbose
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = list(extra_args)
        self._process: subprocess.Popen | None = None
        self._work_dir: Path | None = None
        self._known_children: set[int] = set()
        self._lock = threading.Lock()
        # Set by whoever wants a (re)start cut short, e.g. `aigis serve` on SIGTERM: start() stops waiting for
        # readiness, cleans up and raises LaunchError.
        self.abort = abort

    # -- endpoints ----------------------------------------------------------------------------------

    @property
    def grpc_url(self) -> str:
        """`host:port` as tritonclient.grpc.InferenceServerClient(url=...) expects it."""
        return f"{_client_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """`host:port` as tritonclient.http.InferenceServerClient(url=...) expects it (no scheme)."""
        if not self.http:
            raise LaunchError("this server runs without its HTTP endpoint (http=False)")
        return f"{_client_host(self.host)}:{self.http_port}"

    def control(self, timeout: float = 120.0) -> "ModelControl":
        """A ModelControl for this server, carrying its control key."""
        from aigis.serving.control import ModelControl

        return ModelControl(self.grpc_url, timeout=timeout, control_key=self.control_key)

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus metrics page."""
        return f"http://{_client_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def exit_status(self) -> int | None:
        """The exit status of the last server process (None while it runs or before it started)."""
        return None if self._process is None else self._process.poll()

    def note(self, line: str) -> None:
        """Append a line of our own to the server log (restarts, for whoever reads the log later)."""
        if self.log_path is not None:
            with open(self.log_path, "a") as log:
                log.write(line.rstrip("\n") + "\n")

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the server log ('' when there is none yet)."""
        return "\n".join(self._read_log(256 * 1024).splitlines()[-lines:])

    # -- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> "TritonServer":
        """Launch the server and block until it is ready; raise LaunchError (with the log tail) if not."""
        if self.is_running():
            return self
        self._check_repository()
        dist = find_triton()
        self._work_dir = owned_tempdir("aigis-triton-")
        try:
            backend_dir = prepare_backend_dir(self._work_dir / "backends", dist)
            fixed = all(port for k, port in enumerate(self._requested_ports) if k != 1 or self.http)
            attempts = 1 if fixed else 3   # picked ports can be taken meanwhile
            for attempt in range(attempts):
                self._pick_ports()
                self._launch(dist, backend_dir)
                try:
                    self._wait_until_ready()
                    return self
                except LaunchError:
                    port_clash = "already in use" in self.log_tail(200)
                    self._terminate(grace_s=self._abort_grace())
                    if not (port_clash and attempt + 1 < attempts):
                        raise
        except BaseException:
            self._terminate(grace_s=self._abort_grace())
            self._remove_work_dir()
            raise
        raise AssertionError("unreachable")

    def stop(self) -> int | None:
        """SIGINT (Triton unloads models and ends its stubs), SIGKILL after `stop_timeout` seconds.

        Returns the server's exit status (None if it was not started). Any stub left behind is killed.
        """
        status = self._terminate()
        self._remove_work_dir()
        return status

    def restart(self) -> "TritonServer":
        """Stop what is left of the server (stubs of a crashed one included) and start it again on the same
        ports, with the same key and models; the repository's pointers decide the versions it serves."""
        if self.grpc_port is not None:
            self._requested_ports = (self.grpc_port, self.http_port, self.metrics_port)
        self.stop()
        return self.start()

    # -- internals ----------------------------------------------------------------------------------

    def _check_repository(self) -> None:
        """Fail with a clear LaunchError before launching: Triton's own message for an S3 repository blames
        "account credentials" whatever went wrong. Runs at every (re)start, so a restart names a bucket that
        went away too."""
        if isinstance(self.model_repository, Path):
            if not self.model_repository.is_dir():
                raise LaunchError(f"model repository {self.model_repository} is not a directory")
            return
        from aigis.objectstore import ObjectStoreError, S3Repository

        try:
            self._s3 = S3Repository(self.model_repository).open()
        except ObjectStoreError as error:
            raise LaunchError(str(error)) from None

    @property
    def s3(self) -> "S3Repository | None":
        """The checked S3 repository (endpoint, credentials source, notes) once started on one, else None."""
        return self._s3

    def _pick_ports(self) -> None:
        taken: set[int] = set()
        ports = []
        for k, requested in enumerate(self._requested_ports):
            if k == 1 and not self.http:
                ports.append(None)
                continue
            port = requested
            while port is None or port in taken:
                port = free_port(self.host if self.host not in ("", "::") else "127.0.0.1")
            taken.add(port)
            ports.append(port)
        self.grpc_port, self.http_port, self.metrics_port = ports

    def command(self, dist: TritonDistribution, backend_dir: Path) -> list[str]:
        """The tritonserver command line: triton_flags, then what this embedded server needs besides."""
        return [
            str(dist.binary),
            *triton_flags(
                self._triton_repository(), host=self.host, grpc_port=self.grpc_port, metrics_port=self.metrics_port,
                control_key=self.control_key, models=self.models, http_port=self.http_port if self.http else None,
                exit_timeout_s=max(1, int(self.stop_timeout) - 2), log_verbose=self.log_verbose),
            f"--backend-directory={backend_dir}",
            f"--cache-directory={dist.cache_dir}",
            "--allow-gpu-metrics=false",
            # Each Python-backend model owns shared-memory regions named by this prefix; a unique
            # prefix keeps several servers on one machine from colliding.
            f"--backend-config=python,shm-region-prefix-name=aigis_{os.getpid()}_{uuid.uuid4().hex[:8]}_",
            *self.extra_args,
        ]

    def _triton_repository(self) -> str:
        """The repository as tritonserver reads it: a local path, or the URL its S3 reader parses."""
        if self._s3 is not None:
            return self._s3.triton_url
        return str(self.model_repository)

    def _repository_environment(self) -> dict[str, str]:
        """What tritonserver needs in its environment to read the repository (nothing for a local folder).

        For S3 its copies of the models go under the work folder (removed at stop, so a crash loop leaves no
        copies behind) unless TRITON_AWS_MOUNT_DIRECTORY is set; credentials travel in the environment it
        inherits, never on its command line."""
        if self._s3 is None:
            return {}
        assert self._work_dir is not None
        mount = self._work_dir / "s3-models"
        mount.mkdir(exist_ok=True)
        return self._s3.triton_environment(mount)

    def _launch(self, dist: TritonDistribution, backend_dir: Path) -> None:
        assert self._work_dir is not None
        if self._user_log_path is None:
            self.log_path = self._work_dir / "tritonserver.log"
        else:
            self._user_log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path = self._user_log_path
        # The parent-death signal fires when the *thread* that forked exits, so only ask for it from the main
        # thread. setpriv sets it and execs tritonserver: no Python runs between fork and exec (a preexec_fn
        # would, which can crash the child of a process whose other threads, e.g. gRPC's, hold locks).
        in_main_thread = threading.current_thread() is threading.main_thread()
        prefix = parent_death_prefix() if in_main_thread else []
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                prefix + self.command(dist, backend_dir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**server_environment(dist), **self._repository_environment()},
                cwd=self._work_dir,
                # Own process group: a terminal's Ctrl-C reaches only us (we then stop the server in
                # order), and the whole group (server + stubs) can be killed as a last resort.
                start_new_session=True,
            )

    def _wait_until_ready(self) -> None:
        from aigis.serving.control import wait_ready

        assert self._process is not None
        process = self._process

        def check_alive() -> None:
            if process.poll() is not None:
                raise LaunchError(self._failure_message(f"tritonserver exited with status {process.returncode}"))
            if self.abort is not None and self.abort.is_set():
                raise LaunchError("start aborted: a stop was requested before tritonserver was ready")

        try:
            wait_ready(self.grpc_url, timeout=self.startup_timeout, models=self.models or (), check=check_alive)
        except TimeoutError:
            raise LaunchError(
                self._failure_message(f"tritonserver was not ready after {self.startup_timeout:.0f} s")
            ) from None

    def _failure_message(self, what: str) -> str:
        """`what`, then one line per model that failed to load (with Triton's reason), then the log
        tail without Triton's wide status tables."""
        text = self._read_log(1 << 20)
        failures: dict[str, str] = {}
        for name, reason in re.findall(r"failed to load '([^']+)' (version \d+: [^\n]*)", text):
            failures[name] = reason.replace("\\n", " ").split(" At: ")[0].strip().rstrip('"')[:500]
        lines = [what] + [f"  model '{name}' failed to load: {reason}" for name, reason in failures.items()]
        tail = [line for line in text.splitlines() if line.strip() and not line.startswith(("|", "+"))][-30:]
        where = f" ({self.log_path})" if self._user_log_path is not None else ""
        return "\n".join(lines + [f"--- last lines of the server log{where} ---", *tail])

    def _read_log(self, limit: int) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit))
            return handle.read().decode("utf-8", errors="replace")

    def _abort_grace(self) -> float | None:
        """No grace for a start cut short by `abort`: it serves nothing yet, and a starting tritonserver may not
        act on SIGINT until its models are loaded (None: the usual stop_timeout)."""
        return 0.0 if self.abort is not None and self.abort.is_set() else None

    def _terminate(self, grace_s: float | None = None) -> int | None:
        """Stop the server: SIGINT, and SIGKILL to its whole group after `grace_s` (default stop_timeout)."""
        grace_s = self.stop_timeout if grace_s is None else grace_s
        with self._lock:
            process = self._process
            if process is None:
                return None
            # Children are found through the server while it lives and through its process group after a
            # crash (orphaned stubs are no longer its descendants), so the wait below covers both.
            self._known_children.update(descendants(process.pid))
            self._known_children.update(process_group_members(process.pid))
            if process.poll() is None:
                try:
                    process.send_signal(signal.SIGINT)
                    process.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    self._kill_group(process.pid)
                    process.wait()
            # Stubs normally exit with the server; kill any that did not (they keep its group).
            self._known_children.update(process_group_members(process.pid))
            self._kill_group(process.pid)
            for pid in self._known_children:
                if is_alive(pid) and is_triton_process(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self._wait_gone([process.pid, *self._known_children])
            self._known_children.clear()
            self._process = None
            return process.returncode

    @staticmethod
    def _kill_group(pgid: int) -> None:
        if process_group_members(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    @staticmethod
    def _wait_gone(pids: Sequence[int], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while any(is_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _remove_work_dir(self) -> None:
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
            if self._user_log_path is None:
                self.log_path = None

    def __repr__(self) -> str:
        state = f"running pid {self.pid}" if self.is_running() else "stopped"
        return f"TritonServer({str(self.model_repository)!r}, grpc={self.grpc_url}, {state})"
