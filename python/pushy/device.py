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
import logging
import random
import ssl as ssl_module
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

__all__ = ["RETRY_CLOSE_CODES", "SUBPROTOCOL", "DeviceClient"]

#: The WebSocket subprotocol of the device protocol.
SUBPROTOCOL = "pushy.v1"

#: Close codes after which a client made with ``reconnect=True`` connects
#: again: going away (drain, shutdown, a reconnect not followed), lost
#: without a close frame, server error, try again later, slow consumer.
RETRY_CLOSE_CODES = frozenset({1001, 1006, 1011, 1013, 4003})

_log = logging.getLogger("pushy.device")

_OP_PONG = 0xA
_CONNECT_PARAMS = frozenset(inspect.signature(_ws_connect).parameters)
_Message = dict[str, Any]


class DeviceClient:
    """One device connected to a node.

    Args:
        url: the node's device URL, ``ws://HOST:PORT/v1/connect``, or
            ``wss://`` for a node with TLS (:attr:`pushy.Node.url`).
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
        ssl: the :class:`ssl.SSLContext` of a ``wss://`` URL, e.g. one that
            trusts a test certificate (``ssl.create_default_context(cafile=
            ...)``); ``None`` uses the system's trusted certificates.
        reconnect: follow the node's lifecycle (see below); ``False`` (the
            default) keeps one connection, whose end is the client's end.
        reconnect_delay: with ``reconnect``, the first backoff step in
            seconds after an unexpected close or a failed attempt.
        reconnect_max_delay: with ``reconnect``, the largest backoff step.

    With ``reconnect=True`` the client moves between connections by itself:

    - On a ``{"t":"reconnect"}`` message it opens a new connection first
      (after ``in_ms``), and keeps reading the old one until the node closes
      it (4001, once the new one is registered): frames written to the old
      connection before its close frame are still received.
    - When the current connection ends unexpectedly (a close code of
      :data:`RETRY_CLOSE_CODES`), it connects again, to whatever node the
      URL leads to, after a backoff with full jitter: a random wait of up to
      ``reconnect_delay`` doubled after each failed attempt, at most
      ``reconnect_max_delay``. A refused upgrade with ``Retry-After`` (503:
      draining, at the connection limit, over the accept rate) waits that
      long, times a random factor in [1, 1.5), instead.
    - It stops, as a client without ``reconnect`` would at its close, on a
      close it asked for (:meth:`close`), on 4001 when it did not connect
      again itself (another client took the device id), on 4002 (the token
      expired), on any other close code, and when an upgrade is refused
      with 401 or another 4xx status but 408 and 429: then :meth:`receive`
      raises :class:`ConnectionClosed` with the last connection's code,
      once the messages received before are read.

    :meth:`receive` and :meth:`wait_for` return the messages of every
    connection, in order within each (the ``reconnect`` messages
    included, the ``hello`` of later connections not); :attr:`hello`,
    :attr:`node` and :attr:`websocket` are the current connection's, and
    :attr:`reconnects` counts the connections made after the first.

    Limitations:
        The library reads frames (and answers pings) in the background until
        it holds ``max_queue`` unread messages, then stops reading from the
        socket: a client whose messages are not received with
        :meth:`receive` is what a slow consumer looks like to the node.
        Pongs to the node's pings are then not sent either.

        With ``reconnect=True`` the client reads every connection in tasks
        of its own instead: messages wait in memory, without a bound, until
        they are received (the node never sees a slow consumer), and
        ``auto_ack`` acks each push as it arrives, on its connection.
        :meth:`connect` itself does not retry: the first connection must
        succeed. A message sent while no connection is open (between a close
        and the next ``hello``) raises :class:`ConnectionClosed` and is not
        sent later. :meth:`ack` goes to the connection that carried the
        push while it is open; an ack after that connection closed is lost
        (the node answered the push 503 at its close). A push delivered on
        both connections (a queued message retried) is received twice, with
        the same id.
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
        ssl: ssl_module.SSLContext | None = None,
        reconnect: bool = False,
        reconnect_delay: float = 0.1,
        reconnect_max_delay: float = 5.0,
    ) -> None:
        if not 0 < reconnect_delay <= reconnect_max_delay:
            raise PushyError(
                "expected 0 < reconnect_delay <= reconnect_max_delay, got "
                f"{reconnect_delay!r} and {reconnect_max_delay!r}"
            )
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
        self.ssl = ssl
        self._token = token
        self._ws: Any = None
        self._hello: _Message | None = None
        self._pending: collections.deque[_Message] = collections.deque()
        self._read_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._pings_sent = 0
        self._pongs_received = 0
        self._closed: ConnectionClosed | None = None
        # With reconnect=True only.
        self.reconnect = reconnect
        self.reconnect_delay = reconnect_delay
        self.reconnect_max_delay = reconnect_max_delay
        self._links: list[_Link] = []  # open connections, oldest first
        self._current: _Link | None = None
        self._switch: asyncio.Task[None] | None = None
        self._stopping = False
        self._refused: ConnectError | None = None
        self._reconnects = 0
        self._wake = asyncio.Event()
        self._random = random.Random()

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
        if self.reconnect:
            link = await self._open_link()
            self._adopt(link)
            return link.hello
        self._ws = await self._open_ws()
        self._install_ping_filter(self._ws)
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

    async def _open_ws(self) -> Any:
        """Open one WebSocket connection to :attr:`url` (no hello read yet).

        Raises:
            TokenRejected: the node answered the upgrade with 401.
            ConnectError: the node cannot be reached or answered with
                another status.
        """
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
        if self.ssl is not None and url.startswith("wss:"):
            kwargs["ssl"] = self.ssl
        kwargs["additional_headers" if not _LEGACY else "extra_headers"] = headers
        if "proxy" in _CONNECT_PARAMS:
            # The node is reached directly; ignore HTTP(S)_PROXY variables.
            kwargs["proxy"] = None
        try:
            return await _ws_connect(url, **kwargs)
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
        if self.reconnect:
            return await self._close_links(code, reason)
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
    def reconnects(self) -> int:
        """Connections made after the first (with ``reconnect=True``)."""
        return self._reconnects

    @property
    def connected(self) -> bool:
        """Whether the connection is open (as far as the client has seen)."""
        return self._ws is not None and self._closed is None and _is_open(self._ws)

    @property
    def close_code(self) -> int | None:
        """The close code received from the node; 1006 when lost without one.

        ``None`` while the connection is open or before :meth:`connect`;
        with ``reconnect=True``, ``None`` until the client has stopped.
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

        With ``reconnect=True``: until the client stops (see the class).
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
            if self.reconnect:  # between connections: not the end
                raise self._closed or _closed_of(exc) from None
            raise self._closed_from(exc) from None

    async def ack(self, id: int | str) -> None:
        """Acknowledge the push with this id (a queued message's is a string).

        With ``reconnect=True`` the ack goes to the connection that carried
        the push, while it is open.
        """
        if self.reconnect:
            for link in self._links:
                if id in link.ack_ids:
                    link.ack_ids.discard(id)
                    with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                        await link.ws.send(_ack_text(id))
                    return
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

    def _install_ping_filter(self, ws: Any) -> None:
        """Make WebSocket pong replies depend on :attr:`respond_to_pings`."""
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
        if self.reconnect:
            await self._wait_change(deadline, stop)
            return
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
        if self.reconnect:  # the end of one connection is not the client's
            return
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

    # Reconnecting (reconnect=True): one reader task per open connection
    # appends to the kept messages; at most one task opens the next one.

    async def _open_link(self) -> _Link:
        """Open a connection and read its ``hello``.

        Raises:
            ConnectError: as :meth:`connect`.
        """
        ws = await self._open_ws()
        self._install_ping_filter(ws)
        try:
            async with asyncio.timeout(self.open_timeout):
                data = await ws.recv()
            hello = _decode(data)
        except TimeoutError:
            await _abort_ws(ws)
            raise ConnectError(f"no hello from {self.url} in time") from None
        except websockets.exceptions.ConnectionClosed as exc:
            closed = _closed_of(exc)
            raise ConnectError(
                f"connection to {self.url} closed before hello: code {closed.code}"
                + (f" ({closed.reason})" if closed.reason else "")
            ) from None
        except PushyError as exc:
            await _abort_ws(ws)
            raise ConnectError(str(exc)) from None
        if hello.get("t") != "hello":
            await _abort_ws(ws)
            raise ConnectError(
                f"expected a hello message first, got {hello.get('t')!r}"
            )
        return _Link(ws, hello)

    def _adopt(self, link: _Link) -> None:
        """Make ``link`` the current connection and start reading it."""
        if self._current is not None:
            self._reconnects += 1
        self._current = link
        self._ws = link.ws
        self._hello = link.hello
        if self.device is None:
            self.device = link.hello.get("device")
        self._links.append(link)
        link.reader = asyncio.create_task(self._read_link(link))
        self._notify()

    async def _read_link(self, link: _Link) -> None:
        """Read one connection until it ends, then decide what comes next."""
        try:
            while True:
                data = await link.ws.recv()
                try:
                    message = _decode(data)
                except PushyError as exc:
                    _log.warning("device %s: %s; ignored", self.device, exc)
                    continue
                kind = message.get("t")
                if kind == "pong":
                    self._pongs_received += 1
                    self._notify()
                    continue
                if kind == "push" and message.get("ack") is True:
                    if self.auto_ack:
                        with contextlib.suppress(
                            websockets.exceptions.ConnectionClosed
                        ):
                            await link.ws.send(_ack_text(message.get("id")))
                    else:
                        with contextlib.suppress(TypeError):  # unhashable id
                            link.ack_ids.add(message.get("id"))
                self._pending.append(message)
                if kind == "reconnect" and link is self._current:
                    in_ms = message.get("in_ms")
                    delay = in_ms / 1000 if isinstance(in_ms, int | float) else 0
                    self._start_switch(max(0.0, delay), after_close=False)
                self._notify()
        except websockets.exceptions.ConnectionClosed as exc:
            link.closed = _closed_of(exc)
        finally:
            if link.closed is None:  # cancelled, or a bug of the library
                link.closed = ConnectionClosed(1006, "")
            link.ack_ids.clear()
            self._links.remove(link)
            self._on_link_closed(link)
            self._notify()

    def _on_link_closed(self, link: _Link) -> None:
        """Connect again, or stop, after connection ``link`` ended."""
        if self._stopping or link is not self._current:
            return  # closed on purpose, or an older connection we left
        if self._switch is not None and not self._switch.done():
            return  # the next connection is on its way (this is its 4001)
        assert link.closed is not None
        if self._refused is None and link.closed.code in RETRY_CLOSE_CODES:
            self._start_switch(self._backoff(0), after_close=True)
        else:
            self._closed = self._final(link.closed)

    def _start_switch(self, delay: float, *, after_close: bool) -> None:
        if self._stopping or (self._switch is not None and not self._switch.done()):
            return
        self._switch = asyncio.create_task(self._connect_again(delay, after_close))

    async def _connect_again(self, delay: float, after_close: bool) -> None:
        """Open the next connection, retrying with backoff, and adopt it."""
        attempt = 0
        while not self._stopping:
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                link = await self._open_link()
            except ConnectError as exc:
                if exc.status is not None and _refused_for_good(exc.status):
                    self._give_up(exc)
                    return
                attempt += 1
                delay = self._retry_delay(exc, attempt)
                _log.debug(
                    "device %s: reconnect attempt %d failed (%s); next in %.2f s",
                    self.device,
                    attempt,
                    exc,
                    delay,
                )
                continue
            if self._stopping:
                await _abort_ws(link.ws)
                return
            self._adopt(link)
            return

    def _give_up(self, exc: ConnectError) -> None:
        """Stop reconnecting: the node refused the device for good."""
        _log.warning("device %s: reconnect refused, stopping: %s", self.device, exc)
        self._refused = exc
        current = self._current
        if current is not None and current.closed is not None:
            self._closed = self._final(current.closed)
        self._notify()

    def _final(self, last: ConnectionClosed) -> ConnectionClosed:
        """The client's end, after its last connection closed with ``last``."""
        if self._refused is None:
            return last
        closed = ConnectionClosed(last.code, last.reason)
        closed.__cause__ = self._refused
        return closed

    def _backoff(self, attempt: int) -> float:
        """Full jitter: a random wait up to the attempt's exponential step."""
        step = min(self.reconnect_max_delay, self.reconnect_delay * 2.0**attempt)
        return self._random.uniform(0, step)

    def _retry_delay(self, exc: ConnectError, attempt: int) -> float:
        retry_after = _retry_after(exc.headers.get("retry-after"))
        if retry_after is not None:
            return retry_after * self._random.uniform(1.0, 1.5)
        return self._backoff(attempt)

    def _notify(self) -> None:
        """Wake every task waiting for a message or a change of state."""
        self._wake.set()
        self._wake = asyncio.Event()

    async def _wait_change(
        self, deadline: float | None, stop: Callable[[], bool]
    ) -> None:
        """Wait for the readers to add a message or change state."""
        if stop():
            return
        if self._closed is not None:
            raise self._closed
        wake = self._wake
        loop = asyncio.get_running_loop()
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            raise TimeoutError("no message from the node in time")
        async with asyncio.timeout(remaining):
            await wake.wait()

    async def _close_links(self, code: int, reason: str) -> int | None:
        """close() with reconnect=True: end every connection, keep messages."""
        self._stopping = True
        if self._switch is not None:
            self._switch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._switch
        links = list(self._links)
        for link in links:
            with contextlib.suppress(Exception):  # it may be gone already
                await link.ws.close(code, reason)
        readers = [link.reader for link in links if link.reader is not None]
        await asyncio.gather(*readers, return_exceptions=True)
        if self._closed is None:
            current = self._current
            last = current.closed if current is not None else None
            self._closed = self._final(last or ConnectionClosed(1006, ""))
        self._notify()
        return self._closed.code

    def __repr__(self) -> str:
        if self.connected:
            state = f"connected to {self.node!r}"
        elif self._closed is not None:
            state = f"closed with {self._closed.code}"
        else:
            state = "not connected"
        return f"<pushy.DeviceClient {self.device!r} {state}>"


class _Link:
    """One connection of a reconnecting client."""

    __slots__ = ("ack_ids", "closed", "hello", "reader", "ws")

    def __init__(self, ws: Any, hello: _Message) -> None:
        self.ws = ws
        self.hello = hello
        # Pushes it carried that wait for an ack (see DeviceClient.ack).
        self.ack_ids: set[Any] = set()
        self.reader: asyncio.Task[None] | None = None
        self.closed: ConnectionClosed | None = None


def _closed_of(exc: websockets.exceptions.ConnectionClosed) -> ConnectionClosed:
    rcvd = exc.rcvd
    if rcvd is not None:
        return ConnectionClosed(rcvd.code, rcvd.reason)
    return ConnectionClosed(1006, "")


def _ack_text(id: Any) -> str:
    return json.dumps({"t": "ack", "id": id}, separators=(",", ":"))


def _refused_for_good(status: int) -> bool:
    """Whether an upgrade refused with HTTP ``status`` is not worth retrying:
    a 4xx (a bad token, path or request) other than 408 and 429."""
    return 400 <= status < 500 and status not in (408, 429)


def _retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header (delta-seconds form only)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 3600 else None


async def _abort_ws(ws: Any) -> None:
    with contextlib.suppress(Exception):  # best effort
        await asyncio.wait_for(ws.close(1002), timeout=1.0)


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
    body = body.encode() if isinstance(body, str) else bytes(body)
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
