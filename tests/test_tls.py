"""TLS on the device port (``tls_cert``/``tls_key``): wss:// end to end.

Real nodes with a test certificate (``pushy_tls``), real TLS clients:
``pushy.DeviceClient`` and ``websockets`` for the protocol, the raw client of
``wsraw`` (over ``ssl``) for bytes the libraries would not send.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pushy
import pytest
from pushy import ConfigError, DeviceClient, Node, PushClient
from pushy.testing import TLSFiles, scaled, tls_files, token_for, wait_until
from wsraw import (
    OP_CLOSE,
    OP_TEXT,
    RawWebSocket,
    build_request,
    encode_frame,
    open_device,
    parse_close,
    upgrade_headers,
)
from pushy_cli import PushyProcess


@pytest.fixture
def node(pushy_node_factory: Callable[..., Node]) -> Node:
    """A node with a plain device port."""
    return pushy_node_factory()


@pytest.fixture
def tls_node(pushy_node_factory: Callable[..., Node], pushy_tls: TLSFiles) -> Node:
    """A node whose device port speaks TLS only."""
    return pushy_node_factory(tls_cert=pushy_tls.cert, tls_key=pushy_tls.key)


def rejects(node: Node) -> dict[str, int]:
    return node.stats()["rejects"]


async def test_device_connects_over_wss_and_receives_pushes_and_d2d(
    tls_node: Node, pushy_tls: TLSFiles
) -> None:
    assert tls_node.url.startswith("wss://127.0.0.1:")
    ctx = pushy_tls.ssl_context()
    async with (
        DeviceClient(tls_node.url, token_for("tv"), ssl=ctx, auto_ack=True) as tv,
        DeviceClient(tls_node.url, token_for("phone"), ssl=ctx) as phone,
        PushClient(tls_node.push_url) as client,
    ):
        assert tv.hello is not None and tv.hello["device"] == "tv"
        written = await client.apush("tv", {"n": 1})
        assert written.code == 200
        # auto_ack acks a push when it is read: read while it waits.
        acked = asyncio.create_task(client.apush("tv", {"n": 2}, ack="client"))
        got = [await tv.receive(timeout=scaled(5)) for _ in range(2)]
        assert [m["data"] for m in got] == [{"n": 1}, {"n": 2}]
        assert (await acked).code == 200
        status = await phone.d2d("tv", {"hi": True})
        assert status["code"] == 200
        d2d = await tv.receive(timeout=scaled(5))
        assert d2d["t"] == "d2d" and d2d["from"] == "phone"
    stats = tls_node.stats()
    assert stats["tls_handshakes"] == 2
    assert stats["pushes"]["delivered"] == 2


async def test_push_larger_than_a_tls_record_arrives_whole(
    tls_node: Node, pushy_tls: TLSFiles
) -> None:
    # 60 KB: four TLS records of at most 16 KiB each.
    data = "x" * 60_000
    async with (
        DeviceClient(tls_node.url, token_for("tv"), ssl=pushy_tls.ssl_context()) as tv,
        PushClient(tls_node.push_url) as client,
    ):
        result = await client.apush("tv", data)
        assert result.code == 200
        message = await tv.receive(timeout=scaled(5))
        assert message["data"] == data


def test_burst_of_small_messages_larger_than_one_read_turn_is_answered_whole(
    node: Node,
) -> None:
    # 30,000 pings (540 KB) in one write: more than one read turn of a
    # connection takes (4 reads of 64 KiB), answered whole.
    ws, _ = open_device(node.port, token_for("d1"))
    with ws:
        count = 30_000
        ws.send_raw(encode_frame(OP_TEXT, b'{"t":"ping"}') * count)
        for _ in range(count):
            assert ws.recv_message(timeout=scaled(10)) == {"t": "pong"}
    assert node.stats()["messages_in"] == count


class BurstClient:
    """A TLS device whose records are made ahead (``ssl.MemoryBIO``) and
    sent in one write, so the node receives many records at once."""

    def __init__(self, node: Node, tls: TLSFiles) -> None:
        self.sock = socket.create_connection((node.host, node.port))
        self.sock.settimeout(scaled(10))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = tls.ssl_context().wrap_bio(
            self.incoming, self.outgoing, server_hostname=node.host
        )
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                self.incoming.write(self.sock.recv(65536))
        self.flush()
        self.buffer = b""

    def flush(self) -> None:
        """Send every record made so far, in one write."""
        self.sock.sendall(self.outgoing.read())

    def read(self, n: int) -> bytes:
        """Read exactly ``n`` decrypted bytes."""
        while len(self.buffer) < n:
            try:
                self.buffer += self.tls.read(65536)
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                assert data, "the node closed the connection"
                self.incoming.write(data)
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out


def test_burst_of_tls_records_larger_than_one_read_turn_is_answered_whole(
    tls_node: Node, pushy_tls: TLSFiles
) -> None:
    # 30,000 pings, each a TLS record of its own, in one write: a read of
    # the node takes hundreds of records from the socket into OpenSSL, more
    # than one read turn handles (16 records); the rest are read on later
    # turns, without a new signal from the socket.
    client = BurstClient(tls_node, pushy_tls)
    with client.sock:
        request = build_request(upgrade_headers(tls_node.host, token=token_for("d1")))
        client.tls.write(request)
        client.flush()
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += client.read(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        count = 30_000
        frame = encode_frame(OP_TEXT, b'{"t":"ping"}')
        for _ in range(count):
            client.tls.write(frame)
        client.flush()
        hello = client.read(2)
        client.read(hello[1])
        pong = encode_frame(OP_TEXT, b'{"t":"pong"}', mask=False)
        assert client.read(len(pong) * count) == pong * count
    assert tls_node.stats()["messages_in"] == count


def test_plain_websocket_to_the_tls_port_is_refused_and_counted(
    tls_node: Node,
) -> None:
    before = rejects(tls_node)["tls_handshake_failed"]
    with socket.create_connection((tls_node.host, tls_node.port)) as sock:
        sock.settimeout(scaled(5))
        sock.sendall(b"GET /v1/connect HTTP/1.1\r\nHost: x\r\n\r\n")
        # The node closes without an HTTP answer (a TLS alert at most).
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        assert b"HTTP/1.1" not in data
    wait_until(
        lambda: rejects(tls_node)["tls_handshake_failed"] == before + 1,
        message="tls_handshake_failed to be counted",
    )


async def test_client_that_does_not_trust_the_certificate_gets_connect_error(
    tls_node: Node, tmp_path: Path
) -> None:
    stranger = tls_files(tmp_path / "other").ssl_context()  # another authority
    with pytest.raises(pushy.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await DeviceClient(tls_node.url, token_for("tv"), ssl=stranger).connect()
    wait_until(
        lambda: rejects(tls_node)["tls_handshake_failed"] == 1,
        message="tls_handshake_failed to be counted",
    )
    assert tls_node.stats()["connections"] == 0


def test_silent_client_is_closed_at_the_tls_handshake_deadline(
    pushy_node_factory: Callable[..., Node], pushy_tls: TLSFiles
) -> None:
    deadline = scaled(0.5)
    node = pushy_node_factory(
        tls_cert=pushy_tls.cert, tls_key=pushy_tls.key, tls_handshake_timeout_s=deadline
    )
    with socket.create_connection((node.host, node.port)) as sock:
        sock.settimeout(scaled(5))
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the node, nothing said
        waited = time.monotonic() - started
    assert deadline * 0.9 <= waited <= deadline + scaled(2), waited
    wait_until(
        lambda: rejects(node)["tls_handshake_timeout"] == 1,
        message="tls_handshake_timeout to be counted",
    )
    assert node.stats()["rejects"]["upgrade_timeout"] == 0


def test_refused_upgrade_over_tls_gets_its_http_answer(
    tls_node: Node, pushy_tls: TLSFiles
) -> None:
    with RawWebSocket(tls_node.host, tls_node.port, tls=pushy_tls.ssl_context()) as ws:
        response = ws.upgrade({"Host": "x", "Upgrade": "websocket"})
        assert response.status == 400
        assert "Upgrade: websocket" in response.json()["error"]
    with RawWebSocket(tls_node.host, tls_node.port, tls=pushy_tls.ssl_context()) as ws:
        response = ws.upgrade(upgrade_headers(tls_node.host, token="not-a-jwt"))
        assert response.status == 401
    assert tls_node.stats()["tls_handshakes"] == 2


def test_close_over_tls_is_echoed_and_ends_with_close_notify(
    tls_node: Node, pushy_tls: TLSFiles
) -> None:
    ws, _ = open_device(tls_node.port, token_for("d1"), tls=pushy_tls.ssl_context())
    with ws:
        ws.send_close(1000)
        frame = ws.recv_frame()
        assert frame.opcode == OP_CLOSE and parse_close(frame.payload)[0] == 1000
        # The node's close_notify reads as a clean end of the stream.
        assert ws.wait_server_closed() == "eof"
    wait_until(lambda: tls_node.stats()["connections"] == 0)


async def test_device_that_stops_reading_over_tls_is_closed_4003_on_a_whole_stream(
    pushy_node_factory: Callable[..., Node], pushy_tls: TLSFiles
) -> None:
    # Pushes pile up behind a device that does not read; the frames already
    # framed into a TLS record are sent whole before the 4003 close, so the
    # device that reads again decrypts a valid stream up to the close.
    node = pushy_node_factory(
        tls_cert=pushy_tls.cert, tls_key=pushy_tls.key, max_outbound_bytes=256 * 1024
    )
    device = DeviceClient(
        node.url, token_for("slow"), ssl=pushy_tls.ssl_context(), max_queue=1
    )
    await device.connect()
    async with PushClient(node.push_url, timeout=scaled(10)) as client:
        results = await asyncio.gather(
            *(client.apush("slow", "x" * 60_000, timeout=scaled(1)) for _ in range(150))
        )
    codes = {r.code for r in results}
    assert codes - {200} and codes <= {200, 404, 503, 504}, codes
    with pytest.raises(pushy.ConnectionClosed):
        while True:
            await device.receive(timeout=scaled(10))
    assert device.close_code == 4003
    assert node.stats()["rejects"]["slow_consumer"] == 1


def test_tls_files_key_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    files = tls_files(tmp_path / "tls")
    assert os.stat(files.key).st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" in Path(files.key).read_text()


def test_tls_paths_may_be_path_objects(pushy_tls: TLSFiles) -> None:
    config = pushy.NodeConfig(
        secret="s" * 32, tls_cert=Path(pushy_tls.cert), tls_key=Path(pushy_tls.key)
    )
    assert (config.tls_cert, config.tls_key) == (pushy_tls.cert, pushy_tls.key)
    with pushy.Node(config.replace(host="127.0.0.1", port=0, push_port=0)) as node:
        assert node.url.startswith("wss://")


def test_tls_cert_without_tls_key_is_a_config_error(pushy_tls: TLSFiles) -> None:
    config = pushy.NodeConfig(secret="s" * 32, tls_cert=pushy_tls.cert)
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        config.validate()


@pytest.mark.parametrize(
    "which, match",
    [
        ("missing-cert", "tls_cert '.*missing.pem' is not a readable PEM"),
        ("key-as-cert", "tls_cert '.*key.pem' is not a readable PEM"),
        ("other-key", "tls_key '.*' does not match the certificate"),
    ],
)
def test_bad_certificate_files_are_named_when_the_node_starts(
    pushy_tls: TLSFiles, tmp_path: Path, which: str, match: str
) -> None:
    cert, key = pushy_tls.cert, pushy_tls.key
    if which == "missing-cert":
        cert = str(tmp_path / "missing.pem")
    elif which == "key-as-cert":
        cert = key
    else:
        key = tls_files(tmp_path / "other").key
    node = Node(host="127.0.0.1", port=0, push_port=0, secret="s" * 32,
                tls_cert=cert, tls_key=key)
    with pytest.raises(ConfigError, match=match):
        node.start()
    assert not node.running


def test_encrypted_key_is_refused_at_start_without_prompting(
    pushy_tls: TLSFiles, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(pushy_tls.key).read_bytes(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))  # fmt: skip
    node = Node(host="127.0.0.1", port=0, push_port=0, secret="s" * 32,
                tls_cert=pushy_tls.cert, tls_key=str(encrypted))
    with pytest.raises(ConfigError, match="is encrypted; the node takes an "
                       "unencrypted key"):
        node.start()


async def test_pushy_serve_with_tls_prints_a_wss_url_that_devices_reach(
    pushy_tls: TLSFiles,
) -> None:
    secret = "cli-tls-secret-" + "0123456789abcdef" * 3
    served = PushyProcess(
        "serve", "--host", "127.0.0.1", "--port", "0", "--push-port", "0",
        "--secret", secret, "--tls-cert", pushy_tls.cert, "--tls-key", pushy_tls.key,
    )
    try:
        match = served.wait_line(r"devices (?P<url>wss://\S+), push (?P<push>\S+)",
                                 scaled(30))
        async with DeviceClient(
            match["url"], token_for("tv", secret=secret), ssl=pushy_tls.ssl_context()
        ) as tv:
            response = httpx.post(
                f"{match['push']}/v1/push", json={"device": "tv", "data": 1},
                timeout=scaled(5), trust_env=False,
            )
            assert response.status_code == 200, response.text
            assert (await tv.receive(timeout=scaled(5)))["data"] == 1
    finally:
        served.close()


def test_pushy_serve_warns_of_an_expired_certificate(tmp_path: Path) -> None:
    import datetime

    import trustme

    ca = trustme.CA()
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = ca.issue_cert("127.0.0.1", not_before=now - datetime.timedelta(days=30),
                         not_after=now - datetime.timedelta(days=1))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    served = PushyProcess(
        "serve", "--host", "127.0.0.1", "--port", "0", "--push-port", "0",
        "--secret", "s" * 32, "--tls-cert", str(cert), "--tls-key", str(key),
    )
    try:
        served.wait_line(r"devices wss://", scaled(30))
        wait_until(lambda: any("has expired" in line for line in served.stderr),
                   scaled(5))
    finally:
        served.close()
    assert any(f"tls_cert '{cert}' has expired" in line for line in served.stderr)


def tls_cluster_options(tls: TLSFiles) -> dict[str, Any]:
    return {"tls_cert": tls.cert, "tls_key": tls.key}


async def test_cluster_with_tls_serves_wss_on_the_shared_port(
    redis_server: Any, cluster_factory: Callable[..., Any], pushy_tls: TLSFiles
) -> None:
    cluster = cluster_factory(2, redis=redis_server.url, **tls_cluster_options(pushy_tls))
    assert cluster.url.startswith("wss://")
    ctx = pushy_tls.ssl_context()
    devices = [DeviceClient(cluster.url, token_for(f"d{i}"), ssl=ctx) for i in range(8)]
    try:
        for d in devices:
            await d.connect()
        nodes = {d.hello["node"] for d in devices if d.hello}
        assert nodes <= {n.node_id for n in cluster.nodes}
        async with PushClient(redis=redis_server.url) as client:
            results = [await client.apush(f"d{i}", i) for i in range(8)]
        assert [r.code for r in results] == [200] * 8
        for i, d in enumerate(devices):
            assert (await d.receive(timeout=scaled(5)))["data"] == i
    finally:
        for d in devices:
            await d.close()
