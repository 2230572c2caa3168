"""Test helpers for pushy, also loaded as a pytest plugin.

The plugin (entry point ``pytest11: pushy``) provides these fixtures:

======================  ====================================================
fixture                 gives
======================  ====================================================
``pushy_secret``        the HS256 secret of test nodes (:data:`TEST_SECRET`)
``pushy_node``          a started :class:`pushy.Node` on free loopback ports
``pushy_node_factory``  ``factory(**overrides)`` -> another started node
``push_client``         a :class:`pushy.PushClient` for ``pushy_node`` (an
                        async fixture when pytest-asyncio is installed, so
                        that ``apush`` connections close on the test's loop)
``device_factory``      async ``await factory(device="d1", account="acct",
                        node=None, **client_kwargs)`` -> a connected
                        :class:`pushy.DeviceClient` (needs pytest-asyncio)
``redis_server``        a started, empty :class:`RedisServer`: a real
                        ``redis-server`` on a free loopback port, no
                        persistence; ``.url``, ``.command(...)``
``cluster_factory``     ``factory(nodes, redis=URL, **options)`` -> a
                        started :class:`Cluster` of ``pushy serve``
                        processes sharing one device port
``pushy_tls``           :class:`TLSFiles` in a temporary folder: a test
                        certificate for ``127.0.0.1`` and ``localhost``
                        (``tls_cert=``, ``tls_key=`` of a node) and the
                        client side's ``ssl_context()`` (needs the
                        ``trustme`` package of the ``test`` extra)
======================  ====================================================

Everything started by a fixture is stopped or closed at teardown.

Every timing in tests is scaled by one unit: set ``PUSHY_TEST_TIME_UNIT`` (a
factor, ``1.0`` by default) on a slow machine and use :func:`scaled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cluster import Cluster, NodeProcess, _stop_with_parent, free_port
from .device import DeviceClient
from .errors import PushyError
from .node import Node
from .push import PushClient
from .tokens import issue_token

__all__ = [
    "Cluster",
    "NodeProcess",
    "RedisServer",
    "TEST_SECRET",
    "TIME_UNIT",
    "TLSFiles",
    "async_wait_until",
    "free_port",
    "redis_server",
    "running_node",
    "scaled",
    "tls_files",
    "token_for",
    "wait_until",
]

#: Factor applied to every timing of the tests (``PUSHY_TEST_TIME_UNIT``).
TIME_UNIT = float(os.environ.get("PUSHY_TEST_TIME_UNIT", "1.0"))

#: HS256 secret of test nodes; 64 bytes, so that PyJWT does not warn.
TEST_SECRET = "pushy-test-secret-" + "0123456789abcdef" * 3

#: Overrides of every node that the helpers start.
NODE_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,
    "push_host": "127.0.0.1",
    "push_port": 0,
    "secret": TEST_SECRET,
}


def scaled(seconds: float) -> float:
    """Return ``seconds`` times :data:`TIME_UNIT`."""
    return seconds * TIME_UNIT


@contextlib.contextmanager
def running_node(**overrides: Any) -> Iterator[Node]:
    """Run a node on free loopback ports for the duration of a ``with`` block.

    Args:
        **overrides: :class:`pushy.NodeConfig` fields; by default ``host`` and
            ``push_host`` are 127.0.0.1, both ports are 0 (free ports) and
            ``secret`` is :data:`TEST_SECRET`.

    Raises:
        ConfigError: an override is invalid.

    Limitations:
        Stopping a node waits for the closing handshake of each device still
        connected, up to ``close_timeout_s``. Device clients that run on an
        event loop blocked by this ``with`` block cannot answer: close them
        first, or use ``await node.astop()`` from async code.
    """
    node = Node(**{**NODE_DEFAULTS, **overrides})
    node.start()
    try:
        yield node
    finally:
        node.stop()


def token_for(
    device: str,
    account: str | None = "acct",
    ttl: float = 3600,
    secret: str = TEST_SECRET,
    **kwargs: Any,
) -> str:
    """Return a device token signed with the test secret.

    Args:
        device: the device id (``sub``).
        account: the account id (``acc``).
        ttl: seconds until it expires (not scaled).
        secret: the HS256 secret.
        **kwargs: more :func:`pushy.issue_token` arguments (``algorithm``,
            ``audience``, ``private_key``, ``claims``).
    """
    return issue_token(secret, device, account=account, ttl=ttl, **kwargs)


def wait_until(
    condition: Callable[[], Any],
    timeout: float | None = None,
    interval: float = 0.01,
    message: str = "condition",
) -> Any:
    """Poll ``condition()`` until it returns a true value; return that value.

    Args:
        condition: the check, called repeatedly.
        timeout: seconds before giving up; ``scaled(5)`` by default.
        interval: seconds between checks.
        message: what is awaited, for the error message.

    Raises:
        TimeoutError: the condition stayed false.
    """
    limit = scaled(5) if timeout is None else timeout
    deadline = time.monotonic() + limit
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"expected {message} within {limit:g} s")
        time.sleep(interval)


async def async_wait_until(
    condition: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float | None = None,
    interval: float = 0.01,
    message: str = "condition",
) -> Any:
    """Asynchronous :func:`wait_until`; ``condition`` may be a coroutine function.

    Raises:
        TimeoutError: the condition stayed false.
    """
    limit = scaled(5) if timeout is None else timeout
    deadline = time.monotonic() + limit
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"expected {message} within {limit:g} s")
        await asyncio.sleep(interval)


class RedisServer:
    """A real ``redis-server`` on a free loopback port, without persistence.

    ``start()`` runs it; ``stop()`` (SIGTERM) and ``kill()`` (SIGKILL) end it;
    ``start()`` again brings it back on the same port, empty, as a restarted
    server would be. A context manager::

        with RedisServer() as redis:
            node = pushy.Node(redis=redis.url, ...)
            redis.command("KEYS", "pushy:*")

    The server runs with ``--save "" --appendonly no`` in a temporary
    directory (removed by the context manager or at interpreter exit), and
    is killed at interpreter exit if it still runs. Its log is kept in that
    directory and quoted when it does not start.

    Args:
        binary: the ``redis-server`` executable; found on ``PATH`` (or in
            ``/usr/bin``) by default.

    Raises:
        PushyError: there is no ``redis-server`` (Debian package
            ``redis-server``).
    """

    def __init__(self, binary: str | None = None) -> None:
        found = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.access(found, os.X_OK):
            raise PushyError(
                f"redis-server not found (looked for {found!r}); install the "
                "Debian package redis-server (apt-get install redis-server)"
            )
        self.binary = found
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="pushy-redis-")
        self._log = os.path.join(self._dir, "redis.log")
        # At interpreter exit (or when forgotten) no server outlives its
        # owner and no directory stays; the state holds no reference to self.
        self._state: dict[str, Any] = {"dir": self._dir, "process": None}
        self._finalizer = weakref.finalize(self, _cleanup_redis, self._state)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT``."""
        return f"redis://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server process runs."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> RedisServer:
        """Start the server (empty) and wait until it answers PING.

        Returns:
            The server itself.

        Raises:
            PushyError: it exited or did not answer within ``scaled(10)`` s
                (the port was taken, say); the message quotes its log.
        """
        if self.running:
            return self
        with open(self._log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self._dir,
                    "--logfile",
                    self._log,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # It stops with the script that started it, even one killed.
                preexec_fn=(
                    _stop_with_parent
                    if threading.current_thread() is threading.main_thread()
                    else None
                ),
            )
        self._state["process"] = process = self.process

        def answers() -> bool:
            if process.poll() is not None:
                raise PushyError(
                    f"redis-server exited with {process.returncode} on port "
                    f"{self.port}:\n{self._tail_log()}"
                )
            try:
                # A short deadline: whatever else holds the port may not answer.
                return bool(self.command("PING", timeout=scaled(0.5)) == "PONG")
            except (OSError, PushyError):
                return False

        try:
            wait_until(
                answers,
                timeout=scaled(10),
                interval=0.02,
                message=f"redis-server to answer PING on port {self.port}",
            )
        except TimeoutError as exc:
            self.kill()
            raise PushyError(f"{exc}:\n{self._tail_log()}") from None
        except PushyError:
            self.kill()
            raise
        return self

    def stop(self) -> None:
        """Stop the server with SIGTERM and wait for it to exit."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the server with SIGKILL (a crash) and wait for it to exit."""
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(scaled(10))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.process = None

    def command(self, *args: Any, timeout: float | None = None) -> Any:
        """Send one command (RESP) on a new connection; return the decoded reply.

        Enough for PING, GET, SET, DEL, EXISTS, KEYS, PTTL, FLUSHALL, CONFIG
        and INFO: strings come back as ``str`` (bulk strings decoded as
        UTF-8), integers as ``int``, nil as ``None``, arrays as lists.

        Args:
            *args: the command and its arguments; ``bytes`` go as they are,
                anything else as ``str(arg)``.
            timeout: seconds to connect and to wait for the reply;
                ``scaled(5)`` by default.

        Raises:
            PushyError: the server answered with an error.
            OSError: the server is not reachable.
        """
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        out = b"*%d\r\n" % len(parts)
        for part in parts:
            out += b"$%d\r\n%s\r\n" % (len(part), part)
        address = ("127.0.0.1", self.port)
        limit = scaled(5) if timeout is None else timeout
        with socket.create_connection(address, timeout=limit) as s:
            s.sendall(out)
            with s.makefile("rb") as f:
                return _read_resp(f)

    def _tail_log(self, lines: int = 20) -> str:
        try:
            with open(self._log, errors="replace") as f:
                return "".join(f.readlines()[-lines:]) or "(empty log)"
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._finalizer()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<pushy.testing.RedisServer {self.url} {state}>"


def _cleanup_redis(state: dict[str, Any]) -> None:
    """Kill a server still running and remove its directory (finalizer)."""
    process = state["process"]
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()
    shutil.rmtree(state["dir"], ignore_errors=True)


def redis_server(binary: str | None = None) -> RedisServer:
    """Return a new, not yet started :class:`RedisServer`.

    Use it in a ``with`` block (started on entry, stopped on exit), or call
    ``start()`` and ``stop()`` yourself::

        with redis_server() as redis:
            print(redis.url, redis.command("PING"))

    Args:
        binary: the ``redis-server`` executable; found on ``PATH`` by default.

    Raises:
        PushyError: there is no ``redis-server``.
    """
    return RedisServer(binary)


def _read_resp(f: Any) -> Any:
    line = f.readline()
    if not line:
        raise OSError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise PushyError(f"redis error: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data.decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_resp(f) for _ in range(n)]
    raise PushyError(f"unexpected redis reply {line!r}")


async def _connect_device(
    node: Node,
    device: str,
    account: str | None,
    client_kwargs: dict[str, Any],
) -> DeviceClient:
    token = client_kwargs.pop("token", None)
    ttl = client_kwargs.pop("ttl", 3600)
    if token is None:
        token = token_for(device, account, ttl=ttl, secret=node.config.secret)
    client = DeviceClient(node.url, token, device=device, **client_kwargs)
    await client.connect()
    return client


@dataclass(frozen=True)
class TLSFiles:
    """A test certificate and the authority that signed it, as PEM files.

    Attributes:
        cert: the certificate chain (leaf first): a node's ``tls_cert``.
        key: its private key: a node's ``tls_key``.
        ca: the test authority's certificate, which clients must trust.
    """

    cert: str
    key: str
    ca: str

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts :attr:`ca` (and checks host names):
        the ``ssl=`` of :class:`pushy.DeviceClient` or ``websockets``."""
        return ssl.create_default_context(cafile=self.ca)


def tls_files(
    directory: str | os.PathLike[str],
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
) -> TLSFiles:
    """Write a test certificate authority and a certificate for ``hosts``
    (ECDSA P-256, the cheapest to handshake) into ``directory``.

    For tests and benchmarks only: nothing but the clients given
    :meth:`TLSFiles.ssl_context` trusts it.

    Raises:
        PushyError: the ``trustme`` package is not installed.
    """
    try:
        import trustme
    except ImportError:
        raise PushyError(
            "test certificates need the trustme package "
            "(pip install 'pushy[test]' or pip install trustme)"
        ) from None
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    authority = trustme.CA(key_type=trustme.KeyType.ECDSA)
    issued = authority.issue_cert(*hosts, key_type=trustme.KeyType.ECDSA)
    files = TLSFiles(
        cert=str(folder / "cert.pem"),
        key=str(folder / "key.pem"),
        ca=str(folder / "ca.pem"),
    )
    Path(files.cert).write_bytes(b"".join(b.bytes() for b in issued.cert_chain_pems))
    # Readable by its owner only, from the moment it exists.
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as key:
        os.fchmod(key.fileno(), 0o600)  # a file already there keeps its mode
        key.write(issued.private_key_pem.bytes())
    authority.cert_pem.write_to_path(files.ca)
    return files


# The pytest plugin. pytest is imported only when it is there, and
# pytest-asyncio only for the async fixture, so that the helpers above work
# without either.

try:
    import pytest
except ImportError:  # pragma: no cover - helpers used outside pytest
    pytest = None  # type: ignore[assignment]

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - sync fixtures still work
    pytest_asyncio = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def pushy_secret() -> str:
        """The HS256 secret of the nodes started by the fixtures."""
        return TEST_SECRET

    @pytest.fixture
    def pushy_node(pushy_secret: str) -> Iterator[Node]:
        """A started node on free loopback ports, stopped at teardown."""
        with running_node(secret=pushy_secret) as node:
            yield node

    @pytest.fixture
    def pushy_node_factory(pushy_secret: str) -> Iterator[Callable[..., Node]]:
        """A ``factory(**overrides)`` of started nodes, all stopped at teardown."""
        nodes: list[Node] = []

        def factory(**overrides: Any) -> Node:
            node = Node(**{**NODE_DEFAULTS, "secret": pushy_secret, **overrides})
            node.start()
            nodes.append(node)
            return node

        yield factory
        for node in reversed(nodes):
            node.stop()

    @pytest.fixture
    def pushy_tls(tmp_path: Path) -> TLSFiles:
        """A test certificate for ``127.0.0.1`` and ``localhost``."""
        return tls_files(tmp_path / "tls")

    @pytest.fixture(name="redis_server")
    def _redis_server_fixture() -> Iterator[RedisServer]:
        """A real redis-server on a free port, stopped at teardown."""
        with RedisServer() as server:
            yield server

    @pytest.fixture
    def cluster_factory(pushy_secret: str) -> Iterator[Callable[..., Cluster]]:
        """A ``factory(nodes, redis=URL, **options)`` of started clusters.

        Each is a :class:`Cluster` of ``nodes`` node processes with the
        ``pushy_secret``, sharing one free device port; ``options`` are the
        :class:`Cluster` arguments and NodeConfig fields of every node. Each
        node has ``scaled(20)`` s to start. All are stopped at teardown.
        """
        clusters: list[Cluster] = []

        def factory(nodes: int, redis: str, **options: Any) -> Cluster:
            options.setdefault("secret", pushy_secret)
            options.setdefault("start_timeout", scaled(20))
            cluster = Cluster(nodes, redis, **options)
            clusters.append(cluster)
            return cluster.start()

        yield factory
        for cluster in reversed(clusters):
            cluster.stop()

    if pytest_asyncio is not None:

        @pytest_asyncio.fixture
        async def push_client(pushy_node: Node) -> Any:
            """A push client of ``pushy_node``, closed at teardown.

            An async fixture, so that the connections of its async twins
            (``apush``...) are closed on the event loop of the test.
            """
            client = PushClient(pushy_node.push_url)
            yield client
            await client.aclose()

        @pytest_asyncio.fixture
        async def device_factory(
            pushy_node: Node, pushy_node_factory: Callable[..., Node]
        ) -> Any:
            """An async factory of connected device clients, closed at teardown.

            ``await device_factory(device="d1", account="acct", node=None,
            **client_kwargs)``; ``node`` defaults to ``pushy_node``; extra
            keywords go to :class:`pushy.DeviceClient`, except ``token`` (use
            this token) and ``ttl`` (of the token made otherwise).

            It depends on ``pushy_node`` and ``pushy_node_factory`` so that its
            clients are closed before those nodes stop: a node that stops
            while the event loop of its clients is idle waits for their
            closing handshakes until its ``close_timeout_s``.
            """
            clients: list[DeviceClient] = []

            async def factory(
                device: str = "d1",
                account: str | None = "acct",
                node: Node | None = None,
                **client_kwargs: Any,
            ) -> DeviceClient:
                target = pushy_node if node is None else node
                client = await _connect_device(target, device, account, client_kwargs)
                clients.append(client)
                return client

            yield factory
            for client in reversed(clients):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), timeout=scaled(5))

    else:  # pragma: no cover - exercised only without pytest-asyncio

        @pytest.fixture
        def push_client(pushy_node: Node) -> Iterator[PushClient]:
            """A push client of ``pushy_node``, closed at teardown."""
            client = PushClient(pushy_node.push_url)
            yield client
            client.close()

        @pytest.fixture
        def device_factory() -> Any:
            """Unavailable: the device factory needs pytest-asyncio."""
            pytest.fail(
                "device_factory needs pytest-asyncio (pip install pytest-asyncio)"
            )
