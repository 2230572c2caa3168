"""The internal HTTP push API on a node's push port (DESIGN 4 and 6).

Bad input gets its own status and a reason; a push to a connected device is
answered 200 only once its frame was written (``ack: "written"``) or the
device acked it (``ack: "client"``); every outcome is counted in /v1/stats.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from pushy import DeviceClient, Node
from pushy.testing import async_wait_until, scaled, wait_until
from wsraw import RawWebSocket

#: The push size limit of the nodes made with ``small_node``.
MAX_PUSH = 1024

DeviceFactory = Callable[..., Awaitable[DeviceClient]]
RawDevice = Callable[..., tuple[RawWebSocket, Any]]


@pytest.fixture
def small_node(pushy_node_factory: Callable[..., Node]) -> Node:
    """A node that takes pushes of at most MAX_PUSH bytes of data."""
    return pushy_node_factory(max_push_bytes=MAX_PUSH)


@pytest.fixture
def http(pushy_node: Node) -> Iterator[httpx.Client]:
    """A synchronous HTTP client of ``pushy_node``'s push port."""
    with httpx.Client(
        base_url=pushy_node.push_url, timeout=scaled(10), trust_env=False
    ) as client:
        yield client


@pytest_asyncio.fixture
async def ahttp(pushy_node: Node) -> AsyncIterator[httpx.AsyncClient]:
    """An asynchronous HTTP client of ``pushy_node``'s push port."""
    async with httpx.AsyncClient(
        base_url=pushy_node.push_url, timeout=scaled(10), trust_env=False
    ) as client:
        yield client


def post_raw(client: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


def assert_refused(response: httpx.Response, code: int, mentions: str = "") -> None:
    """``response`` has status ``code`` and a JSON body with a reason."""
    assert response.status_code == code, response.text
    body = response.json()
    reason = body.get("reason")
    assert isinstance(reason, str) and reason, body
    assert mentions in reason.lower(), body


def ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


# Bad input.


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b'{"device":"d1","data":}',
        b"\xff\xfe",
        b'{"device":"d1","data":1} trailing',
        b'{"device":"d1","data":"\xc0\xaf"}',
    ],
    ids=[
        "broken",
        "empty",
        "missing-value",
        "not-utf8",
        "trailing-garbage",
        "invalid-utf8-in-string",
    ],
)
def test_body_that_is_not_json_is_answered_400_with_reason(
    http: httpx.Client, body: bytes
) -> None:
    assert_refused(post_raw(http, "/v1/push", body), 400)


@pytest.mark.parametrize("body", [b"[1, 2]", b'"d1"', b"42", b"null"])
def test_body_that_is_not_an_object_is_answered_400_with_reason(
    http: httpx.Client, body: bytes
) -> None:
    assert_refused(post_raw(http, "/v1/push", body), 400)


def test_absurdly_nested_data_is_answered_400_and_node_keeps_serving(
    http: httpx.Client,
) -> None:
    depth = 100_000
    body = b'{"device":"d1","data":' + b"[" * depth + b"]" * depth + b"}"

    assert_refused(post_raw(http, "/v1/push", body), 400)
    assert http.get("/healthz").status_code == 200


def test_push_without_device_is_answered_400_naming_device(http: httpx.Client) -> None:
    response = http.post("/v1/push", json={"data": {"x": 1}})

    assert_refused(response, 400, mentions="device")


def test_push_with_empty_device_is_answered_400(http: httpx.Client) -> None:
    response = http.post("/v1/push", json={"device": "", "data": {"x": 1}})

    assert_refused(response, 400, mentions="device")


@pytest.mark.parametrize("device", [123, None, ["d1"], {"id": "d1"}])
def test_push_with_non_string_device_is_answered_400(
    http: httpx.Client, device: Any
) -> None:
    response = http.post("/v1/push", json={"device": device, "data": 1})

    assert_refused(response, 400, mentions="device")


def test_push_with_unknown_ack_mode_is_answered_400(http: httpx.Client) -> None:
    response = http.post("/v1/push", json={"device": "d1", "data": 1, "ack": "maybe"})

    assert_refused(response, 400, mentions="ack")
    assert response.json()["device"] == "d1"  # as far as it was read


def test_data_over_max_push_bytes_is_answered_413(small_node: Node) -> None:
    data = "x" * MAX_PUSH  # its JSON text is MAX_PUSH + 2 bytes

    response = httpx.post(
        f"{small_node.push_url}/v1/push",
        json={"device": "d1", "data": data},
        timeout=scaled(10),
        trust_env=False,
    )

    assert_refused(response, 413)
    assert response.json().get("status") == "too_large"


def test_data_of_exactly_max_push_bytes_is_delivered(
    small_node: Node, raw_device: RawDevice
) -> None:
    ws, _ = raw_device(small_node, "d1")
    data = "x" * (MAX_PUSH - 2)  # its JSON text is exactly MAX_PUSH bytes
    assert len(json.dumps(data)) == MAX_PUSH

    response = httpx.post(
        f"{small_node.push_url}/v1/push",
        json={"device": "d1", "data": data},
        timeout=scaled(10),
        trust_env=False,
    )

    assert response.status_code == 200, response.text
    assert ws.recv_message()["data"] == data


def test_push_to_unknown_device_is_answered_404_not_connected(
    http: httpx.Client,
) -> None:
    response = http.post("/v1/push", json={"device": "nobody-here", "data": 1})

    assert response.status_code == 404, response.text
    assert response.json()["status"] == "not_connected"


# Node state endpoints.


def test_healthz_answers_200(http: httpx.Client) -> None:
    response = http.get("/healthz")

    assert response.status_code == 200, response.text


def test_device_endpoint_answers_200_when_connected_and_404_when_not(
    pushy_node: Node, http: httpx.Client, raw_device: RawDevice
) -> None:
    ws, _ = raw_device(pushy_node, "tv-1")

    connected = http.get("/v1/devices/tv-1")
    absent = http.get("/v1/devices/tv-2")

    assert connected.status_code == 200, connected.text
    assert connected.json().get("connected", True) is True
    assert absent.status_code == 404, absent.text
    assert absent.json().get("connected", False) is False

    ws.send_close(1000)
    ws.recv_close()
    wait_until(
        lambda: http.get("/v1/devices/tv-1").status_code == 404,
        message="tv-1 to be gone after it closed",
    )


# Delivery.


def test_push_with_ack_written_is_delivered_with_data_passed_through_exactly(
    pushy_node: Node, http: httpx.Client, raw_device: RawDevice
) -> None:
    ws, _ = raw_device(pushy_node, "d1")
    data = (
        b'{"n":12345678901234567890,"f":[2.50,-3e10,1E-7],"b":[true,false,null],'
        b'"s":"\\u00e9\xe2\x82\xac\xf0\x9f\x98\x80\\n\\"q\\"","e":{},"a":[]}'
    )
    body = b'{"device":"d1","ack":"written","data":' + data + b"}"

    response = post_raw(http, "/v1/push", body)
    frame = ws.recv_frame()

    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "delivered"
    assert result["node"] == pushy_node.node_id
    push = frame.json()
    assert set(push) == {"t", "id", "from", "data", "ack"}, push
    assert push["t"] == "push"
    assert push["id"] == result["id"]
    assert isinstance(push["from"], str) and push["from"].startswith("service:")
    assert push["ack"] is False
    assert push["data"] == json.loads(data)
    assert data in frame.payload, "data was not passed through as sent"


@pytest.mark.parametrize(
    "data",
    [
        b"1",
        b"-0.0e+00",
        b"true",
        b"null",
        b'"a\\u0041\\""',
        b"[ 1 ,\n 2 ]",
        b'{ "k" : [ ] }',
    ],
    ids=[
        "int",
        "odd-float",
        "true",
        "null",
        "escaped-string",
        "spaced-array",
        "spaced-object",
    ],
)
@pytest.mark.parametrize("layout", ["spaced-middle", "spaced-last"])
def test_push_data_of_any_json_shape_reaches_the_device_as_valid_json(
    pushy_node: Node,
    http: httpx.Client,
    raw_device: RawDevice,
    data: bytes,
    layout: str,
) -> None:
    ws, _ = raw_device(pushy_node, "d1")
    if layout == "spaced-middle":
        body = b'{ "device" : "d1" , "data" :  ' + data + b' \n\t, "ack" : "written" }'
    else:
        body = b'{"device":"d1","data":\r\n ' + data + b" \n\t }"

    response = post_raw(http, "/v1/push", body)
    frame = ws.recv_frame()

    assert response.status_code == 200, response.text
    push = frame.json()  # the whole frame must be valid JSON
    assert push["t"] == "push"
    assert push["data"] == json.loads(data)


def test_device_endpoint_takes_percent_encoded_ids(
    pushy_node: Node, http: httpx.Client, raw_device: RawDevice
) -> None:
    raw_device(pushy_node, "tv 1/ä")

    response = http.get("/v1/devices/tv%201%2F%C3%A4")

    assert response.status_code == 200, response.text


async def test_push_waiting_for_ack_is_answered_at_once_when_the_device_leaves(
    device_factory: DeviceFactory, ahttp: httpx.AsyncClient
) -> None:
    device = await device_factory("d1")
    request = asyncio.create_task(
        ahttp.post(
            "/v1/push",
            json={"device": "d1", "data": 1, "ack": "client", "timeout_ms": 60_000},
        )
    )
    await device.wait_for("push", timeout=scaled(5))

    await device.close()
    response = await asyncio.wait_for(request, scaled(5))

    assert response.status_code not in (200, 504), response.text
    assert response.json()["status"] not in ("delivered", "timeout")


async def test_push_with_ack_client_is_answered_200_after_the_device_acks(
    device_factory: DeviceFactory, ahttp: httpx.AsyncClient
) -> None:
    device = await device_factory("d1")
    request = asyncio.create_task(
        ahttp.post(
            "/v1/push",
            json={
                "device": "d1",
                "data": {"k": "v"},
                "ack": "client",
                "timeout_ms": ms(scaled(5)),
            },
        )
    )

    push = await device.wait_for("push", timeout=scaled(5))
    assert push["ack"] is True
    assert push["data"] == {"k": "v"}
    done, _ = await asyncio.wait({request}, timeout=scaled(0.3))
    assert not done, "answered before the device acked"

    await device.ack(push["id"])
    response = await asyncio.wait_for(request, scaled(5))

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "delivered"
    assert response.json()["id"] == push["id"]


async def test_push_with_ack_client_is_answered_504_when_the_device_never_acks(
    device_factory: DeviceFactory, ahttp: httpx.AsyncClient
) -> None:
    device = await device_factory("d1")
    timeout_ms = ms(scaled(0.2))
    started = time.monotonic()

    response = await ahttp.post(
        "/v1/push",
        json={"device": "d1", "data": 1, "ack": "client", "timeout_ms": timeout_ms},
    )
    elapsed = time.monotonic() - started

    assert response.status_code == 504, response.text
    assert response.json()["status"] == "timeout"
    assert elapsed >= timeout_ms / 1000 * 0.9
    assert elapsed < scaled(5)
    push = await device.wait_for("push", timeout=scaled(5))
    assert push["ack"] is True

    # A late ack is harmless: the connection stays usable.
    await device.ack(push["id"])
    await device.ping(timeout=scaled(5))


async def test_batch_answers_one_result_per_push_in_order(
    device_factory: DeviceFactory, ahttp: httpx.AsyncClient
) -> None:
    d1 = await device_factory("d1")
    d2 = await device_factory("d2")
    pushes = [
        {"device": "d1", "data": "first"},
        {"device": "ghost", "data": "second"},
        {"data": "third"},
        {"device": "d2", "data": "fourth"},
        {"device": "d1", "data": "fifth"},
    ]

    response = await ahttp.post("/v1/push/batch", json={"pushes": pushes})

    assert response.status_code in (200, 207), response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [
        "delivered",
        "not_connected",
        "bad_request",
        "delivered",
        "delivered",
    ], results
    got_d1 = [await d1.wait_for("push", timeout=scaled(5)) for _ in range(2)]
    got_d2 = await d2.wait_for("push", timeout=scaled(5))
    ids = {m["data"]: m["id"] for m in [*got_d1, got_d2]}
    assert results[0]["id"] == ids["first"]
    assert results[3]["id"] == ids["fourth"]
    assert results[4]["id"] == ids["fifth"]
    assert [m["data"] for m in got_d1] == ["first", "fifth"]


# Counting.


async def test_stats_count_pushes_by_outcome_and_bytes_in_and_out(
    pushy_node_factory: Callable[..., Node], device_factory: DeviceFactory
) -> None:
    node = pushy_node_factory(max_push_bytes=MAX_PUSH)
    device = await device_factory("d1", node=node)

    async def stats() -> dict[str, Any]:
        return (await client.get("/v1/stats")).json()

    async with httpx.AsyncClient(
        base_url=node.push_url, timeout=scaled(10), trust_env=False
    ) as client:
        before = await stats()

        # Delivered (the device acks), not connected, bad, too large, timeout.
        request = asyncio.create_task(
            client.post(
                "/v1/push", json={"device": "d1", "data": {"n": 1}, "ack": "client"}
            )
        )
        first = await device.wait_for("push", timeout=scaled(5))
        await device.ack(first["id"])
        responses = [await request]
        responses.append(await client.post("/v1/push", json={"device": "x", "data": 1}))
        responses.append(await client.post("/v1/push", json={"data": 1}))
        responses.append(
            await client.post("/v1/push", json={"device": "d1", "data": "y" * MAX_PUSH})
        )
        responses.append(
            await client.post(
                "/v1/push",
                json={
                    "device": "d1",
                    "data": {"n": 2},
                    "ack": "client",
                    "timeout_ms": ms(scaled(0.1)),
                },
            )
        )
        second = await device.wait_for("push", timeout=scaled(5))

        assert [r.status_code for r in responses] == [200, 404, 400, 413, 504]
        outcomes = [r.json()["status"] for r in responses]
        expected_total = sum(before["pushes"].values()) + len(outcomes)

        async def counted() -> dict[str, Any] | None:
            now = await stats()
            return now if sum(now["pushes"].values()) >= expected_total else None

        after = await async_wait_until(counted, message="the pushes to be counted")

    grown = {
        k: after["pushes"][k] - before["pushes"].get(k, 0)
        for k in after["pushes"]
        if after["pushes"][k] != before["pushes"].get(k, 0)
    }
    assert grown == {o: 1 for o in outcomes}, grown
    push_bytes = sum(len(json.dumps(m, separators=(",", ":"))) for m in (first, second))
    ack_bytes = len(json.dumps({"t": "ack", "id": first["id"]}, separators=(",", ":")))
    assert after["bytes_out"] - before["bytes_out"] >= push_bytes
    assert after["bytes_in"] - before["bytes_in"] >= ack_bytes


async def test_metrics_serve_the_stats_in_the_prometheus_text_format(
    pushy_node_factory: Callable[..., Node], device_factory: DeviceFactory
) -> None:
    node = pushy_node_factory(node_id="m-1")
    await device_factory("d1", node=node)
    async with httpx.AsyncClient(
        base_url=node.push_url, timeout=scaled(10), trust_env=False
    ) as client:
        await client.post("/v1/push", json={"device": "d1", "data": 1})
        await client.post("/v1/push", json={"device": "nobody", "data": 1})
        response = await client.get("/metrics")
        refused = await client.post("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['pushy_connections{node="m-1"}'] == 1
    assert samples['pushy_pushes_total{node="m-1",outcome="delivered"}'] >= 1
    assert samples['pushy_pushes_total{node="m-1",outcome="not_connected"}'] >= 1
    assert samples['pushy_rejects_total{node="m-1",reason="draining"}'] == 0
    assert samples['pushy_drain_draining{node="m-1"}'] == 0
    assert samples['pushy_d2d_status_total{node="m-1",code="200"}'] == 0
    assert "# TYPE pushy_connections_opened_total counter" in response.text
    assert "# TYPE pushy_d2d_latency_seconds histogram" in response.text
    assert refused.status_code == 405
