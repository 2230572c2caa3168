"""An asyncio device client that speaks the ``pushy.v1`` protocol.

:class:`DeviceClient` is built on the ``websockets`` library. It is what the
tests, the demo and the examples use to play a device::

    async with pushy.DeviceClient(node.url, token) as device:
        print(device.hello)
        message = await device.receive(timeout=5)
        if message["t"] == "push" and message["ack"]:
            await device.ack(message["id"])
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import itertools
import json
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import websockets
import websockets.exceptions

from .errors import ConnectError, ConnectionClosed, PushyError, TokenRejected

try:  # websockets >= 13: the new asyncio implementation.
    from websockets.asyncio.client import connect as _ws_connect

    _LEGACY = False
except ImportError:  # pragma: no cover - websockets 12
    from websockets.client import connect as _ws_connect  # type: ignore

    _LEGACY = True

__all__ = ["SUBPROTOCOL", "DeviceClient"]

#: The WebSocket subprotocol of the device protocol.
SUBPROTOCOL = "pushy.v1"

_OP_PONG = 0xA
_CONNECT_PARAMS = frozenset(inspect.signature(_ws_connect).parameters)
_Message = dict[str, Any]


class DeviceClient:
    """One device connected to a node.

    Args:
        url: the node's device URL, ``ws://HOST:PORT/v1/connect``
            (:attr:`pushy.Node.url`).
        token: the device's JWT (:func:`pushy.issue_token`).
        device: the device id, for display; taken from ``hello`` when
            ``None``.
        token_in_query: send the token as ``?token=`` (as browsers must)
            instead of an ``Authorization: Bearer`` header.
        auto_ack: acknowledge every push that asks for an ack when the app
            reads it (:meth:`receive`, :meth:`wait_for`...); a push that the
            app never reads is never acked.
        respond_to_pings: answer the node's WebSocket pings with pongs. Set it
            to ``False`` (at any time) to play a silent device that the node's
            heartbeat must detect.
        ping_interval: seconds between the client's own WebSocket pings;
            ``None`` (the default) leaves heartbeats to the node.
        open_timeout: deadline of the TCP connect, the upgrade and the
            ``hello`` message.
        close_timeout: deadline of the closing handshake.
        max_size: largest message accepted from the node, in bytes.
        max_queue: most unread messages buffered before the library stops
            reading from the socket.
        compression: ``"deflate"`` to offer permessage-deflate; ``None``
            (the default) to offer no extension.
        origin: an ``Origin`` header, as a browser sends.
        headers: extra HTTP headers of the upgrade request.

    Limitations:
        The library reads frames (and answers pings) in the background until
        it holds ``max_queue`` unread messages, then stops reading from the
        socket: a client whose messages are not received with
        :meth:`receive` is what a slow consumer looks like to the node.
        Pongs to the node's pings are then not sent either.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        device: str | None = None,
        token_in_query: bool = False,
        auto_ack: bool = False,
        respond_to_pings: bool = True,
        ping_interval: float | None = None,
        open_timeout: float | None = 10.0,
        close_timeout: float | None = 10.0,
        max_size: int | None = 2**20,
        max_queue: int | None = 16,
        compression: str | None = None,
        origin: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self.device = device
        self.token_in_query = token_in_query
        self.auto_ack = auto_ack
        self.respond_to_pings = respond_to_pings
        self.ping_interval = ping_interval
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.max_size = max_size
        self.max_queue = max_queue
        self.compression = compression
        self.origin = origin
        self.headers = dict(headers or {})
        self._token = token
        self._ws: Any = None
        self._hello: _Message | None = None
        self._pending: collections.deque[_Message] = collections.deque()
        self._read_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._pings_sent = 0
        self._pongs_received = 0
        self._closed: ConnectionClosed | None = None

    # Connection.

    async def connect(self) -> _Message:
        """Open the connection and wait for the node's ``hello``.

        Returns:
            The ``hello`` message.

        Raises:
            TokenRejected: the node answered the upgrade with 401.
            ConnectError: the node cannot be reached, answered the upgrade
                with another status, or sent no ``hello`` in time.
            PushyError: the client is already connected.
        """
        if self._ws is not None:
            raise PushyError("device client is already connected")
        url, headers = self._request()
        kwargs: dict[str, Any] = {
            "subprotocols": [SUBPROTOCOL],
            "open_timeout": self.open_timeout,
            "ping_interval": None if not self.respond_to_pings else self.ping_interval,
            "close_timeout": self.close_timeout,
            "max_size": self.max_size,
            "max_queue": self.max_queue,
            "compression": self.compression,
        }
        if self.origin is not None:
            kwargs["origin"] = self.origin
        kwargs["additional_headers" if not _LEGACY else "extra_headers"] = headers
        if "proxy" in _CONNECT_PARAMS:
            # The node is reached directly; ignore HTTP(S)_PROXY variables.
            kwargs["proxy"] = None
        try:
            self._ws = await _ws_connect(url, **kwargs)
        except websockets.exceptions.InvalidStatus as exc:
            raise _rejected(exc.response.status_code, exc.response) from exc
        except websockets.exceptions.InvalidHandshake as exc:
            status = getattr(exc, "status_code", None)  # websockets 12
            if status is not None:
                raise _rejected(status, exc) from exc
            raise ConnectError(
                f"invalid websocket handshake with {self.url}: {exc}"
            ) from exc
        except (OSError, TimeoutError) as exc:
            raise ConnectError(f"cannot connect to {self.url}: {exc}") from exc
        self._install_ping_filter()
        try:
            hello = await self.receive(timeout=self.open_timeout)
        except TimeoutError:
            await self._abort()
            raise ConnectError(f"no hello from {self.url} in time") from None
        except ConnectionClosed as exc:
            raise ConnectError(
                f"connection to {self.url} closed before hello: code {exc.code}"
                + (f" ({exc.reason})" if exc.reason else "")
            ) from exc
        if hello.get("t") != "hello":
            await self._abort()
            raise ConnectError(
                f"expected a hello message first, got {hello.get('t')!r}"
            )
        self._hello = hello
        if self.device is None:
            self.device = hello.get("device")
        return hello

    async def close(self, code: int = 1000, reason: str = "") -> int | None:
        """Close the connection and wait for the closing handshake.

        Calling it again, or on a client that never connected, does nothing.

        Args:
            code: the close code to send.
            reason: the close reason to send.

        Returns:
            The close code received from the node (1006 when the connection
            was lost without one), or ``None`` if never connected.
        """
        if self._ws is None:
            return None
        # Messages not read yet would hold the node's close frame back (the
        # library stops reading when max_queue messages wait): keep reading
        # them, for receive(), while the closing handshake runs.
        drain = None
        if not self._read_lock.locked():
            drain = asyncio.create_task(self._drain())
        try:
            with contextlib.suppress(Exception):  # it may be gone already
                await self._ws.close(code, reason)
        finally:
            if drain is not None:
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain
        self._note_closed()
        return self.close_code

    async def _drain(self) -> None:
        """Read messages into the pending queue until the connection ends."""
        async with self._read_lock:
            with contextlib.suppress(Exception):
                while True:
                    data = await self._ws.recv()
                    with contextlib.suppress(PushyError):
                        message = _decode(data)
                        if message.get("t") == "pong":
                            self._pongs_received += 1
                        else:
                            self._pending.append(message)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # State.

    @property
    def hello(self) -> _Message | None:
        """The node's ``hello`` message, or ``None`` before :meth:`connect`."""
        return self._hello

    @property
    def node(self) -> str | None:
        """The id of the node this device is connected to (from ``hello``)."""
        return None if self._hello is None else self._hello.get("node")

    @property
    def connected(self) -> bool:
        """Whether the connection is open (as far as the client has seen)."""
        return self._ws is not None and self._closed is None and _is_open(self._ws)

    @property
    def close_code(self) -> int | None:
        """The close code received from the node; 1006 when lost without one.

        ``None`` while the connection is open or before :meth:`connect`.
        """
        self._note_closed()
        return None if self._closed is None else self._closed.code

    @property
    def close_reason(self) -> str | None:
        """The close reason received from the node, or ``None`` while open."""
        self._note_closed()
        return None if self._closed is None else self._closed.reason

    @property
    def websocket(self) -> Any:
        """The underlying ``websockets`` connection (for advanced tests)."""
        return self._ws

    # Receiving.

    async def receive(self, timeout: float | None = None) -> _Message:
        """Return the next message from the node, skipping ``pong`` replies.

        Args:
            timeout: seconds to wait; ``None`` waits for ever.

        Raises:
            TimeoutError: no message arrived in time.
            ConnectionClosed: the connection is closed (``.code``,
                ``.reason``); raised again on every later call.
            PushyError: the node sent something that is not a JSON object.
        """
        return await self._next(lambda m: True, timeout)

    async def wait_for(
        self, t: str, *, timeout: float | None = None, **fields: Any
    ) -> _Message:
        """Return the first message of type ``t`` whose fields match.

        Messages received meanwhile that do not match are kept, in order, for
        :meth:`receive`.

        Args:
            t: message type, such as ``"status"`` or ``"push"``.
            timeout: seconds to wait; ``None`` waits for ever.
            **fields: values the message must have, e.g. ``id=3``.

        Raises:
            TimeoutError: no matching message arrived in time.
            ConnectionClosed: the connection closed first.
        """

        def match(message: _Message) -> bool:
            if message.get("t") != t:
                return False
            return all(message.get(k) == v for k, v in fields.items())

        return await self._next(match, timeout)

    async def wait_closed(self, timeout: float | None = None) -> int:
        """Wait until the node closes the connection; return the close code.

        Messages received meanwhile are kept for :meth:`receive`.

        Args:
            timeout: seconds to wait; ``None`` waits for ever.

        Raises:
            TimeoutError: the connection is still open after ``timeout``.
        """
        try:
            await self._next(lambda m: False, timeout)
        except ConnectionClosed as exc:
            return exc.code
        raise AssertionError("unreachable")  # pragma: no cover

    # Sending.

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one JSON message.

        Raises:
            ConnectionClosed: the connection is closed.
        """
        await self.send_raw(json.dumps(message, separators=(",", ":")))

    async def send_raw(self, data: str | bytes) -> None:
        """Send a text (``str``) or binary (``bytes``) frame as it is.

        Raises:
            ConnectionClosed: the connection is closed.
        """
        ws = self._require()
        try:
            await ws.send(data)
        except websockets.exceptions.ConnectionClosed as exc:
            raise self._closed_from(exc) from None

    async def ack(self, id: int | str) -> None:
        """Acknowledge the push with this id (a queued message's is a string)."""
        await self.send({"t": "ack", "id": id})

    async def send_d2d(self, to: str, data: Any, id: str | None = None) -> str:
        """Send a device-to-device message (``{"t":"d2d"}``) to device ``to``.

        The node answers with a ``status`` message carrying the same id:
        200 delivered, 403 not allowed, 404 not connected, 413 too large,
        429 rate limited, 503 unavailable, 504 not written in time (see
        :meth:`wait_for`, ``wait_for("status", id=mid)``, or :meth:`d2d`).

        Args:
            to: the target device id.
            data: any JSON value.
            id: the message id, a string; a fresh one when ``None``.

        Returns:
            The message id.
        """
        mid = str(next(self._ids)) if id is None else id
        await self.send({"t": "d2d", "id": mid, "to": to, "data": data})
        return mid

    async def d2d(
        self, to: str, data: Any, timeout: float | None = None
    ) -> _Message:
        """Send a device-to-device message and return the node's status.

        Messages received meanwhile are kept for :meth:`receive`.

        Args:
            to: the target device id.
            data: any JSON value.
            timeout: seconds to wait for the status; ``None`` waits for ever.

        Returns:
            The ``status`` message: ``{"t":"status","id":M,"code":C, ...}``.

        Raises:
            TimeoutError: no status arrived in time.
            ConnectionClosed: the connection closed first.
        """
        mid = await self.send_d2d(to, data)
        return await self.wait_for("status", id=mid, timeout=timeout)

    async def send_to_service(
        self, service: str, data: Any, id: str | None = None
    ) -> str:
        """Send a message upstream to a service (``to`` is ``service:NAME``).

        A node of a fleet on Redis appends it to the service's stream and
        answers with a ``status`` of the same id: 202 accepted, 400, 413,
        429, or 503 (Redis unreachable, or a node without Redis); read it
        with ``wait_for("status", id=mid)``.

        Args:
            service: the service name, with or without the ``service:`` prefix.
            data: any JSON value.
            id: the message id, a string; a fresh one when ``None``.

        Returns:
            The message id.
        """
        to = service if service.startswith("service:") else f"service:{service}"
        mid = str(next(self._ids)) if id is None else id
        await self.send({"t": "send", "id": mid, "to": to, "data": data})
        return mid

    async def subscribe(self, topic: str = "account.devices") -> None:
        """Subscribe to a topic (``account.devices``: online/offline events)."""
        await self.send({"t": "subscribe", "topic": topic})

    async def unsubscribe(self, topic: str = "account.devices") -> None:
        """Unsubscribe from a topic."""
        await self.send({"t": "unsubscribe", "topic": topic})

    async def ping(self, timeout: float | None = None) -> float:
        """Send a JSON ``ping`` and wait for the node's ``pong``.

        Messages received meanwhile are kept for :meth:`receive`.

        Args:
            timeout: seconds to wait; ``None`` waits for ever.

        Returns:
            The round-trip time in seconds.

        Raises:
            TimeoutError: no pong arrived in time.
            ConnectionClosed: the connection closed first.
        """
        number = self._pings_sent
        self._pings_sent += 1
        started = time.perf_counter()
        await self.send({"t": "ping"})
        deadline = (
            None if timeout is None else asyncio.get_running_loop().time() + timeout
        )
        while self._pongs_received <= number:
            await self._read_one(deadline, stop=lambda: self._pongs_received > number)
        return time.perf_counter() - started

    # Internals.

    def _request(self) -> tuple[str, dict[str, str]]:
        headers = dict(self.headers)
        url = self.url
        if self.token_in_query:
            parts = urlsplit(url)
            query = parse_qsl(parts.query, keep_blank_values=True)
            query.append(("token", self._token))
            url = urlunsplit(parts._replace(query=urlencode(query)))
        else:
            headers["Authorization"] = f"Bearer {self._token}"
        return url, headers

    def _require(self) -> Any:
        if self._ws is None:
            raise PushyError("device client is not connected; call connect() first")
        return self._ws

    def _install_ping_filter(self) -> None:
        """Make WebSocket pong replies depend on :attr:`respond_to_pings`."""
        ws = self._ws
        if _LEGACY:  # pragma: no cover - websockets 12 replies in pong()
            pong = ws.pong

            async def filtered_pong(data: Any = b"") -> None:
                if self.respond_to_pings:
                    await pong(data)

            ws.pong = filtered_pong
            return
        # The Sans-I/O protocol answers a ping inside receive_data() by
        # queueing a pong frame with send_frame(); drop it there.
        protocol = ws.protocol
        send_frame: Callable[[Any], None] = protocol.send_frame

        def filtered_send_frame(frame: Any) -> None:
            if not self.respond_to_pings and int(frame.opcode) == _OP_PONG:
                return
            send_frame(frame)

        protocol.send_frame = filtered_send_frame

    async def _next(
        self, match: Callable[[_Message], bool], timeout: float | None
    ) -> _Message:
        """Return (and remove) the first kept or new message that matches."""
        deadline = (
            None if timeout is None else asyncio.get_running_loop().time() + timeout
        )
        seen = 0
        while True:
            # Look at kept messages not examined yet (others may add some).
            while seen < len(self._pending):
                message = self._pending[seen]
                if match(message):
                    del self._pending[seen]
                    return message
                seen += 1
            if self._closed is not None:
                raise self._closed
            await self._read_one(deadline, stop=self._grown_past(seen))

    def _grown_past(self, count: int) -> Callable[[], bool]:
        return lambda: len(self._pending) > count

    async def _read_one(self, deadline: float | None, stop: Callable[[], bool]) -> None:
        """Read one frame into the kept messages, unless ``stop()`` turns true.

        Only one task reads at a time; the lock is released after each frame
        so that another waiter can look at what was read.
        """
        ws = self._require()
        async with self._read_lock:
            if stop():
                return
            if self._closed is not None:
                raise self._closed
            loop = asyncio.get_running_loop()
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("no message from the node in time")
            try:
                async with asyncio.timeout(remaining):
                    data = await ws.recv()
            except websockets.exceptions.ConnectionClosed as exc:
                raise self._closed_from(exc) from None
            message = _decode(data)
            kind = message.get("t")
            if kind == "pong":
                self._pongs_received += 1
                return
            if self.auto_ack and kind == "push" and message.get("ack") is True:
                with contextlib.suppress(ConnectionClosed):
                    await self.ack(message["id"])
            self._pending.append(message)

    def _closed_from(
        self, exc: websockets.exceptions.ConnectionClosed
    ) -> ConnectionClosed:
        if self._closed is None:
            rcvd = exc.rcvd
            if rcvd is not None:
                self._closed = ConnectionClosed(rcvd.code, rcvd.reason)
            else:
                self._closed = ConnectionClosed(1006, "")
        return self._closed

    def _note_closed(self) -> None:
        """Record the close code once the library saw the connection end."""
        if self._closed is not None or self._ws is None or _is_open(self._ws):
            return
        # websockets 13 has these on the protocol only.
        source = self._ws if hasattr(self._ws, "close_code") else self._ws.protocol
        code = source.close_code
        if code is None:
            return
        self._closed = ConnectionClosed(code, source.close_reason or "")

    async def _abort(self) -> None:
        with contextlib.suppress(Exception):  # best effort
            await asyncio.wait_for(self._ws.close(1002), timeout=1.0)
        self._ws = None

    def __repr__(self) -> str:
        if self.connected:
            state = f"connected to {self.node!r}"
        elif self._closed is not None:
            state = f"closed with {self._closed.code}"
        else:
            state = "not connected"
        return f"<pushy.DeviceClient {self.device!r} {state}>"


def _is_open(ws: Any) -> bool:
    state = getattr(ws, "state", None)
    return getattr(state, "name", "") == "OPEN"


def _decode(data: str | bytes) -> _Message:
    try:
        message = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise PushyError(
            f"expected a JSON message from the node, got {_preview(data)}"
        ) from None
    if not isinstance(message, dict):
        raise PushyError(f"expected a JSON object from the node, got {_preview(data)}")
    return message


def _preview(data: str | bytes) -> str:
    text = repr(data)
    return text if len(text) <= 80 else text[:77] + "..."


def _rejected(status: int, response: Any) -> ConnectError:
    raw = getattr(response, "headers", None) or {}
    headers = {str(k).lower(): str(v) for k, v in raw.items()}
    body = getattr(response, "body", b"") or b""
    if isinstance(body, str):
        body = body.encode()
    text = body.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        text = parsed["error"]
    message = f"node rejected the websocket upgrade with HTTP {status}"
    if text:
        message += f": {text[:200]}"
    if status == 401:
        return TokenRejected(message, status, headers, body)
    return ConnectError(message, status, headers, body)
