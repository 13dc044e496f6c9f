"""A supervised server under a steady load: `aigis serve` restarts a SIGKILLed tritonserver and no request
fails or is lost (the clients retry within their deadlines).

A tiny model is trained on three synthetic tasks and exported as versions 2 and 3. Rollouts under load, with
every kind of load checked against each version's in-process predictions, are in tests/test_fleet_rollout.py.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aigis.client.loadcheck import start_loads
from aigis.serving.server import free_port
from polling import poll
from tiny_run import TASKS, two_version_copy


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, two_version_source) -> dict:
    """A repository with versions 2 and 3 of one run, the held-out images, and each version's predictions."""
    return two_version_copy(two_version_source, tmp_path_factory.mktemp("rollout"))


# ---- a supervised server: tritonserver killed under load ----------------------------------------------
KILLS = 1  # benchmarks/fault_run.py kills 3 times


def start_aigis_serve(repo: Path, tmp_path: Path, key: str) -> tuple[subprocess.Popen, queue.Queue, dict]:
    """`aigis serve` as a real process; its output lines go to a queue; returns the endpoints it printed."""
    ports = [str(free_port()) for _ in range(2)]
    command = [sys.executable, "-m", "aigis.cli", "serve", "--repo", str(repo), "--grpc-port", ports[0],
               "--metrics-port", ports[1], "--log", str(tmp_path / "server.log")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "AIGIS_CONTROL_KEY": key})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    text = wait_for_line(lines, "Ctrl-C", 120)
    return process, lines, {"grpc_url": re.search(r"gRPC\s+(\S+)", text).group(1),
                            "pid": int(re.search(r"\(pid (\d+)\)", text).group(1)), "text": text}


def wait_for_line(lines: queue.Queue, start: str, timeout: float) -> str:
    """Everything read up to and including the first line holding `start` (fails after `timeout` s)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if start in line:
            return "".join(seen)
    pytest.fail(f"no line with {start!r} after {timeout} s:\n" + "".join(seen))


@pytest.mark.slow
def test_a_killed_tritonserver_is_restarted_and_no_request_is_lost(two_versions, tmp_path):
    """SIGKILL tritonserver twice under the four loads: `aigis serve` restarts it on the same port and version,
    and every request is answered exactly once (the clients retry until their deadline)."""
    repo, images, expected = two_versions["repo"], two_versions["images"], two_versions["expected"]
    process, lines, served = start_aigis_serve(repo, tmp_path, key="test-key")
    stop = threading.Event()
    try:
        assert "model    lorax (versions" in served["text"]
        stop, tallies, threads = start_loads(served["grpc_url"], images, TASKS, expected,
                                             names=("client, lorax", "asyncio client, lorax_bytes"))
        pid, recovered = served["pid"], []
        for kill in range(1, KILLS + 1):
            time.sleep(1.5)
            before = {name: t.answered for name, t in tallies.items()}
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            text = wait_for_line(lines, f"restart {kill}: serving again", 120)
            pid = int(re.findall(r"serving again \(pid (\d+)\)", text)[-1])
            # recovered = the first answers after the kill, on both loads
            poll(lambda: {name: t.answered for name, t in tallies.items()},
                 lambda now: all(now[name] > before[name] + 8 for name in now), timeout=60)
            recovered.append(time.monotonic() - killed_at)
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        process.send_signal(signal.SIGTERM)
        rest = wait_for_line(lines, "stopped (tritonserver exit status", 60)
        assert process.wait(timeout=60) == 0 and f"{KILLS} restart{'s' if KILLS != 1 else ''})" in rest, rest
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    for name, tally in tallies.items():
        assert not tally.failed, f"{name}: {sum(tally.failed.values())} failed: {dict(tally.failed)}"
        assert not tally.misread, f"{name}: misread {tally.misread[:3]}"
        assert tally.answered == tally.sent > 0, name
    log = (tmp_path / "server.log").read_text()
    assert f"restart {KILLS}: serving again" in log
    print(f"{KILLS} kills; back to answering after {', '.join(f'{s:.1f}' for s in recovered)} s")
