"""The HTTP upgrade of the device port: every refusal and the accepted case.

Each request is sent byte for byte over a plain socket (see ``wsraw``), so
the node sees exactly the request under test. Requests meant to fail for
one reason are otherwise valid, valid token included.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from conftest import SANITIZED, rss_kib
from pushy import Node
from pushy.testing import TEST_SECRET, scaled, token_for, wait_until
from wsraw import (
    OP_TEXT,
    HttpResponse,
    RawWebSocket,
    accept_for,
    new_key,
    upgrade_headers,
)

# A second secret of the same length, for tokens the node must not trust.
OTHER_SECRET = "not-the-node-secret-" + "fedcba9876543210" * 3


def send_upgrade(
    node: Node,
    headers: list[tuple[str, str]],
    path: str = "/v1/connect",
    method: str = "GET",
    version: str = "HTTP/1.1",
) -> HttpResponse:
    """Send one upgrade request on a new socket and return the response."""
    with RawWebSocket(node.host, node.port) as ws:
        return ws.upgrade(headers, path=path, method=method, version=version)


def valid_headers(node: Node, device: str = "d1") -> list[tuple[str, str]]:
    return upgrade_headers(
        node.host, token=token_for(device, secret=node.config.secret)
    )


def replace_header(
    headers: list[tuple[str, str]], name: str, value: str | None
) -> list[tuple[str, str]]:
    """Headers with ``name`` set to ``value`` (dropped when ``None``)."""
    out = [(k, v) for k, v in headers if k.lower() != name.lower()]
    if value is not None:
        out.append((name, value))
    return out


def error_text(response: HttpResponse) -> str:
    """The refusal's explanation, lower-cased (the whole body)."""
    return response.text.lower()


def assert_serves_a_device(node: Node, device: str = "after") -> None:
    """A normal device still connects and gets its hello."""
    with RawWebSocket(node.host, node.port) as ws:
        response = ws.upgrade(valid_headers(node, device))
        assert response.status == 101, response.text
        assert ws.recv_message()["t"] == "hello"


# Version and handshake headers.


def test_websocket_version_8_is_answered_426_naming_version_13(
    pushy_node: Node,
) -> None:
    headers = replace_header(valid_headers(pushy_node), "Sec-WebSocket-Version", "8")

    response = send_upgrade(pushy_node, headers)

    assert response.status == 426, response.text
    assert response.headers.get("sec-websocket-version") == "13"


def test_missing_websocket_version_is_answered_426_naming_version_13(
    pushy_node: Node,
) -> None:
    headers = replace_header(valid_headers(pushy_node), "Sec-WebSocket-Version", None)

    response = send_upgrade(pushy_node, headers)

    assert response.status == 426, response.text
    assert response.headers.get("sec-websocket-version") == "13"


@pytest.mark.parametrize(
    "key",
    [
        base64.b64encode(os.urandom(15)).decode(),
        base64.b64encode(os.urandom(17)).decode(),
        base64.b64encode(os.urandom(32)).decode(),
        "not base64 at all!!!!!==",
        "short",
        "",
    ],
    ids=["15-bytes", "17-bytes", "32-bytes", "not-base64", "short", "empty"],
)
def test_key_that_is_not_16_bytes_of_base64_is_answered_400(
    pushy_node: Node, key: str
) -> None:
    headers = replace_header(valid_headers(pushy_node), "Sec-WebSocket-Key", key)

    response = send_upgrade(pushy_node, headers)

    assert response.status == 400, response.text


def test_upgrade_to_h2c_is_answered_400(pushy_node: Node) -> None:
    headers = replace_header(valid_headers(pushy_node), "Upgrade", "h2c")
    headers.append(("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"))

    response = send_upgrade(pushy_node, headers)

    assert response.status == 400, response.text


def test_post_upgrade_is_answered_400(pushy_node: Node) -> None:
    headers = valid_headers(pushy_node) + [("Content-Length", "0")]

    response = send_upgrade(pushy_node, headers, method="POST")

    assert response.status == 400, response.text


def test_http_1_0_upgrade_is_answered_400(pushy_node: Node) -> None:
    response = send_upgrade(pushy_node, valid_headers(pushy_node), version="HTTP/1.0")

    assert response.status == 400, response.text


@pytest.mark.parametrize(
    "path", ["/", "/v1/connect/extra", "/v2/connect", "/V1/CONNECT"]
)
def test_upgrade_on_another_path_is_answered_404(pushy_node: Node, path: str) -> None:
    response = send_upgrade(pushy_node, valid_headers(pushy_node), path=path)

    assert response.status == 404, response.text


# Header limits.


def test_16_kib_cookie_is_answered_431(pushy_node: Node) -> None:
    headers = valid_headers(pushy_node) + [("Cookie", "c=" + "x" * 16 * 1024)]

    response = send_upgrade(pushy_node, headers)

    assert response.status == 431, response.text


def test_200_small_headers_are_answered_431(pushy_node: Node) -> None:
    extra = [(f"X-Small-{i}", "v") for i in range(200)]
    headers = valid_headers(pushy_node) + extra
    assert len(b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)) < 8 * 1024

    response = send_upgrade(pushy_node, headers)

    assert response.status == 431, response.text


def test_max_header_bytes_is_configurable(
    pushy_node_factory: Callable[..., Node],
) -> None:
    default = pushy_node_factory()
    strict = pushy_node_factory(max_header_bytes=2048)
    cookie = ("Cookie", "c=" + "x" * 3000)

    accepted = send_upgrade(default, valid_headers(default) + [cookie])
    refused = send_upgrade(strict, valid_headers(strict) + [cookie])

    assert accepted.status == 101, accepted.text
    assert refused.status == 431, refused.text


def test_max_headers_is_configurable(pushy_node_factory: Callable[..., Node]) -> None:
    default = pushy_node_factory()
    strict = pushy_node_factory(max_headers=20)
    few = [(f"X-Few-{i}", "v") for i in range(8)]
    more = [(f"X-More-{i}", "v") for i in range(25)]

    accepted_default = send_upgrade(default, valid_headers(default) + more)
    accepted_strict = send_upgrade(strict, valid_headers(strict) + few)
    refused = send_upgrade(strict, valid_headers(strict) + more)

    assert accepted_default.status == 101, accepted_default.text
    assert accepted_strict.status == 101, accepted_strict.text
    assert refused.status == 431, refused.text


def test_max_headers_is_a_count_inclusive_limit(
    pushy_node_factory: Callable[..., Node],
) -> None:
    node = pushy_node_factory(max_headers=20)
    base = valid_headers(node)
    at_limit = base + [(f"X-Fill-{i}", "v") for i in range(20 - len(base))]
    over = at_limit + [("X-One-More", "v")]

    accepted = send_upgrade(node, at_limit)
    refused = send_upgrade(node, over)

    assert accepted.status == 101, accepted.text
    assert refused.status == 431, refused.text


def test_stalled_upgrade_is_closed_after_upgrade_timeout(
    pushy_node_factory: Callable[..., Node], stats: Callable[[Node], dict[str, Any]]
) -> None:
    node = pushy_node_factory(upgrade_timeout_s=scaled(0.3))
    before = sum(stats(node)["rejects"].values())

    with RawWebSocket(node.host, node.port) as ws:
        ws.send_raw(b"GET /v1/connect HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        how = ws.wait_server_closed(timeout=scaled(5))

    assert how in ("eof", "reset")
    wait_until(
        lambda: sum(stats(node)["rejects"].values()) == before + 1,
        message="the stalled upgrade to be counted",
    )


def test_oversized_header_attempts_keep_memory_bounded_and_node_serving(
    pushy_node: Node,
) -> None:
    big_cookie = [("Cookie", "c=" + "x" * 16 * 1024)]
    many = [(f"X-Small-{i}", "v") for i in range(200)]
    huge_cookie = [("Cookie", "c=" + "y" * 256 * 1024)]

    def attack(extra: list[tuple[str, str]], times: int) -> None:
        for _ in range(times):
            response = send_upgrade(pushy_node, valid_headers(pushy_node) + extra)
            assert response.status == 431, response.text

    # Warm up allocator pools and the test's own buffers first.
    attack(big_cookie, 20)
    attack(many, 20)
    attack(huge_cookie, 5)
    before = rss_kib()

    # Enough attempts that keeping even the header buffer of each refused
    # upgrade (max_header_bytes and more) would pass the bound.
    attack(big_cookie, 1000)
    attack(many, 1000)
    attack(huge_cookie, 200)
    after = rss_kib()

    if not SANITIZED:
        assert after - before < 20 * 1024, f"RSS grew by {after - before} KiB"
    assert_serves_a_device(pushy_node)


# Tokens.


def hs_token(secret: str, algorithm: str = "HS256", **claims: Any) -> str:
    payload = {"sub": "d1", "acc": "acct", "exp": 2**31 - 1, **claims}
    return jwt.encode(payload, secret, algorithm=algorithm)


def unsigned_token() -> str:
    """An ``alg: none`` token (RFC 7519 section 6), built by hand."""

    def b64(obj: dict[str, Any]) -> str:
        raw = json.dumps(obj, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = b64({"alg": "none", "typ": "JWT"})
    payload = b64({"sub": "d1", "acc": "acct", "exp": 2**31 - 1})
    return f"{header}.{payload}."


@dataclass(frozen=True)
class BadToken:
    make: Callable[[], str | None]
    reason: str  # a word the refusal must name


BAD_TOKENS = {
    "missing": BadToken(lambda: None, "missing"),
    "malformed": BadToken(lambda: "not.a.jwt", "malformed"),
    "garbage": BadToken(lambda: "x" * 40, "malformed"),
    "wrong-signature": BadToken(lambda: hs_token(OTHER_SECRET), "signature"),
    "hs512": BadToken(lambda: hs_token(TEST_SECRET, "HS512"), "algorithm"),
    "alg-none": BadToken(unsigned_token, "algorithm"),
    "expired": BadToken(lambda: token_for("d1", ttl=-120), "expired"),
    "no-exp": BadToken(
        lambda: jwt.encode({"sub": "d1", "acc": "acct"}, TEST_SECRET), "no exp"
    ),
    "no-sub": BadToken(
        lambda: jwt.encode({"acc": "acct", "exp": 2**31 - 1}, TEST_SECRET), "sub"
    ),
    # A device no push could name (device ids are at most 256 bytes).
    "sub-over-256-bytes": BadToken(
        lambda: hs_token(TEST_SECRET, sub="d" * 257), "longer than 256 bytes"
    ),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS), ids=list(BAD_TOKENS))
def test_bad_token_is_answered_401_with_its_reason(pushy_node: Node, case: str) -> None:
    bad = BAD_TOKENS[case]
    headers = upgrade_headers(pushy_node.host, token=bad.make())

    response = send_upgrade(pushy_node, headers)

    assert response.status == 401, response.text
    assert bad.reason in error_text(response), response.text
    assert "sec-websocket-accept" not in response.headers


def test_authorization_of_another_scheme_is_answered_401_naming_bearer(
    pushy_node: Node,
) -> None:
    headers = upgrade_headers(pushy_node.host)
    headers.append(("Authorization", "Basic dXNlcjpwYXNz"))

    response = send_upgrade(pushy_node, headers)

    assert response.status == 401, response.text
    assert "not 'bearer <token>'" in error_text(response), response.text


@pytest.mark.parametrize("where", ["bearer", "query", "query-after-another"])
def test_valid_token_upgrades_with_subprotocol_and_hello(
    pushy_node_factory: Callable[..., Node], where: str
) -> None:
    node = pushy_node_factory(heartbeat_s=42, lifetime_s=300)
    token = token_for("tv-7", secret=node.config.secret)
    key = new_key()
    path = "/v1/connect"
    if where == "bearer":
        headers = upgrade_headers(node.host, token=token, key=key)
    elif where == "query":
        headers = upgrade_headers(node.host, key=key)
        path += f"?token={token}"
    else:
        headers = upgrade_headers(node.host, key=key)
        path += f"?app=tv&token={token}&v=2"

    with RawWebSocket(node.host, node.port) as ws:
        response = ws.upgrade(headers, path=path)
        frame = ws.recv_frame()

    assert response.status == 101, response.text
    assert response.headers.get("sec-websocket-protocol") == "pushy.v1"
    assert response.headers.get("sec-websocket-accept") == accept_for(key)
    assert response.headers.get("upgrade", "").lower() == "websocket"
    assert frame.opcode == OP_TEXT and frame.fin and not frame.masked
    hello = frame.json()
    assert set(hello) == {"t", "device", "node", "heartbeat_s", "reconnect_in_s"}
    assert hello["t"] == "hello"
    assert hello["device"] == "tv-7"
    assert hello["node"] == node.node_id
    assert hello["heartbeat_s"] == 42
    assert isinstance(hello["reconnect_in_s"], (int, float))
    assert 0 < hello["reconnect_in_s"] <= 300


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Connection", "keep-alive, Upgrade"),
        ("Upgrade", "WebSocket"),
        ("Sec-WebSocket-Protocol", "chat, pushy.v1"),
    ],
    ids=["connection-list", "upgrade-case", "protocol-list"],
)
def test_browser_style_upgrade_headers_are_accepted(
    pushy_node: Node, name: str, value: str
) -> None:
    headers = replace_header(valid_headers(pushy_node), name, value)

    response = send_upgrade(pushy_node, headers)

    assert response.status == 101, response.text
    assert response.headers.get("sec-websocket-protocol") == "pushy.v1"


# Counting.


@dataclass(frozen=True)
class Refusal:
    status: int
    send: Callable[[Node], HttpResponse]
    counter: str  # a word the name of the counter holds


def _with(name: str, value: str | None) -> Callable[[Node], HttpResponse]:
    return lambda n: send_upgrade(n, replace_header(valid_headers(n), name, value))


def _bearer(make: Callable[[], str | None]) -> Callable[[Node], HttpResponse]:
    return lambda n: send_upgrade(n, upgrade_headers(n.host, token=make()))


REFUSALS = {
    "version-8": Refusal(426, _with("Sec-WebSocket-Version", "8"), "version"),
    "no-version": Refusal(426, _with("Sec-WebSocket-Version", None), "version"),
    "bad-key": Refusal(400, _with("Sec-WebSocket-Key", "short"), "key"),
    "h2c": Refusal(400, _with("Upgrade", "h2c"), "upgrade"),
    "post": Refusal(
        400, lambda n: send_upgrade(n, valid_headers(n), method="POST"), "method"
    ),
    "http-1.0": Refusal(
        400, lambda n: send_upgrade(n, valid_headers(n), version="HTTP/1.0"), "version"
    ),
    "wrong-path": Refusal(
        404, lambda n: send_upgrade(n, valid_headers(n), path="/nope"), "path"
    ),
    "big-cookie": Refusal(
        431,
        lambda n: send_upgrade(n, valid_headers(n) + [("Cookie", "x" * 16 * 1024)]),
        "header",
    ),
    "many-headers": Refusal(
        431,
        lambda n: send_upgrade(
            n, valid_headers(n) + [(f"X-{i}", "v") for i in range(200)]
        ),
        "header",
    ),
    **{
        f"token-{name}": Refusal(401, _bearer(bad.make), "token")
        for name, bad in BAD_TOKENS.items()
    },
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_each_refused_upgrade_is_counted_under_rejects(
    pushy_node: Node,
    stats: Callable[[Node], dict[str, Any]],
    wait_rejects: Callable[..., dict[str, int]],
    case: str,
) -> None:
    refusal = REFUSALS[case]
    before = stats(pushy_node)["rejects"]

    response = refusal.send(pushy_node)

    assert response.status == refusal.status, response.text
    after = wait_rejects(pushy_node, before)
    grown = {
        k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)
    }
    assert sum(grown.values()) == 1, grown
    (name,) = grown
    assert refusal.counter in name, grown


# Admission: connection limit and accept rate.


def test_upgrade_at_the_connection_limit_is_answered_503_retry_after_5(
    pushy_node_factory: Callable[..., Node],
    stats: Callable[[Node], dict[str, Any]],
) -> None:
    node = pushy_node_factory(max_connections=2)
    with RawWebSocket(node.host, node.port) as first, RawWebSocket(
        node.host, node.port
    ) as second:
        for i, ws in enumerate((first, second)):
            assert ws.upgrade(valid_headers(node, f"d{i}")).status == 101
            assert ws.recv_message()["t"] == "hello"
        before = stats(node)["rejects"]

        refused = send_upgrade(node, valid_headers(node, "third"))

        assert refused.status == 503, refused.text
        assert refused.headers["retry-after"] == "5"
        assert refused.json() == {"error": "node is at its connection limit"}
        after = stats(node)["rejects"]
        assert after["too_many_connections"] == before["too_many_connections"] + 1
        assert after["accept_rate"] == before["accept_rate"]
    # Room again once a device has left.
    wait_until(lambda: stats(node)["connections"] == 0)
    assert_serves_a_device(node)


def test_connections_beyond_max_pending_upgrades_wait_in_the_listen_queue(
    pushy_node_factory: Callable[..., Node],
    stats: Callable[[Node], dict[str, Any]],
) -> None:
    node = pushy_node_factory(max_pending_upgrades=2)
    # Two connections that send nothing hold both upgrade places.
    with RawWebSocket(node.host, node.port) as idle1, RawWebSocket(
        node.host, node.port
    ) as idle2:
        wait_until(lambda: stats(node)["upgrades_in_progress"] == 2)
        with RawWebSocket(node.host, node.port) as third:
            # Connected (the kernel's queue), but not accepted: no answer.
            third.send_request(valid_headers(node, "third"))
            with pytest.raises(TimeoutError):
                third.read_response(timeout=scaled(0.5))
            assert stats(node)["upgrades_in_progress"] == 2
            idle1.close()
            # A place is free: the third is accepted and upgraded.
            assert third.read_response().status == 101
            assert third.recv_message()["t"] == "hello"
        assert stats(node)["rejects"]["bad_request"] == 0
    wait_until(lambda: stats(node)["upgrades_in_progress"] == 0)


def test_upgrades_over_the_accept_rate_are_answered_503_retry_after_1(
    pushy_node_factory: Callable[..., Node],
    stats: Callable[[Node], dict[str, Any]],
) -> None:
    # A bucket of 3 that refills at 2 upgrades a second (one io thread).
    node = pushy_node_factory(accept_rate=2, accept_burst=3, threads=1)
    before = stats(node)["rejects"]

    answers = [send_upgrade(node, valid_headers(node, f"d{i}")) for i in range(4)]

    assert [r.status for r in answers] == [101, 101, 101, 503]
    refused = answers[-1]
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": "node is over its accept rate"}
    after = stats(node)["rejects"]
    assert after["accept_rate"] == before["accept_rate"] + 1
    assert after["too_many_connections"] == before["too_many_connections"]
    # A token comes back within half a second; a refusal takes none.
    started = time.monotonic()
    wait_until(
        lambda: send_upgrade(node, valid_headers(node, "later")).status == 101,
        timeout=scaled(2),
        interval=0.05,
        message="an upgrade to be accepted again",
    )
    assert time.monotonic() - started < 0.5 + scaled(0.5)
