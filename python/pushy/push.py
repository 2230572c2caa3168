"""Push to devices through a node's internal HTTP API.

:class:`PushClient` talks to one node's ``push_port``::

    with pushy.PushClient(node.push_url) as client:
        result = client.push("tv-1", {"title": "hello"}, ack="client")
        if result.delivered:
            print(f"delivered in {result.latency * 1e6:.0f} us")

Every outcome the node reports (not connected, timeout, too large, ...) comes
back as a :class:`PushResult`; only a transport failure (the node cannot be
reached, or does not answer in time or in JSON) raises :class:`PushError`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from .errors import ConfigError, PushError

__all__ = ["CODE_BY_STATUS", "STATUS_BY_CODE", "PushClient", "PushResult"]

#: Status name of each push code (HTTP-like, see the device protocol).
STATUS_BY_CODE: dict[int, str] = {
    200: "delivered",
    202: "accepted",
    400: "bad_request",
    403: "forbidden",
    404: "not_connected",
    409: "moved",
    413: "too_large",
    429: "rate_limited",
    503: "unavailable",
    504: "timeout",
}

#: Push code of each status name.
CODE_BY_STATUS: dict[str, int] = {v: k for k, v in STATUS_BY_CODE.items()}

PushItem = tuple[str, Any] | Mapping[str, Any]


@dataclass(frozen=True)
class PushResult:
    """The outcome of one push.

    Args:
        status: ``"delivered"``, ``"not_connected"``, ``"timeout"``,
            ``"bad_request"``, ... (see :data:`STATUS_BY_CODE`).
        code: the push code: 200 delivered, 404 not connected, 504 ack
            timeout, ...
        node: id of the node that answered, when it said.
        latency: seconds from sending the request to reading the answer
            (for a batch: the whole batch).
        id: the message id the node gave the push, when it did.
        reason: the node's explanation of a failure, when it gave one.
    """

    status: str
    code: int
    node: str | None
    latency: float
    id: int | None = None
    reason: str | None = None

    @property
    def delivered(self) -> bool:
        """Whether the push was delivered (code 200)."""
        return self.code == 200

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict."""
        out: dict[str, Any] = {
            "status": self.status,
            "code": self.code,
            "node": self.node,
            "id": self.id,
            "latency_us": round(self.latency * 1e6, 1),
        }
        if self.reason is not None:
            out["reason"] = self.reason
        return out


class PushClient:
    """A service's push library: direct push to devices by id.

    Two ways to reach devices:

    * ``PushClient(url)`` talks to one node's push API over HTTP
      (``POST /v1/push`` and friends); a node with a Redis registry forwards
      pushes for devices connected elsewhere.
    * ``PushClient(redis=URL)`` looks each device up in the Redis registry
      (with a route cache) and sends the push straight to the node holding
      it over a persistent peer link, from the C++ engine's own thread.
      :meth:`apush` then awaits without blocking the event loop.

    With both, pushes take the Redis path and :meth:`device`, :meth:`stats`
    and :meth:`healthy` use the HTTP API.

    Args:
        url: a node's push URL (:attr:`pushy.Node.push_url`); by default
            ``http://127.0.0.1:8081`` when ``redis`` is not given.
        timeout: seconds to wait for an answer. A push with a longer
            ``timeout`` waits for that plus one second.
        redis: Redis URL of the registry (``redis://[:password@]host:port``).
        prefix: key prefix of the registry, as configured on the nodes.
        sender: service name devices see in ``from`` (``service:NAME``).
        queue_shards: number of shards of the queue (:meth:`enqueue`); the
            same number as the message processors use.

    Raises:
        ConfigError: a malformed URL, or Redis refused the credentials.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float = 10.0,
        redis: str | None = None,
        prefix: str = "pushy:",
        sender: str = "api",
        queue_shards: int = 4,
    ) -> None:
        if url is None and redis is None:
            url = "http://127.0.0.1:8081"
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/") if url is not None else None
        self.redis = redis
        self.timeout = timeout
        if (
            not isinstance(sender, str)
            or not 1 <= len(sender.encode()) <= 64
            or any(c.isspace() or c == '"' or ord(c) < 32 for c in sender)
        ):
            raise ConfigError(
                "sender must be a service name of 1 to 64 bytes without blanks "
                f"or quotes, got {sender!r}"
            )
        self.sender = sender
        if not isinstance(queue_shards, int) or not 1 <= queue_shards <= 1024:
            raise ConfigError(
                f"queue_shards must be an integer from 1 to 1024, got {queue_shards!r}"
            )
        self.queue_shards = queue_shards
        self._core: Any = None
        if redis is not None:
            from .node import _core  # loads the engine with its log bridge

            self._core = _core().PushClient(redis, prefix, float(timeout))
        self._client: httpx.Client | None = None
        self._aclient: httpx.AsyncClient | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._closing: set[asyncio.Task[None]] = set()

    # Pushes.

    def push(
        self,
        device: str,
        data: Any,
        ack: str = "written",
        timeout: float | None = None,
    ) -> PushResult:
        """Push one message to a device and wait for the outcome.

        Args:
            device: the device id.
            data: any JSON value.
            ack: ``"written"`` (delivered once the frame is written to the
                device) or ``"client"`` (delivered once the device acks).
            timeout: seconds the node waits for the device's ack; the node's
                ``push_timeout_s`` when ``None``.

        Returns:
            The outcome; ``result.delivered`` tells whether it was delivered.

        Raises:
            PushError: the node cannot be reached or gave no JSON answer.
        """
        if self._core is not None:
            args = self._core_args(device, data, ack, timeout)
            return _core_result(self._core.push(*args))
        body = _push_body(device, data, ack, timeout)
        self._sync_client()  # made before timing: it loads certificates
        started = time.perf_counter()
        response = self._send("POST", "/v1/push", body, timeout)
        return _result(response, time.perf_counter() - started)

    async def apush(
        self,
        device: str,
        data: Any,
        ack: str = "written",
        timeout: float | None = None,
    ) -> PushResult:
        """Asynchronous twin of :meth:`push`."""
        if self._core is not None:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[PushResult] = loop.create_future()

            def done(result: tuple[Any, ...]) -> None:
                # On the engine's thread: hand the result to the loop.
                loop.call_soon_threadsafe(_settle, future, _core_result(result))

            self._core.push_async(*self._core_args(device, data, ack, timeout), done)
            return await future
        body = _push_body(device, data, ack, timeout)
        self._async_client()
        started = time.perf_counter()
        response = await self._asend("POST", "/v1/push", body, timeout)
        return _result(response, time.perf_counter() - started)

    def push_many(
        self,
        items: Sequence[PushItem],
        ack: str = "written",
        timeout: float | None = None,
    ) -> list[PushResult]:
        """Push many messages in one request (``POST /v1/push/batch``).

        Args:
            items: ``(device, data)`` pairs, or dicts shaped like a
                ``/v1/push`` body (``device``, ``data``, and optionally
                ``ack`` and ``timeout_ms``, which win over the arguments).
            ack: ``"written"`` or ``"client"`` for items that do not say.
            timeout: seconds the node waits for each ack, for items that do
                not say.

        Returns:
            One result per item, in order.

        Raises:
            PushError: the node cannot be reached or gave no JSON answer.
            TypeError: an item is neither a pair nor a dict.
        """
        bodies = _batch_bodies(items, ack, timeout)
        if not bodies:
            return []
        if self._core is not None:
            results = self._core.push_many(self._core_items(bodies))
            return [_core_result(r) for r in results]
        self._sync_client()
        started = time.perf_counter()
        response = self._send("POST", "/v1/push/batch", {"pushes": bodies}, timeout)
        return _batch_results(response, len(bodies), time.perf_counter() - started)

    async def apush_many(
        self,
        items: Sequence[PushItem],
        ack: str = "written",
        timeout: float | None = None,
    ) -> list[PushResult]:
        """Asynchronous twin of :meth:`push_many`."""
        bodies = _batch_bodies(items, ack, timeout)
        if not bodies:
            return []
        if self._core is not None:
            return list(
                await asyncio.gather(
                    *(
                        self.apush(b["device"], b["data"], b["ack"], _seconds(b))
                        for b in bodies
                    )
                )
            )
        self._async_client()
        started = time.perf_counter()
        response = await self._asend(
            "POST", "/v1/push/batch", {"pushes": bodies}, timeout
        )
        return _batch_results(response, len(bodies), time.perf_counter() - started)

    # The queue (indirect push).

    def enqueue(
        self,
        device: str,
        data: Any,
        ttl: float = 300.0,
        id: str | None = None,
        ack: str = "written",
    ) -> str:
        """Queue a message for a device; a message processor delivers it.

        The message waits in the queue (a Redis Stream shard chosen by the
        device id) until a processor delivers it, retrying while the device
        is offline, until ``ttl`` seconds have passed; then it goes to the
        dead-letter stream. Delivery is at least once: the device gets the
        push with ``"id": <message id>`` on every attempt, so it can drop
        duplicates. Needs ``redis=``.

        Args:
            device: the device id.
            data: any JSON value.
            ttl: seconds the message stays deliverable (at most 30 days).
            id: the message id; a random 32-hex-digit one when ``None``.
            ack: ``"written"`` (done once written to the device) or
                ``"client"`` (done once the device acks the id).

        Returns:
            The message id.

        Raises:
            PushError: no ``redis=``, a bad message, or Redis did not take it.
        """
        return _enqueued(self._queue().enqueue_many([self._queue_item(
            device, data, ttl, id, ack)])[0])

    async def aenqueue(
        self,
        device: str,
        data: Any,
        ttl: float = 300.0,
        id: str | None = None,
        ack: str = "written",
    ) -> str:
        """Asynchronous twin of :meth:`enqueue`."""
        item = self._queue_item(device, data, ttl, id, ack)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Any, ...]] = loop.create_future()

        def done(result: tuple[Any, ...]) -> None:
            loop.call_soon_threadsafe(_settle, future, result)

        self._queue().enqueue_async(item, done)
        return _enqueued(await future)

    def enqueue_many(
        self,
        items: Sequence[tuple[str, Any]],
        ttl: float = 300.0,
        ack: str = "written",
    ) -> list[str]:
        """Queue many ``(device, data)`` messages at once (pipelined).

        Returns:
            The message ids, in order.

        Raises:
            PushError: as :meth:`enqueue`, for the first message Redis did
                not take (the others may have been queued).
        """
        queue = self._queue()
        batch = [self._queue_item(d, data, ttl, None, ack) for d, data in items]
        return [_enqueued(r) for r in queue.enqueue_many(batch)]

    def _queue(self) -> Any:
        if self._core is None:
            raise PushError("enqueue needs a client made with redis=")
        return self._core

    def _queue_item(
        self, device: str, data: Any, ttl: float, id: str | None, ack: str
    ) -> tuple[str, str, str, float, bool, str, int]:
        if ack not in ("written", "client"):
            raise ConfigError(f"ack must be 'written' or 'client', got {ack!r}")
        if not isinstance(device, str):
            raise TypeError(f"device must be a string, got {device!r}")
        if id is not None and not isinstance(id, str):
            raise TypeError(f"id must be a string or None, got {id!r}")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise TypeError(f"ttl must be a number of seconds, got {ttl!r}")
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        return (
            device,
            text,
            id or "",
            float(ttl),
            ack == "client",
            self.sender,
            self.queue_shards,
        )

    # Node state.

    def device(self, id: str) -> dict[str, Any]:
        """Return what the node knows of a device (``GET /v1/devices/{id}``).

        The answer is returned whatever its status (404 says the device is
        not connected here).

        Raises:
            PushError: the node cannot be reached or gave no JSON answer.
        """
        return _json(self._send("GET", f"/v1/devices/{quote(id, safe='')}"))

    async def adevice(self, id: str) -> dict[str, Any]:
        """Asynchronous twin of :meth:`device`."""
        path = f"/v1/devices/{quote(id, safe='')}"
        return _json(await self._asend("GET", path))

    def stats(self) -> dict[str, Any]:
        """Return the node's counters (``GET /v1/stats``).

        Raises:
            PushError: the node cannot be reached or gave no JSON answer.
        """
        return _json(self._send("GET", "/v1/stats"))

    async def astats(self) -> dict[str, Any]:
        """Asynchronous twin of :meth:`stats`."""
        return _json(await self._asend("GET", "/v1/stats"))

    def healthy(self) -> bool:
        """Return whether ``GET /healthz`` answers 200 (``False`` if unreachable)."""
        try:
            return self._send("GET", "/healthz").status_code == 200
        except PushError:
            return False

    async def ahealthy(self) -> bool:
        """Asynchronous twin of :meth:`healthy`."""
        try:
            return (await self._asend("GET", "/healthz")).status_code == 200
        except PushError:
            return False

    # Event frames (for the device-list service).

    def send_event(
        self, device: str, event: Mapping[str, Any], conn: int = 0
    ) -> PushResult:
        """Send an event frame to a device and wait for the outcome.

        The frame reaches the device as it is (``{"t":"event",...}``), on
        whichever node holds it, over a peer link; it is answered like a
        push (200 once written) but is not a push: it has no id, no ack,
        and the node counts it as ``events_sent``.

        Args:
            device: the device id.
            event: the whole frame, e.g. ``{"kind": "device_online",
                "device": "phone-1", "meta": {}}``; ``"t": "event"`` is added
                when missing. It must be JSON-encodable.
            conn: the connection number (the ``conn`` of the device's
                connection events) that must get it; 0 for whichever
                connection the device has. When that connection is gone the
                result is 404 with reason ``connection is gone``.

        Returns:
            The outcome: 200 written, 404 not connected (or that
            connection is gone), 503, 504, or 400 for a frame that is not an
            event.

        Raises:
            ConfigError: the client was made without ``redis=``.
            TypeError: ``event`` is not a dict or not JSON-encodable.
            ValueError: ``event`` has a ``"t"`` other than ``"event"``.
        """
        core = self._event_core()
        return _core_result(core.send_event(device, _event_text(event), conn))

    async def asend_event(
        self, device: str, event: Mapping[str, Any], conn: int = 0
    ) -> PushResult:
        """Asynchronous twin of :meth:`send_event`."""
        core = self._event_core()
        text = _event_text(event)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[PushResult] = loop.create_future()

        def done(result: tuple[Any, ...]) -> None:
            # On the engine's thread: hand the result to the loop.
            loop.call_soon_threadsafe(_settle, future, _core_result(result))

        core.send_event_async(device, text, conn, done)
        return await future

    def _event_core(self) -> Any:
        if self._core is None:
            raise ConfigError(
                "send_event needs a client made with redis=URL (events travel "
                "over peer links, not the HTTP push API)"
            )
        return self._core

    # Lifecycle.

    def close(self) -> None:
        """Close the connections.

        The async connections are closed too: at once when their event loop
        is idle, in a task when called on that loop. In async code prefer
        :meth:`aclose`, which waits for them.
        """
        if self._core is not None:
            self._core.close()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._aclient is None or self._aloop is None:
            return
        client, loop = self._aclient, self._aloop
        self._aclient = self._aloop = None
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            task = loop.create_task(client.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        elif loop.is_closed():
            return
        elif loop.is_running():
            asyncio.run_coroutine_threadsafe(client.aclose(), loop)
        elif current is None:
            loop.run_until_complete(client.aclose())

    async def aclose(self) -> None:
        """Close every connection, synchronous and asynchronous."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._aclient is not None and self._aloop is asyncio.get_running_loop():
            client, self._aclient, self._aloop = self._aclient, None, None
            await client.aclose()
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        if self.redis is not None:
            return f"<pushy.PushClient redis={_redacted(self.redis)!r}>"
        return f"<pushy.PushClient {self.url!r}>"

    # Transport.

    def _core_args(
        self, device: str, data: Any, ack: str, timeout: float | None
    ) -> tuple[str, str, bool, float, str]:
        if ack not in ("written", "client"):
            raise ConfigError(f"ack must be 'written' or 'client', got {ack!r}")
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        return (device, text, ack == "client", float(timeout or 0.0), self.sender)

    def _core_items(
        self, bodies: list[dict[str, Any]]
    ) -> list[tuple[str, str, bool, float, str]]:
        return [
            self._core_args(b["device"], b["data"], b["ack"], _seconds(b))
            for b in bodies
        ]

    def _url(self) -> str:
        if self.url is None:
            raise PushError("this client has no url= of a node's push API")
        return self.url

    def _timeout(self, push_timeout: float | None) -> float:
        if push_timeout is None:
            return self.timeout
        return max(self.timeout, push_timeout + 1.0)

    def _sync_client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(trust_env=False)
        return self._client

    def _async_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aloop is not loop:
            # An AsyncClient belongs to the loop it first ran on.
            self._aclient = httpx.AsyncClient(trust_env=False)
            self._aloop = loop
        return self._aclient

    def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        push_timeout: float | None = None,
    ) -> httpx.Response:
        client = self._sync_client()
        timeout = self._timeout(push_timeout)
        url = self._url()
        try:
            return client.request(method, url + path, json=body, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise PushError(
                f"{method} {self.url}{path} got no answer in {timeout:g} s"
            ) from exc
        except httpx.HTTPError as exc:
            raise PushError(f"{method} {self.url}{path} failed: {exc}") from exc

    async def _asend(
        self,
        method: str,
        path: str,
        body: Any = None,
        push_timeout: float | None = None,
    ) -> httpx.Response:
        client = self._async_client()
        timeout = self._timeout(push_timeout)
        url = self._url()
        try:
            return await client.request(method, url + path, json=body, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise PushError(
                f"{method} {self.url}{path} got no answer in {timeout:g} s"
            ) from exc
        except httpx.HTTPError as exc:
            raise PushError(f"{method} {self.url}{path} failed: {exc}") from exc


def _core_result(t: tuple[Any, ...]) -> PushResult:
    """A :class:`PushResult` from the engine's result tuple."""
    code, status, node, mid, reason, latency = t
    return PushResult(
        status=status or STATUS_BY_CODE.get(code, "error"),
        code=code,
        node=node or None,
        latency=latency,
        id=mid or None,
        reason=reason or None,
    )


def _enqueued(t: tuple[Any, ...]) -> str:
    """The message id of the engine's enqueue result, or a PushError."""
    code, status, mid, _entry, reason = t
    if code != 202:
        raise PushError(f"message for the queue was refused ({code} {status}): {reason}")
    return str(mid)


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # the awaiting task may have been cancelled
        future.set_result(result)


def _seconds(body: Mapping[str, Any]) -> float | None:
    ms = body.get("timeout_ms")
    return ms / 1000 if isinstance(ms, (int, float)) else None


def _redacted(url: str) -> str:
    """``url`` without its password."""
    head, sep, tail = url.rpartition("@")
    return f"redis://***@{tail}" if sep else url


def _event_text(event: Mapping[str, Any]) -> str:
    """The JSON text of an event frame, with ``"t": "event"`` first."""
    if not isinstance(event, Mapping):
        raise TypeError(f"event must be a dict (the whole frame), got {event!r}")
    kind = event.get("t", "event")
    if kind != "event":
        raise ValueError(f"an event frame has 't' 'event', got {kind!r}")
    frame = {"t": "event", **event}
    try:
        return json.dumps(frame, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"event must be JSON-encodable: {exc}") from exc


def _push_body(
    device: str, data: Any, ack: str, timeout: float | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"device": device, "data": data, "ack": ack}
    if timeout is not None:
        body["timeout_ms"] = max(0, round(timeout * 1000))
    return body


def _batch_bodies(
    items: Sequence[PushItem], ack: str, timeout: float | None
) -> list[dict[str, Any]]:
    bodies = []
    for item in items:
        if isinstance(item, Mapping):
            body = dict(item)
            body.setdefault("ack", ack)
            if timeout is not None:
                body.setdefault("timeout_ms", max(0, round(timeout * 1000)))
        elif isinstance(item, tuple) and len(item) == 2:
            body = _push_body(item[0], item[1], ack, timeout)
        else:
            raise TypeError(
                f"each push must be a (device, data) pair or a dict, got {item!r}"
            )
        bodies.append(body)
    return bodies


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise PushError(
            f"expected a JSON object from {response.request.url}, got HTTP "
            f"{response.status_code} {response.text[:80]!r}"
        )
    return value


def _from_fields(
    fields: Mapping[str, Any], code: int | None, latency: float
) -> PushResult:
    status = fields.get("status")
    if code is None:
        raw_code = fields.get("code")
        if isinstance(raw_code, int):
            code = raw_code
        elif isinstance(status, str) and status in CODE_BY_STATUS:
            code = CODE_BY_STATUS[status]
        else:
            code = 0
    if not isinstance(status, str):
        status = STATUS_BY_CODE.get(code, "error")
    node = fields.get("node")
    mid = fields.get("id")
    reason = fields.get("reason")
    return PushResult(
        status=status,
        code=code,
        node=str(node) if node is not None else None,
        latency=latency,
        id=mid if isinstance(mid, int) else None,
        reason=str(reason) if reason is not None else None,
    )


def _result(response: httpx.Response, latency: float) -> PushResult:
    code = response.status_code
    try:
        fields = response.json()
    except ValueError:
        fields = None
    if not isinstance(fields, Mapping):
        text = response.text.strip()[:200] or None
        return PushResult(
            STATUS_BY_CODE.get(code, "error"), code, None, latency, None, text
        )
    return _from_fields(fields, code, latency)


def _batch_results(
    response: httpx.Response, count: int, latency: float
) -> list[PushResult]:
    try:
        fields = response.json()
    except ValueError:
        fields = None
    results = fields.get("results") if isinstance(fields, Mapping) else None
    if isinstance(results, list) and len(results) == count:
        return [
            _from_fields(item if isinstance(item, Mapping) else {}, None, latency)
            for item in results
        ]
    # The batch as a whole was refused (or answered oddly): one outcome for all.
    whole = _result(response, latency)
    if whole.code == 200:
        whole = PushResult(
            "error",
            0,
            whole.node,
            latency,
            None,
            f"expected {count} results in the batch answer",
        )
    return [whole] * count
