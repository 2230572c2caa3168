"""Nodes on a shared Redis registry: direct push across nodes (DESIGN 2, 4, 5, 6).

Real redis-server processes on free ports, real nodes (in this process, or as
``pushy serve`` processes where one must be killed), real WebSocket clients
and real HTTP. Every timing is scaled by ``pushy.testing.TIME_UNIT``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pushy
import pytest
from conftest import FLEET_TTL as TTL
from conftest import stop_process
from pushy import Cluster, DeviceClient, Node, PushClient
from pushy.testing import (
    TEST_SECRET,
    RedisServer,
    async_wait_until,
    scaled,
    token_for,
)

DeviceFactory = Callable[..., Awaitable[DeviceClient]]
NodeFactory = Callable[..., Node]



def record(redis: RedisServer, device: str) -> list[str] | None:
    """The registry record of ``device``: [node, peer, conn, at, account]."""
    value = redis.command("GET", f"pushy:dev:{{{device}}}")
    return None if value is None else value.split("\t")


async def push_via(node: Node, device: str, data: Any) -> pushy.PushResult:
    async with PushClient(node.push_url) as client:
        return await client.apush(device, data)


# Direct push across nodes.


async def test_device_on_a_gets_pushes_sent_through_b_and_through_push_client(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
) -> None:
    a, b = fleet("node-a"), fleet("node-b")
    tv = await device_factory("tv-1", node=a)

    via_b = await push_via(b, "tv-1", {"n": 1})
    with PushClient(redis=redis_server.url) as client:
        direct = await client.apush("tv-1", {"n": 2})
        sync = await asyncio.to_thread(client.push, "tv-1", {"n": 3})
        many = await asyncio.to_thread(client.push_many, [("tv-1", 4), ("ghost", 5)])

    assert (via_b.code, via_b.status, via_b.node) == (200, "delivered", "node-a")
    assert (direct.code, direct.node) == (200, "node-a")
    assert (sync.code, sync.node) == (200, "node-a")
    assert [(r.code, r.node) for r in many] == [(200, "node-a"), (404, None)]
    received = [(await tv.wait_for("push"))["data"] for _ in range(4)]
    assert received == [{"n": 1}, {"n": 2}, {"n": 3}, 4]
    fleet_stats = b.stats()["fleet"]
    assert fleet_stats["forwarded"] >= 1 and fleet_stats["redis"] == "up"


async def test_push_to_an_unknown_device_through_any_node_is_404(
    fleet: Callable[..., Node], redis_server: RedisServer
) -> None:
    b = fleet("node-b")

    via_b = await push_via(b, "nobody", 1)
    with PushClient(redis=redis_server.url) as client:
        direct = await client.apush("nobody", 1)

    assert (via_b.code, via_b.status) == (404, "not_connected")
    assert (direct.code, direct.status) == (404, "not_connected")


async def test_client_ack_across_nodes_waits_for_the_device_or_answers_504(
    fleet: Callable[..., Node], device_factory: DeviceFactory
) -> None:
    a, b = fleet("node-a"), fleet("node-b")
    tv = await device_factory("tv-1", node=a)

    async with PushClient(b.push_url) as client:
        pending = asyncio.create_task(
            client.apush("tv-1", "ack me", ack="client", timeout=scaled(5))
        )
        push = await tv.wait_for("push")
        await tv.ack(push["id"])
        acked = await pending
        silent = await client.apush("tv-1", "ignore me", ack="client", timeout=0.3)

    assert (acked.code, acked.node) == (200, "node-a")
    assert (silent.code, silent.status) == (504, "timeout")


# The record and its TTL.


async def test_record_has_a_ttl_that_is_refreshed_and_goes_on_disconnect(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
) -> None:
    a = fleet("node-a")
    tv = await device_factory("tv-1", node=a, account="home")
    key = "pushy:dev:{tv-1}"

    rec = record(redis_server, "tv-1")
    assert rec is not None
    assert rec[0] == "node-a"
    assert rec[1] == a.peer_address
    assert rec[4] == "home"
    assert 0 < redis_server.command("PTTL", key) <= TTL * 1000
    # Well past one TTL later the record is still there: it was refreshed.
    await asyncio.sleep(TTL * 1.5)
    assert 0 < redis_server.command("PTTL", key) <= TTL * 1000
    assert record(redis_server, "tv-1") == rec
    assert a.stats()["fleet"]["refreshed"] >= 1

    await tv.close()
    assert await async_wait_until(
        lambda: record(redis_server, "tv-1") is None,
        message="the record removed on disconnect",
    )


async def test_node_directory_names_each_node_with_its_peer_address(
    fleet: Callable[..., Node], redis_server: RedisServer
) -> None:
    a = fleet("node-a")

    assert redis_server.command("GET", "pushy:node:node-a") == a.peer_address
    assert 0 < redis_server.command("PTTL", "pushy:node:node-a") <= TTL * 1000
    a.stop()
    assert redis_server.command("GET", "pushy:node:node-a") is None


async def test_key_prefix_is_configurable(
    redis_server: RedisServer,
    pushy_node_factory: NodeFactory,
    device_factory: DeviceFactory,
) -> None:
    a = pushy_node_factory(node_id="a", redis=redis_server.url, redis_prefix="app1:")
    await device_factory("tv-1", node=a)

    assert redis_server.command("EXISTS", "app1:dev:{tv-1}") == 1
    assert redis_server.command("EXISTS", "pushy:dev:{tv-1}") == 0
    with PushClient(redis=redis_server.url, prefix="app1:") as client:
        assert (await client.apush("tv-1", 1)).delivered
    with PushClient(redis=redis_server.url) as other:
        assert (await other.apush("tv-1", 1)).code == 404


# One connection per device, across nodes.


async def test_connecting_on_b_closes_the_connection_on_a_with_4001(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
) -> None:
    a, b = fleet("node-a"), fleet("node-b")
    old = await device_factory("tv-1", node=a)

    new = await device_factory("tv-1", node=b)

    assert await old.wait_closed(timeout=scaled(5)) == 4001
    assert record(redis_server, "tv-1")[0] == "node-b"  # type: ignore[index]
    via_a = await push_via(a, "tv-1", "to the new one")
    assert (via_a.code, via_a.node) == (200, "node-b")
    assert (await new.wait_for("push"))["data"] == "to the new one"


async def test_simultaneous_connections_on_two_nodes_leave_exactly_one_open(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
) -> None:
    # A long TTL: the periodic refresh (every third of it) must not be what
    # closes the extra connections.
    a = fleet("node-a", registry_ttl_s=60.0)
    b = fleet("node-b", registry_ttl_s=60.0)

    async def still_open_after(client: pushy.DeviceClient, seconds: float) -> bool:
        try:
            assert await client.wait_closed(timeout=seconds) == 4001
            return False
        except TimeoutError:
            return True

    devices = [f"tv-{i}" for i in range(40)]
    clients = await asyncio.gather(
        *(device_factory(d, node=node) for d in devices for node in (a, b, a, b))
    )
    left = await asyncio.gather(*(still_open_after(c, scaled(2)) for c in clients))

    for i, device in enumerate(devices):
        mine = clients[4 * i : 4 * i + 4]
        still = [c for c, open_ in zip(mine, left[4 * i : 4 * i + 4]) if open_]
        assert len(still) == 1, f"{device}: {len(still)} connections open"
        assert record(redis_server, device)[0] == still[0].node  # type: ignore[index]


@pytest.mark.parametrize("race", [False, True])
async def test_late_cleanup_of_the_old_connection_never_removes_the_new_record(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
    race: bool,
) -> None:
    a, b = fleet("node-a"), fleet("node-b")
    old = await device_factory("tv-1", node=a)

    if race:
        # The old socket closes while the new connection registers.
        new_task = asyncio.create_task(device_factory("tv-1", node=b))
        await old.close()
        new = await new_task
    else:
        new = await device_factory("tv-1", node=b)
        await old.wait_closed(timeout=scaled(5))
    # Give every cleanup time to reach Redis, then some.
    await asyncio.sleep(scaled(0.5))

    assert record(redis_server, "tv-1")[0] == "node-b"  # type: ignore[index]
    for node in (a, b):
        result = await push_via(node, "tv-1", node.node_id)
        assert (result.code, result.node) == (200, "node-b")
    assert [(await new.wait_for("push"))["data"] for _ in range(2)] == [
        "node-a",
        "node-b",
    ]


# Node and Redis failures.


async def test_killed_node_records_expire_and_its_devices_are_reachable_elsewhere(
    redis_server: RedisServer,
) -> None:
    ttl = 2.0
    with (
        Cluster(1, redis_server.url, secret=TEST_SECRET, name="a",
                registry_ttl_s=ttl) as a,
        Cluster(1, redis_server.url, secret=TEST_SECRET, name="b",
                registry_ttl_s=ttl) as b,
        PushClient(redis=redis_server.url) as client,
    ):
        devices = [DeviceClient(a.url, token_for(f"d{i}")) for i in range(5)]
        for d in devices:
            await d.connect()
        assert (await client.apush("d0", "before")).node == "a-0"

        a.nodes[0].kill()
        killed = time.monotonic()
        # Meanwhile pushes answer quickly, 404 or 503, never hang.
        while record(redis_server, "d0") is not None:
            started = time.monotonic()
            result = await client.apush("d0", "meanwhile")
            assert result.code in (404, 503), result
            assert time.monotonic() - started < scaled(1)
            assert time.monotonic() - killed < ttl + scaled(2), "record did not expire"
            await asyncio.sleep(0.1)
        # The others were refreshed in the same round, a moment apart.
        assert await async_wait_until(
            lambda: all(record(redis_server, f"d{i}") is None for i in range(5)),
            scaled(1), message="every record expired",
        )

        # The devices reconnect elsewhere; pushes reach them there.
        moved = [DeviceClient(b.url, token_for(f"d{i}")) for i in range(5)]
        for d in moved:
            await d.connect()
        results = [await client.apush(f"d{i}", "after") for i in range(5)]
        assert [(r.code, r.node) for r in results] == [(200, "b-0")] * 5
        for d in moved:
            assert (await d.wait_for("push"))["data"] == "after"
            await d.close()
        for d in devices:
            await d.close()


@pytest.mark.timeout(scaled(60))
async def test_push_to_a_stalled_node_is_answered_504_and_never_delivered_late(
    redis_server: RedisServer,
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory(1, redis_server.url)
    (node,) = cluster.nodes
    assert node.process is not None
    async with (
        PushClient(redis=redis_server.url, timeout=1.0) as client,
        DeviceClient(cluster.url, token_for("tv")) as tv,
    ):
        assert (await client.apush("tv", "warm")).code == 200
        assert (await tv.wait_for("push", timeout=scaled(5)))["data"] == "warm"

        stop_process(node.process)
        try:
            result = await client.apush("tv", "late")
            assert result.code == 504, result
            await asyncio.sleep(scaled(1.0))
        finally:
            node.process.send_signal(signal.SIGCONT)

        # Woken up past the push's deadline, the node does not deliver it.
        assert (await client.apush("tv", "after")).code == 200
        assert (await tv.wait_for("push", timeout=scaled(5)))["data"] == "after"
        await tv.ping(timeout=scaled(5))
        with pytest.raises(TimeoutError):
            await tv.receive(timeout=scaled(0.2))


async def test_redis_outage_keeps_devices_and_local_pushes_then_reregisters_all(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
) -> None:
    a, b = fleet("node-a"), fleet("node-b")
    devices = [await device_factory(f"d{i}", node=a) for i in range(20)]

    redis_server.stop()
    await async_wait_until(
        lambda: a.stats()["fleet"]["redis"] == "down", message="redis seen down"
    )
    outage_end = time.monotonic() + scaled(10)
    while time.monotonic() < outage_end:
        # Same-node pushes deliver; a push for a device whose route B has
        # not cached (so it needs the registry) answers 503.
        local = await push_via(a, "d1", "local")
        assert (local.code, local.node) == (200, "node-a")
        cross = await push_via(b, f"d{int(time.monotonic() * 10) % 10 + 10}", "x")
        assert (cross.code, cross.status) == (503, "unavailable"), cross
        await asyncio.sleep(scaled(1))
    assert all(d.connected for d in devices)

    redis_server.start()  # empty, on the same port
    restarted = time.monotonic()
    await async_wait_until(
        lambda: all(record(redis_server, f"d{i}") for i in range(20)),
        timeout=scaled(5),
        message="every device registered again",
    )
    assert time.monotonic() - restarted < scaled(5)
    assert a.stats()["fleet"]["reregistered"] >= 20
    cross = await push_via(b, "d19", "after")
    assert (cross.code, cross.node) == (200, "node-a")


def test_unreachable_redis_at_start_is_reported_and_retried(
    pushy_node_factory: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    redis = RedisServer()  # a free port, nothing listening yet
    node = pushy_node_factory(node_id="early", redis=redis.url, registry_ttl_s=TTL)
    assert any("not reachable" in r.getMessage() for r in caplog.records)
    assert node.running
    with redis:
        from pushy.testing import wait_until

        wait_until(
            lambda: node.stats()["fleet"]["redis"] == "up",
            timeout=scaled(5),
            message="the node connected to redis",
        )


def test_wrong_redis_url_or_password_is_a_clear_config_error(
    redis_server: RedisServer,
) -> None:
    with pytest.raises(pushy.ConfigError, match="port"):
        Node(redis="redis://127.0.0.1:notaport", secret=TEST_SECRET, port=0,
             push_port=0).start()
    redis_server.command("CONFIG", "SET", "requirepass", "right")
    wrong = redis_server.url.replace("redis://", "redis://:wrong@")
    with pytest.raises(pushy.ConfigError, match="refused"):
        Node(redis=wrong, secret=TEST_SECRET, port=0, push_port=0).start()
    with pytest.raises(pushy.ConfigError, match="password"):
        Node(redis=redis_server.url, secret=TEST_SECRET, port=0, push_port=0).start()
    with pytest.raises(pushy.ConfigError, match="refused"):
        PushClient(redis=wrong)
