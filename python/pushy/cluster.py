"""A local cluster: several node processes sharing one Redis registry.

Every node is a ``pushy serve`` process of this interpreter. They share one
device port (``SO_REUSEPORT``: the kernel spreads new connections over
them), and each has its own push port, peer port and node id::

    with pushy.Cluster(2, redis="redis://127.0.0.1:6379", secret=s) as c:
        print(c.url)                 # the shared device URL
        for node in c.nodes:
            print(node.node_id, node.push_url, node.peer_address)

``pushy cluster --nodes N --redis URL`` runs one in the foreground; the
``cluster_factory`` fixture of :mod:`pushy.testing` starts them in tests.

Limitations:
    The nodes run on this host only, with this interpreter. The device port
    is shared with ``SO_REUSEPORT``: the kernel picks a node for each new
    connection, so a test cannot choose the node a device lands on through
    :attr:`Cluster.url` (each node's own push API and peer port are
    distinct, though). A node's output is kept in memory, its last
    :data:`OUTPUT_LINES` lines only.

    Node processes never outlive this interpreter: those still running at
    its exit are stopped, and on Linux a node started from the main thread
    is also stopped (SIGINT) when this process dies, even by SIGKILL. One
    started from another thread is not, if the process is killed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self

from .config import NodeConfig
from .errors import ConfigError, PushyError
from .node import http_host

__all__ = ["OUTPUT_LINES", "Cluster", "NodeProcess", "free_port"]

#: Lines of output kept per node process (see :attr:`NodeProcess.output`).
OUTPUT_LINES = 2000

#: Options that :class:`Cluster` sets itself for every node.
_OWNED = (
    "host",
    "port",
    "push_port",
    "peer_port",
    "node_id",
    "redis",
    "secret",
    "reuse_port",
)

#: ``pushy serve`` options that are not :class:`NodeConfig` fields.
_SERVE_ONLY = ("log_level",)

_LISTENING = re.compile(
    r"pushy: node (?P<id>\S+) listening: devices (?P<url>\S+), "
    r"push (?P<push>\S+), peer (?P<peer>\S+)"
)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NodeProcess:
    """One ``pushy serve`` process of a :class:`Cluster`.

    Args:
        node_id: the node's id (also passed in ``args``).
        args: the command line of the process.
        env: its environment.
        on_output: called with ``(node_id, line)`` for each line the process
            writes after its start line (from a reader thread).

    Attributes:
        node_id: the node's id.
        url: the device WebSocket URL (the cluster's shared port).
        push_url: the node's push API URL (``None`` until started).
        peer_address: ``HOST:PORT`` of its peer link (``None`` until started).
        process: the running process, or ``None``.
    """

    def __init__(
        self,
        node_id: str,
        args: list[str],
        env: Mapping[str, str],
        on_output: Callable[[str, str], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.url: str | None = None
        self.push_url: str | None = None
        self.peer_address: str | None = None
        self.process: subprocess.Popen[str] | None = None
        self._args = args
        self._env = dict(env)
        self._on_output = on_output
        self._output: deque[str] = deque(maxlen=OUTPUT_LINES)
        self._reader: threading.Thread | None = None

    @property
    def args(self) -> list[str]:
        """The command line of the process (the secret is not on it)."""
        return list(self._args)

    @property
    def pid(self) -> int | None:
        """The process id while running."""
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.poll() is None

    @property
    def output(self) -> str:
        """What the process wrote (stdout and stderr), its last lines only."""
        return "".join(list(self._output))

    def start(self, timeout: float = 20.0) -> None:
        """Start the process (again: same id, same ports) and wait until it listens.

        Args:
            timeout: seconds to wait for its start line.

        Raises:
            PushyError: it exited or did not listen within ``timeout``; the
                message holds its output.
        """
        if self.running:
            return
        self._output.clear()
        self.process = subprocess.Popen(
            self._args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self._env,
            # The death signal follows the thread that forks: only the
            # main thread lives as long as the parent process.
            preexec_fn=(
                _stop_with_parent
                if threading.current_thread() is threading.main_thread()
                else None
            ),
        )
        _started.add(self)
        ready = threading.Event()
        self._reader = threading.Thread(
            target=self._read, args=(self.process, ready), daemon=True
        )
        self._reader.start()
        started = ready.wait(timeout)
        if not started or self.push_url is None:
            code = None
            if started:  # its output ended: it exited, or is about to
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = self.process.wait(5)
            self.kill()
            why = (
                f"did not start within {timeout:g} s"
                if code is None
                else f"exited with code {code} before listening"
            )
            raise PushyError(f"node {self.node_id} {why}:\n{self.output[-4000:]}")

    def _read(self, process: subprocess.Popen[str], ready: threading.Event) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._output.append(line)
            if not ready.is_set():
                # Until it listens, the output is for start() to report.
                m = _LISTENING.search(line)
                if m:
                    self.url = m["url"]
                    self.push_url = m["push"]
                    self.peer_address = m["peer"]
                    ready.set()
                continue
            if self._on_output is not None:
                # An exception must not stop the reader: the pipe would fill.
                try:
                    self._on_output(self.node_id, line)
                except Exception:  # noqa: BLE001
                    self._on_output = None
        ready.set()  # exited: start() reports it

    def stop(self, timeout: float = 15.0) -> int | None:
        """Stop at once with SIGINT (devices are closed with 1001) and wait;
        return the exit code."""
        return self._end(signal.SIGINT, timeout)

    def drain(self, timeout: float = 60.0) -> int | None:
        """Drain with SIGTERM, as a deploy would (devices are asked to
        reconnect over the node's ``drain_s``), and wait until the node has
        stopped; return the exit code."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """Kill with SIGKILL (a crash: nothing is cleaned up); return the code."""
        return self._end(signal.SIGKILL, 10.0)

    def join(self, timeout: float = 15.0) -> int | None:
        """Wait for the exit a signal sent already asked for; SIGKILL at
        ``timeout``. Returns the exit code."""
        return self._end(None, timeout)

    def _end(self, sig: int | None, timeout: float) -> int | None:
        """Send ``sig`` (None: it was sent already), wait, kill at the timeout."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            if sig is not None:
                process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(5)
        if process.stdout is not None:
            process.stdout.close()
        self.push_url = self.peer_address = None
        return process.returncode

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<pushy.NodeProcess {self.node_id!r} {state}, push={self.push_url}>"


def _stop_with_parent() -> None:
    """In the child, before exec: SIGINT (stop at once) when the parent dies,
    even by SIGKILL, so that no node outlives the script that started it
    (Linux ``PR_SET_PDEATHSIG``)."""
    import ctypes

    with contextlib.suppress(Exception):  # not Linux: atexit still stops them
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGINT), 0, 0, 0)  # PR_SET_PDEATHSIG


#: Node processes started by this interpreter, stopped at its exit.
_started: weakref.WeakSet[NodeProcess] = weakref.WeakSet()


@atexit.register
def _stop_started() -> None:
    for node in list(_started):
        with contextlib.suppress(Exception):
            node.stop(timeout=5.0)


class Cluster:
    """Several node processes on one Redis registry and one device port.

    Every node is ``python -m pushy serve`` with ``--port PORT`` (the same
    for all), ``--push-port 0 --peer-port 0``, ``--node-id NAME-I``,
    ``--redis URL`` and the ``options``. The secret goes to the processes
    in ``PUSHY_SECRET``, not on their command lines (which any local user
    can read).

    Args:
        nodes: how many node processes.
        redis: Redis URL of the registry.
        secret: HS256 secret of device tokens; ``None`` leaves the nodes
            the ``PUSHY_SECRET`` of this environment.
        host: address of the shared device port.
        port: the shared device port; 0 picks a free one.
        name: node ids are ``{name}-{i}``.
        start_timeout: seconds each node has to print its start line.
        on_output: called with ``(node_id, line)`` for every line a node
            writes after its start line (its log), from a reader thread.
        **options: more ``pushy serve`` options, as NodeConfig field names
            (``heartbeat_s=5``, ``registry_ttl_s=3``, ``deflate=True``,
            ``allowed_origins=[...]``) or ``log_level``.

    Raises:
        ConfigError: ``nodes`` is below 1, ``redis`` is empty, an option is
            unknown or set by the cluster itself, or a value is invalid.
        PushyError: a node did not start (from :meth:`start`).
    """

    def __init__(
        self,
        nodes: int,
        redis: str,
        *,
        secret: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "node",
        start_timeout: float = 20.0,
        on_output: Callable[[str, str], None] | None = None,
        **options: Any,
    ) -> None:
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise ConfigError(f"nodes must be at least 1, got {nodes!r}")
        if not redis:
            raise ConfigError("a cluster needs redis (a redis:// URL)")
        _check_options(options, redis=redis, host=host, port=port)
        self.port = port or free_port(host)
        self.host = host
        self._scheme = "wss" if options.get("tls_cert") else "ws"
        self.start_timeout = start_timeout
        env = dict(os.environ)
        if secret is not None:
            env["PUSHY_SECRET"] = secret
        public_key = options.pop("public_key", None)
        if public_key is not None:
            # pushy serve reads a key from a file or the environment only.
            env["PUSHY_PUBLIC_KEY"] = public_key
        self.nodes: list[NodeProcess] = []
        for i in range(nodes):
            node_id = f"{name}-{i}"
            args = [
                sys.executable,
                "-m",
                "pushy",
                "serve",
                "--host",
                host,
                "--port",
                str(self.port),
                "--reuse-port",
                "--push-port",
                "0",
                "--peer-port",
                "0",
                "--node-id",
                node_id,
                "--redis",
                redis,
            ]
            for key, value in options.items():
                args += _flag(key, value)
            self.nodes.append(NodeProcess(node_id, args, env, on_output))

    @property
    def url(self) -> str:
        """The shared device WebSocket URL (as each node prints it):
        ``wss://`` with ``tls_cert``."""
        return f"{self._scheme}://{http_host(self.host)}:{self.port}/v1/connect"

    def start(self) -> Self:
        """Start every node that is not running; wait until each listens.

        Raises:
            PushyError: a node did not start (the others are stopped).
        """
        try:
            for node in self.nodes:
                node.start(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node at once (SIGINT: devices are closed with 1001)."""
        for node in self.nodes:
            if node.running:
                assert node.process is not None
                node.process.send_signal(signal.SIGINT)
        # Once is enough: a second signal could end a node mid-shutdown.
        for node in self.nodes:
            node.join()

    def wait(self) -> Iterator[NodeProcess]:
        """Yield each node that exits, as it exits, while any runs."""
        exited: set[str] = set()
        while any(n.running for n in self.nodes):
            for node in self.nodes:
                if not node.running and node.node_id not in exited:
                    exited.add(node.node_id)
                    yield node
            time.sleep(0.2)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        running = sum(n.running for n in self.nodes)
        return f"<pushy.Cluster {running}/{len(self.nodes)} running, url={self.url!r}>"



def _check_options(options: Mapping[str, Any], **given: Any) -> None:
    """Check a cluster's node options as ``pushy serve`` would, before starting.

    Raises:
        ConfigError: an option is unknown, owned by the cluster, or invalid.
    """
    fields = set(NodeConfig.field_names())
    for key in options:
        if key in _OWNED:
            raise ConfigError(
                f"{key} is set by the cluster for each node; "
                "expected another NodeConfig field"
            )
        if key not in fields and key not in _SERVE_ONLY:
            raise ConfigError(
                f"unknown option {key!r}; expected a NodeConfig field or log_level"
            )
    values = {k: v for k, v in options.items() if k in fields and v is not None}
    NodeConfig(**values, **given)


def _flag(key: str, value: Any) -> list[str]:
    """Return the ``pushy serve`` arguments that set option ``key``."""
    flag = "--" + key.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + flag.removeprefix("--")]
    if isinstance(value, (list, tuple)):
        return [flag, ",".join(str(v) for v in value)]
    return [flag, str(value)]
