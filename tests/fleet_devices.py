"""Many reconnecting devices on one event loop, for the fleet tests.

Each device is a :class:`pushy.DeviceClient` made with ``reconnect=True``
and ``auto_ack=True``: it follows the node's ``reconnect`` messages, connects
again after a lost connection (to whichever node the shared port leads to)
and acks every push that asks for it. A task per device reads its messages
and records them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from pushy import ConnectError, ConnectionClosed, DeviceClient
from pushy.testing import async_wait_until, scaled, token_for

__all__ = ["Devices"]


class Devices:
    """Many devices on one event loop that ack every push and reconnect.

    Args:
        url: the device URL (a cluster's shared port).
        names: the device ids.
        at: with ``then``, call ``then()`` once ``at`` distinct pushes have
            arrived.
        then: see ``at``.
        concurrency: connections opened at once by :meth:`start`.
        **client_kwargs: more :class:`pushy.DeviceClient` arguments.

    Attributes:
        received: how many times each push id arrived.
        asked: per device, ``(time.monotonic(), reason)`` of each
            ``reconnect`` message, when the device read it.
        clients: the client of each device.
    """

    def __init__(
        self,
        url: str,
        names: list[str],
        at: int = 0,
        then: Callable[[], Any] | None = None,
        *,
        concurrency: int = 100,
        **client_kwargs: Any,
    ) -> None:
        self.url = url
        self.names = names
        self.at, self.then = at, then
        self.concurrency = concurrency
        self.client_kwargs = {"open_timeout": scaled(10), **client_kwargs}
        self.received: Counter[Any] = Counter()
        self.asked: defaultdict[str, list[tuple[float, str]]] = defaultdict(list)
        self.clients: dict[str, DeviceClient] = {}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def connected(self) -> set[str]:
        """The devices whose current connection is open."""
        return {name for name, c in self.clients.items() if c.connected}

    @property
    def reconnects(self) -> int:
        """Connections made after each device's first, all devices together."""
        return sum(c.reconnects for c in self.clients.values())

    def nodes(self) -> Counter[str]:
        """How many devices each node holds (from their current hello)."""
        return Counter(str(c.node) for c in self.clients.values() if c.connected)

    async def start(self, timeout: float | None = None) -> None:
        """Connect every device, ``concurrency`` at a time, retrying refusals.

        Raises:
            TimeoutError: not all connected within ``timeout``
                (``scaled(60)`` by default).
        """
        limit = scaled(60) if timeout is None else timeout
        deadline = time.monotonic() + limit
        gate = asyncio.Semaphore(self.concurrency)

        async def connect(name: str) -> None:
            client = DeviceClient(
                self.url,
                token_for(name),
                device=name,
                reconnect=True,
                auto_ack=True,
                **self.client_kwargs,
            )
            async with gate:
                while True:
                    try:
                        await client.connect()
                        break
                    except ConnectError:
                        if time.monotonic() >= deadline:
                            raise
                        await asyncio.sleep(0.05)  # a pause between attempts
            self.clients[name] = client
            self._tasks.append(asyncio.create_task(self._read(name, client)))

        await asyncio.gather(*(connect(n) for n in self.names))
        await async_wait_until(
            lambda: len(self.connected) == len(self.names),
            timeout=max(0.0, deadline - time.monotonic()),
            message="every device connected",
        )

    async def stop(self) -> None:
        """Close every device and stop reading."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        gate = asyncio.Semaphore(self.concurrency * 5)

        async def close(client: DeviceClient) -> None:
            async with gate:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), timeout=scaled(5))

        await asyncio.gather(*(close(c) for c in self.clients.values()))

    async def _read(self, name: str, client: DeviceClient) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await client.receive()
                kind = message.get("t")
                if kind == "push":
                    self.received[message["id"]] += 1
                    if self.then and len(self.received) == self.at:
                        self.then()
                elif kind == "reconnect":
                    self.asked[name].append((time.monotonic(), message.get("reason")))
