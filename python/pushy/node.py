"""A node: the C++ engine (``pushy._core``) run from Python.

:class:`Node` starts the engine's io threads in the background and returns at
once, so it works the same from a script, a test and a notebook::

    import pushy

    node = pushy.Node(port=0, push_port=0, secret="...")
    node.start()
    print(node.url, node.push_url)
    ...
    node.stop()

In async code (an async test, a notebook whose cells also run device
clients) prefer ``async with pushy.Node(...) as node:`` or
``await node.astop()``: see the limitations of :class:`Node`.

The engine's log records arrive under the ``pushy.*`` loggers of
:mod:`logging` (today all under ``pushy.node``). The engine drops
records below the level of the ``pushy`` logger as it is when a node starts;
call :func:`set_log_level` to change both at once later.

==========  ===========================================================
level       what the engine logs
==========  ===========================================================
ERROR       bugs, failures of user callbacks
WARNING     server-imposed disconnects, dropped pushes, store outages
INFO        start, stop, listen addresses, configuration
DEBUG       connection lifecycle (a normal disconnect is never louder)
TRACE (5)   frames
==========  ===========================================================
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import threading
import time
import weakref
from types import ModuleType, TracebackType
from typing import Any, Self

from .config import NodeConfig
from .errors import ConfigError, PushyError

__all__ = ["TRACE", "Node", "http_host", "set_log_level"]

#: Log level of the engine's per-frame records (below DEBUG).
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_logger = logging.getLogger("pushy")

_LEVEL_NAMES = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

_core_module: ModuleType | None = None
_core_lock = threading.Lock()

# Nodes that are running, stopped at interpreter exit so that no io thread
# outlives the interpreter (a script that forgets stop() still exits).
_running: weakref.WeakSet[Node] = weakref.WeakSet()


def _core() -> ModuleType:
    """Import the engine once and install the log bridge.

    Raises:
        ImportError: the engine is not built.
    """
    global _core_module
    with _core_lock:
        if _core_module is None:
            try:
                from . import _core as core  # type: ignore[attr-defined]
            except ImportError as exc:
                raise ImportError(
                    "the pushy engine (pushy._core) is not built; "
                    "install pushy with 'pip install .' from the repository"
                ) from exc
            core.set_log_handler(_log_record)
            core.set_log_level(_logger.getEffectiveLevel())
            _core_module = core
        return _core_module


def _log_record(level: int, name: str, message: str) -> None:
    """Forward one engine log record to :mod:`logging` (called by the engine)."""
    # An exception must never propagate into the engine's io thread.
    with contextlib.suppress(Exception):
        logger = logging.getLogger(f"pushy.{name}" if name else "pushy")
        logger.log(level, message)


def set_log_level(level: int | str) -> None:
    """Set the level of the ``pushy`` logger and of the engine together.

    Args:
        level: a :mod:`logging` level, a level name such as ``"debug"``, or
            ``"trace"``.

    Raises:
        ValueError: the level name is unknown.
    """
    if isinstance(level, str):
        name = level.lower()
        if name not in _LEVEL_NAMES:
            raise ValueError(
                "level must be trace, debug, info, warning, error or critical, "
                f"got {level!r}"
            )
        level = _LEVEL_NAMES[name]
    _logger.setLevel(level)
    if _core_module is not None:
        _core_module.set_log_level(_logger.getEffectiveLevel())


def http_host(host: str) -> str:
    """Return the address a client on this host should use for ``host``.

    A wildcard bind address becomes the loopback address; an IPv6 address is
    put in brackets for use in a URL.
    """
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


class Node:
    """One node: the device WebSocket server and the internal push API.

    Args:
        config: the configuration; ``NodeConfig()`` defaults when ``None``.
        **overrides: fields that replace those of ``config``.

    Raises:
        ConfigError: an override is unknown or a value is invalid.

    Limitations:
        A node runs in this process. The engine's io threads keep running
        while Python code runs or blocks; they are stopped by :meth:`stop`,
        by the context manager, or at interpreter exit.

        :meth:`stop` waits for the closing handshake of every connected
        device, up to ``close_timeout_s``. From async code (a notebook, an
        async test) whose event loop also runs device clients, use
        ``await node.astop()`` or ``async with``, or the stop waits the full
        timeout because those clients cannot answer while the loop is blocked.
    """

    def __init__(self, config: NodeConfig | None = None, **overrides: Any) -> None:
        base = config if config is not None else NodeConfig()
        if not isinstance(base, NodeConfig):
            raise TypeError(f"config must be a NodeConfig, got {type(base).__name__}")
        self._config = base.replace(**overrides) if overrides else base
        self._config.validate()
        self._core: Any = None
        self._lock = threading.Lock()

    # Lifecycle.

    def start(self) -> Self:
        """Bind the ports and start the io threads; return at once.

        Returns:
            The node itself.

        Raises:
            ConfigError: the configuration cannot run or a port is in use.
            PushyError: the node is already running.
            ImportError: the engine is not built.
        """
        core = _core()
        with self._lock:
            if self._core is not None and self._core.running:
                raise PushyError("node is already running")
            core.set_log_level(_logger.getEffectiveLevel())
            engine = core.Node(self._config.to_core())
            engine.start()
            self._core = engine
            _running.add(self)
        return self

    def stop(self) -> None:
        """Close every device with 1001, stop the io threads and wait for them.

        Calling it again, or on a node that never started, does nothing.
        """
        with self._lock:
            engine = self._core
            if engine is not None:
                engine.stop()
            _running.discard(self)

    def drain(self, over_s: float | None = None, *, wait: bool = False) -> bool:
        """Drain the node: move its devices elsewhere, then stop.

        The device port stops listening (upgrades under way are answered
        HTTP 503, ``Retry-After: 1``); every
        connected device is sent ``{"t":"reconnect","reason":"drain"}`` at a
        moment spread evenly over ``over_s`` seconds; a device still
        connected ``reconnect_grace_s`` after its message is closed with
        1001. The node stops itself once no device is left, or
        ``over_s + reconnect_grace_s`` after the start at the latest.
        Progress is in ``stats()["drain"]``.

        Args:
            over_s: seconds to spread the reconnects over; the config's
                ``drain_s`` when ``None``.
            wait: block until the node has stopped.

        Returns:
            ``True`` when the drain started; ``False`` when the node is not
            running or already drains.

        Raises:
            ConfigError: ``over_s`` is not a number from 0 to 86400.
        """
        over = self._config.drain_s if over_s is None else over_s
        if isinstance(over, bool) or not isinstance(over, int | float) or not (
            0 <= over <= 86400
        ):
            raise ConfigError(f"over_s must be a number from 0 to 86400, got {over!r}")
        engine = self._core
        if engine is None or not engine.running:
            return False
        started = bool(engine.drain(float(over)))
        if started and wait:
            self.wait_stopped()
        return started

    async def adrain(self, over_s: float | None = None) -> bool:
        """:meth:`drain` that waits, without blocking the event loop, until
        the node has stopped; returns whether the drain started."""
        started = self.drain(over_s)
        if started:
            await asyncio.to_thread(self.wait_stopped)
        return started

    @property
    def draining(self) -> bool:
        """Whether a drain has started (and the node has not restarted)."""
        return self._core is not None and bool(self._core.draining)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until the node is stopped (by a drain, say); return whether
        it is, ``False`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    async def astop(self) -> None:
        """:meth:`stop` in a worker thread, for use from a running event loop.

        Device clients on the same loop can then answer the closing
        handshakes instead of making the node wait for its close timeout.
        """
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    # State.

    @property
    def config(self) -> NodeConfig:
        """The configuration the node was made with."""
        return self._config

    @property
    def running(self) -> bool:
        """Whether the node is started and not stopped."""
        return self._core is not None and bool(self._core.running)

    @property
    def port(self) -> int:
        """The device port: the bound one once started, else the configured one."""
        return int(self._core.port) if self._core is not None else self._config.port

    @property
    def push_port(self) -> int:
        """The push API port: the bound one once started, else the configured one."""
        if self._core is not None:
            return int(self._core.push_port)
        return self._config.push_port

    @property
    def peer_port(self) -> int:
        """The peer-link port once started with ``redis``; 0 otherwise."""
        if self._core is not None:
            return int(self._core.peer_port)
        return 0

    @property
    def peer_address(self) -> str | None:
        """``HOST:PORT`` of the peer link (with ``redis``), else ``None``."""
        port = self.peer_port
        return f"{self._config.peer_host}:{port}" if port else None

    @property
    def node_id(self) -> str:
        """The node id; a random one is chosen at start when none is configured."""
        if self._core is not None:
            return str(self._core.node_id)
        return self._config.node_id

    @property
    def host(self) -> str:
        """The address clients on this host use to reach the device port."""
        return http_host(self._config.host)

    @property
    def url(self) -> str:
        """The device WebSocket URL, ``ws://HOST:PORT/v1/connect`` (``wss://``
        with ``tls_cert``)."""
        scheme = "wss" if self._config.tls_cert else "ws"
        return f"{scheme}://{self.host}:{self.port}/v1/connect"

    @property
    def push_url(self) -> str:
        """The push API base URL, ``http://PUSH_HOST:PUSH_PORT``."""
        return f"http://{http_host(self._config.push_host)}:{self.push_port}"

    def stats(self) -> dict[str, Any]:
        """Return the node's counters, as ``GET /v1/stats`` does.

        Raises:
            PushyError: the node was never started.
        """
        if self._core is None:
            raise PushyError("node is not started; call start() first")
        if hasattr(self._core, "stats"):
            return dict(self._core.stats())
        return dict(json.loads(self._core.stats_json()))

    @property
    def connections(self) -> int:
        """The number of devices connected now (0 when not started)."""
        if self._core is None:
            return 0
        if hasattr(self._core, "connections"):
            return int(self._core.connections)
        return int(self.stats().get("connections", 0))

    def __repr__(self) -> str:
        if self.running:
            state = f"running, url={self.url!r}, push_url={self.push_url!r}"
            return f"<pushy.Node {self.node_id!r} {state}>"
        return f"<pushy.Node stopped, port={self.port}, push_port={self.push_port}>"


@atexit.register
def _stop_all() -> None:
    for node in list(_running):
        with contextlib.suppress(Exception):  # best effort at exit
            node.stop()
    if _core_module is not None:
        with contextlib.suppress(Exception):  # the engine may refuse None
            _core_module.set_log_handler(None)
