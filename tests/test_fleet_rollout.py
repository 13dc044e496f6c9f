"""A fleet rollout over two real tritonserver replicas reading one repository, each under a steady load.

`aigis models rollout --url A,B` moves both replicas, one after the other, and the repository's pointer with
them; no request to either replica fails, is lost or is misread (A carries every kind of load: the sync client,
the asyncio client on lorax_bytes, plain tritonclient calls to both ensembles). When a replica dies during a fleet rollout,
the replica already moved goes back, and the pointer with it (the version a restarted replica comes back on, as
tests/test_objectstore.py shows). `aigis models status` shows what each replica serves.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from aigis import contract
from aigis.cli import main as aigis_main
from aigis.client.loadcheck import LOADS as ALL_LOADS
from aigis.client.loadcheck import start_loads
from aigis.export import load_version
from aigis.export.fleet import FleetRolloutError, fleet_rollout, parse_urls
from aigis.export.repository import pointed_version
from aigis.serving.server import TritonServer
from tiny_run import TASKS, two_version_copy

# Replica A carries every kind of load (the sync client's micro-batcher, the asyncio client on lorax_bytes, plain
# tritonclient calls to both ensembles), B the sync client's.
A_LOADS, B_LOADS = tuple(ALL_LOADS), ("client, lorax",)


@pytest.fixture(scope="module")
def fleet_repo(tmp_path_factory, two_version_source) -> dict:
    return two_version_copy(two_version_source, tmp_path_factory.mktemp("fleet"))


def _check(tallies: dict, versions: set[str]) -> None:
    for name, tally in tallies.items():
        assert not tally.failed, f"{name}: {sum(tally.failed.values())} failed: {dict(tally.failed)}"
        assert not tally.misread, f"{name}: misread {tally.misread[:3]}"
        assert tally.answered == tally.sent > 0 and tally.lost == 0, name
        assert set(tally.versions) <= versions, f"{name} saw versions {dict(tally.versions)}"


def _stop(load) -> None:
    stop, _, threads = load
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), f"load {thread.name} did not stop"


def test_endpoint_lists_parse_as_one_fleet():
    assert parse_urls("a:1, b:2,a:1,") == ["a:1", "b:2"] == parse_urls(["a:1", "b:2"])
    with pytest.raises(ValueError, match="no endpoint"):
        parse_urls(" , ")


@pytest.mark.slow
def test_a_fleet_rolls_replica_by_replica_and_back_when_one_dies(fleet_repo, capsys, monkeypatch):
    repo, images, expected = fleet_repo["repo"], fleet_repo["images"], fleet_repo["expected"]
    key = "fleet-test-key"
    monkeypatch.setenv("AIGIS_CONTROL_KEY", key)   # what `aigis models rollout|status` read
    with TritonServer(repo, models=[], control_key=key) as a, TritonServer(repo, models=[], control_key=key) as b:
        for server in (a, b):
            with server.control() as control:
                load_version(control, repo, 2)
        fleet = f"{a.grpc_url},{b.grpc_url}"
        loads = {a.grpc_url: start_loads(a.grpc_url, images, TASKS, expected, A_LOADS),
                 b.grpc_url: start_loads(b.grpc_url, images, TASKS, expected, B_LOADS)}
        time.sleep(1.0)

        # Forward: both replicas move, one after the other, and the pointer with them.
        assert aigis_main(["models", "rollout", "--repo", str(repo), "--url", fleet, "--version", "3"]) == 0
        out = capsys.readouterr().out
        assert f"{a.grpc_url}: ensemble version 2 -> 3" in out and f"{b.grpc_url}: ensemble version 2 -> 3" in out, out
        assert pointed_version(repo, contract.ENSEMBLE_MODEL) == 3
        time.sleep(0.5)
        assert aigis_main(["models", "status", "--url", fleet, "--repo", str(repo), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        for url in (a.grpc_url, b.grpc_url):
            assert status["replicas"][url][contract.ENSEMBLE_MODEL] == ["3"], status
        assert status["repository"][contract.ENSEMBLE_MODEL] == 3

        # B's load saw both versions and lost nothing; then B dies once A has moved back to 2: A goes forward to 3
        # again, and the pointer with it.
        load_b = loads.pop(b.grpc_url)
        _stop(load_b)
        _check(load_b[1], {"2", "3"})
        assert all(set(t.versions) == {"2", "3"} for t in load_b[1].values())
        dead_b = b.pid

        def kill_b(result) -> None:
            if result.url == a.grpc_url:
                os.kill(dead_b, signal.SIGKILL)

        with a.control() as control_a, b.control() as control_b:
            with pytest.raises(FleetRolloutError, match="rolled back") as failed:
                fleet_rollout([(a.grpc_url, control_a), (b.grpc_url, control_b)], repo, 2, after_each=kill_b)
        moved, dead = failed.value.results
        assert moved.rolled_back and (moved.before, moved.after) == (3, 3) and dead.error
        assert pointed_version(repo, contract.ENSEMBLE_MODEL) == 3
        assert aigis_main(["models", "status", "--url", fleet]) == 1
        out = capsys.readouterr().out
        assert f"{b.grpc_url}: unreachable" in out and f"{a.grpc_url}: {contract.ENSEMBLE_MODEL} 3" in out, out

        load_a = loads.pop(a.grpc_url)
        _stop(load_a)
        _check(load_a[1], {"2", "3"})  # every load on A saw the move, the move back and the rollback, losing nothing
        assert all(set(t.versions) == {"2", "3"} for t in load_a[1].values())
        # A replica that does not answer before the start: nothing moves.
        b.stop()  # (what is left of the killed one)
        assert aigis_main(["models", "rollout", "--repo", str(repo), "--url", fleet, "--version", "2"]) == 2
        assert "nothing was moved" in capsys.readouterr().err
        assert pointed_version(repo, contract.ENSEMBLE_MODEL) == 3
        with a.control() as control:
            assert control.is_ready(contract.ENSEMBLE_MODEL, "3")
