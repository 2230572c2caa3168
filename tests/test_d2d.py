"""Device-to-device messages (DESIGN 3; docs/d2d.md): checked, authorized,
rate-limited, routed across nodes, answered with a status.

Real nodes on a real redis-server, real WebSocket clients. Every timing is
scaled by ``pushy.testing.TIME_UNIT``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import websockets
from conftest import SANITIZED, rss_kib, stop_process
from pushy import DeviceClient, Node
from pushy.testing import (
    RedisServer,
    async_wait_until,
    scaled,
    token_for,
)

NodeFactory = Callable[..., Node]


async def nothing_received(device: DeviceClient) -> bool:
    """True if nothing but the pong of a ping round trip reaches ``device``."""
    await device.ping(timeout=scaled(5))
    try:
        message = await device.receive(timeout=scaled(0.2))
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected message {message}")


def d2d_stats(node: Node) -> dict[str, Any]:
    return node.stats()["d2d"]


# Delivery.


async def test_message_to_a_device_on_the_same_node_is_delivered_with_200(
    pushy_node: Node, device_factory: Any
) -> None:
    phone = await device_factory("phone", node=pushy_node)
    tv = await device_factory("tv", node=pushy_node)

    status = await phone.d2d("tv", {"cmd": "play", "at": 12.5}, timeout=scaled(5))
    got = await tv.wait_for("d2d", timeout=scaled(5))

    assert status == {"t": "status", "id": status["id"], "code": 200}
    assert got == {
        "t": "d2d",
        "id": status["id"],
        "from": "phone",
        "data": {"cmd": "play", "at": 12.5},
    }


async def test_message_data_passes_through_as_the_sender_wrote_it(
    pushy_node: Node, device_factory: Any
) -> None:
    phone = await device_factory("phone", node=pushy_node)
    tv = await device_factory("tv", node=pushy_node)
    raw = '{"t":"d2d","id":"m-1","to":"tv","data":{"b": [1,2.50,"\\u00e9"], "a":null}}'

    await phone.send_raw(raw)
    await phone.wait_for("status", id="m-1", code=200, timeout=scaled(5))
    frame = await asyncio.wait_for(tv.websocket.recv(), timeout=scaled(5))

    assert frame == (
        '{"t":"d2d","id":"m-1","from":"phone","data":{"b": [1,2.50,"\\u00e9"], '
        '"a":null}}'
    )


async def test_message_to_a_device_on_another_node_is_delivered_with_200(
    fleet: Callable[..., Node], device_factory: Any
) -> None:
    a, b = fleet("a"), fleet("b")
    phone = await device_factory("phone", node=a)
    tv = await device_factory("tv", node=b)

    status = await phone.d2d("tv", [1, "two"], timeout=scaled(5))
    got = await tv.wait_for("d2d", timeout=scaled(5))

    assert status["code"] == 200, status
    assert got["from"] == "phone" and got["data"] == [1, "two"]
    assert got["id"] == status["id"]
    assert d2d_stats(a)["forwarded"] == 1
    assert d2d_stats(b)["delivered"] == 1


async def test_repeated_messages_between_the_same_devices_touch_no_store(
    fleet: Callable[..., Node], device_factory: Any
) -> None:
    a, b = fleet("a"), fleet("b")
    phone = await device_factory("phone", node=a)
    await device_factory("tv", node=b)
    assert (await phone.d2d("tv", 0, timeout=scaled(5)))["code"] == 200
    calls = a.stats()["fleet"]["store_calls"]
    hits = a.stats()["fleet"]["route_cache_hits"]

    for i in range(20):
        assert (await phone.d2d("tv", i, timeout=scaled(5)))["code"] == 200

    fleet_stats = a.stats()["fleet"]
    assert fleet_stats["store_calls"] == calls
    assert fleet_stats["route_cache_hits"] >= hits + 20


# Authorization.


async def test_target_of_another_account_is_refused_403_and_gets_nothing(
    fleet: Callable[..., Node], device_factory: Any
) -> None:
    a, b = fleet("a"), fleet("b")
    phone = await device_factory("phone", account="alice", node=a)
    near = await device_factory("tv-near", account="bob", node=a)
    far = await device_factory("tv-far", account="bob", node=b)

    same_node = await phone.d2d("tv-near", "hi", timeout=scaled(5))
    other_node = await phone.d2d("tv-far", "hi", timeout=scaled(5))

    assert same_node["code"] == 403 and "account" in same_node["reason"]
    assert other_node["code"] == 403 and "account" in other_node["reason"]
    assert await nothing_received(near)
    assert await nothing_received(far)


async def test_target_of_another_account_on_the_senders_allow_list_is_reached(
    redis_server: RedisServer, fleet: Callable[..., Node], device_factory: Any
) -> None:
    a, b = fleet("a"), fleet("b")
    redis_server.command("SADD", "pushy:allow:{phone}", "tv-near", "tv-far")
    phone = await device_factory("phone", account="alice", node=a)
    near = await device_factory("tv-near", account="bob", node=a)
    far = await device_factory("tv-far", account="bob", node=b)

    assert (await phone.d2d("tv-near", 1, timeout=scaled(5)))["code"] == 200
    assert (await phone.d2d("tv-far", 2, timeout=scaled(5)))["code"] == 200
    assert (await near.wait_for("d2d", timeout=scaled(5)))["data"] == 1
    assert (await far.wait_for("d2d", timeout=scaled(5)))["data"] == 2
    # The list is the sender's: the other way round stays closed.
    assert (await far.d2d("phone", 3, timeout=scaled(5)))["code"] == 403


async def test_node_without_redis_refuses_other_accounts(
    pushy_node: Node, device_factory: Any
) -> None:
    phone = await device_factory("phone", account="alice", node=pushy_node)
    tv = await device_factory("tv", account="bob", node=pushy_node)

    assert (await phone.d2d("tv", 1, timeout=scaled(5)))["code"] == 403
    assert await nothing_received(tv)


# Targets that are not there.


@pytest.mark.parametrize("on_fleet", [False, True], ids=["embedded", "redis"])
async def test_offline_or_unknown_target_is_answered_404(
    on_fleet: bool,
    pushy_node: Node,
    fleet: Callable[..., Node],
    device_factory: Any,
) -> None:
    node = fleet("a") if on_fleet else pushy_node
    phone = await device_factory("phone", node=node)
    tv = await device_factory("tv", node=node)
    await tv.close()

    gone = await phone.d2d("tv", 1, timeout=scaled(5))
    never = await phone.d2d("nobody", 1, timeout=scaled(5))

    assert gone["code"] == 404 and never["code"] == 404
    assert d2d_stats(node)["status"]["404"] == 2


# Rate limit.


async def test_messages_over_the_rate_are_answered_429_and_the_rest_delivered(
    pushy_node_factory: NodeFactory, device_factory: Any
) -> None:
    node = pushy_node_factory(d2d_rate=2.0, d2d_burst=5)
    phone = await device_factory("phone", node=node)
    tv = await device_factory("tv", node=node)

    ids = [await phone.send_d2d("tv", i) for i in range(30)]
    codes = {}
    for mid in ids:
        codes[mid] = (await phone.wait_for("status", id=mid, timeout=scaled(5)))["code"]
    delivered = [mid for mid, code in codes.items() if code == 200]
    limited = [mid for mid, code in codes.items() if code == 429]

    # A burst of 5, and at most a token or two more refilled meanwhile.
    assert 5 <= len(delivered) <= 7, codes
    assert len(delivered) + len(limited) == 30, codes
    received = [(await tv.wait_for("d2d", timeout=scaled(5)))["id"] for _ in delivered]
    assert received == delivered
    assert await nothing_received(tv)
    assert d2d_stats(node)["status"]["429"] == len(limited)

    # The bucket refills at the rate.
    await asyncio.sleep(scaled(1.0))
    assert (await phone.d2d("tv", "later", timeout=scaled(5)))["code"] == 200


# Bad messages.


@pytest.mark.parametrize(
    ("message", "code", "reason"),
    [
        ({"t": "d2d", "id": "m", "data": 1}, 400, "'to'"),
        ({"t": "d2d", "id": "m", "to": "", "data": 1}, 400, "'to'"),
        ({"t": "d2d", "id": "m", "to": 7, "data": 1}, 400, "'to'"),
        ({"t": "d2d", "id": 5, "to": "tv", "data": 1}, 400, "'id'"),
        ({"t": "d2d", "to": "tv", "data": 1}, 400, "'id'"),
        ({"t": "d2d", "id": "", "to": "tv", "data": 1}, 400, "'id'"),
        ({"t": "d2d", "id": "m", "to": "tv"}, 400, "'data'"),
        ({"t": "d2d", "id": "m", "to": "tv", "data": "x" * 2000}, 413, "larger"),
    ],
    ids=[
        "missing-to",
        "empty-to",
        "number-to",
        "number-id",
        "missing-id",
        "empty-id",
        "missing-data",
        "data-over-the-limit",
    ],
)
async def test_bad_d2d_message_gets_its_status_and_the_connection_is_kept(
    message: dict[str, Any],
    code: int,
    reason: str,
    pushy_node_factory: NodeFactory,
    device_factory: Any,
) -> None:
    node = pushy_node_factory(max_d2d_bytes=1024)
    phone = await device_factory("phone", node=node)
    tv = await device_factory("tv", node=node)

    await phone.send(message)
    status = await phone.wait_for("status", timeout=scaled(5))

    assert status["code"] == code and reason in status["reason"], status
    if "id" in message:
        assert status["id"] == message["id"]
    assert await nothing_received(tv)
    assert (await phone.d2d("tv", "still here", timeout=scaled(5)))["code"] == 200
    assert d2d_stats(node)["status"][str(code)] == 1


async def test_data_of_exactly_max_d2d_bytes_is_delivered(
    pushy_node_factory: NodeFactory, device_factory: Any
) -> None:
    node = pushy_node_factory(max_d2d_bytes=1024)
    phone = await device_factory("phone", node=node)
    tv = await device_factory("tv", node=node)
    data = "y" * (1024 - 2)  # with its quotes

    assert (await phone.d2d("tv", data, timeout=scaled(5)))["code"] == 200
    assert (await tv.wait_for("d2d", timeout=scaled(5)))["data"] == data


# Routes that change and stores that go away.


async def test_target_that_moved_to_another_node_is_reached_there(
    fleet: Callable[..., Node], device_factory: Any
) -> None:
    a, b, c = fleet("a"), fleet("b"), fleet("c")
    phone = await device_factory("phone", node=a)
    tv_on_b = await device_factory("tv", node=b)
    assert (await phone.d2d("tv", "first", timeout=scaled(5)))["code"] == 200

    # The tv reconnects on c: b closes its old connection with 4001, and a's
    # cached route (to b) is now stale.
    tv_on_c = await device_factory("tv", node=c)
    assert await tv_on_b.wait_closed(timeout=scaled(5)) == 4001

    status = await phone.d2d("tv", "second", timeout=scaled(5))
    assert status["code"] == 200, status
    assert (await tv_on_c.wait_for("d2d", timeout=scaled(5)))["data"] == "second"


async def test_cached_routes_and_permissions_deliver_while_redis_is_down(
    redis_server: RedisServer, fleet: Callable[..., Node], device_factory: Any
) -> None:
    a, b = fleet("a", route_cache_ttl_s=1.0), fleet("b")
    redis_server.command("SADD", "pushy:allow:{phone}", "guest-tv")
    phone = await device_factory("phone", account="alice", node=a)
    tv = await device_factory("tv", account="alice", node=b)
    guest = await device_factory("guest-tv", account="bob", node=b)
    assert (await phone.d2d("tv", 0, timeout=scaled(5)))["code"] == 200
    assert (await phone.d2d("guest-tv", 0, timeout=scaled(5)))["code"] == 200
    await tv.wait_for("d2d", timeout=scaled(5))
    await guest.wait_for("d2d", timeout=scaled(5))

    redis_server.stop()
    await async_wait_until(
        lambda: a.stats()["fleet"]["redis"] == "down", timeout=scaled(10)
    )

    # Longer than the caches keep an entry fresh: a stale entry still
    # serves while the store cannot answer.
    await asyncio.sleep(scaled(1.5))
    for i in range(3):
        assert (await phone.d2d("tv", i, timeout=scaled(5)))["code"] == 200
        assert (await phone.d2d("guest-tv", i, timeout=scaled(5)))["code"] == 200
        assert (await tv.wait_for("d2d", timeout=scaled(5)))["data"] == i
        assert (await guest.wait_for("d2d", timeout=scaled(5)))["data"] == i
    # A target that was never looked up cannot be found.
    assert (await phone.d2d("nobody", 1, timeout=scaled(5)))["code"] == 503


# Metrics.


async def test_stats_count_d2d_by_outcome_with_a_latency_histogram(
    fleet: Callable[..., Node], device_factory: Any
) -> None:
    a, b = fleet("a"), fleet("b")
    phone = await device_factory("phone", node=a)
    await device_factory("tv", node=b)
    await device_factory("other", account="else", node=a)

    for _ in range(3):
        assert (await phone.d2d("tv", 1, timeout=scaled(5)))["code"] == 200
    assert (await phone.d2d("other", 1, timeout=scaled(5)))["code"] == 403
    assert (await phone.d2d("nobody", 1, timeout=scaled(5)))["code"] == 404

    stats = d2d_stats(a)
    assert stats["received"] == 5
    assert stats["forwarded"] == 4  # tv three times, nobody once
    assert stats["status"]["200"] == 3
    assert stats["status"]["403"] == 1
    assert stats["status"]["404"] == 1
    latency = stats["latency_us"]
    assert latency["count"] == 5
    assert 0 < latency["p50"] <= latency["p99"] <= latency["p99.9"]
    assert d2d_stats(b)["delivered"] == 3
    fleet_stats = a.stats()["fleet"]
    assert fleet_stats["route_cache_misses"] >= 1
    assert fleet_stats["store_calls"] >= 1
    # The same numbers over HTTP.
    async with httpx.AsyncClient() as http:
        over_http = (await http.get(f"{a.push_url}/v1/stats")).json()
    assert over_http["d2d"]["status"] == stats["status"]


# A flood.


@pytest.mark.timeout(scaled(120))
async def test_flood_to_an_offline_target_is_answered_and_memory_stays_flat(
    redis_server: RedisServer, cluster_factory: Callable[..., Any]
) -> None:
    cluster = cluster_factory(1, redis_server.url)
    (node,) = cluster.nodes
    assert node.process is not None
    pid = node.process.pid
    uri = cluster.url + "?token=" + token_for("flooder")
    duration = scaled(30)
    codes: Counter[int] = Counter()
    sent = 0

    async with websockets.connect(uri, subprotocols=["pushy.v1"]) as ws:
        await ws.recv()  # hello

        async def read() -> None:
            async for frame in ws:
                message = json.loads(frame)
                if message.get("t") == "status":
                    codes[message["code"]] += 1

        reader = asyncio.create_task(read())
        started = time.monotonic()
        samples: list[tuple[float, int, int]] = []
        flood = json.dumps({"t": "d2d", "id": "f", "to": "offline-tv", "data": 0})
        while time.monotonic() - started < duration:
            for _ in range(200):
                await ws.send(flood)
            sent += 200
            # Never more than a few thousand answers behind.
            while sent - sum(codes.values()) > 5000:
                await asyncio.sleep(0.001)
            elapsed = time.monotonic() - started
            if not samples or elapsed - samples[-1][0] >= duration / 10:
                info = redis_server.command("INFO", "memory")
                used = int(info.split("used_memory:")[1].split()[0])
                samples.append((elapsed, rss_kib(pid), used))
        await async_wait_until(lambda: sum(codes.values()) == sent, timeout=scaled(10))
        reader.cancel()

    assert set(codes) <= {404, 429}, codes
    assert codes[404] > 0 and codes[429] > sent / 2, codes
    # After the first tenth (pools and caches warm), memory stays flat.
    warm = samples[1:]
    rss = [s[1] for s in warm]
    redis_mem = [s[2] for s in warm]
    if not SANITIZED:
        assert max(rss) - rss[0] < 4 * 1024, samples  # KiB
    assert max(redis_mem) - redis_mem[0] < 512 * 1024, samples  # bytes
    assert node.running
    assert os.path.exists(f"/proc/{pid}")
    # And it still serves.
    async with DeviceClient(cluster.url, token_for("after")) as device:
        assert (await device.d2d("offline-tv", 1, timeout=scaled(5)))["code"] == 404


# Accounts, threads and deadlines.


async def test_tokens_without_an_account_reach_only_themselves(
    fleet: Callable[..., Node], device_factory: Any
) -> None:
    a, b = fleet("a"), fleet("b")
    lonely = await device_factory("lonely", account=None, node=a)
    near = await device_factory("near", account=None, node=a)
    far = await device_factory("far", account=None, node=b)

    assert (await lonely.d2d("near", 1, timeout=scaled(5)))["code"] == 403
    assert (await lonely.d2d("far", 1, timeout=scaled(5)))["code"] == 403
    assert (await lonely.d2d("lonely", "me", timeout=scaled(5)))["code"] == 200
    assert (await lonely.wait_for("d2d", timeout=scaled(5)))["data"] == "me"
    assert await nothing_received(near)
    assert await nothing_received(far)


async def test_many_devices_on_nodes_with_several_threads_all_get_200(
    fleet: Callable[..., Node],
) -> None:
    # Peer links and devices share each io thread's read buffer: a peer
    # request must never be read from bytes a device wrote.
    a, b = fleet("a", threads=3), fleet("b", threads=3)
    pairs = 100
    senders = [DeviceClient(a.url, token_for(f"s{i}")) for i in range(pairs)]
    targets = [DeviceClient(b.url, token_for(f"t{i}")) for i in range(pairs)]
    await asyncio.gather(*(c.connect() for c in senders + targets))
    try:

        async def send_all(i: int) -> list[int]:
            ids = [await senders[i].send_d2d(f"t{i}", {"n": k}) for k in range(8)]
            return [
                (await senders[i].wait_for("status", id=mid, timeout=scaled(10)))[
                    "code"
                ]
                for mid in ids
            ]

        codes = Counter(
            c for got in await asyncio.gather(*map(send_all, range(pairs))) for c in got
        )
        assert codes == {200: 8 * pairs}, codes
        for i in range(pairs):
            got = [(await targets[i].wait_for("d2d", timeout=scaled(5)))["data"]["n"]
                   for _ in range(8)]  # fmt: skip
            assert got == list(range(8))
        assert a.stats()["fleet"]["forward_failed"] == 0
    finally:
        await asyncio.gather(*(c.close() for c in senders + targets))


@pytest.mark.timeout(scaled(60))
async def test_message_to_a_stalled_node_is_answered_504_and_never_delivered_late(
    redis_server: RedisServer,
    fleet: Callable[..., Node],
    cluster_factory: Callable[..., Any],
    device_factory: Any,
) -> None:
    sender_node = fleet("a", push_timeout_s=1.0)
    cluster = cluster_factory(1, redis_server.url, push_timeout_s=1.0)
    (target_node,) = cluster.nodes
    assert target_node.process is not None
    phone = await device_factory("phone", node=sender_node)
    tv = DeviceClient(cluster.url, token_for("tv"))
    await tv.connect()
    try:
        assert (await phone.d2d("tv", "warm", timeout=scaled(5)))["code"] == 200
        assert (await tv.wait_for("d2d", timeout=scaled(5)))["data"] == "warm"

        stop_process(target_node.process)
        try:
            status = await phone.d2d("tv", "late", timeout=scaled(10))
            assert status["code"] == 504, status
            await asyncio.sleep(scaled(1.0))
        finally:
            target_node.process.send_signal(signal.SIGCONT)

        # The stalled node wakes up with the message in its socket: past its
        # deadline, it is not delivered; the next message is.
        assert (await phone.d2d("tv", "after", timeout=scaled(5)))["code"] == 200
        assert (await tv.wait_for("d2d", timeout=scaled(5)))["data"] == "after"
        assert await nothing_received(tv)
    finally:
        await tv.close()
