"""Connection lifecycle (DESIGN 3, 6, 7; issue 6): lifetimes, drains,
admission, slow consumers, half-open connections, a node killed.

Real nodes (in this process, or ``pushy serve`` processes where one must
exit or be killed), a real redis-server, real WebSocket clients. Every
timing is scaled by ``pushy.testing.TIME_UNIT``; waits poll with deadlines.
The measured figures are printed (``-s``) and appended to the file named by
``PUSHY_REPORT`` when it is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pushy
import pytest
from conftest import SANITIZED, fetch_stats, report, rss_kib, stop_process
from fleet_devices import Devices
from pushy import Cluster, DeviceClient, Node, PushClient
from pushy.testing import (
    TEST_SECRET,
    RedisServer,
    async_wait_until,
    scaled,
    token_for,
    wait_until,
)
from wsraw import RawWebSocket, upgrade_headers

DeviceFactory = Callable[..., Awaitable[DeviceClient]]
NodeFactory = Callable[..., Node]


def records(redis: RedisServer, names: list[str]) -> list[str | None]:
    """The node id in each device's registry record (``None``: no record)."""
    values = redis.command("MGET", *(f"pushy:dev:{{{n}}}" for n in names))
    return [None if v is None else v.split("\t", 1)[0] for v in values]


def post_drain(push_url: str, body: str | bytes | None) -> httpx.Response:
    return httpx.post(
        f"{push_url}/v1/drain", content=body, timeout=scaled(5), trust_env=False
    )


# Lifetime.


async def test_pushes_during_lifetime_switches_are_delivered_or_refused_never_lost(
    fleet: Callable[..., Node], redis_server: RedisServer
) -> None:
    # Two nodes on one device port: each new connection lands on either.
    lifetime = {"lifetime_s": scaled(1), "reconnect_grace_s": scaled(2)}
    a = fleet("a", reuse_port=True, **lifetime)
    fleet("b", port=a.port, reuse_port=True, **lifetime)
    device = DeviceClient(a.url, token_for("tv-1"), reconnect=True, auto_ack=True)
    await device.connect()
    received: list[int] = []

    async def read() -> None:
        with contextlib.suppress(pushy.ConnectionClosed):
            while True:
                message = await device.receive()
                if message["t"] == "push":
                    received.append(message["data"]["n"])

    reader = asyncio.create_task(read())
    results: dict[int, pushy.PushResult] = {}
    try:
        with PushClient(redis=redis_server.url, timeout=scaled(5)) as client:
            n = 0
            while device.reconnects < 4:
                ack = "written" if n % 2 == 0 else "client"
                results[n] = await client.apush(
                    "tv-1", {"n": n}, ack=ack, timeout=scaled(2)
                )
                n += 1
                await asyncio.sleep(0.002)  # a steady flow, not a flood
                assert n < 100_000, "the device never reconnected"
        delivered = {n for n, r in results.items() if r.code == 200}
        await async_wait_until(
            lambda: delivered <= set(received),
            timeout=scaled(5),
            message="every push answered 200 to reach the device",
        )
    finally:
        await device.close()
        reader.cancel()

    codes = Counter(r.code for r in results.values())
    assert set(codes) <= {200, 404, 409, 503}, codes
    assert codes[200] >= 0.9 * len(results), codes
    assert len(received) == len(set(received)), "a push arrived twice"
    nodes = {r.node for r in results.values() if r.code == 200}
    report(
        f"lifetime switches: {device.reconnects} reconnects, {len(results)} pushes, "
        f"codes {dict(codes)}, delivered by {sorted(nodes)}"
    )


async def test_device_that_ignores_its_reconnect_is_closed_1001_after_the_grace(
    pushy_node_factory: NodeFactory, device_factory: DeviceFactory
) -> None:
    lifetime, grace = scaled(0.5), scaled(0.5)
    node = pushy_node_factory(lifetime_s=lifetime, reconnect_grace_s=grace)
    device = await device_factory("tv-1", node=node)

    await device.wait_for("reconnect", timeout=lifetime + scaled(2))
    asked = time.monotonic()
    code = await device.wait_closed(timeout=grace + scaled(2))
    waited = time.monotonic() - asked

    assert (code, device.close_reason) == (1001, "reconnect requested")
    assert grace - 0.05 <= waited <= grace + scaled(0.5), waited
    stats = await async_wait_until(
        lambda: (s := node.stats())["connections_closed"] == 1 and s
    )
    assert stats["reconnects"] == {"lifetime": 1, "drain": 0}
    assert stats["reconnect_grace_closes"] == 1
    assert stats["connections"] == 0 and stats["connections_opened"] == 1


async def test_reconnecting_client_moves_to_a_new_connection_at_its_lifetime(
    pushy_node_factory: NodeFactory,
) -> None:
    node = pushy_node_factory(lifetime_s=scaled(0.5), reconnect_grace_s=scaled(5))
    device = DeviceClient(node.url, token_for("tv-1"), reconnect=True)
    first = await device.connect()
    try:
        assert (await device.wait_for("reconnect", timeout=scaled(3)))["reason"] == (
            "lifetime"
        )
        await async_wait_until(lambda: device.reconnects == 1)
        # The old connection was superseded (4001), not left to the grace.
        stats = await async_wait_until(
            lambda: (s := node.stats())["connections_closed"] >= 1 and s
        )
        assert stats["rejects"]["superseded"] == 1
        assert stats["reconnect_grace_closes"] == 0
        assert device.connected and device.hello is not first
        async with PushClient(node.push_url) as client:
            assert (await client.apush("tv-1", "after")).delivered
        assert (await device.wait_for("push", timeout=scaled(5)))["data"] == "after"
    finally:
        assert await device.close() == 1000
    assert device.close_code == 1000
    with pytest.raises(pushy.ConnectionClosed):
        await device.receive(timeout=scaled(1))


# Drain: the small things.


def test_drain_request_is_checked_and_a_second_one_is_409(
    pushy_node_factory: NodeFactory, raw_device: Callable[..., Any]
) -> None:
    node = pushy_node_factory(reconnect_grace_s=scaled(3))
    ws, _ = raw_device(node, "stays")  # ignores its reconnect: keeps the drain on
    url = node.push_url

    bad = {
        b"{": "body is not valid JSON",
        b"[1]": "body must be a JSON object",
        b'{"over_s":-1}': "over_s must be a number from 0 to 86400",
        b'{"over_s":86401}': "over_s must be a number from 0 to 86400",
        b'{"over_s":"5"}': "over_s must be a number from 0 to 86400",
    }
    for body, error in bad.items():
        response = post_drain(url, body)
        assert (response.status_code, response.json()) == (400, {"error": error}), body
    got = httpx.get(f"{url}/v1/drain", timeout=scaled(5), trust_env=False)
    assert got.status_code == 405
    assert not node.draining

    started = post_drain(url, b'{"over_s":5}')
    again = post_drain(url, b'{"over_s":1}')

    assert started.status_code == 202, started.text
    assert started.json() == {
        "status": "draining",
        "node": node.node_id,
        "over_s": 5,
        "deadline_s": 5 + scaled(3),
        "devices": 1,
    }
    assert again.status_code == 409
    assert again.json() == {"error": "node is already draining or stopping"}
    assert node.draining
    assert node.drain(1) is False  # already draining
    assert ws.recv_message()["reason"] == "drain"


def test_drain_of_a_node_that_is_not_running_returns_false() -> None:
    node = Node(host="127.0.0.1", port=0, push_port=0, secret=TEST_SECRET)
    assert node.drain(1) is False  # never started
    node.start()
    node.stop()
    assert node.drain(1) is False
    assert not node.draining
    with pytest.raises(pushy.ConfigError, match="over_s must be a number"):
        node.drain(-1)


async def test_drain_refuses_new_devices_and_reports_its_progress_in_stats(
    pushy_node_factory: NodeFactory, raw_device: Callable[..., Any]
) -> None:
    grace, over, close = scaled(1), scaled(2), scaled(0.5)
    node = pushy_node_factory(reconnect_grace_s=grace, close_timeout_s=close)
    sockets = [raw_device(node, f"d{i}")[0] for i in range(4)]
    assert fetch_stats(node)["drain"] == {
        "draining": False,
        "over_s": 0,
        "elapsed_s": 0,
        "deadline_s": 0,
        "devices": 0,
        "left": 0,
    }

    # `late` is accepted before the drain (the node accepts in order, and
    # the device opened after it has its hello) but upgrades after it.
    late = RawWebSocket(node.host, node.port)
    sockets.append(raw_device(node, "d4")[0])

    assert httpx.get(f"{node.push_url}/healthz", trust_env=False).status_code == 200
    assert node.drain(over) is True
    drain = fetch_stats(node)["drain"]
    health = httpx.get(f"{node.push_url}/healthz", trust_env=False)
    assert (health.status_code, health.json()["status"]) == (503, "draining")
    with late:
        refused = late.upgrade(upgrade_headers(node.host, token=token_for("late")))
    # The device port no longer listens.
    def port_refuses() -> bool:
        try:
            RawWebSocket(node.host, node.port, timeout=scaled(2)).close()
        except OSError:
            return True
        return False

    wait_until(port_refuses, message="the device port to stop listening")

    assert refused.status == 503 and refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": "node is draining"}
    assert drain["draining"] is True
    assert (drain["over_s"], drain["deadline_s"]) == (over, over + grace)
    assert drain["devices"] == 5 and drain["left"] == 5
    assert 0 <= drain["elapsed_s"] < over
    # The five messages are spread evenly over `over`: 0, 1/5, ..., 4/5.
    arrivals = []
    started = time.monotonic()
    for ws in sockets:
        assert ws.recv_message(timeout=over + scaled(1)) == {
            "t": "reconnect",
            "in_ms": 0,
            "reason": "drain",
        }
        arrivals.append(time.monotonic() - started)
    assert arrivals[-1] >= 0.8 * over - scaled(0.25), arrivals
    stats = fetch_stats(node)
    assert stats["rejects"]["draining"] == 1
    assert stats["reconnects"]["drain"] == 5
    # None leaves: each is closed a grace after its message, and given
    # close_timeout_s to answer the close (these never do); then it stops.
    assert await asyncio.to_thread(node.wait_stopped, over + grace + close + scaled(2))
    assert time.monotonic() - started <= over + grace + close + scaled(0.5)
    after = node.stats()
    assert after["reconnect_grace_closes"] == 5
    assert after["drain"]["left"] == 0


async def test_reconnecting_client_waits_the_retry_after_of_a_refusal(
    pushy_node_factory: NodeFactory, stats: Callable[[Node], dict[str, Any]]
) -> None:
    # One upgrade a century after the first: the device's reconnects (its
    # lifetime ends at once) are refused with 503 Retry-After: 1.
    node = pushy_node_factory(
        accept_rate=1e-9, accept_burst=1, lifetime_s=scaled(0.3),
        reconnect_grace_s=scaled(4) + 3,
    )
    device = DeviceClient(node.url, token_for("tv-1"), reconnect=True)
    await device.connect()
    try:
        await device.wait_for("reconnect", timeout=scaled(2))
        times = []
        for count in (1, 2, 3):
            await async_wait_until(
                lambda c=count: stats(node)["rejects"]["accept_rate"] >= c,
                timeout=scaled(4),
                interval=0.005,
            )
            times.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # Retry-After 1 times a factor in [1, 1.5), and a poll's slack.
        assert all(0.95 <= g <= 1.5 + scaled(0.3) for g in gaps), gaps
        assert device.connected  # the old connection is still read
    finally:
        await device.close()
        await node.astop()


async def test_adrain_moves_a_reconnecting_device_to_the_other_node(
    fleet: Callable[..., Node], redis_server: RedisServer
) -> None:
    a = fleet("a", reuse_port=True, reconnect_grace_s=scaled(5))
    device = DeviceClient(a.url, token_for("tv-1"), reconnect=True)
    await device.connect()
    b = fleet("b", port=a.port, reuse_port=True)
    try:
        assert device.node == "a"

        assert await a.adrain(scaled(0.5)) is True

        assert not a.running
        await async_wait_until(lambda: device.node == "b" and device.connected)
        assert redis_server.command("GET", "pushy:dev:{tv-1}").startswith("b\t")
        assert device.reconnects >= 1
        stats = a.stats()
        assert stats["reconnect_grace_closes"] == 0  # it left on its own
        assert stats["rejects"]["superseded"] == 1
        assert b.connections == 1
    finally:
        await device.close()


# Drain at scale.


@pytest.mark.timeout(scaled(240))
async def test_drain_of_2000_devices_spreads_reconnects_evenly_and_moves_all(
    redis_server: RedisServer, cluster_factory: Callable[..., Cluster]
) -> None:
    over, grace = 5.0, scaled(5)
    cluster = cluster_factory(2, redis=redis_server.url, reconnect_grace_s=grace)
    drained, other = cluster.nodes
    other.stop()  # every device on the node that will drain
    names = [f"dev-{i}" for i in range(2000)]
    devices = Devices(cluster.url, names)
    await devices.start(timeout=scaled(90))
    try:
        assert devices.nodes() == {"node-0": 2000}
        await asyncio.to_thread(other.start, scaled(20))

        assert drained.push_url is not None
        started = time.monotonic()
        response = await asyncio.to_thread(
            post_drain, drained.push_url, f'{{"over_s":{over}}}'
        )
        assert response.status_code == 202, response.text
        assert response.json()["devices"] == 2000
        exit_code = await asyncio.to_thread(drained.join, over + grace + scaled(30))
        exited = time.monotonic() - started
        await async_wait_until(
            lambda: devices.nodes() == {"node-1": 2000},
            timeout=scaled(60),
            message="every device on node-1",
        )
        moved = time.monotonic() - started
        await async_wait_until(
            lambda: set(records(redis_server, names)) == {"node-1"},
            timeout=scaled(10),
            message="every record naming node-1",
        )
    finally:
        await devices.stop()

    asked = [times[0][0] - started for times in devices.asked.values()]
    reasons = {reason for times in devices.asked.values() for _, reason in times}
    per_second = Counter(int(t) for t in asked)
    seconds = max(1, math.ceil(over))
    mean = len(asked) / seconds
    busiest = max(per_second.values())
    report(
        f"drain of 2,000 devices over {over:g} s: reconnect messages per second "
        f"{[per_second[s] for s in range(max(per_second) + 1)]} (max {busiest}, "
        f"mean {mean:.0f}); node exited after {exited:.2f} s (deadline "
        f"{over + grace:g} s), all on node-1 after {moved:.2f} s"
    )
    assert exit_code == 0, drained.output[-2000:]
    assert len(asked) == 2000 and reasons == {"drain"}
    assert busiest <= 2 * mean, per_second
    assert exited <= over + grace + scaled(2), exited
    assert "drained" in drained.output


# Slow consumers.

#: One push of the slow-consumer test: big enough to fill socket buffers fast.
BIG = "x" * 60_000


@pytest.mark.timeout(scaled(120))
async def test_device_that_stops_reading_is_closed_4003_and_node_memory_stays_flat(
    redis_server: RedisServer, cluster_factory: Callable[..., Cluster]
) -> None:
    cluster = cluster_factory(1, redis=redis_server.url, max_outbound_bytes=256 * 1024)
    [node] = cluster.nodes
    assert node.push_url is not None and node.pid is not None
    timeout = scaled(1)

    async def one_round(client: PushClient, i: int) -> int | None:
        # With max_queue=1 the client stops reading once a message waits.
        device = DeviceClient(cluster.url, token_for(f"slow-{i}"), max_queue=1)
        await device.connect()
        # 9 MB: more than the socket buffers of both ends hold.
        pushes = [client.apush(f"slow-{i}", BIG, timeout=timeout) for _ in range(150)]
        results = await asyncio.gather(*pushes)
        codes = {r.code for r in results}
        assert codes - {200} and codes <= {200, 404, 503, 504}, codes
        with contextlib.suppress(pushy.ConnectionClosed):
            while True:
                await device.receive(timeout=scaled(10))
        return device.close_code

    async with PushClient(node.push_url, timeout=timeout + scaled(5)) as client:
        for i in range(3):  # warm up allocator pools
            assert await one_round(client, i) == 4003
        before = rss_kib(node.pid)
        closes = [await one_round(client, i) for i in range(3, 13)]
        after = rss_kib(node.pid)
        stats = await client.astats()

    assert closes == [4003] * 10
    assert stats["rejects"]["slow_consumer"] >= 13
    assert stats["connections"] == 0
    report(f"slow consumers: 10 rounds of 9 MB, node RSS {before} -> {after} KiB")
    if not SANITIZED:
        assert after - before < 8 * 1024, f"node RSS grew by {after - before} KiB"


# Half-open connections.

#: A device in a process of its own: a websockets client that prints its
#: hello, then reads (and answers pings) until the end.
DEVICE_SCRIPT = """
import sys
from websockets.sync.client import connect
with connect(sys.argv[1], subprotocols=["pushy.v1"], ping_interval=None,
             additional_headers={"Authorization": "Bearer " + sys.argv[2]}) as ws:
    print(ws.recv(), flush=True)
    for _ in ws:
        pass
"""


def test_stopped_device_process_is_forgotten_within_heartbeat_and_pong_timeout(
    fleet: Callable[..., Node], redis_server: RedisServer
) -> None:
    heartbeat, pong_timeout = scaled(0.5), scaled(0.5)
    node = fleet("a", heartbeat_s=heartbeat, pong_timeout_s=pong_timeout)
    process = subprocess.Popen(
        [sys.executable, "-c", DEVICE_SCRIPT, node.url, token_for("tv-1")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert '"t":"hello"' in process.stdout.readline()
        assert redis_server.command("EXISTS", "pushy:dev:{tv-1}") == 1
        # It answers pings while it runs.
        wait_until(lambda: node.stats()["pings_sent"] >= 3, timeout=scaled(5))
        assert node.connections == 1

        stop_process(process)
        stopped = time.monotonic()
        wait_until(
            lambda: (
                node.connections == 0
                and redis_server.command("EXISTS", "pushy:dev:{tv-1}") == 0
            ),
            timeout=heartbeat + pong_timeout + scaled(3),
            interval=0.005,
            message="the stopped device's connection and record to go",
        )
        gone = time.monotonic() - stopped
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()

    report(
        f"SIGSTOP of a device: connection and record gone after {gone:.2f} s "
        f"(heartbeat_s {heartbeat:g} + pong_timeout_s {pong_timeout:g})"
    )
    assert gone <= heartbeat + pong_timeout + scaled(0.3), gone
    assert node.stats()["rejects"]["pong_timeout"] == 1


# A node killed.


@pytest.mark.timeout(scaled(400))
async def test_devices_of_a_killed_node_are_registered_on_the_others(
    redis_server: RedisServer, cluster_factory: Callable[..., Cluster]
) -> None:
    cluster = cluster_factory(3, redis=redis_server.url)
    doomed, *others = cluster.nodes
    for node in others:
        node.stop()  # every device on the node that will be killed
    names = [f"dev-{i}" for i in range(5000)]
    devices = Devices(cluster.url, names, concurrency=50)
    await devices.start(timeout=scaled(180))
    try:
        assert devices.nodes() == {"node-0": 5000}
        for node in others:
            await asyncio.to_thread(node.start, scaled(20))

        killed = time.monotonic()
        await asyncio.to_thread(doomed.kill)
        await async_wait_until(
            lambda: (
                sum(devices.nodes().values()) == 5000
                and "node-0" not in devices.nodes()
            ),
            timeout=scaled(120),
            interval=0.05,
            message="every device connected to another node",
        )
        connected = time.monotonic() - killed
        await async_wait_until(
            lambda: set(records(redis_server, names)) <= {"node-1", "node-2"},
            timeout=scaled(30),
            interval=0.05,
            message="every record naming node-1 or node-2",
        )
        registered = time.monotonic() - killed
        spread = devices.nodes()
    finally:
        await devices.stop()

    report(
        f"SIGKILL of a node with 5,000 devices: all connected elsewhere after "
        f"{connected:.2f} s, all registered after {registered:.2f} s "
        f"({dict(sorted(spread.items()))}, {devices.reconnects} reconnects)"
    )
    assert set(spread) == {"node-1", "node-2"}


# The open-file limit.


def serve_with_file_limit(limit: int, *args: str) -> tuple[subprocess.Popen[str], str, str]:
    """``pushy serve`` with an open-file limit of ``limit`` (soft and hard);
    returns the process and its device and push URLs."""
    from pushy_cli import cli_env

    cmd = ["prlimit", f"--nofile={limit}:{limit}", sys.executable, "-m", "pushy",
           "serve", "--host", "127.0.0.1", "--port", "0", "--push-port", "0",
           "--secret", TEST_SECRET, *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env())
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening" in line, line + proc.stderr.read()
    words = line.split()
    url = next(w.rstrip(",") for w in words if w.startswith("ws://"))
    push_url = next(w.rstrip(",") for w in words if w.startswith("http://"))
    return proc, url, push_url


def run_loadgen(url: str, count: int, tmp: Any, rate: int = 2000) -> dict[str, Any]:
    from pushy.bench import loadgen_path

    tokens = tmp / "tokens.txt"
    tokens.write_text("".join(f"{token_for(f'fd{i}')}\n" for i in range(count)))
    port = url.rsplit(":", 1)[1].split("/")[0]
    done = subprocess.run(
        [loadgen_path(), "--port", port, "--connections", str(count), "--rate",
         str(rate), "--hold-s", "0.5", "--handshake-timeout-s", str(scaled(5)),
         "--tokens", str(tokens), "--json"],
        capture_output=True, text=True, timeout=scaled(60), check=False,
    )  # fmt: skip
    import json

    return dict(json.loads(done.stdout))


def test_devices_beyond_what_the_file_limit_leaves_get_503(tmp_path: Any) -> None:
    # 300 files: the node keeps 64 + 75 (a quarter, for upgrades in
    # progress) and takes 161 devices; the rest are refused 503, and the
    # push API still answers.
    proc, url, push_url = serve_with_file_limit(300)
    try:
        report_ = run_loadgen(url, 200, tmp_path)
        assert report_["connected"] == 161, report_
        assert report_["failed_by_reason"] == {"http_503": 39}
        stats = httpx.get(f"{push_url}/v1/stats", timeout=scaled(5)).json()
        assert stats["rejects"]["too_many_connections"] == 39
        assert stats["rejects"]["out_of_files"] == 0
    finally:
        proc.terminate()
        proc.communicate(timeout=scaled(30))


def test_upgrades_in_progress_fit_in_the_room_the_file_limit_keeps(
    tmp_path: Any,
) -> None:
    # 300 files keep 75 for upgrades in progress. 150 connections that send
    # nothing, then 300 devices: the node holds at most 75 upgrades at once
    # (not the default 1,024), the rest wait in the listen queue, so every
    # device past the 161 gets its 503 and none finds the node out of
    # descriptors.
    proc, url, push_url = serve_with_file_limit(300, "--upgrade-timeout-s", "1")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(150)]
    try:
        report_ = run_loadgen(url, 300, tmp_path, rate=100_000)
        assert report_["connected"] == 161, report_
        assert report_["failed_by_reason"] == {"http_503": 139}, report_
        stats = httpx.get(f"{push_url}/v1/stats", timeout=scaled(5)).json()
        assert stats["rejects"]["out_of_files"] == 0
        assert stats["rejects"]["too_many_connections"] == 139
        assert stats["rejects"]["upgrade_timeout"] == 150
    finally:
        for s in silent:
            s.close()
        proc.terminate()
        proc.communicate(timeout=scaled(30))


def test_connections_past_the_file_limit_are_closed_not_left_hanging(
    tmp_path: Any,
) -> None:
    # max_connections above what 300 files allow: the node warns at start;
    # connections it cannot accept are closed at once (the clients see a
    # reset, not a silence), counted out_of_files, and the node recovers.
    proc, url, push_url = serve_with_file_limit(300, "--max-connections", "1000")
    try:
        report_ = run_loadgen(url, 400, tmp_path)
        failed = report_["failed_by_reason"]
        assert report_["connected"] + sum(failed.values()) == 400
        assert failed and not any(k.startswith("timeout") for k in failed), failed
        stats = httpx.get(f"{push_url}/v1/stats", timeout=scaled(5)).json()
        assert stats["rejects"]["out_of_files"] >= 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=scaled(30))
    assert "is above what the open-file limit (300) leaves" in err
    assert err.count("out of file descriptors") <= 2
