"""A raw-socket WebSocket client for frame-level tests of a node.

It speaks just enough HTTP and RFC 6455 to send what a well-behaved library
never would: upgrade requests with chosen headers, frames with any opcode,
FIN, RSV bits, mask or length, and plain bytes. It reads the node's answers
as they are: the HTTP response, each frame (``fin, opcode, payload``), the
close code, and the end of the TCP connection.

Every read has a deadline (``scaled(5)`` by default); a read that runs out
of time raises :class:`TimeoutError`, one that meets the end of the
connection raises :class:`ServerClosed`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pushy.testing import scaled

__all__ = [
    "ACCEPT_GUID",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "SUBPROTOCOL",
    "Frame",
    "HttpResponse",
    "RawWebSocket",
    "ServerClosed",
    "accept_for",
    "build_request",
    "encode_frame",
    "new_key",
    "open_device",
    "parse_close",
    "upgrade_headers",
]

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

SUBPROTOCOL = "pushy.v1"

#: RFC 6455 section 1.3: appended to the key before hashing.
ACCEPT_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class ServerClosed(ConnectionError):
    """The server ended the TCP connection while a read expected more.

    Args:
        how: ``"eof"`` for an orderly end (FIN), ``"reset"`` for a reset.
    """

    def __init__(self, how: str) -> None:
        self.how = how
        super().__init__(f"server closed the connection ({how})")


class Frame(NamedTuple):
    """One frame read from the server; unpacks as ``fin, opcode, payload``."""

    fin: bool
    opcode: int
    payload: bytes
    rsv: int = 0
    masked: bool = False

    def json(self) -> Any:
        """The payload of a text frame, decoded as JSON."""
        return json.loads(self.payload.decode("utf-8"))


@dataclass
class HttpResponse:
    """An HTTP response as read from the socket.

    ``headers`` maps lower-case names to the value (the last one when a name
    repeats); ``header_list`` keeps every line in order.
    """

    status: int
    reason: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)
    header_list: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def text(self) -> str:
        """The body as text."""
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


def new_key() -> str:
    """A fresh ``Sec-WebSocket-Key``: base64 of 16 random bytes."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_for(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value a server must answer to ``key``."""
    digest = hashlib.sha1((key + ACCEPT_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def upgrade_headers(
    host: str = "127.0.0.1",
    token: str | None = None,
    key: str | None = None,
    subprotocol: str | None = SUBPROTOCOL,
) -> list[tuple[str, str]]:
    """The headers of a valid upgrade request, in order.

    Args:
        host: the ``Host`` value.
        token: sent as ``Authorization: Bearer``; omitted when ``None``.
        key: the ``Sec-WebSocket-Key``; a fresh one when ``None``.
        subprotocol: the offered subprotocol; omitted when ``None``.
    """
    headers = [
        ("Host", host),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key or new_key()),
        ("Sec-WebSocket-Version", "13"),
    ]
    if subprotocol is not None:
        headers.append(("Sec-WebSocket-Protocol", subprotocol))
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    return headers


def build_request(
    headers: Iterable[tuple[str, str]] | Mapping[str, str],
    path: str = "/v1/connect",
    method: str = "GET",
    version: str = "HTTP/1.1",
    body: bytes = b"",
) -> bytes:
    """Encode a request line, the headers as given, and ``body``."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    lines = [f"{method} {path} {version}"]
    lines += [f"{name}: {value}" for name, value in items]
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("latin-1") + body


def encode_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    masking_key: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """Encode one frame, valid or not.

    Args:
        opcode: any value 0-15, reserved ones included.
        payload: the payload before masking.
        fin: the FIN bit.
        rsv: the three RSV bits as a number 0-7 (RSV1 is 4).
        mask: mask the payload, as a client must (section 5.1).
        masking_key: the 4-byte key; random when ``None``.
        length: the length to announce instead of ``len(payload)``.
    """
    b0 = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0x0F)
    n = len(payload) if length is None else length
    mask_bit = 0x80 if mask else 0
    if n <= 125:
        header = struct.pack("!BB", b0, mask_bit | n)
    elif n <= 0xFFFF:
        header = struct.pack("!BBH", b0, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", b0, mask_bit | 127, n)
    if not mask:
        return header + payload
    key = masking_key if masking_key is not None else os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return header + key + masked


class RawWebSocket:
    """A client socket to a node, driven byte by byte.

    Args:
        host: the node's address.
        port: the node's device port.
        timeout: default deadline of each read, in seconds; ``scaled(5)``
            when ``None``.
        tls: speak TLS with this client context (a node with ``tls_cert``);
            the handshake is done before the constructor returns.
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.timeout = scaled(5) if timeout is None else timeout
        sock = socket.create_connection((host, port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self._buf = bytearray()
        self._eof = False
        #: Bytes the server sent between the last read and the end of TCP.
        self.trailing = b""

    # Lifecycle.

    def close(self) -> None:
        """Close the socket (no closing handshake)."""
        self.sock.close()

    def __enter__(self) -> RawWebSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Sending.

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are."""
        self.sock.sendall(data)

    def send_request(
        self,
        headers: Iterable[tuple[str, str]] | Mapping[str, str],
        path: str = "/v1/connect",
        method: str = "GET",
        version: str = "HTTP/1.1",
        body: bytes = b"",
    ) -> None:
        """Send an HTTP request (see :func:`build_request`)."""
        self.send_raw(build_request(headers, path, method, version, body))

    def upgrade(
        self,
        headers: Iterable[tuple[str, str]] | Mapping[str, str],
        path: str = "/v1/connect",
        method: str = "GET",
        version: str = "HTTP/1.1",
        timeout: float | None = None,
    ) -> HttpResponse:
        """Send an upgrade request and return the node's response.

        Bytes after a 101 response stay buffered for :meth:`recv_frame`.
        """
        self.send_request(headers, path, method, version)
        return self.read_response(timeout)

    def send_frame(
        self,
        opcode: int,
        payload: bytes | str = b"",
        *,
        fin: bool = True,
        rsv: int = 0,
        mask: bool = True,
        length: int | None = None,
    ) -> None:
        """Send one frame (see :func:`encode_frame`); ``str`` goes as UTF-8."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        self.send_raw(
            encode_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask, length=length)
        )

    def send_text(self, text: str | bytes, *, fin: bool = True) -> None:
        """Send a text frame (bytes are sent as they are, valid UTF-8 or not)."""
        self.send_frame(OP_TEXT, text, fin=fin)

    def send_json(self, message: Any) -> None:
        """Send one JSON message in a single text frame."""
        self.send_text(json.dumps(message, separators=(",", ":")))

    def send_ping(self, payload: bytes = b"", *, fin: bool = True) -> None:
        """Send a ping frame."""
        self.send_frame(OP_PING, payload, fin=fin)

    def send_close(self, code: int | None = None, reason: bytes | str = b"") -> None:
        """Send a close frame; an empty payload when ``code`` is ``None``."""
        if isinstance(reason, str):
            reason = reason.encode("utf-8")
        payload = b"" if code is None else struct.pack("!H", code) + reason
        self.send_frame(OP_CLOSE, payload)

    # Receiving.

    def _fill(self, deadline: float) -> None:
        """Read at least one more byte into the buffer before ``deadline``."""
        if self._eof:
            raise ServerClosed("eof")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from the server in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError("no data from the server in time") from None
        except ConnectionResetError:
            raise ServerClosed("reset") from None
        except ssl.SSLEOFError:
            raise ServerClosed("eof") from None
        if not data:
            self._eof = True
            raise ServerClosed("eof")
        self._buf += data

    def _take(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            self._fill(deadline)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def read_response(self, timeout: float | None = None) -> HttpResponse:
        """Read one HTTP response: status line, headers and body.

        The body is ``Content-Length`` bytes, or everything until the server
        closes when there is no length (never for a 101).
        """
        deadline = self._deadline(timeout)
        while b"\r\n\r\n" not in self._buf:
            self._fill(deadline)
        end = self._buf.index(b"\r\n\r\n")
        head = bytes(self._buf[:end]).decode("latin-1")
        del self._buf[: end + 4]
        status_line, *lines = head.split("\r\n")
        version, status, *reason = status_line.split(" ", 2)
        response = HttpResponse(int(status), reason[0] if reason else "", version)
        for line in lines:
            name, _, value = line.partition(":")
            name, value = name.strip(), value.strip()
            response.header_list.append((name, value))
            response.headers[name.lower()] = value
        if response.status == 101:
            return response
        if "content-length" in response.headers:
            response.body = self._take(
                int(response.headers["content-length"]), deadline
            )
        else:
            while True:
                try:
                    self._fill(deadline)
                except ServerClosed:
                    break
            response.body = bytes(self._buf)
            self._buf.clear()
        return response

    def recv_frame(self, timeout: float | None = None) -> Frame:
        """Read the next frame; a masked one is unmasked and marked ``masked``."""
        deadline = self._deadline(timeout)
        b0, b1 = self._take(2, deadline)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._take(2, deadline))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._take(8, deadline))
        masked = bool(b1 & 0x80)
        key = self._take(4, deadline) if masked else b""
        payload = self._take(n, deadline)
        if masked:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        return Frame(
            fin=bool(b0 & 0x80),
            opcode=b0 & 0x0F,
            payload=payload,
            rsv=(b0 >> 4) & 0x7,
            masked=masked,
        )

    def recv_message(self, timeout: float | None = None) -> Any:
        """Return the next text frame decoded as JSON, skipping pings and pongs.

        Raises:
            AssertionError: the server sent a close frame or a binary frame.
        """
        deadline = self._deadline(timeout)
        while True:
            frame = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if frame.opcode in (OP_PING, OP_PONG):
                continue
            if frame.opcode == OP_CLOSE:
                code, reason = parse_close(frame.payload)
                raise AssertionError(f"expected a message, got close {code} {reason!r}")
            assert frame.opcode == OP_TEXT, f"unexpected opcode {frame.opcode:#x}"
            return frame.json()

    def recv_close(self, timeout: float | None = None) -> tuple[int | None, bytes]:
        """Read frames until a close frame; return its ``(code, reason)``.

        The code is ``None`` for an empty close payload.

        Raises:
            ServerClosed: the TCP connection ended without a close frame.
        """
        deadline = self._deadline(timeout)
        while True:
            frame = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if frame.opcode == OP_CLOSE:
                return parse_close(frame.payload)

    def wait_server_closed(self, timeout: float | None = None) -> str:
        """Wait until the server ends the TCP connection.

        What the server still sends meanwhile is kept in :attr:`trailing`.

        Returns:
            ``"eof"`` for an orderly end, ``"reset"`` for a reset.

        Raises:
            TimeoutError: the connection is still open after ``timeout``.
        """
        deadline = self._deadline(timeout)
        while True:
            try:
                self._fill(deadline)
            except ServerClosed as exc:
                self.trailing = bytes(self._buf)
                self._buf.clear()
                return exc.how


def parse_close(payload: bytes) -> tuple[int | None, bytes]:
    """Split a close payload into ``(code, reason)``; code ``None`` if empty."""
    if len(payload) < 2:
        return None, payload
    (code,) = struct.unpack("!H", payload[:2])
    return code, payload[2:]


def open_device(
    port: int,
    token: str,
    host: str = "127.0.0.1",
    timeout: float | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[RawWebSocket, Any]:
    """Connect a device with ``token`` (over TLS with ``tls``) and read its
    ``hello``.

    Returns:
        The socket, ready for frames, and the ``hello`` message.

    Raises:
        AssertionError: the upgrade was not answered with 101.
    """
    ws = RawWebSocket(host, port, timeout, tls)
    try:
        response = ws.upgrade(upgrade_headers(host, token=token))
        assert response.status == 101, (response.status, response.text)
        hello = ws.recv_message()
    except BaseException:
        ws.close()
        raise
    return ws, hello
