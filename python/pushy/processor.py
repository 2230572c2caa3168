"""The message processor of indirect push.

Services queue messages with :meth:`pushy.PushClient.enqueue`; a
:class:`MessageProcessor` (the C++ engine, on a thread of its own) reads the
queue's Redis Stream shards with a consumer group and delivers each message
by direct push, to whichever node holds the device::

    with pushy.MessageProcessor(redis="redis://127.0.0.1:6379") as processor:
        ...
        print(processor.stats()["delivered"])

Several processors (threads, processes, hosts) share the work when they use
the same ``group`` with distinct ``consumer`` names. See docs/queue.md for
the delivery guarantee and what happens when Redis, a processor or a node
fails.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Self

from .errors import ConfigError, PushyError

__all__ = ["MessageProcessor"]


class MessageProcessor:
    """Consumes the queue and delivers its messages.

    A message is acknowledged in its stream (and deleted from it) once its
    device's node answered 200: written to the device, or acked by it for a
    message queued with ``ack="client"``. While the device is offline (404),
    its node unreachable (503) or the ack late (504), the message is tried
    again with backoff until its ttl passes; then, or at once for a message
    a node refuses (400, 403, 413), it moves to the dead-letter stream
    ``{prefix}q:dead`` with the reason. Delivery is at least once: every
    attempt carries the same message id.

    Args:
        redis: Redis URL of the registry and the queue.
        prefix: key prefix, as configured on the nodes.
        group: consumer group of the processors.
        consumer: this processor's name in the group (``host-pid`` by
            default). A processor started again under its old name resumes
            the messages it held.
        shards: number of queue shards, as :class:`pushy.PushClient` uses.
        batch: entries read per request.
        max_in_flight: messages being delivered at once; reading pauses
            at this many.
        max_waiting: messages waiting for a retry (their device offline,
            say); reading pauses at this many, so that below it an offline
            device's messages never hold up the others.
        claim_idle_s: an entry pending this long on another consumer is
            claimed (that consumer is taken for dead).
        retry_min_s: first backoff; it doubles per attempt up to
            ``retry_max_s``.
        retry_max_s: longest backoff.
        ack_timeout_s: wait for the device's ack (``ack="client"``).
        push_timeout_s: wait for a node's answer beyond that.
        route_cache_ttl_s: how long a device's node is trusted without
            asking Redis.
        dead_maxlen: the dead-letter stream is trimmed to about this many.

    Raises:
        ConfigError: an option out of range, a malformed URL, or Redis
            refused the credentials.

    Limitations:
        Messages of one device keep their order only until one of them is
        retried. A message whose device stays offline is looked up in Redis
        on every attempt (at most every ``retry_max_s``).
    """

    def __init__(
        self,
        redis: str,
        *,
        prefix: str = "pushy:",
        group: str = "processors",
        consumer: str | None = None,
        shards: int = 4,
        batch: int = 256,
        max_in_flight: int = 10000,
        max_waiting: int = 100_000,
        claim_idle_s: float = 30.0,
        retry_min_s: float = 0.1,
        retry_max_s: float = 5.0,
        ack_timeout_s: float = 5.0,
        push_timeout_s: float = 10.0,
        route_cache_ttl_s: float = 10.0,
        dead_maxlen: int = 1_000_000,
    ) -> None:
        from .node import _core  # loads the engine with its log bridge

        options: dict[str, Any] = {
            "redis": redis,
            "prefix": prefix,
            "group": group,
            "consumer": consumer,
            "shards": shards,
            "batch": batch,
            "max_in_flight": max_in_flight,
            "max_waiting": max_waiting,
            "claim_idle_s": claim_idle_s,
            "retry_min_s": retry_min_s,
            "retry_max_s": retry_max_s,
            "ack_timeout_s": ack_timeout_s,
            "push_timeout_s": push_timeout_s,
            "route_cache_ttl_s": route_cache_ttl_s,
            "dead_maxlen": dead_maxlen,
        }
        for name in ("shards", "batch", "max_in_flight", "max_waiting", "dead_maxlen"):
            value = options[name]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            # Out of range, negative or not, is the engine's to say (with
            # the range).
            options[name] = max(value, 0)
        self.redis = redis
        self.prefix = prefix
        self.group = group
        self.shards = shards
        self._core = _core().MessageProcessor(options)
        self._started = False

    @property
    def consumer(self) -> str:
        """This processor's name in its consumer group."""
        return str(self._core.consumer)

    @property
    def running(self) -> bool:
        """Whether the processor is running."""
        return bool(self._core.running)

    def start(self) -> Self:
        """Start consuming in the background; returns at once.

        Raises:
            PushyError: the processor has been started before (a stopped
                processor does not start again: make a new one, with the
                same ``consumer`` to resume its messages).
        """
        if self._started:
            raise PushyError("processor was started before; make a new one")
        self._started = True
        self._core.start()
        return self

    def stop(self) -> None:
        """Stop consuming. Messages held stay pending in their streams.

        Calling it again does nothing.
        """
        self._core.stop()

    async def astop(self) -> None:
        """:meth:`stop` in a worker thread, for use from an event loop."""
        await asyncio.to_thread(self.stop)

    def stats(self) -> dict[str, Any]:
        """Return the counters.

        Keys: ``read``, ``claimed``, ``attempts``, ``delivered``, ``retried``,
        ``expired``, ``undeliverable``, ``malformed`` and ``redis_errors``
        (totals), ``in_flight`` and ``waiting`` (now), ``redis_up``.
        """
        return dict(self._core.stats())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<pushy.MessageProcessor {self.consumer!r} {state}>"
