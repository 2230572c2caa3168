"""The device-list service: which devices of each account are online.

:class:`DeviceListService` consumes the connection events that nodes write
to the stream ``{prefix}events`` (consumer group ``devicelist``), keeps each
account's online devices in Redis, and tells the devices that subscribed to
``account.devices`` when another device of their account comes online or
goes offline::

    async with pushy.DeviceListService(redis="redis://10.0.0.2:6379") as svc:
        print(await svc.devices("home"))   # [{'device': 'tv-1', ...}]
        await svc.wait_closed()             # until stop() or cancellation

Keys (``P`` is the prefix; ``A`` an account, ``D`` a device, ``N`` a node):

=============================  ==============================================
key                            holds
=============================  ==============================================
``P acct:{A}:devices``         hash D -> ``{"node","conn","since","meta"}``
``P acct:{A}:subs``            hash D -> ``{"node","conn"}``: subscribers
``P acct:{A}:gone:D``          hash ``N<TAB>conn`` -> time it disconnected
                               (expires after ``tombstone_s``)
``P dl:node:N``                set of ``A<TAB>D`` listed on node N
=============================  ==============================================

Processing is at least once: an entry is acknowledged (``XACK``) after its
effects, and handling one again does no harm. See ``docs/devicelist.md`` for
the guarantees, and for what happens when Redis, the service or a node dies.

What is logged (logger ``pushy.devicelist``):

=========  ==================================================================
level      what
=========  ==================================================================
error      a delivery callable that raised; a bug while handling an entry
warning    a bad entry in the stream (counted ``events_bad``), Redis
           unreachable (once until it is back), a node found gone (its
           devices go offline), a delivery that failed other than with 404
info       start and stop, Redis reachable again, the group created, lists
           rebuilt from the registry
debug      every entry handled, deliveries answered 404
=========  ==================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from .errors import ConfigError, PushyError

__all__ = [
    "DEFAULT_GROUP",
    "TOPIC",
    "Deliver",
    "DeviceListService",
    "online_devices",
    "parse_event",
]

_log = logging.getLogger("pushy.devicelist")

#: Consumer group of the service on ``{prefix}events``.
DEFAULT_GROUP = "devicelist"

#: The one topic devices subscribe to.
TOPIC = "account.devices"

#: ``deliver(device, event, conn)``: send the event frame (a dict with
#: ``"t": "event"``) to connection ``conn`` of ``device``; return a
#: :class:`pushy.PushResult` or its code (200 written, 404 gone, ...).
Deliver = Callable[[str, dict[str, Any], int], Awaitable[Any]]

_KINDS = ("connected", "disconnected", "subscribe", "unsubscribe")

# Consumers of the group other than this one that have nothing pending and
# have not read for this long are deleted (each restart adds one).
_FORGET_CONSUMER_MS = 3_600_000

# Rebuilds from the registry after the group was created: at once and at
# this many sweeps after it, while the nodes write their records again.
_REBUILD_SWEEPS = 3

# Backoff between attempts while Redis cannot be reached.
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 2.0

_GLOB_SPECIAL = "\\*?[]"


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions as rexc

    return (rexc.ConnectionError, rexc.TimeoutError, TimeoutError, OSError)


#: Failures that mean "Redis cannot be reached now": retried with backoff.
_REDIS_ERRORS = _redis_errors()


class BadEvent(ValueError):
    """An entry of the events stream that cannot be handled."""


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of ``{prefix}events``, parsed and checked.

    Args:
        id: the stream entry id.
        kind: ``connected``, ``disconnected``, ``subscribe`` or ``unsubscribe``.
        device: the device id.
        account: the account id (may be empty).
        node: the node id.
        conn: the connection's number on that node.
        time: ms since the Unix epoch.
        meta: the token's ``meta`` (``connected`` only; else ``{}``).
        topic: the topic (``subscribe`` / ``unsubscribe`` only; else ``""``).
    """

    id: str
    kind: str
    device: str
    account: str
    node: str
    conn: int
    time: int
    meta: dict[str, Any]
    topic: str = ""


def parse_event(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Event:
    """Parse one stream entry (fields as Redis returns them).

    Args:
        entry_id: the entry id.
        fields: the entry's fields and values, as bytes.

    Returns:
        The event.

    Raises:
        BadEvent: a field is missing or malformed; the message names it.
    """
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    if not fields:
        raise BadEvent("entry has no fields (trimmed from the stream)")
    text: dict[str, str] = {}
    for key, value in fields.items():
        try:
            text[key.decode()] = value.decode()
        except UnicodeDecodeError:
            raise BadEvent(f"field {key!r} must be UTF-8") from None
    kind = text.get("kind")
    if kind not in _KINDS:
        raise BadEvent(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    for name in ("device", "node"):
        if not text.get(name):
            raise BadEvent(f"{kind} entry needs a non-empty {name!r}")
    if "account" not in text:
        raise BadEvent(f"{kind} entry needs an 'account' field")
    conn = _decimal(text, "conn", kind)
    when = _decimal(text, "time", kind)
    meta: dict[str, Any] = {}
    if kind == "connected":
        try:
            meta = json.loads(text.get("meta") or "{}")
        except ValueError:
            raise BadEvent("'meta' must be a JSON object, got invalid JSON") from None
        if not isinstance(meta, dict):
            raise BadEvent(f"'meta' must be a JSON object, got {type(meta).__name__}")
    topic = ""
    if kind in ("subscribe", "unsubscribe"):
        topic = text.get("topic", "")
        if topic != TOPIC:
            raise BadEvent(f"topic must be {TOPIC!r}, got {topic!r}")
    return Event(
        eid,
        kind,
        text["device"],
        text["account"],
        text["node"],
        conn,
        when,
        meta,
        topic,
    )


def _decimal(text: dict[str, str], name: str, kind: str) -> int:
    value = text.get(name, "")
    if not value.isascii() or not value.isdigit():
        raise BadEvent(
            f"{kind} entry needs {name!r} as a decimal number, got {value!r}"
        )
    return int(value)


# Frames sent to subscribers (see the issue 5 contract).


def online_frame(device: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The ``device_online`` event frame."""
    return {"t": "event", "kind": "device_online", "device": device, "meta": meta}


def offline_frame(device: str) -> dict[str, Any]:
    """The ``device_offline`` event frame."""
    return {"t": "event", "kind": "device_offline", "device": device, "meta": {}}


def list_frame(devices: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The ``device_list`` event frame of the given listed devices."""
    return {
        "t": "event",
        "kind": "device_list",
        "devices": [
            {"device": d["device"], "node": d["node"], "meta": d["meta"]}
            for d in devices
        ],
    }


# Lua scripts. Each touches the keys of one account only (one hash slot:
# the account is the hash tag), so that they hold on Redis Cluster too.
# Records and subscriptions are JSON; conn and since are numbers in them.

# KEYS devices, subs, gone. ARGV device, node, conn, since, record JSON,
# only_if_absent ("1": leave a listed device as it is). A connection that
# already disconnected (per gone) and one older than the listed other
# connection are not listed. Listing a connection drops the device's
# subscription of another connection (it was superseded).
# Returns {applied, previous record or nil, subs as a flat list}.
_CONNECT = """
local device, node, conn, since = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local gone = redis.call('HGET', KEYS[3], node .. '\\t' .. ARGV[3])
if gone and since <= tonumber(gone) then
  return {0, false, {}}
end
local prev = redis.call('HGET', KEYS[1], device)
if prev then
  local p = cjson.decode(prev)
  local same = p.node == node and p.conn == conn
  if ARGV[6] == '1' or (not same and p.since > since) then
    return {0, prev, {}}
  end
end
redis.call('HSET', KEYS[1], device, ARGV[5])
local sub = redis.call('HGET', KEYS[2], device)
if sub then
  local s = cjson.decode(sub)
  if s.node ~= node or s.conn ~= conn then
    redis.call('HDEL', KEYS[2], device)
  end
end
return {1, prev or false, redis.call('HGETALL', KEYS[2])}
"""

# KEYS devices, subs, gone. ARGV device, node, conn ("" = any connection
# on the node), time ("" = none: no tombstone, no time check), gone TTL ms.
# Unlists the device and drops its subscription if they are of that
# connection (or node). Returns {removed, record left or nil, subs flat}.
_LEAVE = """
local device, node = ARGV[1], ARGV[2]
local conn, t = tonumber(ARGV[3]), tonumber(ARGV[4])
if t then
  local field = node .. '\\t' .. ARGV[3]
  local old = redis.call('HGET', KEYS[3], field)
  if not old or tonumber(old) < t then
    redis.call('HSET', KEYS[3], field, ARGV[4])
  end
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
local removed = 0
local cur = redis.call('HGET', KEYS[1], device)
if cur then
  local p = cjson.decode(cur)
  if p.node == node and (not conn or p.conn == conn) and (not t or p.since <= t) then
    redis.call('HDEL', KEYS[1], device)
    removed = 1
    cur = false
  end
end
local sub = redis.call('HGET', KEYS[2], device)
if sub then
  local s = cjson.decode(sub)
  if s.node == node and (not conn or s.conn == conn) then
    redis.call('HDEL', KEYS[2], device)
  end
end
return {removed, cur, redis.call('HGETALL', KEYS[2])}
"""

# KEYS devices, subs, gone. ARGV device, node, conn, time, subscription
# JSON. Returns the account's devices (flat), or nil when the connection
# has already disconnected.
_SUBSCRIBE = """
local gone = redis.call('HGET', KEYS[3], ARGV[2] .. '\\t' .. ARGV[3])
if gone and tonumber(ARGV[4]) <= tonumber(gone) then
  return false
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS subs. ARGV device, node, conn. Drops the subscription if it is of
# that connection; returns 1 if it did.
_UNSUBSCRIBE = """
local sub = redis.call('HGET', KEYS[1], ARGV[1])
if sub then
  local s = cjson.decode(sub)
  if s.node == ARGV[2] and s.conn == tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], ARGV[1])
    return 1
  end
end
return 0
"""


class _Keys:
    """The Redis keys of one deployment prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.events = f"{prefix}events"

    def devices(self, account: str) -> str:
        return f"{self.prefix}acct:{{{account}}}:devices"

    def subs(self, account: str) -> str:
        return f"{self.prefix}acct:{{{account}}}:subs"

    def gone(self, account: str, device: str) -> str:
        return f"{self.prefix}acct:{{{account}}}:gone:{device}"

    def account(self, account: str) -> list[str]:
        """KEYS of the scripts: devices, subs, gone (the last needs a device)."""
        return [self.devices(account), self.subs(account)]

    def node_set(self, node: str) -> str:
        return f"{self.prefix}dl:node:{node}"

    def node_dir(self, node: str) -> str:
        return f"{self.prefix}node:{node}"

    def pattern(self, middle: str) -> str:
        """A SCAN pattern of ``prefix + middle + '*'`` (prefix escaped)."""
        escaped = "".join("\\" + c if c in _GLOB_SPECIAL else c for c in self.prefix)
        return f"{escaped}{middle}*"


def _check_prefix(prefix: str) -> None:
    if not prefix or any(c.isspace() or c in "{}" for c in prefix):
        raise ConfigError(
            f"prefix must be non-empty, without blanks or braces, got {prefix!r}"
        )


def _check_redis_url(url: str) -> None:
    from redis.connection import parse_url

    # The events go out through the engine's push client, which speaks
    # plain redis:// (no TLS, no Unix socket), as the nodes do.
    if not isinstance(url, str) or not url.startswith("redis://"):
        shown = _redacted(url) if isinstance(url, str) else repr(url)
        raise ConfigError(f"redis must be a redis:// URL, got {shown!r}")
    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(
            f"redis must be a redis:// URL, got {_redacted(url)!r}: {exc}"
        ) from None


def _redacted(url: str) -> str:
    from .push import _redacted as redact

    return redact(url)


def _decode_record(device: str, raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
        return {
            "device": device,
            "node": str(value["node"]),
            "conn": int(value["conn"]),
            "since": int(value["since"]),
            "meta": value.get("meta") or {},
        }
    except (ValueError, KeyError, TypeError):
        return None


def _listing(flat: Sequence[bytes]) -> list[dict[str, Any]]:
    """Records of an ``HGETALL`` of ``acct:{A}:devices``, sorted by device."""
    out = []
    for key, raw in zip(flat[::2], flat[1::2], strict=True):
        record = _decode_record(key.decode(errors="replace"), raw)
        if record is not None:
            out.append(record)
    return sorted(out, key=lambda r: r["device"])


def _subscribers(flat: Sequence[bytes]) -> dict[str, tuple[str, int]]:
    """Subscriptions of an ``HGETALL`` of ``acct:{A}:subs``: device -> (node, conn)."""
    out: dict[str, tuple[str, int]] = {}
    for key, raw in zip(flat[::2], flat[1::2], strict=True):
        try:
            value = json.loads(raw)
            out[key.decode(errors="replace")] = (str(value["node"]), int(value["conn"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def default_consumer() -> str:
    """The consumer name used when none is given: ``HOST-PID``."""
    return f"{socket.gethostname()}-{os.getpid()}"


class DeviceListService:
    """The device-list service of a fleet on Redis.

    It reads ``{prefix}events`` in the consumer group ``group`` as the
    consumer ``consumer``: first the entries it read before and did not
    acknowledge (after a restart), then new ones. Several services can
    share a group: each handles a share of the entries, and entries that a
    dead consumer left pending longer than ``claim_s`` are claimed by a live
    one. Every ``sweep_s`` it also looks for nodes whose directory entry
    (``{prefix}node:<id>``) is gone: the devices listed on a node found gone
    at two sweeps in a row go offline.

    Args:
        redis: Redis URL (``redis://[:password@]host:port[/db]``).
        prefix: key prefix of the fleet, as configured on the nodes.
        group: the consumer group.
        consumer: this consumer's name; ``HOST-PID`` when ``None``.
        sweep_s: seconds between sweeps (dead nodes, claims, rebuilds).
        claim_s: entries pending this long with another consumer are
            claimed.
        tombstone_s: how long a disconnected connection is remembered, so
            that its late ``connected`` or ``subscribe`` (from a consumer
            that was slower) is ignored. Keep it well above ``claim_s``.
        delivery_timeout_s: the push client's timeout of one event.
        batch: entries read at once.
        block_s: how long one read waits for new entries.
        deliver: ``async deliver(device, event, conn)`` that sends an event
            frame; by default a ``PushClient(redis=redis, prefix=prefix)``'s
            ``asend_event``. It returns a :class:`pushy.PushResult` or a
            code; 200 counts as sent, 404 drops the subscription.

    Raises:
        ConfigError: a bad URL, prefix, group, consumer or timing.

    Limitations:
        One account's entries are handled in order, one at a time; entries
        of different accounts in one read run concurrently. A delivery that
        fails is counted and not retried. Subscriptions live in Redis only:
        a Redis that restarts empty loses them (devices must subscribe
        again) and the lists are rebuilt from the registry without ``meta``.
    """

    def __init__(
        self,
        redis: str,
        *,
        prefix: str = "pushy:",
        group: str = DEFAULT_GROUP,
        consumer: str | None = None,
        sweep_s: float = 5.0,
        claim_s: float = 30.0,
        tombstone_s: float = 600.0,
        delivery_timeout_s: float = 5.0,
        batch: int = 100,
        block_s: float = 1.0,
        deliver: Deliver | None = None,
    ) -> None:
        _check_redis_url(redis)
        _check_prefix(prefix)
        consumer = default_consumer() if consumer is None else consumer
        for name, value in (("group", group), ("consumer", consumer)):
            if not value or any(c.isspace() for c in value):
                raise ConfigError(
                    f"{name} must be non-empty, without blanks, got {value!r}"
                )
        for name, seconds in (
            ("sweep_s", sweep_s),
            ("claim_s", claim_s),
            ("tombstone_s", tombstone_s),
            ("delivery_timeout_s", delivery_timeout_s),
            ("block_s", block_s),
        ):
            if not 0 < seconds <= 86400:
                raise ConfigError(
                    f"{name} must be above 0 and at most 86400, got {seconds!r}"
                )
        if not 1 <= batch <= 10000:
            raise ConfigError(f"batch must be 1 to 10000, got {batch!r}")
        self.redis_url = redis
        self.prefix = prefix
        self.group = group
        self.consumer = consumer
        self.sweep_s = float(sweep_s)
        self.claim_s = float(claim_s)
        self.tombstone_s = float(tombstone_s)
        self.delivery_timeout_s = float(delivery_timeout_s)
        self.batch = batch
        self.block_s = float(block_s)
        self._deliver_fn = deliver
        self._keys = _Keys(prefix)
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        self._push: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._down = False
        self._sweeps = 0
        self._missing: dict[str, int] = {}
        self._rebuilds_due = 0
        self._thread: threading.Thread | None = None
        self._thread_stop: Callable[[], Any] | None = None
        self._stopping = False
        self._counters = dict.fromkeys(
            (
                "events_handled",
                "events_bad",
                "events_skipped",
                "events_claimed",
                "events_sent",
                "deliveries_failed",
                "subscriptions_dropped",
                "nodes_swept",
                "devices_swept",
                "devices_rebuilt",
                "redis_errors",
            ),
            0,
        )
        self._by_kind = dict.fromkeys(_KINDS, 0)

    # Lifecycle.

    @property
    def running(self) -> bool:
        """Whether the service is started and not stopped."""
        return bool(self._tasks) and not all(t.done() for t in self._tasks)

    async def start(self) -> Self:
        """Connect, make the consumer group if missing, start consuming.

        Returns at once: consuming and sweeping run as tasks of the running
        event loop. A Redis that cannot be reached is a warning: the service
        keeps trying.

        Returns:
            The service itself.

        Raises:
            PushyError: the service is already running.
            ConfigError: Redis refused the credentials or the database.
            ImportError: the engine is not built (only without ``deliver``).
        """
        import redis.asyncio as aioredis
        import redis.exceptions as rexc

        if self._tasks:
            raise PushyError("the device-list service is already running")
        self._redis = aioredis.from_url(
            self.redis_url,
            socket_timeout=self.block_s + 5.0,
            socket_connect_timeout=2.0,
        )
        self._scripts = {
            name: self._redis.register_script(text)
            for name, text in (
                ("connect", _CONNECT),
                ("leave", _LEAVE),
                ("subscribe", _SUBSCRIBE),
                ("unsubscribe", _UNSUBSCRIBE),
            )
        }
        self._closed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        try:
            await asyncio.wait_for(self._redis.ping(), timeout=4.0)
            await self._ensure_group()
        except (rexc.AuthenticationError, rexc.AuthorizationError) as exc:
            await self._redis.aclose()
            raise ConfigError(f"redis refused the service: {exc}") from None
        except rexc.ResponseError as exc:
            await self._redis.aclose()
            text = str(exc)
            if "NOAUTH" in text or "authenticated" in text:
                text = "it needs a password (redis://:PASSWORD@HOST:PORT)"
            raise ConfigError(f"redis refused the service: {text}") from None
        except _REDIS_ERRORS as exc:
            self._redis_down(exc)
        if self._deliver_fn is None:
            from .push import PushClient

            try:
                self._push = await asyncio.to_thread(
                    PushClient,
                    redis=self.redis_url,
                    prefix=self.prefix,
                    timeout=self.delivery_timeout_s,
                    sender="devicelist",
                )
            except BaseException:
                await self._redis.aclose()
                raise
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._consume(), name="devicelist-consume"),
            asyncio.create_task(self._maintain(), name="devicelist-sweep"),
        ]
        for task in self._tasks:
            task.add_done_callback(_report_crash)
        _log.info(
            "device-list service started: consumer %s of group %s on %s%s",
            self.consumer,
            self.group,
            _redacted(self.redis_url),
            f" (stream {self._keys.events})",
        )
        return self

    async def stop(self) -> None:
        """Stop consuming and close the connections.

        Entries read and not yet acknowledged stay pending: this consumer
        reads them again when it starts, or another claims them. It does
        nothing when the service is not running.
        """
        tasks, self._tasks = self._tasks, []
        if not tasks:
            if self._stopping and self._closed is not None:
                await self._closed.wait()  # another stop() is under way
            return
        self._stopping = True
        # A cancellation that lands in the Redis client just as its socket
        # timeout fires can come out as a TimeoutError, which the loops ride
        # out: cancel again until the tasks are done.
        while not all(task.done() for task in tasks):
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=0.5)
        if self._push is not None:
            push, self._push = self._push, None
            await push.aclose()
        if self._redis is not None:
            await self._redis.aclose()
        if self._closed is not None:
            self._closed.set()
        _log.info("device-list service stopped: consumer %s", self.consumer)

    async def wait_closed(self) -> None:
        """Wait until the service is stopped (by :meth:`stop`) or fails.

        Raises:
            Exception: what ended one of the service's tasks (a bug).
        """
        tasks = list(self._tasks)
        if self._closed is None or not tasks:
            return
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait([closed, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def run(self) -> None:
        """Start, then run until cancelled; stop at the end."""
        await self.start()
        try:
            await self.wait_closed()
        finally:
            await self.stop()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # Running in a thread of its own, for synchronous code.

    def start_thread(self, timeout: float = 30.0) -> Self:
        """Run the service on an event loop in a thread of its own.

        Args:
            timeout: seconds to wait for :meth:`start` to finish.

        Returns:
            The service itself, started.

        Raises:
            PushyError: it is already running, or did not start in time.
            ConfigError: as :meth:`start`.
        """
        if self._thread is not None:
            raise PushyError("the device-list service is already running")
        ready = threading.Event()
        outcome: list[BaseException | None] = []

        async def main() -> None:
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            self._thread_stop = lambda: loop.call_soon_threadsafe(stop.set)
            try:
                await self.start()
            except BaseException as exc:  # noqa: BLE001 - raised in the caller
                outcome.append(exc)
                ready.set()
                return
            outcome.append(None)
            ready.set()
            asked = asyncio.ensure_future(stop.wait())
            await asyncio.wait(
                [asked, *self._tasks], return_when=asyncio.FIRST_COMPLETED
            )
            asked.cancel()
            await self.stop()

        self._thread = threading.Thread(
            target=asyncio.run, args=(main(),), name="pushy-devicelist", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout):
            self.stop_thread()
            raise PushyError(
                f"the device-list service did not start within {timeout:g} s"
            )
        if outcome[0] is not None:
            self._thread.join()
            self._thread = None
            raise outcome[0]
        return self

    def stop_thread(self, timeout: float = 30.0) -> None:
        """Stop the service run by :meth:`start_thread` and join its thread."""
        thread, ask = self._thread, self._thread_stop
        if thread is None:
            return
        if ask is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                ask()
        thread.join(timeout)
        self._thread = None
        self._thread_stop = None

    def __enter__(self) -> Self:
        return self.start_thread()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_thread()

    # Reading lists.

    async def devices(self, account: str) -> list[dict[str, Any]]:
        """The online devices of ``account``, sorted by device id.

        Each is ``{"device", "node", "conn", "since", "meta"}`` (``since`` in
        ms since the epoch). Works once :meth:`start` has been called.

        Raises:
            PushyError: the service was never started.
            redis.exceptions.ConnectionError: Redis cannot be reached.
        """
        if self._redis is None:
            raise PushyError("start the device-list service first")
        flat = await self._redis.execute_command("HGETALL", self._keys.devices(account))
        return _listing(_flat(flat))

    async def subscribers(self, account: str) -> dict[str, tuple[str, int]]:
        """The subscribed connections of ``account``: device -> (node, conn).

        Raises:
            PushyError: the service was never started.
        """
        if self._redis is None:
            raise PushyError("start the device-list service first")
        flat = await self._redis.execute_command("HGETALL", self._keys.subs(account))
        return _subscribers(_flat(flat))

    def stats(self) -> dict[str, Any]:
        """Counters and state, as a dict.

        ``events_handled`` (entries handled, also per kind in ``by_kind``),
        ``events_bad`` (malformed, acked and dropped), ``events_skipped``
        (no account, or a connection already gone), ``events_claimed``
        (taken from other consumers), ``events_sent`` (event frames answered
        200), ``deliveries_failed`` (any other answer), ``subscriptions_dropped``
        (a 404 to a subscriber), ``nodes_swept``, ``devices_swept``,
        ``devices_rebuilt``, ``redis_errors``; ``running``, ``redis_up``,
        ``consumer``, ``group``.
        """
        return {
            **self._counters,
            "by_kind": dict(self._by_kind),
            "running": self.running,
            "redis_up": self._redis is not None and not self._down,
            "consumer": self.consumer,
            "group": self.group,
        }

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<pushy.DeviceListService {self.consumer} of {self.group} on "
            f"{_redacted(self.redis_url)} {state}>"
        )

    # Consuming.

    async def _ensure_group(self) -> None:
        """Make the consumer group (and the stream) if missing."""
        import redis.exceptions as rexc

        try:
            await self._redis.xgroup_create(
                self._keys.events, self.group, id="0", mkstream=True
            )
        except rexc.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return
        _log.info(
            "created consumer group %s on %s; rebuilding lists from the registry",
            self.group,
            self._keys.events,
        )
        # A new group: a first start, or a Redis that lost its data. Either
        # way the records of the registry say who is online now.
        self._rebuilds_due = 1 + _REBUILD_SWEEPS
        if self._wake is not None:
            self._wake.set()

    async def _consume(self) -> None:
        """Read and handle entries until cancelled, riding out Redis outages."""
        import redis.exceptions as rexc

        backoff = _BACKOFF_FIRST_S
        pending_from: str | None = "0"  # re-read our own pending entries first
        while not self._stopping:
            try:
                if pending_from is not None:
                    entries = await self._read(pending_from, block=None)
                    if not entries:
                        pending_from = None
                        continue
                    pending_from = entries[-1][0].decode()
                    await self._handle(entries, redelivered=True)
                else:
                    entries = await self._read(">", block=int(self.block_s * 1000))
                    await self._handle(entries, redelivered=False)
                self._redis_up()
                backoff = _BACKOFF_FIRST_S
            except rexc.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    # The stream or the group is gone (a Redis that
                    # restarted empty, or someone deleted it): make them.
                    with contextlib.suppress(*_REDIS_ERRORS, rexc.ResponseError):
                        await self._ensure_group()
                    pending_from = "0"
                    continue
                # Another refusal (out of memory, a replica, a key of
                # another type): try again later, as for an outage.
                self._redis_down(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                pending_from = "0"
            except _REDIS_ERRORS as exc:
                self._redis_down(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                pending_from = "0"

    async def _read(self, start: str, block: int | None) -> list[Any]:
        reply = await self._redis.xreadgroup(
            self.group,
            self.consumer,
            {self._keys.events: start},
            count=self.batch,
            block=block,
        )
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3
            return [e for entries in reply.values() for e in entries[0]]
        return list(reply[0][1])

    async def _handle(self, entries: list[Any], redelivered: bool) -> None:
        """Handle entries (one account's in order), then acknowledge them all."""
        if not entries:
            return
        assert self._lock is not None
        chains: dict[str, list[Event]] = {}
        for entry_id, fields in entries:
            try:
                event = parse_event(entry_id, fields)
            except BadEvent as exc:
                self._counters["events_bad"] += 1
                _log.warning(
                    "bad entry %s in %s: %s", _id(entry_id), self._keys.events, exc
                )
                continue
            chains.setdefault(event.account, []).append(event)
        async with self._lock:
            try:
                async with asyncio.TaskGroup() as group:
                    for chain in chains.values():
                        group.create_task(self._handle_chain(chain, redelivered))
            except ExceptionGroup as failed:
                # A Redis failure in one chain (the others were cancelled):
                # nothing is acknowledged, all is read again.
                raise failed.exceptions[0] from None
            await self._redis.xack(
                self._keys.events, self.group, *(entry_id for entry_id, _ in entries)
            )

    async def _handle_chain(self, events: list[Event], redelivered: bool) -> None:
        import redis.exceptions as rexc

        for event in events:
            try:
                await self._handle_event(event, redelivered)
            except _REDIS_ERRORS:
                raise
            except rexc.ResponseError as exc:
                if "script" not in str(exc).lower():
                    raise
                # State that the scripts cannot read (written by something
                # else): drop the entry rather than fail on it forever.
                self._counters["events_bad"] += 1
                _log.warning(
                    "entry %s of %s failed in redis: %s", event.id, event.kind, exc
                )
            except Exception:  # noqa: BLE001 - a bug must not stop the service
                self._counters["events_bad"] += 1
                _log.exception("handling entry %s (%s) failed", event.id, event.kind)

    async def _handle_event(self, event: Event, redelivered: bool) -> None:
        _log.debug(
            "%s %s %s of %r on %s/%d",
            event.id,
            event.kind,
            event.device,
            event.account,
            event.node,
            event.conn,
        )
        if not event.account:
            # No account: nobody can subscribe to its list.
            self._counters["events_skipped"] += 1
            return
        if event.kind == "connected":
            applied = await self._connected(event, redelivered)
        elif event.kind == "disconnected":
            applied = await self._disconnected(event, redelivered)
        elif event.kind == "subscribe":
            applied = await self._subscribe(event)
        else:
            applied = await self._unsubscribe(event)
        self._by_kind[event.kind] += 1
        self._counters["events_handled" if applied else "events_skipped"] += 1

    async def _connected(
        self, event: Event, redelivered: bool, only_if_absent: bool = False
    ) -> bool:
        """List the device; tell the account's subscribers it is online.

        ``device_online`` goes out when the device was not listed, or was
        listed with other ``meta``. A listed device that reconnects (on this
        or another node) with the same ``meta`` was never offline for the
        subscribers, so they hear nothing; a redelivered entry whose
        connection is listed may have been listed just before a crash, so
        they hear it (again).
        """
        keys = self._keys
        record = {
            "node": event.node,
            "conn": event.conn,
            "since": event.time,
            "meta": event.meta,
        }
        applied, prev_raw, subs_flat = await self._on_connection(
            "connect", event, _json(record), "1" if only_if_absent else "0"
        )
        if not applied:
            return False
        prev = _decode_record(event.device, prev_raw) if prev_raw else None
        member = f"{event.account}\t{event.device}"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.sadd(keys.node_set(event.node), member)
            if prev is not None and prev["node"] != event.node:
                pipe.srem(keys.node_set(prev["node"]), member)
            await pipe.execute()
        same = prev is not None and (prev["node"], prev["conn"]) == (
            event.node,
            event.conn,
        )
        if prev is None or prev["meta"] != event.meta or (redelivered and same):
            await self._tell(
                event.account,
                _subscribers(_flat(subs_flat)),
                online_frame(event.device, event.meta),
                skip=event.device,
            )
        return True

    async def _disconnected(self, event: Event, redelivered: bool) -> bool:
        """Unlist the connection; tell the subscribers the device is offline.

        Only the listed connection of the device is unlisted: the
        ``disconnected`` of a connection that was superseded by one on
        another node (which can be read before or after that one's
        ``connected``) changes nothing. The connection is remembered as gone
        for ``tombstone_s``.
        """
        keys = self._keys
        removed, left_raw, subs_flat = await self._on_connection(
            "leave", event, str(int(self.tombstone_s * 1000))
        )
        left = _decode_record(event.device, left_raw) if left_raw else None
        if left is None or left["node"] != event.node:
            await self._redis.srem(
                keys.node_set(event.node), f"{event.account}\t{event.device}"
            )
        # A redelivered entry may have unlisted the device before a crash:
        # offline again is still true while it is not listed.
        if removed or (redelivered and left is None):
            await self._tell(
                event.account,
                _subscribers(_flat(subs_flat)),
                offline_frame(event.device),
                skip=event.device,
            )
        return True

    async def _subscribe(self, event: Event) -> bool:
        """Record the subscription; send the subscriber the account's list."""
        subscription = _json({"node": event.node, "conn": event.conn})
        listed = await self._on_connection("subscribe", event, subscription)
        if listed is None:
            return False  # that connection is already gone
        others = [d for d in _listing(_flat(listed)) if d["device"] != event.device]
        await self._tell(
            event.account,
            {event.device: (event.node, event.conn)},
            list_frame(others),
        )
        return True

    async def _on_connection(self, script: str, event: Event, *args: str) -> Any:
        """Run ``script`` on the event's account keys and connection, plus ``args``.

        KEYS are the account's devices, subs and the device's gone hash;
        ARGV starts with device, node, conn and time.
        """
        keys = self._keys
        return await self._scripts[script](
            keys=[*keys.account(event.account), keys.gone(event.account, event.device)],
            args=[event.device, event.node, str(event.conn), str(event.time), *args],
        )

    async def _unsubscribe(self, event: Event) -> bool:
        await self._drop_subscription(
            event.account, event.device, event.node, event.conn
        )
        return True

    async def _drop_subscription(
        self, account: str, device: str, node: str, conn: int
    ) -> bool:
        dropped = await self._scripts["unsubscribe"](
            keys=[self._keys.subs(account)], args=[device, node, str(conn)]
        )
        return bool(dropped)

    async def _tell(
        self,
        account: str,
        subscribers: dict[str, tuple[str, int]],
        frame: dict[str, Any],
        skip: str | None = None,
        skip_node: str | None = None,
    ) -> None:
        """Send ``frame`` to each subscriber but ``skip`` and those on ``skip_node``."""
        targets = [
            (device, node, conn)
            for device, (node, conn) in sorted(subscribers.items())
            if device != skip and node != skip_node
        ]
        if not targets:
            return
        codes = await asyncio.gather(
            *(self._deliver(device, frame, conn) for device, _, conn in targets)
        )
        for (device, node, conn), code in zip(targets, codes, strict=True):
            if code == 200:
                self._counters["events_sent"] += 1
                continue
            self._counters["deliveries_failed"] += 1
            if code == 404:
                _log.debug("%s to %s/%d: connection gone", frame["kind"], device, conn)
                if await self._drop_subscription(account, device, node, conn):
                    self._counters["subscriptions_dropped"] += 1
            elif code is not None:
                _log.warning(
                    "%s to %s on %s/%d not delivered: code %s",
                    frame["kind"],
                    device,
                    node,
                    conn,
                    code,
                )

    async def _deliver(
        self, device: str, frame: dict[str, Any], conn: int
    ) -> int | None:
        """Send one frame; return its code (``None`` when the callable raised)."""
        try:
            if self._deliver_fn is not None:
                result = await self._deliver_fn(device, frame, conn)
            else:
                result = await self._push.asend_event(device, frame, conn=conn)
        except Exception:  # noqa: BLE001 - the callable's failure is logged
            _log.exception("delivering %s to %s failed", frame.get("kind"), device)
            return None
        return int(getattr(result, "code", result))

    # Sweeps, claims and rebuilds.

    async def _maintain(self) -> None:
        """Every ``sweep_s``: claim, sweep dead nodes, rebuild when due."""
        import redis.exceptions as rexc

        assert self._wake is not None
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.sweep_s)
            self._wake.clear()
            try:
                if self._rebuilds_due > 0:
                    await self.rebuild()
                    self._rebuilds_due -= 1
                await self._claim()
                await self._sweep()
                await self._forget_consumers()
            except _REDIS_ERRORS as exc:
                self._redis_down(exc)
            except rexc.ResponseError as exc:
                # NOGROUP: the reader makes the group again; others are
                # the reader's to report.
                _log.debug("sweep refused by redis: %s", exc)

    async def _claim(self) -> None:
        """Take over entries pending with other consumers for ``claim_s``."""
        start = "0-0"
        while True:
            reply = await self._redis.xautoclaim(
                self._keys.events,
                self.group,
                self.consumer,
                min_idle_time=int(self.claim_s * 1000),
                start_id=start,
                count=self.batch,
            )
            start = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
            entries = [e for e in reply[1] if e[0] is not None]
            if entries:
                self._counters["events_claimed"] += len(entries)
                _log.info(
                    "claimed %d entries pending with other consumers", len(entries)
                )
                await self._handle(entries, redelivered=True)
            if start == "0-0":
                return

    async def _sweep(self) -> None:
        """Unlist the devices of nodes whose directory entry is gone.

        A node counts as gone when its entry is missing at two sweeps in a
        row with Redis reachable in between: right after Redis comes back
        the nodes may not have written their entries again yet.
        """
        self._sweeps += 1
        head = len(self._keys.node_set(""))
        seen: set[str] = set()
        async for key in self._redis.scan_iter(
            match=self._keys.pattern("dl:node:"), count=500
        ):
            node = key[head:].decode(errors="replace")
            seen.add(node)
            if await self._redis.exists(self._keys.node_dir(node)):
                self._missing.pop(node, None)
                continue
            first = self._missing.setdefault(node, self._sweeps)
            if first < self._sweeps:
                await self._sweep_node(node)
                self._missing.pop(node, None)
        for node in set(self._missing) - seen:
            del self._missing[node]

    async def _sweep_node(self, node: str) -> None:
        assert self._lock is not None
        keys = self._keys
        gone = 0
        members: list[bytes] = []
        async for member in self._redis.sscan_iter(keys.node_set(node), count=500):
            members.append(member)
        for raw in members:
            account, _, device = raw.decode(errors="replace").partition("\t")
            async with self._lock:
                removed, _, subs_flat = await self._scripts["leave"](
                    keys=[*keys.account(account), keys.gone(account, device)],
                    args=[device, node, "", "", "0"],
                )
                if removed:
                    gone += 1
                    await self._tell(
                        account,
                        _subscribers(_flat(subs_flat)),
                        offline_frame(device),
                        skip=device,
                        skip_node=node,
                    )
                await self._redis.srem(keys.node_set(node), raw)
        self._counters["nodes_swept"] += 1
        self._counters["devices_swept"] += gone
        _log.warning(
            "node %s is gone (no %s): %d devices listed on it went offline",
            node,
            keys.node_dir(node),
            gone,
        )

    async def rebuild(self) -> int:
        """List the devices of the registry's records that are not listed.

        Reads every ``{prefix}dev:{D}`` record (``node, peer, conn,
        connected_at, account``); a device with an account that is not
        listed is listed, with ``meta`` ``{}``, and its account's
        subscribers hear ``device_online``. It runs by itself when the
        consumer group had to be created (a first start, or a Redis that
        lost its data), at once and at the next three sweeps.

        Returns:
            The number of devices it listed.

        Raises:
            PushyError: the service was never started.
            redis.exceptions.ConnectionError: Redis cannot be reached.
        """
        if self._redis is None or self._lock is None:
            raise PushyError("start the device-list service first")
        head = len(f"{self.prefix}dev:")
        listed = 0
        keys: list[bytes] = []
        async for key in self._redis.scan_iter(
            match=self._keys.pattern("dev:"), count=500
        ):
            keys.append(key)
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            records = await self._redis.mget(chunk)
            for key, raw in zip(chunk, records, strict=True):
                event = _record_event(key[head:], raw)
                if event is None:
                    continue
                async with self._lock:
                    if await self._connected(event, False, only_if_absent=True):
                        listed += 1
        self._counters["devices_rebuilt"] += listed
        _log.info(
            "rebuilt lists from %d registry records: %d devices listed",
            len(keys),
            listed,
        )
        return listed

    async def _forget_consumers(self) -> None:
        """Delete consumers that hold nothing and have not read for an hour."""
        consumers = await self._redis.xinfo_consumers(self._keys.events, self.group)
        for info in consumers:
            name = info.get("name")
            name = name.decode() if isinstance(name, bytes) else name
            if (
                name != self.consumer
                and int(info.get("pending", 0)) == 0
                and int(info.get("idle", 0)) > _FORGET_CONSUMER_MS
            ):
                await self._redis.xgroup_delconsumer(
                    self._keys.events, self.group, name
                )

    # Redis health.

    def _redis_down(self, exc: BaseException) -> None:
        self._counters["redis_errors"] += 1
        # What was seen missing may only be a Redis that lost its data.
        self._missing.clear()
        if not self._down:
            self._down = True
            _log.warning(
                "redis %s unreachable or refusing (%s); retrying",
                _redacted(self.redis_url),
                exc,
            )

    def _redis_up(self) -> None:
        if self._down:
            self._down = False
            _log.info("redis %s reachable again", _redacted(self.redis_url))


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("%s stopped by a bug", task.get_name(), exc_info=task.exception())


def _flat(value: Any) -> list[bytes]:
    """A flat ``HGETALL`` reply (RESP2 list or RESP3 map) as a list."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [x for pair in value.items() for x in pair]
    return list(value)


def _id(entry_id: Any) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def _record_event(device_tag: bytes, raw: bytes | None) -> Event | None:
    """A ``connected`` event from a registry record, or ``None``.

    ``device_tag`` is the key after ``dev:`` (``{D}``); the record is
    ``node TAB peer TAB conn TAB connected_at TAB account``.
    """
    if raw is None or not device_tag.startswith(b"{") or not device_tag.endswith(b"}"):
        return None
    try:
        device = device_tag[1:-1].decode()
        node, _peer, conn, since, account = raw.decode().split("\t", 4)
        return Event(
            "registry",
            "connected",
            device,
            account,
            node,
            int(conn),
            int(since) * 1000,
            {},
        )
    except ValueError:
        return None


def online_devices(
    redis: str, account: str, *, prefix: str = "pushy:", timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Read the online devices of ``account`` (no running service needed).

    Args:
        redis: Redis URL of the fleet.
        account: the account id.
        prefix: key prefix of the fleet.
        timeout: seconds to connect and to wait for the answer.

    Returns:
        ``[{"device", "node", "conn", "since", "meta"}, ...]`` sorted by
        device id, as :meth:`DeviceListService.devices`.

    Raises:
        ConfigError: a bad URL or prefix.
        redis.exceptions.ConnectionError: Redis cannot be reached.
    """
    import redis as redis_lib

    _check_redis_url(redis)
    _check_prefix(prefix)
    client = redis_lib.Redis.from_url(
        redis, socket_timeout=timeout, socket_connect_timeout=timeout
    )
    try:
        flat = client.execute_command("HGETALL", _Keys(prefix).devices(account))
    finally:
        client.close()
    return _listing(_flat(flat))
