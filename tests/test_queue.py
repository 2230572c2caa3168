"""Indirect push: the queue and the message processor (DESIGN 2, 5; issue 5).

Real redis-server processes on free ports, real nodes (in this process, or
as ``pushy serve`` processes where one must be killed), a real processor
(in this process, or as ``pushy processor`` where it must be killed) and
real WebSocket clients. Every timing is scaled by ``pushy.testing.TIME_UNIT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pushy
import pytest
from conftest import report
from fleet_devices import Devices
from pushy import Cluster, DeviceClient, MessageProcessor, Node, PushClient
from pushy.testing import RedisServer, async_wait_until, scaled

DeviceFactory = Callable[..., Awaitable[DeviceClient]]

#: Retry backoff of the test processors: an offline device is tried again
#: at least every 0.2 s (before scaling).
FAST = {"retry_min_s": 0.05, "retry_max_s": 0.2}


@pytest.fixture
def processor_factory(redis_server: RedisServer) -> Iterator[Callable[..., MessageProcessor]]:
    """``factory(**options)`` -> a started processor on the test's Redis."""
    started: list[MessageProcessor] = []

    def make(**options: Any) -> MessageProcessor:
        options = {**FAST, "claim_idle_s": scaled(2), **options}
        processor = MessageProcessor(redis_server.url, **options)
        started.append(processor.start())
        return processor

    yield make
    for processor in started:
        processor.stop()


def entries(redis: RedisServer, key: str) -> list[dict[str, str]]:
    """Every entry of stream ``key`` as a dict of its fields."""
    out = []
    for _id, fields in redis.command("XRANGE", key, "-", "+"):
        out.append(dict(zip(fields[::2], fields[1::2], strict=True)))
    return out


def _flat(fields: dict[str, str]) -> list[str]:
    return [x for kv in fields.items() for x in kv]


def queued(redis: RedisServer, shards: int = 4) -> int:
    """Entries left in the queue's shards."""
    return sum(int(redis.command("XLEN", f"pushy:q:{i}")) for i in range(shards))


def pending(redis: RedisServer, shards: int = 4) -> int:
    """Entries delivered to a processor and not acknowledged yet."""
    total = 0
    for i in range(shards):
        with contextlib.suppress(Exception):  # no group yet
            total += int(redis.command("XPENDING", f"pushy:q:{i}", "processors")[0])
    return total


# Delivery.


async def test_enqueued_message_to_an_online_device_is_delivered_once_and_acked(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
    processor_factory: Callable[..., MessageProcessor],
) -> None:
    node = fleet("node-a")
    tv = await device_factory("tv-1", node=node)
    with PushClient(redis=redis_server.url, sender="alerts") as client:
        mid = await client.aenqueue("tv-1", {"title": "hi"}, ttl=scaled(30))
    processor = processor_factory()

    push = await tv.wait_for("push", timeout=scaled(5))
    assert push == {
        "t": "push", "id": mid, "from": "service:alerts",
        "data": {"title": "hi"}, "ack": False,
    }
    await async_wait_until(lambda: processor.stats()["delivered"] == 1)
    await async_wait_until(lambda: queued(redis_server) == 0 and pending(redis_server) == 0)
    stats = processor.stats()
    assert (stats["attempts"], stats["retried"], stats["in_flight"]) == (1, 0, 0)
    with pytest.raises(asyncio.TimeoutError):
        await tv.wait_for("push", timeout=scaled(0.5))


async def test_client_ack_message_is_done_only_once_the_device_acks_its_id(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
    processor_factory: Callable[..., MessageProcessor],
) -> None:
    node = fleet("node-a")
    tv = await device_factory("tv-1", node=node)
    with PushClient(redis=redis_server.url) as client:
        mid = client.enqueue("tv-1", [1, 2], ttl=scaled(30), id="order-17", ack="client")
    assert mid == "order-17"
    processor = processor_factory(ack_timeout_s=scaled(10))

    push = await tv.wait_for("push", timeout=scaled(5))
    assert (push["id"], push["ack"], push["data"]) == ("order-17", True, [1, 2])
    assert pending(redis_server) == 1 and processor.stats()["delivered"] == 0

    await tv.ack("order-17")
    await async_wait_until(lambda: processor.stats()["delivered"] == 1)
    await async_wait_until(lambda: queued(redis_server) == 0 and pending(redis_server) == 0)


async def test_message_for_an_offline_device_is_delivered_once_it_connects(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
    processor_factory: Callable[..., MessageProcessor],
) -> None:
    node = fleet("node-a")
    processor = processor_factory()
    with PushClient(redis=redis_server.url) as client:
        mid = client.enqueue("tv-1", "later", ttl=scaled(30))
    await async_wait_until(lambda: processor.stats()["retried"] >= 2)

    tv = await device_factory("tv-1", node=node)
    push = await tv.wait_for("push", timeout=scaled(5))
    assert (push["id"], push["data"]) == (mid, "later")
    await async_wait_until(lambda: processor.stats()["delivered"] == 1)
    assert entries(redis_server, "pushy:q:dead") == []


async def test_message_past_its_ttl_goes_to_the_dead_letters_with_the_reason(
    fleet: Callable[..., Node],
    redis_server: RedisServer,
    processor_factory: Callable[..., MessageProcessor],
) -> None:
    fleet("node-a")
    processor = processor_factory()
    with PushClient(redis=redis_server.url) as client:
        mid = client.enqueue("tv-1", {"n": 1}, ttl=scaled(0.5))

    await async_wait_until(lambda: processor.stats()["expired"] == 1)
    await async_wait_until(lambda: entries(redis_server, "pushy:q:dead") != [])
    [dead] = entries(redis_server, "pushy:q:dead")
    assert (dead["id"], dead["device"], dead["data"]) == (mid, "tv-1", '{"n":1}')
    assert dead["reason"].startswith("expired after ")
    assert "404" in dead["reason"] and int(dead["attempts"]) >= 1
    await async_wait_until(lambda: queued(redis_server) == 0 and pending(redis_server) == 0)


async def test_message_a_node_refuses_is_dead_lettered_at_once(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
    processor_factory: Callable[..., MessageProcessor],
) -> None:
    node = fleet("node-a", max_push_bytes=64)
    await device_factory("tv-1", node=node)
    processor = processor_factory()
    with PushClient(redis=redis_server.url) as client:
        client.enqueue("tv-1", "x" * 100, ttl=scaled(30))

    await async_wait_until(lambda: entries(redis_server, "pushy:q:dead") != [])
    [dead] = entries(redis_server, "pushy:q:dead")
    assert dead["reason"].startswith("undeliverable: 413")
    assert dead["attempts"] == "1"
    assert processor.stats()["undeliverable"] == 1


async def test_malformed_queue_entry_is_dead_lettered_and_the_rest_flows(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
    processor_factory: Callable[..., MessageProcessor],
) -> None:
    node = fleet("node-a")
    tv = await device_factory("tv-1", node=node)
    redis_server.command("XADD", "pushy:q:0", "*", "device", "tv-1", "data", "1")
    bad = {"id": "b", "device": "tv-1", "exp": str(2**62), "data": "1"}
    redis_server.command("XADD", "pushy:q:0", "*",
                         *_flat({**bad, "data": "{not json"}))
    redis_server.command("XADD", "pushy:q:0", "*", *_flat({**bad, "ack": "maybe"}))
    processor = processor_factory()
    with PushClient(redis=redis_server.url) as client:
        mid = client.enqueue("tv-1", 2, ttl=scaled(30))

    # Only the good message reaches the device, which can still read it.
    assert (await tv.receive(timeout=scaled(5)))["id"] == mid
    await async_wait_until(lambda: processor.stats()["malformed"] == 3)
    await async_wait_until(lambda: len(entries(redis_server, "pushy:q:dead")) == 3)
    dead = entries(redis_server, "pushy:q:dead")
    assert [d["reason"] for d in dead] == [
        "malformed: no 'id' field",
        "malformed: 'data' is not valid JSON",
        "malformed: 'ack' is neither 'written' nor 'client'",
    ]
    assert (dead[0]["device"], dead[0]["stream"]) == ("tv-1", "pushy:q:0")


async def test_messages_for_offline_devices_never_hold_up_an_online_one(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
    processor_factory: Callable[..., MessageProcessor],
) -> None:
    node = fleet("node-a")
    tv = await device_factory("tv-1", node=node)
    processor = processor_factory(batch=8, max_in_flight=16)
    with PushClient(redis=redis_server.url) as client:
        client.enqueue_many([(f"away-{i}", i) for i in range(400)], ttl=scaled(60))
        await async_wait_until(lambda: processor.stats()["waiting"] >= 300)
        mid = client.enqueue("tv-1", "now", ttl=scaled(60))

    push = await tv.wait_for("push", timeout=scaled(5))
    assert push["id"] == mid
    assert processor.stats()["expired"] == 0


def test_enqueue_refuses_what_it_cannot_queue(redis_server: RedisServer) -> None:
    with pytest.raises(pushy.ConfigError, match="sender must be a service name"):
        PushClient(redis=redis_server.url, sender='we"ird')
    with PushClient(redis=redis_server.url) as client:
        with pytest.raises(TypeError, match="device must be a string, got 5"):
            client.enqueue(5, 1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="id must be a string or None"):
            client.enqueue("tv-1", 1, id=17)  # type: ignore[arg-type]
        with pytest.raises(pushy.PushError, match="'device' must not be empty"):
            client.enqueue("", 1)
        with pytest.raises(pushy.PushError, match="'ttl' must be more than 0"):
            client.enqueue("tv-1", 1, ttl=0)
        with pytest.raises(pushy.ConfigError, match="ack must be"):
            client.enqueue("tv-1", 1, ack="maybe")
    with PushClient("http://127.0.0.1:1") as http_only:
        with pytest.raises(pushy.PushError, match="enqueue needs a client made with redis="):
            http_only.enqueue("tv-1", 1)
    assert queued(redis_server) == 0


def test_enqueue_while_redis_is_down_raises() -> None:
    redis = RedisServer().start()
    client = PushClient(redis=redis.url)
    try:
        redis.kill()
        with pytest.raises(pushy.PushError, match="503"):
            client.enqueue("tv-1", 1)
    finally:
        client.close()


def test_processor_options_are_checked(redis_server: RedisServer) -> None:
    with pytest.raises(pushy.ConfigError, match="shards must be between 1 and 1024"):
        MessageProcessor(redis_server.url, shards=0)
    with pytest.raises(pushy.ConfigError, match="retry_max_s"):
        MessageProcessor(redis_server.url, retry_min_s=2, retry_max_s=1)
    with pytest.raises(pushy.ConfigError, match="batch must be between 1 and 10000"):
        MessageProcessor(redis_server.url, batch=-1)
    with pytest.raises(pushy.ConfigError, match="must not contain blanks"):
        MessageProcessor(redis_server.url, group="a b")
    with pytest.raises(pushy.ConfigError):
        MessageProcessor("http://not-redis")


# Processors that stop or die.


async def test_processor_started_again_under_its_name_resumes_its_messages(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
    processor_factory: Callable[..., MessageProcessor],
) -> None:
    node = fleet("node-a")
    first = processor_factory(consumer="p1", claim_idle_s=scaled(600))
    with PushClient(redis=redis_server.url) as client:
        ids = {client.enqueue("tv-1", i, ttl=scaled(60)) for i in range(5)}
    await async_wait_until(lambda: pending(redis_server) == 5)
    await first.astop()

    tv = await device_factory("tv-1", node=node)
    again = processor_factory(consumer="p1", claim_idle_s=scaled(600))
    got = {(await tv.wait_for("push", timeout=scaled(5)))["id"] for _ in range(5)}
    assert got == ids
    await async_wait_until(lambda: again.stats()["delivered"] == 5)
    assert again.stats()["claimed"] == 0


async def test_killed_processor_pending_messages_are_claimed_and_delivered(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
    processor_factory: Callable[..., MessageProcessor],
) -> None:
    node = fleet("node-a")
    doomed = subprocess.Popen(
        [
            sys.executable, "-m", "pushy", "processor", "--redis", redis_server.url,
            "--consumer", "doomed", "--retry-max-s", "0.2",
            "--claim-idle-s", str(scaled(600)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert doomed.stdout is not None
        assert "pushy: processor doomed consuming" in doomed.stdout.readline()
        with PushClient(redis=redis_server.url) as client:
            ids = set(client.enqueue_many([("tv-1", i) for i in range(20)], ttl=scaled(60)))
        # The dying processor holds all 20, retrying the offline device.
        await async_wait_until(lambda: pending(redis_server) == 20)
    finally:
        doomed.kill()
        doomed.wait()
        assert doomed.stdout is not None
        doomed.stdout.close()

    heir = processor_factory(consumer="heir", claim_idle_s=scaled(1))
    tv = await device_factory("tv-1", node=node)
    got = [(await tv.wait_for("push", timeout=scaled(10)))["id"] for _ in range(20)]
    assert set(got) == ids
    await async_wait_until(lambda: heir.stats()["delivered"] == 20)
    assert heir.stats()["claimed"] == 20
    await async_wait_until(lambda: queued(redis_server) == 0 and pending(redis_server) == 0)


async def test_two_processors_share_the_work_and_each_message_is_delivered(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
    processor_factory: Callable[..., MessageProcessor],
) -> None:
    node = fleet("node-a")
    devices = [await device_factory(f"tv-{i}", node=node) for i in range(8)]
    p1 = processor_factory(consumer="p1", batch=4, max_in_flight=8)
    p2 = processor_factory(consumer="p2", batch=4, max_in_flight=8)
    with PushClient(redis=redis_server.url) as client:
        ids = client.enqueue_many(
            [(f"tv-{i % 8}", i) for i in range(400)], ttl=scaled(60)
        )

    await async_wait_until(
        lambda: p1.stats()["delivered"] + p2.stats()["delivered"] == 400
    )
    assert p1.stats()["delivered"] > 0 and p2.stats()["delivered"] > 0
    got = []
    for device in devices:
        got += [(await device.wait_for("push", timeout=scaled(5)))["id"] for _ in range(50)]
    assert sorted(got) == sorted(ids)


async def test_processor_carries_on_after_redis_restarts_empty(
    fleet: Callable[..., Node],
    device_factory: DeviceFactory,
    redis_server: RedisServer,
    processor_factory: Callable[..., MessageProcessor],
) -> None:
    node = fleet("node-a")
    tv = await device_factory("tv-1", node=node)
    processor = processor_factory()
    with PushClient(redis=redis_server.url) as client:
        first = client.enqueue("tv-1", 1, ttl=scaled(30))
        assert (await tv.wait_for("push", timeout=scaled(5)))["id"] == first
        # Held for an offline device across the restart: only the
        # processor has it then.
        held = client.enqueue("radio-1", "kept", ttl=scaled(30))
        await async_wait_until(lambda: processor.stats()["waiting"] == 1)

        redis_server.stop()
        await async_wait_until(lambda: not processor.stats()["redis_up"])
        with pytest.raises(pushy.PushError, match="503"):
            client.enqueue("tv-1", 2)
        redis_server.start()  # empty: no streams, no group, no records
        restarted_at = processor.stats()["attempts"]
        await async_wait_until(lambda: processor.stats()["redis_up"])
        # The node writes its devices' records again; the processor makes
        # the group again.
        await async_wait_until(
            lambda: redis_server.command("EXISTS", "pushy:dev:{tv-1}") == 1
        )

        async def enqueued_again() -> str | None:
            try:
                return await client.aenqueue("tv-1", 3, ttl=scaled(30))
            except pushy.PushError:  # the client's link is still coming back
                return None

        again = await async_wait_until(enqueued_again, message="enqueue to work")
    assert (await tv.wait_for("push", timeout=scaled(10)))["id"] == again
    # Ten more attempts for radio-1 (at least 0.2 s apart each): several
    # keep-alive rounds (every 0.5 s) have run on the empty Redis.
    await async_wait_until(
        lambda: processor.stats()["attempts"] >= restarted_at + 10, timeout=scaled(10)
    )
    radio = await device_factory("radio-1", node=node)
    assert (await radio.wait_for("push", timeout=scaled(10)))["id"] == held
    await async_wait_until(lambda: processor.stats()["delivered"] == 3)


# The fleet under failure.


@pytest.mark.timeout(scaled(240))
async def test_ten_thousand_messages_survive_a_node_killed_and_restarted(
    redis_server: RedisServer,
    cluster_factory: Callable[..., Cluster],
    processor_factory: Callable[..., MessageProcessor],
) -> None:
    cluster = cluster_factory(2, redis=redis_server.url, registry_ttl_s=3)
    # Node 0 is killed as the 2,000th message arrives.
    devices = Devices(
        cluster.url, [f"dev-{i}" for i in range(1000)], at=2000, then=cluster.nodes[0].kill
    )
    await devices.start()
    processor = processor_factory(ack_timeout_s=scaled(2), max_in_flight=20000)
    ttl = scaled(120)
    started = time.monotonic()

    with PushClient(redis=redis_server.url) as client:
        batch = [(f"dev-{i % 1000}", {"n": i}) for i in range(10000)]
        enqueued = asyncio.create_task(
            asyncio.to_thread(client.enqueue_many, batch, ttl, "client")
        )
        # Node 0 is killed while messages are being delivered; restarted.
        await async_wait_until(lambda: len(devices.received) > 2000, timeout=scaled(60))
        killed_at = 2000
        ids = set(await enqueued)
        assert len(ids) == 10000
        await asyncio.to_thread(cluster.nodes[0].start, scaled(20))
        await async_wait_until(
            lambda: ids <= set(devices.received), timeout=scaled(150),
            message="every message delivered",
        )
        # Acknowledged once each, and nothing left in the queue.
        await async_wait_until(
            lambda: processor.stats()["delivered"] == 10000
            and queued(redis_server) == 0 and pending(redis_server) == 0,
            timeout=scaled(30),
            message="every message acknowledged",
        )
    elapsed = time.monotonic() - started
    await devices.stop()

    duplicates = sum(devices.received.values()) - len(devices.received)
    stats = processor.stats()
    summary = (
        f"10,000 messages to 1,000 devices in {elapsed:.1f} s: node-0 killed "
        f"after {killed_at} and restarted; {duplicates} duplicates, "
        f"{devices.reconnects} reconnects, {stats['attempts']} attempts, "
        f"{stats['retried']} retried"
    )
    report(summary)
    assert set(devices.received) == ids, summary
    assert stats["expired"] == stats["undeliverable"] == 0, summary
    assert entries(redis_server, "pushy:q:dead") == []
