"""Connection events, upstream ``send``, ``subscribe`` and event frames
(issue 5; docs/protocol.md, docs/architecture.md#connection-events).

Real nodes on a real redis-server, real WebSocket clients; the streams are
read back with XRANGE. Every timing is scaled by ``pushy.testing.TIME_UNIT``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from pushy import DeviceClient, Node, PushClient
from pushy.cli import main as cli_main
from pushy.config import NodeConfig
from pushy.errors import ConfigError, TokenError, TokenRejected
from pushy.testing import (
    RedisServer,
    async_wait_until,
    scaled,
    token_for,
    wait_until,
)

Fleet = Callable[..., Node]

EVENTS = "pushy:events"


def entries(redis: RedisServer, key: str) -> list[dict[str, str]]:
    """The entries of stream ``key``, oldest first, as field dicts."""
    reply = redis.command("XRANGE", key, "-", "+")
    return [dict(zip(fields[::2], fields[1::2])) for _, fields in reply]


def wait_entries(redis: RedisServer, key: str, count: int) -> list[dict[str, str]]:
    """The entries of ``key`` once there are at least ``count``."""

    def enough() -> list[dict[str, str]] | None:
        found = entries(redis, key)
        return found if len(found) >= count else None

    return wait_until(enough, message=f"{count} entries in {key}")


def upstream(node: Node) -> dict[str, Any]:
    return node.stats()["upstream"]


def fleet_stats(node: Node) -> dict[str, Any]:
    return node.stats()["fleet"]


async def status_of(device: DeviceClient, message: dict[str, Any]) -> dict[str, Any]:
    """Send ``message`` and return the node's status for it (same id)."""
    await device.send(message)
    return await device.wait_for("status", id=message.get("id"), timeout=scaled(5))


# Connection events.


async def test_connect_subscribe_and_disconnect_are_written_in_order(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    a = fleet("a")
    meta = {"name": "Salon TV", "model": "x-1"}
    tv = await device_factory(
        "tv", account="home", node=a, token=token_for("tv", "home", meta=meta)
    )

    await tv.subscribe()
    status = await tv.wait_for("status", timeout=scaled(5))
    await tv.close()
    got = wait_entries(redis_server, EVENTS, 3)

    assert status == {"t": "status", "id": None, "code": 202}
    assert [e["kind"] for e in got] == ["connected", "subscribe", "disconnected"]
    conn = got[0]["conn"]
    for e in got:
        assert (e["device"], e["account"], e["node"], e["conn"]) == (
            "tv",
            "home",
            "a",
            conn,
        )
    assert int(conn) > 0
    times = [int(e["time"]) for e in got]
    assert times == sorted(times) and times[0] > 1_600_000_000_000
    assert json.loads(got[0]["meta"]) == meta
    assert got[1]["topic"] == "account.devices"
    assert "meta" not in got[1] and "topic" not in got[0]
    assert set(got[2]) == {"kind", "device", "account", "node", "conn", "time"}
    await async_wait_until(lambda: fleet_stats(a)["events_written"] == 3)
    assert fleet_stats(a)["events_dropped"] == 0


async def test_meta_is_carried_as_the_token_has_it_and_defaults_to_empty(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    a = fleet("a")
    meta = {"name": "Küche", "n": [1, 2.5]}
    await device_factory("tv", node=a, token=token_for("tv", meta=meta))
    await device_factory("phone", node=a)

    got = wait_entries(redis_server, EVENTS, 2)

    by_device = {e["device"]: e for e in got}
    # PyJWT's compact, ASCII encoding: the text signed is the text carried.
    assert by_device["tv"]["meta"] == json.dumps(meta, separators=(",", ":"))
    assert by_device["phone"]["meta"] == "{}"
    assert by_device["phone"]["account"] == "acct"


async def test_a_device_without_account_has_an_empty_account_field(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    a = fleet("a")
    await device_factory("tv", account=None, node=a)

    (got,) = wait_entries(redis_server, EVENTS, 1)

    assert got["kind"] == "connected" and got["account"] == ""


async def test_a_device_superseded_across_nodes_has_its_events_in_order(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    a, b = fleet("a"), fleet("b")
    old = await device_factory("tv", node=a)
    await device_factory("tv", node=b)

    assert await old.wait_closed(timeout=scaled(5)) == 4001
    got = wait_entries(redis_server, EVENTS, 3)

    assert [(e["kind"], e["node"]) for e in got] == [
        ("connected", "a"),
        ("connected", "b"),
        ("disconnected", "a"),
    ]
    assert got[0]["conn"] == got[2]["conn"]


async def test_a_device_superseded_on_one_node_still_says_its_old_connection_left(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    a = fleet("a")
    old = await device_factory("tv", node=a)
    await device_factory("tv", node=a)

    assert await old.wait_closed(timeout=scaled(5)) == 4001
    got = wait_entries(redis_server, EVENTS, 3)

    assert [e["kind"] for e in got] == ["connected", "connected", "disconnected"]
    assert got[0]["conn"] != got[1]["conn"]
    assert got[2]["conn"] == got[0]["conn"]
    # The record is the newer connection's: the old one did not delete it.
    record = redis_server.command("GET", "pushy:dev:{tv}")
    assert record is not None and f"\t{got[1]['conn']}\t" in record


async def test_events_maxlen_zero_writes_no_events_and_refuses_subscribe(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    a = fleet("a", events_maxlen=0)
    tv = await device_factory("tv", node=a)

    sub = await status_of(tv, {"t": "subscribe", "id": "s", "topic": "account.devices"})
    sent = await status_of(tv, {"t": "send", "id": "m", "to": "service:api", "data": 1})
    await tv.close()
    await async_wait_until(lambda: a.stats()["connections"] == 0)

    assert sub["code"] == 503
    assert sub["reason"] == "connection events are off on this node"
    assert sent["code"] == 202
    assert redis_server.command("EXISTS", EVENTS) == 0
    assert len(entries(redis_server, "pushy:svc:api")) == 1
    assert fleet_stats(a)["events_written"] == 0


async def test_events_stream_is_trimmed_to_about_events_maxlen(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    a = fleet("a", events_maxlen=10, d2d_burst=1000)
    tv = await device_factory("tv", node=a)

    for _ in range(300):
        await tv.send({"t": "subscribe", "topic": "account.devices"})
    for _ in range(300):
        await tv.wait_for("status", code=202, timeout=scaled(5))

    # MAXLEN ~ trims whole stream nodes (100 entries each by default).
    assert redis_server.command("XLEN", EVENTS) <= 200
    assert fleet_stats(a)["events_written"] == 301


# Upstream send.


async def test_send_lands_in_the_service_stream_and_is_answered_202(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    a = fleet("a")
    phone = await device_factory("phone", account="home", node=a)
    (connected,) = wait_entries(redis_server, EVENTS, 1)
    raw = (
        '{"t":"send","id":"m-1","to":"service:billing.v2",'
        '"data":{"b": [1,2.50,"\\u00e9"], "a":null}}'
    )

    await phone.send_raw(raw)
    status = await phone.wait_for("status", id="m-1", timeout=scaled(5))
    (got,) = entries(redis_server, "pushy:svc:billing.v2")

    assert status == {"t": "status", "id": "m-1", "code": 202}
    assert got["id"] == "m-1"
    assert got["from"] == "phone"
    assert got["account"] == "home"
    assert got["node"] == "a"
    assert got["conn"] == connected["conn"]
    assert int(got["time"]) >= int(connected["time"])
    assert got["data"] == '{"b": [1,2.50,"\\u00e9"], "a":null}'
    stats = upstream(a)
    assert stats["sends"] == 1 and stats["status"]["202"] == 1


async def test_sends_of_one_device_keep_their_order(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    a = fleet("a")
    phone = await device_factory("phone", node=a)

    ids = [await phone.send_to_service("api", {"n": i}) for i in range(20)]
    for mid in ids:
        assert (await phone.wait_for("status", id=mid, timeout=scaled(5)))[
            "code"
        ] == 202

    got = entries(redis_server, "pushy:svc:api")
    assert [e["id"] for e in got] == ids
    assert [json.loads(e["data"]) for e in got] == [{"n": i} for i in range(20)]


BAD_SENDS = [
    ({"t": "send", "to": "service:api", "data": 1}, 400, "non-empty string 'id'"),
    ({"t": "send", "id": "", "to": "service:api", "data": 1}, 400, "'id'"),
    ({"t": "send", "id": 7, "to": "service:api", "data": 1}, 400, "'id'"),
    ({"t": "send", "id": "m", "data": 1}, 400, "service:NAME"),
    ({"t": "send", "id": "m", "to": "api", "data": 1}, 400, "service:NAME"),
    ({"t": "send", "id": "m", "to": "service:", "data": 1}, 400, "service:NAME"),
    ({"t": "send", "id": "m", "to": "service:a b", "data": 1}, 400, "NAME"),
    ({"t": "send", "id": "m", "to": "service:a/b", "data": 1}, 400, "NAME"),
    ({"t": "send", "id": "m", "to": "service:" + "x" * 65, "data": 1}, 400, "NAME"),
    ({"t": "send", "id": "m", "to": "service:api"}, 400, "'data'"),
    ({"t": "send", "id": "m", "to": "service:api", "data": "x" * 100}, 413, "64 bytes"),
]


@pytest.mark.parametrize(("message", "code", "reason"), BAD_SENDS)
async def test_a_bad_send_gets_its_status_and_writes_nothing(
    fleet: Fleet,
    redis_server: RedisServer,
    device_factory: Any,
    message: dict[str, Any],
    code: int,
    reason: str,
) -> None:
    a = fleet("a", max_d2d_bytes=64)
    phone = await device_factory("phone", node=a)
    wait_entries(redis_server, EVENTS, 1)

    await phone.send(message)
    status = await phone.wait_for("status", timeout=scaled(5))

    assert status["code"] == code, status
    assert reason in status["reason"]
    expected_id = (
        message.get("id") if isinstance(message.get("id"), (str, int)) else None
    )
    assert status["id"] == expected_id
    assert redis_server.command("KEYS", "pushy:svc:*") == []
    stats = upstream(a)
    assert stats["sends"] == 1 and stats["status"][str(code)] == 1
    assert stats["status"]["202"] == 0


async def test_sends_above_the_shared_rate_get_429(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    a = fleet("a", d2d_rate=0.001, d2d_burst=3)
    phone = await device_factory("phone", node=a)
    await device_factory("tv", node=a)

    # One token goes to a d2d message: the bucket is shared.
    assert (await phone.d2d("tv", 0, timeout=scaled(5)))["code"] == 200
    codes = []
    for i in range(4):
        mid = await phone.send_to_service("api", i)
        codes.append(
            (await phone.wait_for("status", id=mid, timeout=scaled(5)))["code"]
        )

    assert codes == [202, 202, 429, 429]
    assert len(entries(redis_server, "pushy:svc:api")) == 2
    assert upstream(a)["status"]["429"] == 2


# Subscribe and unsubscribe.


async def test_unsubscribe_is_written_with_its_kind_and_an_id_is_echoed(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    a = fleet("a")
    tv = await device_factory("tv", account="home", node=a)

    sub = await status_of(
        tv, {"t": "subscribe", "id": "s-1", "topic": "account.devices"}
    )
    unsub = await status_of(
        tv, {"t": "unsubscribe", "id": 9, "topic": "account.devices"}
    )
    got = wait_entries(redis_server, EVENTS, 3)

    assert sub == {"t": "status", "id": "s-1", "code": 202}
    assert unsub == {"t": "status", "id": 9, "code": 202}
    assert [e["kind"] for e in got] == ["connected", "subscribe", "unsubscribe"]
    assert got[2]["topic"] == "account.devices" and got[2]["account"] == "home"
    stats = upstream(a)
    assert stats["subscriptions"] == 2 and stats["status"]["202"] == 2


async def test_subscribe_to_another_topic_is_400_and_without_account_403(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    a = fleet("a")
    tv = await device_factory("tv", node=a)
    loner = await device_factory("loner", account=None, node=a)
    wait_entries(redis_server, EVENTS, 2)

    other = await status_of(tv, {"t": "subscribe", "id": 1, "topic": "account.pushes"})
    missing = await status_of(tv, {"t": "unsubscribe", "id": 2})
    no_account = await status_of(
        loner, {"t": "subscribe", "id": 3, "topic": "account.devices"}
    )

    assert other["code"] == 400 and "account.devices" in other["reason"]
    assert missing["code"] == 400 and "unsubscribe" in missing["reason"]
    assert no_account["code"] == 403 and "acc" in no_account["reason"]
    assert len(entries(redis_server, EVENTS)) == 2
    stats = upstream(a)
    assert stats["status"]["400"] == 2 and stats["status"]["403"] == 1


# Without Redis.


async def test_the_embedded_registry_answers_send_and_subscribe_503(
    pushy_node: Node, device_factory: Any
) -> None:
    tv = await device_factory("tv", node=pushy_node)

    sent = await status_of(tv, {"t": "send", "id": "m", "to": "service:a", "data": 1})
    sub = await status_of(tv, {"t": "subscribe", "id": "s", "topic": "account.devices"})

    assert sent == {
        "t": "status",
        "id": "m",
        "code": 503,
        "reason": "needs a fleet on Redis",
    }
    assert sub["code"] == 503 and sub["reason"] == "needs a fleet on Redis"
    assert upstream(pushy_node)["status"]["503"] == 2


async def test_while_redis_is_down_send_and_subscribe_get_503_and_events_drop(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    a = fleet("a")
    tv = await device_factory("tv", node=a)
    wait_entries(redis_server, EVENTS, 1)

    redis_server.stop()
    await async_wait_until(lambda: fleet_stats(a)["redis"] == "down")
    sent = await status_of(tv, {"t": "send", "id": "m", "to": "service:a", "data": 1})
    sub = await status_of(tv, {"t": "subscribe", "id": "s", "topic": "account.devices"})
    await tv.close()
    await async_wait_until(lambda: fleet_stats(a)["events_dropped"] == 2)

    assert sent == {
        "t": "status",
        "id": "m",
        "code": 503,
        "reason": "registry unavailable",
    }
    assert sub["code"] == 503 and sub["reason"] == "registry unavailable"
    assert fleet_stats(a)["events_written"] == 1


# Event frames through the push client.


async def test_send_event_reaches_the_device_on_another_node_as_it_is(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    fleet("a")
    b = fleet("b")
    tv = await device_factory("tv", node=b)
    event = {"kind": "device_online", "device": "phone", "meta": {"n": "é"}}

    with PushClient(redis=redis_server.url) as client:
        result = await client.asend_event("tv", event)
        frame = await tv.wait_for("event", timeout=scaled(5))
        again = client.send_event(
            "tv", {"t": "event", "kind": "device_list", "devices": []}
        )

    assert result.code == 200 and result.node == "b", result
    assert result.id is None
    assert frame == {"t": "event", **event}
    assert again.code == 200
    assert (await tv.wait_for("event", timeout=scaled(5)))["kind"] == "device_list"
    stats = b.stats()
    assert stats["fleet"]["events_sent"] == 2
    assert stats["pushes"]["delivered"] == 0


async def test_send_event_to_a_connection_that_is_gone_is_404(
    fleet: Fleet, redis_server: RedisServer, device_factory: Any
) -> None:
    b = fleet("b")
    tv = await device_factory("tv", node=b)
    (connected,) = wait_entries(redis_server, EVENTS, 1)
    conn = int(connected["conn"])
    event = {"kind": "device_offline", "device": "phone", "meta": {}}

    with PushClient(redis=redis_server.url) as client:
        gone = client.send_event("tv", event, conn=conn + 1000)
        right = client.send_event("tv", event, conn=conn)
        nobody = client.send_event("radio", event)

    assert (gone.code, gone.reason) == (404, "connection is gone")
    assert right.code == 200
    assert nobody.code == 404
    assert (await tv.wait_for("event", timeout=scaled(5)))["kind"] == "device_offline"
    assert fleet_stats(b)["events_sent"] == 1


def test_send_event_checks_the_frame_and_needs_redis(
    pushy_node: Node, redis_server: RedisServer
) -> None:
    with (
        PushClient(pushy_node.push_url) as http_client,
        pytest.raises(ConfigError, match="redis="),
    ):
        http_client.send_event("tv", {"kind": "device_list"})
    with PushClient(redis=redis_server.url) as client:
        with pytest.raises(ValueError, match="'event'"):
            client.send_event("tv", {"t": "push"})
        with pytest.raises(TypeError, match="JSON-encodable"):
            client.send_event("tv", {"kind": object()})
        with pytest.raises(TypeError, match="dict"):
            client.send_event("tv", ["not", "a", "frame"])  # type: ignore[arg-type]
        empty = client.send_event("", {"kind": "x"})
    assert empty.code == 400


# Tokens and configuration.


async def test_a_token_whose_meta_is_not_a_small_object_is_refused_401(
    pushy_node: Node,
) -> None:
    before = pushy_node.stats()["rejects"]["token_bad_meta"]
    for meta in ([1], "text", {"k": "x" * 1100}):
        token = token_for("tv", claims={"meta": meta})
        with pytest.raises(TokenRejected) as info:
            await DeviceClient(pushy_node.url, token).connect()
        assert info.value.status == 401
        assert json.loads(info.value.body)["error"] == (
            "token meta must be a JSON object of at most 1024 bytes"
        )
    assert pushy_node.stats()["rejects"]["token_bad_meta"] == before + 3


def test_issue_token_refuses_meta_that_a_node_would_refuse() -> None:
    with pytest.raises(TokenError, match="JSON object"):
        token_for("tv", meta=[1])  # type: ignore[arg-type]
    with pytest.raises(TokenError, match="1024 bytes"):
        token_for("tv", meta={"k": "x" * 1100})
    with pytest.raises(TokenError, match="JSON-encodable"):
        token_for("tv", meta={"k": float("nan")})


def test_pushy_token_meta_puts_the_claim_in_the_token(
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = "s" * 32
    args = ["token", "--secret", secret, "--device", "tv", "--account", "home"]

    assert cli_main([*args, "--meta", '{"name":"TV"}']) == 0
    token = capsys.readouterr().out.strip()
    assert cli_main([*args, "--meta", "[1"]) == 2
    error = capsys.readouterr().err

    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["meta"] == {"name": "TV"}
    assert "--meta must be a JSON object" in error


def test_events_maxlen_comes_from_every_source_and_is_checked(tmp_path: Any) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text("events-maxlen = 50\n")

    assert NodeConfig().events_maxlen == 1_000_000
    assert NodeConfig.from_sources(toml, env={}).events_maxlen == 50
    assert (
        NodeConfig.from_sources(toml, env={"PUSHY_EVENTS_MAXLEN": "7"}).events_maxlen
        == 7
    )
    assert (
        NodeConfig.from_sources(
            toml, env={"PUSHY_EVENTS_MAXLEN": "7"}, events_maxlen=0
        ).events_maxlen
        == 0
    )
    with pytest.raises(ConfigError, match="events_maxlen"):
        NodeConfig(events_maxlen=-1)
    with pytest.raises(ConfigError, match="events_maxlen"):
        NodeConfig(events_maxlen=10**10)
