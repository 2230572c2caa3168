"""How a node behaves for well-behaved devices and services (DESIGN 3, 4, 6).

Real nodes on free ports, real device clients (:class:`pushy.DeviceClient`)
and real HTTP (:class:`pushy.PushClient`). Every timing is scaled by
``pushy.testing.TIME_UNIT``; waits poll with deadlines.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pushy
import pytest
from pushy import DeviceClient, Node, PushClient
from pushy.testing import TEST_SECRET, async_wait_until, scaled, token_for, wait_until
from wsraw import RawWebSocket

DeviceFactory = Callable[..., Awaitable[DeviceClient]]
NodeFactory = Callable[..., Node]
RawDevice = Callable[..., tuple[RawWebSocket, Any]]


async def device_info(client: PushClient, device: str) -> dict[str, Any]:
    """What the node says of ``device`` (``GET /v1/devices/{id}``)."""
    return await client.adevice(device)


def counters(node: Node) -> dict[str, Any]:
    """The node's counters, read through the Python API."""
    return node.stats()


# The hello message.


async def test_hello_names_device_node_heartbeat_and_reconnect_delay(
    pushy_node_factory: NodeFactory, device_factory: DeviceFactory
) -> None:
    node = pushy_node_factory(heartbeat_s=30, lifetime_s=100)

    device = await device_factory("tv-1", node=node)

    hello = device.hello
    assert hello is not None
    assert hello["t"] == "hello"
    assert hello["device"] == "tv-1"
    assert hello["node"] == node.node_id
    assert hello["heartbeat_s"] == 30
    assert 0 < hello["reconnect_in_s"] <= 100, hello
    assert device.node == node.node_id


# Delivery.


async def test_push_with_ack_written_is_delivered_and_device_gets_the_push_frame(
    pushy_node: Node, device_factory: DeviceFactory, push_client: PushClient
) -> None:
    device = await device_factory("tv-1")

    result = await push_client.apush("tv-1", {"title": "hi"}, ack="written")
    frame = await device.wait_for("push", timeout=scaled(5))

    assert result.status == "delivered"
    assert result.code == 200
    assert result.delivered
    assert result.node == pushy_node.node_id
    assert result.latency > 0
    assert frame["data"] == {"title": "hi"}
    assert frame["ack"] is False
    assert frame["id"] == result.id
    assert frame["from"].startswith("service:")


async def test_push_with_ack_client_stays_pending_until_the_device_acks(
    pushy_node: Node, device_factory: DeviceFactory, push_client: PushClient
) -> None:
    device = await device_factory("tv-1")
    pending = asyncio.create_task(
        push_client.apush("tv-1", {"n": 1}, ack="client", timeout=scaled(10))
    )

    frame = await device.wait_for("push", timeout=scaled(5))
    done, _ = await asyncio.wait({pending}, timeout=scaled(0.3))
    assert not done, "the push was answered before the device acked"
    assert frame["ack"] is True

    await device.ack(frame["id"])
    result = await asyncio.wait_for(pending, scaled(5))

    assert result.code == 200
    assert result.status == "delivered"
    assert result.node == pushy_node.node_id
    assert result.id == frame["id"]


async def test_push_with_ack_client_is_answered_504_when_the_device_never_acks(
    device_factory: DeviceFactory, push_client: PushClient
) -> None:
    device = await device_factory("tv-1")
    timeout = scaled(0.3)

    result = await push_client.apush("tv-1", 1, ack="client", timeout=timeout)

    assert result.code == 504
    assert result.status == "timeout"
    assert not result.delivered
    assert timeout * 0.9 <= result.latency < timeout + scaled(3)
    frame = await device.wait_for("push", timeout=scaled(5))
    assert frame["ack"] is True


async def test_push_to_unknown_device_is_answered_404_not_connected(
    pushy_node: Node, push_client: PushClient
) -> None:
    result = await push_client.apush("nobody", {"x": 1})

    assert result.code == 404
    assert result.status == "not_connected"
    assert not result.delivered


async def test_push_many_returns_one_result_per_push_in_order(
    device_factory: DeviceFactory, push_client: PushClient
) -> None:
    d1 = await device_factory("d1")
    d2 = await device_factory("d2")

    results = await push_client.apush_many(
        [("d1", "first"), ("ghost", "second"), ("d2", "third"), ("d1", "fourth")]
    )

    assert [(r.code, r.status) for r in results] == [
        (200, "delivered"),
        (404, "not_connected"),
        (200, "delivered"),
        (200, "delivered"),
    ]
    got_d1 = [await d1.wait_for("push", timeout=scaled(5)) for _ in range(2)]
    got_d2 = await d2.wait_for("push", timeout=scaled(5))
    assert [m["data"] for m in got_d1] == ["first", "fourth"]
    assert got_d2["data"] == "third"
    assert [results[0].id, results[3].id] == [m["id"] for m in got_d1]
    assert results[2].id == got_d2["id"]


def test_push_many_from_sync_code_delivers_to_raw_devices_in_order(
    pushy_node: Node, raw_device: RawDevice
) -> None:
    ws, _ = raw_device(pushy_node, "d1")

    with PushClient(pushy_node.push_url, timeout=scaled(10)) as client:
        results = client.push_many([("d1", n) for n in range(5)])

    assert [r.status for r in results] == ["delivered"] * 5
    assert [ws.recv_message()["data"] for _ in range(5)] == list(range(5))


# One connection per device.


async def test_newer_connection_of_a_device_supersedes_the_older_with_4001(
    pushy_node: Node, device_factory: DeviceFactory, push_client: PushClient
) -> None:
    older = await device_factory("tv-1")
    before = await device_info(push_client, "tv-1")

    newer = await device_factory("tv-1")
    code = await older.wait_closed(timeout=scaled(5))
    result = await push_client.apush("tv-1", "to the newer")
    frame = await newer.wait_for("push", timeout=scaled(5))
    after = await device_info(push_client, "tv-1")

    assert code == 4001
    assert result.status == "delivered"
    assert frame["data"] == "to the newer"
    assert newer.connected
    assert before["connected"] is True
    assert after["connected"] is True
    assert after["connection"] != before["connection"], (before, after)
    assert counters(pushy_node)["rejects"]["superseded"] >= 1
    assert counters(pushy_node)["connections"] == 1


# Heartbeats.


async def test_device_that_stops_answering_pings_is_closed_and_forgotten(
    pushy_node_factory: NodeFactory,
    device_factory: DeviceFactory,
) -> None:
    heartbeat, pong_timeout = scaled(0.5), scaled(0.5)
    node = pushy_node_factory(heartbeat_s=heartbeat, pong_timeout_s=pong_timeout)
    responsive = await device_factory("alive", node=node)
    started = time.monotonic()
    silent = await device_factory("silent", node=node, respond_to_pings=False)

    await silent.wait_closed(timeout=heartbeat + pong_timeout + scaled(2))
    elapsed = time.monotonic() - started

    assert elapsed <= heartbeat + pong_timeout + scaled(1), elapsed
    async with PushClient(node.push_url, timeout=scaled(10)) as client:
        gone = await async_wait_until(
            lambda: _not_connected(client, "silent"),
            message="the silent device to be forgotten",
        )
        assert gone
        stats = await client.astats()
        assert stats["connections"] == 1
        assert stats["rejects"]["pong_timeout"] >= 1
        assert (await client.apush("silent", 1)).status == "not_connected"

        # The responsive device outlives several heartbeats.
        with pytest.raises(TimeoutError):
            await responsive.wait_closed(timeout=2 * (heartbeat + pong_timeout))
        assert (await client.apush("alive", 1)).status == "delivered"
        assert (await responsive.wait_for("push", timeout=scaled(5)))["data"] == 1
        assert (await client.astats())["pings_sent"] >= 2

        await responsive.close()
        await async_wait_until(
            lambda: _connections(client, 0), message="no connections left"
        )


async def _not_connected(client: PushClient, device: str) -> bool:
    return (await client.adevice(device))["connected"] is False


async def _connections(client: PushClient, count: int) -> bool:
    return (await client.astats())["connections"] == count


# Token lifetime.


async def test_token_expiring_while_connected_closes_the_device_with_4002(
    pushy_node: Node, device_factory: DeviceFactory, push_client: PushClient
) -> None:
    ttl = max(1.0, scaled(1.5))
    started = time.monotonic()
    device = await device_factory("tv-1", ttl=ttl)

    code = await device.wait_closed(timeout=ttl + scaled(3))
    elapsed = time.monotonic() - started

    assert code == 4002
    # exp is rounded up to a whole second.
    assert ttl - 0.1 <= elapsed <= ttl + 1 + scaled(1), elapsed
    assert (await push_client.adevice("tv-1"))["connected"] is False
    assert (await push_client.astats())["rejects"]["token_expired_live"] >= 1


# Connection lifetime.


async def test_device_is_asked_to_reconnect_when_its_lifetime_ends(
    pushy_node_factory: NodeFactory, device_factory: DeviceFactory
) -> None:
    lifetime = scaled(1)
    node = pushy_node_factory(lifetime_s=lifetime)
    started = time.monotonic()
    device = await device_factory("tv-1", node=node)

    message = await device.wait_for("reconnect", timeout=lifetime + scaled(3))
    elapsed = time.monotonic() - started

    assert message["reason"] == "lifetime"
    assert 0 <= message["in_ms"] <= lifetime * 1000
    assert device.hello is not None
    assert device.hello["reconnect_in_s"] <= lifetime
    assert elapsed <= lifetime + scaled(1), elapsed


# Node lifecycle.


async def test_node_stop_closes_connected_devices_with_1001(
    pushy_node_factory: NodeFactory, device_factory: DeviceFactory
) -> None:
    node = pushy_node_factory()
    devices = [await device_factory(f"d{i}", node=node) for i in range(3)]

    started = time.monotonic()
    await node.astop()
    codes = [await d.wait_closed(timeout=scaled(5)) for d in devices]

    assert codes == [1001, 1001, 1001]
    assert not node.running
    assert time.monotonic() - started < node.config.close_timeout_s
    await node.astop()  # stopping again does nothing
    assert not node.running


def test_node_as_context_manager_runs_inside_the_block_only() -> None:
    node = Node(
        host="127.0.0.1", port=0, push_port=0, secret=TEST_SECRET, node_id="cm-node"
    )
    assert not node.running

    with node as same:
        assert same is node
        assert node.running
        assert node.port != 0 and node.push_port != 0
        assert node.port != node.push_port
        assert node.node_id == "cm-node"
        with PushClient(node.push_url, timeout=scaled(5)) as client:
            assert client.healthy()
            push_url = node.push_url

    assert not node.running
    with PushClient(push_url, timeout=scaled(5)) as client:
        assert not client.healthy()


async def test_node_as_async_context_manager_closes_its_devices_with_1001() -> None:
    async with Node(host="127.0.0.1", port=0, push_port=0, secret=TEST_SECRET) as node:
        device = DeviceClient(node.url, token_for("d1"))
        await device.connect()
        assert node.running
        assert (await async_wait_until(lambda: node.connections == 1)) is True

    assert await device.wait_closed(timeout=scaled(5)) == 1001
    assert not node.running
    await device.close()


def test_node_stats_before_start_raise_pushy_error() -> None:
    node = Node(host="127.0.0.1", port=0, push_port=0, secret=TEST_SECRET)

    with pytest.raises(pushy.PushyError, match="not started"):
        node.stats()
    assert node.connections == 0


async def test_two_nodes_in_one_process_serve_their_own_devices(
    pushy_node_factory: NodeFactory, device_factory: DeviceFactory
) -> None:
    a = pushy_node_factory()
    b = pushy_node_factory()
    on_a = await device_factory("on-a", node=a)
    on_b = await device_factory("on-b", node=b)

    async with PushClient(a.push_url) as to_a, PushClient(b.push_url) as to_b:
        via_a = await to_a.apush("on-a", "for a")
        via_b = await to_b.apush("on-b", "for b")
        wrong_node = await to_a.apush("on-b", "lost")

    assert len({a.port, a.push_port, b.port, b.push_port}) == 4
    assert a.node_id != b.node_id
    assert on_a.node == a.node_id and on_b.node == b.node_id
    assert (via_a.status, via_a.node) == ("delivered", a.node_id)
    assert (via_b.status, via_b.node) == ("delivered", b.node_id)
    assert wrong_node.status == "not_connected"
    assert (await on_a.wait_for("push", timeout=scaled(5)))["data"] == "for a"
    assert (await on_b.wait_for("push", timeout=scaled(5)))["data"] == "for b"
    assert a.connections == 1 and b.connections == 1


# Counting.


async def test_stats_count_pushes_by_outcome_and_frame_bytes(
    pushy_node: Node, device_factory: DeviceFactory, push_client: PushClient
) -> None:
    device = await device_factory("tv-1")
    before = counters(pushy_node)

    delivered = await push_client.apush("tv-1", {"payload": "x" * 1000})
    frame = await device.wait_for("push", timeout=scaled(5))
    missing = await push_client.apush("ghost", 1)
    timed_out = await push_client.apush("tv-1", 2, ack="client", timeout=scaled(0.1))
    await device.wait_for("push", timeout=scaled(5))

    def counted() -> dict[str, Any] | None:
        now = counters(pushy_node)
        grown = sum(now["pushes"].values()) - sum(before["pushes"].values())
        return now if grown >= 3 else None

    after = wait_until(counted, message="three pushes to be counted")
    grown = {
        k: v - before["pushes"][k]
        for k, v in after["pushes"].items()
        if v != before["pushes"][k]
    }
    assert [delivered.status, missing.status, timed_out.status] == [
        "delivered",
        "not_connected",
        "timeout",
    ]
    assert grown == {"delivered": 1, "not_connected": 1, "timeout": 1}
    frame_bytes = len(json.dumps(frame, separators=(",", ":")))
    assert after["bytes_out"] - before["bytes_out"] >= frame_bytes > 1000
    assert after["messages_out"] - before["messages_out"] >= 2
    assert (await push_client.astats())["pushes"] == after["pushes"]


# Slow devices.

#: One push of the slow-device tests: big enough to fill socket buffers fast.
BIG = "x" * 60_000

#: Pushes of BIG that no socket buffer holds (18 MB).
MANY = 300


async def push_until_not_delivered(
    client: PushClient, device: str, timeout: float
) -> list[pushy.PushResult]:
    """Push BIG to ``device`` one at a time until one is not delivered.

    Fails the test when a push gets no answer at all.
    """
    results: list[pushy.PushResult] = []
    for _ in range(MANY):
        try:
            result = await client.apush(device, BIG, timeout=timeout)
        except pushy.PushError as exc:
            pytest.fail(
                f"push {len(results) + 1} to a device that stopped reading got "
                f"no answer ({exc}) after {len(results)} were delivered"
            )
        results.append(result)
        if not result.delivered:
            break
    return results


async def test_push_to_a_device_that_stops_reading_is_answered_504_in_time(
    pushy_node: Node, raw_device: RawDevice, device_factory: DeviceFactory
) -> None:
    other = await device_factory("other")
    ws, _ = raw_device(pushy_node, "stalled")
    # Keep the kernel from absorbing megabytes on the device's behalf.
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    timeout = scaled(1)

    async with PushClient(pushy_node.push_url, timeout=timeout + scaled(2)) as client:
        results = await push_until_not_delivered(client, "stalled", timeout)
        last = results[-1]

        assert not last.delivered, f"{MANY} x 60 KB written to a socket nobody reads"
        assert (last.code, last.status) == (504, "timeout")
        assert timeout * 0.9 <= last.latency < timeout + scaled(1.5)
        assert await async_wait_until(
            lambda: _not_connected(client, "stalled"),
            message="the stalled device to be dropped",
        )
        assert (await client.astats())["rejects"]["slow_consumer"] >= 1
        assert (await client.apush("other", "still served")).delivered
    assert (await other.wait_for("push", timeout=scaled(5)))["data"] == "still served"


async def test_every_push_answered_delivered_reaches_a_device_that_paused_reading(
    pushy_node: Node, device_factory: DeviceFactory
) -> None:
    # With max_queue=1 the client stops reading its socket until receive().
    device = await device_factory("paused", max_queue=1, max_size=2**20)
    timeout = scaled(1)

    async with PushClient(pushy_node.push_url, timeout=timeout + scaled(2)) as client:
        results = await push_until_not_delivered(client, "paused", timeout)
    received = await _drain(device)

    assert not results[-1].delivered
    assert results[-1].status == "timeout"
    delivered = [r.id for r in results if r.delivered]
    assert received[: len(delivered)] == delivered, "a delivered push never arrived"
    # Only the frame partly written when the device was dropped may follow;
    # its push was answered 504.
    extra = received[len(delivered) :]
    assert len(extra) <= 1 and set(extra) <= {r.id for r in results if not r.delivered}


async def test_flood_of_pushes_to_a_stalled_device_is_all_answered(
    pushy_node: Node, device_factory: DeviceFactory
) -> None:
    device = await device_factory("flooded", max_queue=1, max_size=2**20)
    timeout = scaled(1)

    async with PushClient(pushy_node.push_url, timeout=timeout + scaled(5)) as client:
        pushes = [client.apush("flooded", BIG, timeout=timeout) for _ in range(150)]
        results = await asyncio.wait_for(
            asyncio.gather(*pushes, return_exceptions=True), timeout + scaled(10)
        )
        stats = await client.astats()
    received = await _drain(device)

    unanswered = [r for r in results if not isinstance(r, pushy.PushResult)]
    assert not unanswered, unanswered[:3]
    answered = [r for r in results if isinstance(r, pushy.PushResult)]
    statuses = {r.status for r in answered}
    assert statuses - {"delivered"}, "150 x 60 KB delivered to a stalled device"
    assert statuses <= {"delivered", "disconnected", "not_connected", "timeout"}
    assert stats["rejects"]["slow_consumer"] >= 1
    delivered = {r.id for r in answered if r.delivered}
    assert delivered <= set(received), "a push answered delivered never arrived"
    # Only the frame partly written when the device was dropped may arrive
    # without a 200; its push was answered 504.
    assert len(set(received) - delivered) <= 1


async def test_device_dropped_as_slow_consumer_gets_close_code_4003(
    pushy_node: Node, device_factory: DeviceFactory
) -> None:
    device = await device_factory("flooded", max_queue=1, max_size=2**20)
    timeout = scaled(1)

    async with PushClient(pushy_node.push_url, timeout=timeout + scaled(5)) as client:
        pushes = [client.apush("flooded", BIG, timeout=timeout) for _ in range(150)]
        await asyncio.wait_for(
            asyncio.gather(*pushes, return_exceptions=True), timeout + scaled(10)
        )
    await _drain(device)

    assert device.close_code == 4003, (device.close_code, device.close_reason)


async def _drain(device: DeviceClient) -> list[int]:
    """Read until the connection ends; return the ids of the pushes received."""
    ids = []
    while True:
        try:
            message = await device.receive(timeout=scaled(10))
        except pushy.ConnectionClosed:
            return ids
        if message["t"] == "push":
            ids.append(message["id"])


def test_second_node_on_a_device_port_in_use_fails_unless_both_share_it(
    pushy_node_factory: Callable[..., Node],
) -> None:
    first = pushy_node_factory()
    with pytest.raises(pushy.ConfigError, match="cannot listen on device port"):
        pushy_node_factory(port=first.port)

    shared = pushy_node_factory(reuse_port=True)
    second = pushy_node_factory(port=shared.port, reuse_port=True)

    assert second.port == shared.port and second.running
