"""The client library on a fleet of real tritonserver replicas reading one repository (real gRPC, no mocks).

Three replicas (aigis.serving.server.TritonServer) serve the tiny run's repository: two answer with ensemble
version 2, the third with version 3, as in the middle of a fleet rollout. Where the loopback network allows it,
they listen on one port of 127.0.0.1, 127.0.0.2 and 127.0.0.3, so that a DNS name whose A records are those
three addresses (answered by a stub DNS server here, as a Kubernetes headless Service's name would be) reaches
the whole fleet through one `dns://` target.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from aigis import contract
from aigis.cli import main as aigis_main
from aigis.client import (AsyncAttributionClient, AttributionClient, InvalidInputError, ModelNotFoundError,
                          ProtectionClient, ServerUnavailableError, parse_urls)
from aigis.client.endpoints import Endpoints
from aigis.client.loadcheck import Tally, async_client_load, client_load, png_bytes
from aigis.export import load_version
from aigis.serving.server import TritonServer, free_port
from polling import poll
from tiny_run import TASKS, two_version_copy

KEY = "fleet-client-test-key"
VERSIONS = (2, 2, 3)   # what each replica serves


# ---- a DNS name with several addresses -------------------------------------------------------------------
class StubDNS:
    """A UDP DNS server on 127.0.0.1 answering every A query with `addresses` (gRPC's c-ares resolver asks it
    when the target names it: dns://127.0.0.1:PORT/NAME:PORT)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def target(self, name: str, port: int) -> str:
        return f"dns://127.0.0.1:{self.port}/{name}:{port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self._sock.recvfrom(512)
            except socket.timeout:
                continue
            end = 12
            while query[end]:                      # the question's name: length-prefixed labels, then 0
                end += query[end] + 1
            qtype = struct.unpack(">H", query[end + 1:end + 3])[0]
            records = [b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 1, 4) + socket.inet_aton(address)
                       for address in (self.addresses if qtype == 1 else [])]
            header = struct.pack(">HHHHHH", struct.unpack(">H", query[:2])[0], 0x8180, 1, len(records), 0, 0)
            self._sock.sendto(header + query[12:end + 5] + b"".join(records), peer)
            self.queries += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


def loopback_hosts(count: int) -> list[str] | None:
    """127.0.0.1, .2, ... when this host can bind them all (Linux loopback), else None."""
    hosts = [f"127.0.0.{k + 1}" for k in range(count)]
    try:
        for host in hosts:
            with socket.socket() as sock:
                sock.bind((host, 0))
    except OSError:
        return None
    return hosts


# ---- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory, two_version_source) -> dict:
    return two_version_copy(two_version_source, tmp_path_factory.mktemp("fleet_client"))


@pytest.fixture(scope="module")
def fleet(repo):
    """Three replicas on one repository, serving versions 2, 2 and 3; and the DNS name of all three, when the
    loopback addresses allow it."""
    hosts = loopback_hosts(len(VERSIONS))
    port = free_port()
    servers = [TritonServer(repo["repo"], models=[], control_key=KEY, host=hosts[k] if hosts else "127.0.0.1",
                            grpc_port=port if hosts else free_port(), metrics_port=free_port())
               for k in range(len(VERSIONS))]
    dns = StubDNS(hosts) if hosts and os.environ.get("GRPC_DNS_RESOLVER", "ares") == "ares" else None
    try:
        for server, version in zip(servers, VERSIONS):
            server.start()
            with server.control() as control:
                load_version(control, repo["repo"], version)
        yield {"servers": servers, "urls": [s.grpc_url for s in servers],
               "dns": dns.target("replicas.aigis.test", port) if dns else None}
    finally:
        with ThreadPoolExecutor(len(servers)) as pool:      # each stop waits for its server to unload
            list(pool.map(TritonServer.stop, servers))
        if dns is not None:
            dns.close()


# ---- helpers ---------------------------------------------------------------------------------------------
def successes(url: str, model: str = contract.ENSEMBLE_MODEL) -> int:
    """Requests replica `url` answered for `model` (every version), from its statistics API."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as one:
        stats = one.get_inference_statistics(model, as_json=True)["model_stats"]
    return sum(int(entry.get("inference_stats", {}).get("success", {}).get("count", 0)) for entry in stats)


def per_replica(fleet: dict, model: str = contract.ENSEMBLE_MODEL) -> list[int]:
    return [successes(url, model) for url in fleet["urls"]]


def check_labels(answers: list, indices: list[int], expected: dict[str, list[str]]) -> None:
    for answer, index in zip(answers, indices):
        assert answer.label == expected[answer.model_version][index], (answer.model_version, index)
        assert list(answer.probabilities) == contract.class_names(TASKS[:int(answer.model_version)])


# ---- tests -----------------------------------------------------------------------------------------------
def test_a_string_and_a_list_name_the_same_fleet_and_a_down_endpoint_is_skipped_until_its_back_off_ends():
    assert parse_urls("a:1, b:2,a:1,") == ("a:1", "b:2") == parse_urls(["a:1", "b:2"]) == parse_urls(["a:1,b:2"])
    assert parse_urls("ipv4:10.0.0.1:1,10.0.0.2:1") == ("ipv4:10.0.0.1:1,10.0.0.2:1",)   # gRPC's own list: one
    with pytest.raises(InvalidInputError, match="no endpoint"):
        parse_urls(" , ")
    now = [0.0]
    endpoints = Endpoints("a,b,c", clock=lambda: now[0])
    assert [endpoints.order()[0] for _ in range(6)] == [0, 1, 2, 0, 1, 2]         # round robin
    endpoints.failed(1, ServerUnavailableError("b is gone"))
    assert [endpoints.order()[0] for _ in range(4)] == [0, 2, 0, 2]               # b skipped ...
    assert endpoints.order()[-1] == 1                                             # ... tried last
    now[0] += endpoints.down_s
    assert 1 in [endpoints.order()[0] for _ in range(3)]                          # back after its back-off
    endpoints.failed(1, ServerUnavailableError("still gone"))
    assert endpoints.health()[1].down_for_s == pytest.approx(2 * endpoints.down_s)  # doubled


def test_batches_spread_over_every_replica_and_answers_are_read_with_their_version(fleet, repo):
    images, expected, urls = repo["images"], repo["expected"], fleet["urls"]
    before, before_bytes = per_replica(fleet), per_replica(fleet, contract.BYTES_ENSEMBLE_MODEL)
    with AttributionClient(",".join(urls), max_batch_size=4) as client, AttributionClient(urls) as listed:
        assert client.urls == listed.urls == tuple(urls)
        indices = [[(k * 4 + j) % len(images) for j in range(4)] for k in range(9)]
        answers = [client.attribute(images[batch]) for batch in indices]          # one request each, in turn
    for answer, batch in zip(answers, indices):
        check_labels(answer, batch, expected)
    assert {a.model_version for answer in answers for a in answer} == {"2", "3"}

    async def through_bytes() -> list:
        async with AsyncAttributionClient(list(urls), model=contract.BYTES_ENSEMBLE_MODEL) as aclient:
            return [await aclient.attribute([png_bytes(images[k])]) for k in range(6)]

    bytes_answers = asyncio.run(through_bytes())
    for k, answer in enumerate(bytes_answers):
        check_labels(answer, [k], expected)
    after = poll(lambda: per_replica(fleet), lambda now: sum(now) - sum(before) >= 9)
    after_bytes = poll(lambda: per_replica(fleet, contract.BYTES_ENSEMBLE_MODEL),
                       lambda now: sum(now) - sum(before_bytes) >= 6)
    assert [a - b for a, b in zip(after, before)] == [3, 3, 3]                   # round robin over the three
    assert [a - b for a, b in zip(after_bytes, before_bytes)] == [2, 2, 2]


def test_errors_that_are_the_caller_s_do_not_fail_over(fleet, repo):
    urls = fleet["urls"]
    with AttributionClient(urls, model=contract.BYTES_ENSEMBLE_MODEL) as thin:
        with pytest.raises(InvalidInputError, match="not a readable image"):
            thin.attribute(b"\x89PNG\r\n\x1a\n not really")
        health = thin.health()
    assert sum(h.failed_over for h in health) == 0 and all(h.healthy for h in health)
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError, match=rf"version 9 at {urls[0]} is not loaded"):
        AttributionClient(urls, version=9)
    assert time.monotonic() - started < 2


def test_a_replica_that_stops_answering_costs_one_attempt_s_timeout(fleet, repo):
    """A replica that keeps its connections but never answers (SIGSTOP, as a host cut off the network): the
    request caught there goes to another replica when its attempt times out, and the replica is skipped after."""
    images, expected, victim = repo["images"], repo["expected"], fleet["servers"][0]
    with AttributionClient(fleet["urls"], timeout_s=1.0) as client:
        client.attribute(images[0])                              # connected
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            answers = [client.attribute(images[k]) for k in range(6)]
            elapsed = time.monotonic() - started
            health = client.health()
        finally:
            os.kill(victim.pid, signal.SIGCONT)
    check_labels(answers, list(range(6)), expected)
    assert health[0].failed_over >= 1 and "DeadlineExceededError" in health[0].last_error
    assert [h.failed_over for h in health[1:]] == [0, 0]
    assert 1.0 <= elapsed < 10, elapsed


@pytest.mark.slow
def test_a_replica_killed_under_load_loses_and_fails_nothing(fleet, repo):
    """SIGKILL one replica while steady loads run through the fleet (the sync client's micro-batcher on the
    comma-separated string, the asyncio client on `lorax_bytes` with the list, and the sync client on the DNS
    name); restart it; every request is answered, and the restarted replica gets requests again."""
    images, expected, urls = repo["images"], repo["expected"], fleet["urls"]
    victim = fleet["servers"][1]
    loads = {"client, a,b,c": (client_load, ",".join(urls)), "asyncio client, list": (async_client_load, urls)}
    if fleet["dns"]:
        loads["client, dns name"] = (client_load, fleet["dns"])
    stop, tallies = threading.Event(), {name: Tally() for name in loads}
    threads = [threading.Thread(target=load, args=(url, images, TASKS, expected, stop, tallies[name]), daemon=True)
               for name, (load, url) in loads.items()]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        answered = {name: t.answered for name, t in tallies.items()}
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        poll(lambda: [t.answered for t in tallies.values()],
             lambda now: all(n > answered[name] + 16 for n, name in zip(now, tallies)), timeout=30)
        served_while_down = time.monotonic() - killed_at
        victim.restart()                                     # same ports; then back to its version
        with victim.control() as control:
            load_version(control, repo["repo"], VERSIONS[1])
        back = successes(victim.grpc_url)
        poll(lambda: successes(victim.grpc_url), lambda count: count > back + 3, timeout=30)
        assert successes(victim.grpc_url) > back + 3, "the restarted replica got no requests"
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    for name, tally in tallies.items():
        assert not tally.failed, f"{name}: {dict(tally.failed)}"
        assert not tally.misread, f"{name}: {tally.misread[:3]}"
        assert tally.answered == tally.sent > 0 and tally.lost == 0, name
        assert set(tally.versions) == {"2", "3"}, f"{name}: {dict(tally.versions)}"
    print(f"answered {({n: t.answered for n, t in tallies.items()})}; the others served {served_while_down:.1f} s "
          f"without the killed replica")


@pytest.mark.parametrize("target", ["dns", "ipv4 list"])
def test_a_name_with_several_addresses_is_spread_over_all_of_them(fleet, repo, target):
    """One endpoint, several addresses: a DNS name with three A records, or gRPC's own `ipv4:a,b,c` list."""
    if target == "dns" and not fleet["dns"]:
        pytest.skip("needs 127.0.0.2-3 on the loopback and gRPC's c-ares resolver")
    url = fleet["dns"] if target == "dns" else "ipv4:" + ",".join(fleet["urls"])
    before = per_replica(fleet)
    with AttributionClient(url) as client:
        assert client.urls == (url,)
        for k in range(30):
            index = k % len(repo["images"])
            check_labels([client.attribute(repo["images"][index])], [index], repo["expected"])
    after = poll(lambda: per_replica(fleet), lambda now: sum(now) - sum(before) >= 30)
    assert sum(after) - sum(before) == 30 and all(a > b for a, b in zip(after, before)), (before, after)


def test_every_replica_down_is_one_error_naming_them_all(tmp_path, capsys):
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    named = rf"(?s)^none of 2 endpoints answered \({dead[0]}, {dead[1]}\): .*gave up after \d+ attempts over"

    async def open_async() -> None:
        async with AsyncAttributionClient(dead, deadline_s=1.0):
            pass

    for make in (lambda: AttributionClient(dead, deadline_s=1.0),
                 lambda: ProtectionClient(",".join(dead), deadline_s=1.0), lambda: asyncio.run(open_async())):
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError, match=named) as raised:
            make()
        assert time.monotonic() - started < 3
        assert all(str(raised.value).count(url) >= 2 for url in dead), str(raised.value)   # what each said
    image = tmp_path / "one.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    assert aigis_main(["attribute", str(image), "--url", ",".join(dead), "--deadline", "1", "--quiet"]) == 2
    assert f"at {','.join(dead)}: none of 2 endpoints answered" in capsys.readouterr().err


def test_the_command_takes_a_fleet_and_skips_a_dead_endpoint(fleet, repo, tmp_path):
    images, urls = repo["images"], fleet["urls"]
    paths = []
    for k in range(8):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(images[k]).save(paths[-1])
    before = per_replica(fleet)
    out = tmp_path / "answers.jsonl"
    fleet_url = f"127.0.0.1:{free_port()},{urls[0]},{urls[2]}"            # a dead one first
    assert aigis_main(["attribute", *map(str, paths), "--url", fleet_url, "--out", str(out), "--quiet",
                       "--batch-size", "2", "--in-flight", "1"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in paths]
    assert all(r["label"] == repo["expected"][r["model_version"]][k] for k, r in enumerate(records))
    after = poll(lambda: per_replica(fleet), lambda now: sum(now) - sum(before) >= 4)
    assert after[0] > before[0] and after[2] > before[2] and after[1] == before[1], (before, after)
