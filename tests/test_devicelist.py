"""The device-list service (``pushy.DeviceListService``, ``pushy devicelist``).

The first tests write connection events into the stream themselves, as
nodes would, and capture what the service sends with its ``deliver``
callable; the last ones run real nodes, real devices and the command line.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pushy
import pytest
import pytest_asyncio
from pushy.devicelist import DeviceListService, online_devices, parse_event
from pushy.testing import RedisServer, async_wait_until, scaled

P = "pushy:"

#: Sweeps of the services in these tests.
SWEEP_S = 0.2


class Inbox:
    """A ``deliver`` callable that records frames and answers with ``codes``."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, int, dict[str, Any]]] = []
        self.codes: dict[str, int] = {}

    async def __call__(self, device: str, event: dict[str, Any], conn: int) -> int:
        self.frames.append((device, conn, event))
        return self.codes.get(device, 200)

    def of(self, device: str) -> list[dict[str, Any]]:
        """Frames sent to ``device``, in order."""
        return [f for d, _, f in self.frames if d == device]

    def kinds(self, device: str) -> list[tuple[str, Any]]:
        """``(kind, device or devices)`` of each frame sent to ``device``."""
        out = []
        for f in self.of(device):
            if f["kind"] == "device_list":
                out.append(("device_list", [d["device"] for d in f["devices"]]))
            else:
                out.append((f["kind"], f["device"]))
        return out


class Stream:
    """Writes entries into ``P events`` as a node would."""

    def __init__(self, redis: RedisServer) -> None:
        self.redis = redis
        self.clock = int(time.time() * 1000)

    def add(
        self,
        kind: str,
        device: str,
        account: str = "home",
        node: str = "n1",
        conn: int = 1,
        *,
        meta: dict[str, Any] | None = None,
        at: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        self.clock += 1
        fields: dict[str, Any] = {
            "kind": kind,
            "device": device,
            "account": account,
            "node": node,
            "conn": conn,
            "time": self.clock if at is None else at,
        }
        if kind == "connected":
            fields["meta"] = json.dumps(meta or {})
        if kind in ("subscribe", "unsubscribe"):
            fields["topic"] = "account.devices"
        fields.update(extra or {})
        args = [x for kv in fields.items() for x in kv]
        return self.redis.command("XADD", f"{P}events", "*", *args)

    def raw(self, *fields: Any) -> str:
        return self.redis.command("XADD", f"{P}events", "*", *fields)


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


@pytest.fixture
def stream(redis_server: RedisServer) -> Stream:
    return Stream(redis_server)


@pytest_asyncio.fixture
async def service(
    redis_server: RedisServer, inbox: Inbox
) -> AsyncIterator[Callable[..., Any]]:
    """``await service(**options)`` -> a started service delivering to ``inbox``."""
    started: list[DeviceListService] = []

    async def make(**options: Any) -> DeviceListService:
        options.setdefault("deliver", inbox)
        options.setdefault("consumer", "c1")
        options.setdefault("sweep_s", scaled(SWEEP_S))
        options.setdefault("block_s", scaled(0.2))
        svc = DeviceListService(redis_server.url, **options)
        await svc.start()
        started.append(svc)
        return svc

    yield make
    for svc in started:
        await svc.stop()


async def handled(svc: DeviceListService, count: int) -> None:
    """Wait until ``svc`` has handled or skipped ``count`` entries in all."""

    def done() -> bool:
        s = svc.stats()
        return s["events_handled"] + s["events_skipped"] + s["events_bad"] >= count

    await async_wait_until(done, message=f"{count} entries handled")


def pending(redis: RedisServer, group: str = "devicelist") -> int:
    return redis.command("XPENDING", f"{P}events", group)[0]


async def handle_then_stop(
    service: Any, stream: Stream, *entries: tuple[str, str, int]
) -> None:
    """Run a service until it has handled ``(kind, device, conn)`` entries."""
    svc = await service()
    for kind, device, conn in entries:
        stream.add(kind, device, conn=conn)
    await handled(svc, len(entries))
    await svc.stop()


def read_and_die(redis: RedisServer, consumer: str) -> None:
    """Read every new entry as ``consumer`` and acknowledge none (a crash)."""
    redis.command(
        "XREADGROUP", "GROUP", "devicelist", consumer, "STREAMS", f"{P}events", ">"
    )


# Lists and events.


async def test_subscriber_gets_the_list_then_online_and_offline_of_other_devices(
    service: Any, stream: Stream, inbox: Inbox
) -> None:
    svc = await service()
    stream.add("connected", "tv", conn=1, meta={"name": "Living room"})
    stream.add("connected", "phone", conn=2)
    stream.add("subscribe", "phone", conn=2)
    stream.add("connected", "tablet", node="n2", conn=7, meta={"kind": "tablet"})
    stream.add("disconnected", "tv", conn=1)
    await handled(svc, 5)
    await async_wait_until(lambda: len(inbox.of("phone")) == 3)

    first, online, offline = inbox.of("phone")
    assert first == {
        "t": "event",
        "kind": "device_list",
        "devices": [{"device": "tv", "node": "n1", "meta": {"name": "Living room"}}],
    }
    assert online == {
        "t": "event",
        "kind": "device_online",
        "device": "tablet",
        "meta": {"kind": "tablet"},
    }
    assert offline == {
        "t": "event",
        "kind": "device_offline",
        "device": "tv",
        "meta": {},
    }
    assert {conn for d, conn, _ in inbox.frames if d == "phone"} == {2}
    assert {d for d, _, _ in inbox.frames} == {"phone"}  # never the others
    assert [d["device"] for d in await svc.devices("home")] == ["phone", "tablet"]
    assert svc.stats()["events_sent"] == 3


async def test_a_device_hears_nothing_of_itself_nor_of_other_accounts(
    service: Any, stream: Stream, inbox: Inbox
) -> None:
    svc = await service()
    stream.add("connected", "phone", conn=1)
    stream.add("subscribe", "phone", conn=1)
    stream.add("connected", "tv-x", account="other", conn=2)
    stream.add("subscribe", "tv-x", account="other", conn=2)
    stream.add("connected", "tv-y", account="other", conn=3)
    stream.add("disconnected", "tv-y", account="other", conn=3)
    stream.add("disconnected", "phone", conn=1)
    await handled(svc, 7)
    await async_wait_until(lambda: len(inbox.of("tv-x")) == 3)

    assert inbox.kinds("phone") == [("device_list", [])]
    assert inbox.kinds("tv-x") == [
        ("device_list", []),
        ("device_online", "tv-y"),
        ("device_offline", "tv-y"),
    ]
    assert await svc.devices("home") == []
    assert [d["device"] for d in await svc.devices("other")] == ["tv-x"]


async def test_lists_are_kept_in_the_keys_of_the_contract(
    service: Any, stream: Stream, redis_server: RedisServer
) -> None:
    svc = await service()
    stream.add("connected", "tv", node="n1", conn=4, meta={"a": 1}, at=1000)
    stream.add("connected", "phone", node="n2", conn=9, at=2000)
    stream.add("subscribe", "phone", node="n2", conn=9)
    await handled(svc, 3)

    record = json.loads(redis_server.command("HGET", f"{P}acct:{{home}}:devices", "tv"))
    assert record == {"node": "n1", "conn": 4, "since": 1000, "meta": {"a": 1}}
    sub = json.loads(redis_server.command("HGET", f"{P}acct:{{home}}:subs", "phone"))
    assert sub == {"node": "n2", "conn": 9}
    assert redis_server.command("SMEMBERS", f"{P}dl:node:n1") == ["home\ttv"]
    assert redis_server.command("SMEMBERS", f"{P}dl:node:n2") == ["home\tphone"]

    listed = [
        {"device": "phone", "node": "n2", "conn": 9, "since": 2000, "meta": {}},
        {"device": "tv", "node": "n1", "conn": 4, "since": 1000, "meta": {"a": 1}},
    ]
    assert await svc.devices("home") == listed
    assert online_devices(redis_server.url, "home") == listed
    assert online_devices(redis_server.url, "nobody") == []
    assert await svc.subscribers("home") == {"phone": ("n2", 9)}
    assert pending(redis_server) == 0


async def test_unsubscribe_stops_the_events(
    service: Any, stream: Stream, inbox: Inbox
) -> None:
    svc = await service()
    stream.add("subscribe", "phone", conn=1)
    stream.add("connected", "tv", conn=2)
    stream.add("unsubscribe", "phone", conn=1)
    stream.add("disconnected", "tv", conn=2)
    await handled(svc, 4)

    assert inbox.kinds("phone") == [("device_list", []), ("device_online", "tv")]
    assert await svc.subscribers("home") == {}


async def test_a_disconnected_subscriber_is_no_longer_told(
    service: Any, stream: Stream, inbox: Inbox
) -> None:
    svc = await service()
    stream.add("connected", "phone", conn=1)
    stream.add("subscribe", "phone", conn=1)
    stream.add("disconnected", "phone", conn=1)
    stream.add("connected", "tv", conn=2)
    await handled(svc, 4)

    assert inbox.kinds("phone") == [("device_list", [])]
    assert await svc.subscribers("home") == {}


# Connections that move between nodes.


@pytest.mark.parametrize("new_node", ["n1", "n2"])
@pytest.mark.parametrize("order", ["connected_first", "disconnected_first"])
async def test_the_old_connection_of_a_reconnected_device_does_not_unlist_it(
    service: Any, stream: Stream, inbox: Inbox, order: str, new_node: str
) -> None:
    svc = await service()
    stream.add("subscribe", "phone", node="n2", conn=1)
    stream.add("connected", "tv", node="n1", conn=5)
    if order == "connected_first":
        stream.add("connected", "tv", node=new_node, conn=8)
        stream.add("disconnected", "tv", node="n1", conn=5)
        expected = [("device_list", []), ("device_online", "tv")]
    else:
        stream.add("disconnected", "tv", node="n1", conn=5)
        stream.add("connected", "tv", node=new_node, conn=8)
        expected = [
            ("device_list", []),
            ("device_online", "tv"),
            ("device_offline", "tv"),
            ("device_online", "tv"),
        ]
    await handled(svc, 4)

    (tv,) = await svc.devices("home")
    assert (tv["node"], tv["conn"]) == (new_node, 8)
    assert inbox.kinds("phone") == expected
    assert svc.stats()["deliveries_failed"] == 0
    for node in ("n1", "n2"):
        expected_members = ["home\ttv"] if node == new_node else []
        assert redis_members(stream.redis, f"{P}dl:node:{node}") == expected_members


def redis_members(redis: RedisServer, key: str) -> list[str]:
    return sorted(redis.command("SMEMBERS", key))


async def test_a_redelivered_entry_never_tells_a_device_about_itself(
    service: Any, stream: Stream, inbox: Inbox, redis_server: RedisServer
) -> None:
    await handle_then_stop(
        service, stream, ("connected", "phone", 1), ("subscribe", "phone", 1)
    )
    # The phone's connected again, read by c1, which died before its XACK
    # (as when another consumer handled the subscribe meanwhile).
    stream.add("connected", "phone", conn=1)
    stream.add("connected", "tv", conn=2)
    read_and_die(redis_server, "c1")

    second = await service()
    await handled(second, 2)

    assert inbox.kinds("phone") == [("device_list", []), ("device_online", "tv")]


async def test_a_reconnection_with_new_meta_is_announced_again(
    service: Any, stream: Stream, inbox: Inbox
) -> None:
    svc = await service()
    stream.add("subscribe", "phone", conn=1)
    stream.add("connected", "tv", node="n1", conn=5, meta={"v": 1})
    stream.add("connected", "tv", node="n2", conn=6, meta={"v": 2})
    await handled(svc, 3)

    online = [f["meta"] for f in inbox.of("phone") if f["kind"] == "device_online"]
    assert online == [{"v": 1}, {"v": 2}]
    assert (await svc.devices("home"))[0]["meta"] == {"v": 2}


async def test_late_entries_of_a_connection_already_gone_are_ignored(
    service: Any, stream: Stream, inbox: Inbox
) -> None:
    svc = await service()
    stream.add("subscribe", "phone", conn=1)
    # As when another consumer was slower with the first two: the
    # connection's disconnected is read before its connected and subscribe.
    stream.add("disconnected", "tv", node="n1", conn=5, at=2000)
    stream.add("connected", "tv", node="n1", conn=5, at=1000)
    stream.add("subscribe", "tv", node="n1", conn=5, at=1500)
    # An older connection read after a newer one of the same device.
    stream.add("connected", "radio", node="n2", conn=9, at=5000)
    stream.add("connected", "radio", node="n1", conn=3, at=4000)
    await handled(svc, 6)

    assert [(d["device"], d["node"]) for d in await svc.devices("home")] == [
        ("radio", "n2")
    ]
    assert await svc.subscribers("home") == {"phone": ("n1", 1)}
    assert inbox.kinds("phone") == [("device_list", []), ("device_online", "radio")]
    assert inbox.of("tv") == []
    assert svc.stats()["events_skipped"] == 3


async def test_a_subscriber_whose_connection_is_gone_is_dropped(
    service: Any, stream: Stream, inbox: Inbox
) -> None:
    svc = await service()
    inbox.codes["phone"] = 404
    stream.add("subscribe", "phone", conn=1)
    stream.add("connected", "tv", conn=2)
    await handled(svc, 2)

    await async_wait_until(lambda: svc.stats()["subscriptions_dropped"] == 1)
    assert await svc.subscribers("home") == {}
    assert inbox.kinds("phone") == [("device_list", [])]
    assert svc.stats()["deliveries_failed"] == 1


async def test_a_failed_delivery_is_a_warning_and_counted(
    service: Any, stream: Stream, inbox: Inbox, caplog: pytest.LogCaptureFixture
) -> None:
    svc = await service()
    inbox.codes["phone"] = 503
    stream.add("subscribe", "phone", conn=1)
    stream.add("connected", "tv", conn=2)
    await handled(svc, 2)

    assert svc.stats()["deliveries_failed"] == 2
    assert await svc.subscribers("home") == {"phone": ("n1", 1)}  # kept
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("device_online to phone" in w and "503" in w for w in warnings)


# Bad entries.


async def test_bad_entries_are_warned_counted_acked_and_the_rest_handled(
    service: Any,
    stream: Stream,
    inbox: Inbox,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    svc = await service()
    stream.raw("kind", "exploded", "device", "x")
    stream.raw("kind", "connected", "device", "x", "account", "home")  # no node
    stream.add("connected", "tv", extra={"conn": "seven"})
    stream.add("connected", "tv", extra={"meta": "{not json"})
    stream.add("connected", "tv", extra={"meta": "[1, 2]"})
    stream.add("subscribe", "phone", extra={"topic": "weather"})
    stream.raw("kind", "connected", "device", b"\xff\xfe", "account", "home")
    stream.add("subscribe", "phone", conn=1)
    stream.add("connected", "tv", conn=2)
    await handled(svc, 9)

    assert svc.stats()["events_bad"] == 7
    assert inbox.kinds("phone") == [("device_list", []), ("device_online", "tv")]
    assert pending(redis_server) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("bad entry" in w for w in warnings) == 7
    assert any("kind must be one of" in w for w in warnings)
    assert any("'meta' must be a JSON object" in w for w in warnings)
    assert any("topic must be 'account.devices'" in w for w in warnings)


def test_parse_event_names_what_is_wrong() -> None:
    good = {
        b"kind": b"connected",
        b"device": b"tv",
        b"account": b"",
        b"node": b"n1",
        b"conn": b"3",
        b"time": b"17",
        b"meta": b'{"a":1}',
    }
    event = parse_event(b"1-0", good)
    assert (event.kind, event.device, event.account, event.conn, event.time) == (
        "connected",
        "tv",
        "",
        3,
        17,
    )
    assert event.meta == {"a": 1}
    for field, value, message in [
        (b"conn", b"-1", "'conn' as a decimal number"),
        (b"time", b"", "'time' as a decimal number"),
        (b"device", b"", "non-empty 'device'"),
        (b"meta", b'"x"', "JSON object, got str"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_event(b"1-0", {**good, field: value})
    with pytest.raises(ValueError, match="trimmed"):
        parse_event(b"1-0", {})


async def test_devices_without_an_account_are_not_listed(
    service: Any, stream: Stream
) -> None:
    svc = await service()
    stream.add("connected", "lonely", account="", conn=1)
    await handled(svc, 1)

    assert svc.stats()["events_skipped"] == 1
    assert await svc.devices("") == []


# Restarts, pending entries and several consumers.


async def test_a_restarted_service_resumes_where_it_stopped(
    service: Any, stream: Stream, inbox: Inbox, redis_server: RedisServer
) -> None:
    await handle_then_stop(
        service, stream, ("subscribe", "phone", 1), ("connected", "tv", 2)
    )

    stream.add("disconnected", "tv", conn=2)
    stream.add("connected", "radio", conn=3)
    second = await service()
    await handled(second, 2)

    assert inbox.kinds("phone") == [
        ("device_list", []),
        ("device_online", "tv"),
        ("device_offline", "tv"),
        ("device_online", "radio"),
    ]
    assert second.stats()["events_handled"] == 2  # not the first two again
    assert pending(redis_server) == 0


async def test_entries_read_but_not_acked_before_a_crash_are_handled_on_restart(
    service: Any, stream: Stream, inbox: Inbox, redis_server: RedisServer
) -> None:
    redis_server.command(
        "XGROUP", "CREATE", f"{P}events", "devicelist", "0", "MKSTREAM"
    )
    stream.add("subscribe", "phone", conn=1)
    stream.add("connected", "tv", conn=2)
    # Consumer c1 read them and died before acknowledging them.
    read_and_die(redis_server, "c1")
    assert pending(redis_server) == 2

    svc = await service(consumer="c1")
    await handled(svc, 2)

    assert inbox.kinds("phone") == [("device_list", []), ("device_online", "tv")]
    assert pending(redis_server) == 0


async def test_an_entry_applied_but_not_acked_before_a_crash_still_sends_its_event(
    service: Any, stream: Stream, inbox: Inbox, redis_server: RedisServer
) -> None:
    await handle_then_stop(service, stream, ("subscribe", "phone", 1))
    stream.add("connected", "tv", conn=2, at=1000)
    read_and_die(redis_server, "c1")
    # c1 listed the TV, then died before telling the phone and acking.
    record = {"node": "n1", "conn": 2, "since": 1000, "meta": {}}
    redis_server.command("HSET", f"{P}acct:{{home}}:devices", "tv", json.dumps(record))

    second = await service(consumer="c1")
    await handled(second, 1)

    assert inbox.kinds("phone") == [("device_list", []), ("device_online", "tv")]


async def test_a_disconnect_applied_but_not_acked_before_a_crash_still_sends_offline(
    service: Any, stream: Stream, inbox: Inbox, redis_server: RedisServer
) -> None:
    await handle_then_stop(
        service, stream, ("subscribe", "phone", 1), ("connected", "tv", 2)
    )
    stream.add("disconnected", "tv", conn=2)
    read_and_die(redis_server, "c1")
    # c1 unlisted the TV, then died before telling the phone and acking.
    redis_server.command("HDEL", f"{P}acct:{{home}}:devices", "tv")

    second = await service(consumer="c1")
    await handled(second, 1)

    assert inbox.kinds("phone")[-1] == ("device_offline", "tv")


async def test_entries_of_a_dead_consumer_are_claimed(
    service: Any, stream: Stream, inbox: Inbox, redis_server: RedisServer
) -> None:
    redis_server.command(
        "XGROUP", "CREATE", f"{P}events", "devicelist", "0", "MKSTREAM"
    )
    stream.add("subscribe", "phone", conn=1)
    stream.add("connected", "tv", conn=2)
    read_and_die(redis_server, "dead")

    svc = await service(consumer="alive", claim_s=scaled(0.3))
    await async_wait_until(lambda: svc.stats()["events_claimed"] == 2)
    await handled(svc, 2)

    assert inbox.kinds("phone") == [("device_list", []), ("device_online", "tv")]
    assert pending(redis_server) == 0


async def test_two_services_share_the_group_and_each_entry_is_handled_once(
    service: Any, stream: Stream, inbox: Inbox, redis_server: RedisServer
) -> None:
    a = await service(consumer="a")
    b = await service(consumer="b")
    stream.add("subscribe", "phone", conn=1)
    for i in range(20):
        stream.add("connected", f"d{i}", account="home", conn=10 + i)
    for i in range(20):
        stream.add("subscribe", f"s{i}", account=f"acct{i}", conn=100 + i)

    def total() -> int:
        return sum(s.stats()["events_handled"] for s in (a, b))

    await async_wait_until(lambda: total() == 41)
    assert len(await a.devices("home")) == 20
    assert pending(redis_server) == 0
    assert all(inbox.kinds(f"s{i}") == [("device_list", [])] for i in range(20))


# Dead nodes.


async def test_devices_of_a_node_whose_directory_entry_is_gone_go_offline(
    service: Any, stream: Stream, inbox: Inbox, redis_server: RedisServer
) -> None:
    redis_server.command("SET", f"{P}node:n1", "127.0.0.1:1")
    redis_server.command("SET", f"{P}node:n2", "127.0.0.1:2")
    svc = await service()
    stream.add("connected", "phone", node="n2", conn=1)
    stream.add("subscribe", "phone", node="n2", conn=1)
    stream.add("connected", "tv", node="n1", conn=2)
    stream.add("connected", "tablet", node="n1", conn=3)
    stream.add("subscribe", "tablet", node="n1", conn=3)
    await handled(svc, 5)
    sent = len(inbox.frames)

    # n1 is SIGKILLed: its entry expires, and it writes no disconnected.
    redis_server.command("DEL", f"{P}node:n1")
    await async_wait_until(lambda: svc.stats()["nodes_swept"] == 1)

    assert [d["device"] for d in await svc.devices("home")] == ["phone"]
    assert sorted(inbox.kinds("phone")[-2:]) == [
        ("device_offline", "tablet"),
        ("device_offline", "tv"),
    ]
    assert len(inbox.frames) == sent + 2  # nothing to the tablet, gone with n1
    assert await svc.subscribers("home") == {"phone": ("n2", 1)}
    assert redis_server.command("EXISTS", f"{P}dl:node:n1") == 0
    assert svc.stats()["devices_swept"] == 2


async def test_a_node_whose_entry_is_there_is_not_swept(
    service: Any, stream: Stream, redis_server: RedisServer
) -> None:
    redis_server.command("SET", f"{P}node:n1", "127.0.0.1:1")
    svc = await service()
    stream.add("connected", "tv", node="n1", conn=2)
    await handled(svc, 1)
    sweeps = svc._sweeps
    await async_wait_until(lambda: svc._sweeps >= sweeps + 3)

    assert svc.stats()["nodes_swept"] == 0
    assert len(await svc.devices("home")) == 1


# Redis outages and restarts.


async def test_redis_restarting_empty_the_group_comes_back_and_lists_are_rebuilt(
    service: Any,
    stream: Stream,
    inbox: Inbox,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    svc = await service()
    stream.add("connected", "tv", conn=2)
    await handled(svc, 1)

    redis_server.kill()
    redis_server.start()  # empty
    # The nodes register their live devices again when their link is up.
    redis_server.command(
        "SET", f"{P}dev:{{tv}}", "n1\t127.0.0.1:1\t2\t1700000000\thome"
    )
    redis_server.command("SET", f"{P}dev:{{solo}}", "n1\t127.0.0.1:1\t3\t1700000000\t")
    redis_server.command("SET", f"{P}node:n1", "127.0.0.1:1")

    await async_wait_until(
        lambda: svc.stats()["devices_rebuilt"] >= 1, timeout=scaled(10)
    )
    listed = await svc.devices("home")
    assert [(d["device"], d["conn"], d["since"], d["meta"]) for d in listed] == [
        ("tv", 2, 1700000000000, {})
    ]
    # Events flow again on the group made anew.
    stream.add("subscribe", "phone", conn=5)
    await async_wait_until(lambda: inbox.kinds("phone") == [("device_list", ["tv"])])
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "unreachable" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert svc.stats()["redis_up"]


async def test_the_service_starts_while_redis_is_down_and_catches_up(
    service: Any, stream: Stream, inbox: Inbox, redis_server: RedisServer
) -> None:
    redis_server.stop()
    svc = await service()
    assert svc.running and not svc.stats()["redis_up"]

    redis_server.start()
    stream.add("subscribe", "phone", conn=1)
    await async_wait_until(
        lambda: inbox.kinds("phone") == [("device_list", [])], timeout=scaled(10)
    )


# The API.


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"redis": "http://x"}, "redis must be a redis:// URL"),
        ({"prefix": ""}, "prefix must be non-empty"),
        ({"group": "a b"}, "group must be non-empty"),
        ({"sweep_s": 0}, "sweep_s must be above 0"),
        ({"batch": 0}, "batch must be 1 to 10000"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict[str, Any], message: str) -> None:
    kwargs.setdefault("redis", "redis://127.0.0.1:1")
    with pytest.raises(pushy.ConfigError, match=message):
        pushy.DeviceListService(**kwargs)


async def test_a_wrong_password_is_a_config_error(redis_server: RedisServer) -> None:
    redis_server.command("CONFIG", "SET", "requirepass", "secret")
    url = f"redis://:wrong@127.0.0.1:{redis_server.port}"
    svc = DeviceListService(url, deliver=Inbox())
    with pytest.raises(pushy.ConfigError, match="redis refused"):
        await svc.start()
    assert not svc.running


def test_the_service_runs_in_a_thread_of_its_own(
    redis_server: RedisServer, stream: Stream
) -> None:
    inbox = Inbox()
    svc = DeviceListService(redis_server.url, deliver=inbox, block_s=scaled(0.2))
    with svc:
        assert svc.running
        stream.add("connected", "tv", conn=1)
        from pushy.testing import wait_until

        wait_until(lambda: online_devices(redis_server.url, "home"))
        with pytest.raises(pushy.PushyError, match="already running"):
            svc.start_thread()
    assert not svc.running
    assert "c1" not in repr(svc) and "stopped" in repr(svc)


# The command line.


async def test_pushy_devicelist_tells_devices_and_stops_on_sigterm(
    redis_server: RedisServer, fleet: Callable[..., pushy.Node]
) -> None:
    from pushy.testing import token_for
    from pushy_cli import PushyProcess

    node = fleet("node-a")
    cli = PushyProcess(
        "devicelist", "--redis", redis_server.url, "--prefix", P,
        "--consumer", "cli-1", "--sweep-s", str(scaled(SWEEP_S)),
    )  # fmt: skip
    phone = pushy.DeviceClient(node.url, token_for("phone", "home"))
    tv = pushy.DeviceClient(node.url, token_for("tv", "home", meta={"room": "den"}))
    try:
        line = cli.wait_line(
            r"pushy: devicelist consumer (\S+) of group (\S+)", scaled(30)
        )
        assert line.groups() == ("cli-1", "devicelist")
        await phone.connect()
        assert await subscribed(phone) == []
        await tv.connect()
        online = await phone.wait_for("event", kind="device_online", timeout=scaled(10))
        assert (online["device"], online["meta"]) == ("tv", {"room": "den"})
        listed = online_devices(redis_server.url, "home")
        assert [(d["device"], d["meta"]) for d in listed] == [
            ("phone", {}),
            ("tv", {"room": "den"}),
        ]
        # The event is sent before its entry is acknowledged.
        await async_wait_until(lambda: pending(redis_server) == 0)
        code = cli.finish(signal.SIGTERM)
    finally:
        await phone.close()
        await tv.close()
        cli.close()
    assert code == 0, cli.output
    assert "pushy: devicelist stopped" in "".join(cli.stdout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--redis is required"),
        (["--redis", "http://x"], "redis must be a redis:// URL"),
        (["--redis", "redis://127.0.0.1:1", "--sweep-s", "0"], "sweep_s must be"),
    ],
)
def test_pushy_devicelist_with_bad_options_exits_2(
    args: list[str], message: str
) -> None:
    from pushy_cli import run_pushy

    proc = run_pushy("devicelist", *args)

    assert proc.returncode == 2, proc.stderr
    assert "pushy: error:" in proc.stderr and message in proc.stderr, proc.stderr


# End to end: real nodes, real devices, events sent through the fleet.


async def next_not_pong(device: pushy.DeviceClient) -> dict[str, Any]:
    return await device.receive(timeout=scaled(5))


async def subscribed(device: pushy.DeviceClient) -> list[str]:
    """Subscribe ``device``; return the devices of the ``device_list`` it gets."""
    await device.subscribe()
    status = await device.wait_for("status", timeout=scaled(5))
    assert status["code"] == 202, status
    listed = await device.wait_for("event", kind="device_list", timeout=scaled(10))
    return [d["device"] for d in listed["devices"]]


async def test_end_to_end_online_offline_across_nodes_and_a_service_restart(
    redis_server: RedisServer, fleet: Callable[..., pushy.Node]
) -> None:
    from pushy.testing import token_for

    node_a, node_b = fleet("node-a"), fleet("node-b")
    svc = DeviceListService(redis_server.url, consumer="dl-e2e", block_s=scaled(0.2))
    await svc.start()
    phone = pushy.DeviceClient(node_a.url, token_for("phone", "home"))
    stranger = pushy.DeviceClient(node_b.url, token_for("stranger", "elsewhere"))
    tv = pushy.DeviceClient(node_b.url, token_for("tv", "home", meta={"room": "den"}))
    try:
        await phone.connect()
        await stranger.connect()
        assert await subscribed(phone) == []
        assert await subscribed(stranger) == []

        await tv.connect()
        online = await phone.wait_for("event", kind="device_online", timeout=scaled(10))
        assert online == {
            "t": "event",
            "kind": "device_online",
            "device": "tv",
            "meta": {"room": "den"},
        }
        listed = await svc.devices("home")
        assert [(d["device"], d["node"]) for d in listed] == [
            ("phone", "node-a"),
            ("tv", "node-b"),
        ]

        # The service is down while the TV leaves; restarted, it misses
        # nothing.
        await svc.stop()
        await tv.close()
        svc = DeviceListService(
            redis_server.url, consumer="dl-e2e", block_s=scaled(0.2)
        )
        await svc.start()
        offline = await phone.wait_for(
            "event", kind="device_offline", timeout=scaled(10)
        )
        assert offline == {
            "t": "event",
            "kind": "device_offline",
            "device": "tv",
            "meta": {},
        }
        assert [d["device"] for d in await svc.devices("home")] == ["phone"]

        # The stranger heard nothing of home: the next thing it gets is this.
        async with pushy.PushClient(redis=redis_server.url) as client:
            result = await client.apush("stranger", {"marker": 1})
        assert result.code == 200, result
        assert (await next_not_pong(stranger))["data"] == {"marker": 1}
        # Nor did the phone hear of itself.
        assert svc.stats()["deliveries_failed"] == 0
    finally:
        for device in (phone, stranger, tv):
            await device.close()
        await svc.stop()


async def test_end_to_end_devices_of_a_killed_node_go_offline(
    redis_server: RedisServer,
    fleet: Callable[..., pushy.Node],
    cluster_factory: Callable[..., pushy.Cluster],
) -> None:
    from pushy.testing import token_for

    node_a = fleet("node-a")
    cluster = cluster_factory(1, redis=redis_server.url, registry_ttl_s=2)
    svc = DeviceListService(
        redis_server.url,
        consumer="dl-sweep",
        sweep_s=scaled(SWEEP_S),
        block_s=scaled(0.2),
    )
    await svc.start()
    phone = pushy.DeviceClient(node_a.url, token_for("phone", "home"))
    tv = pushy.DeviceClient(cluster.url, token_for("tv", "home"))
    try:
        await phone.connect()
        await tv.connect()
        await async_wait_until(
            lambda: _devices_named(svc, "home", {"phone", "tv"}), timeout=scaled(10)
        )
        assert await subscribed(phone) == ["tv"]

        cluster.nodes[0].kill()
        offline = await phone.wait_for(
            "event", kind="device_offline", device="tv", timeout=scaled(20)
        )
        assert offline["meta"] == {}
        assert [d["device"] for d in await svc.devices("home")] == ["phone"]
        await async_wait_until(lambda: svc.stats()["nodes_swept"] == 1)
        assert svc.stats()["devices_swept"] == 1
    finally:
        await phone.close()
        await tv.close()
        await svc.stop()


async def _devices_named(svc: DeviceListService, account: str, names: set[str]) -> bool:
    return {d["device"] for d in await svc.devices(account)} == names
