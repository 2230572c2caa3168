"""Shared fixtures of the integration tests.

The node fixtures (``pushy_node``, ``pushy_node_factory``, ``push_client``,
``device_factory``) come from the ``pushy.testing`` plugin. It is registered
by its entry point once pushy is installed; from a source tree (only
``PYTHONPATH=python``) it is loaded here instead.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from pushy import Node
    from pushy.testing import RedisServer
    from wsraw import RawWebSocket

# pushy.testing (and wsraw, which uses it) is imported only inside the
# functions below: imported here, before pytest registers it as a plugin,
# it could not be assertion-rewritten (a warning, and warnings are errors).


def _plugin_installed() -> bool:
    eps = metadata.entry_points(group="pytest11")
    return any(ep.value == "pushy.testing" for ep in eps)


if not _plugin_installed():
    pytest_plugins = ["pushy.testing"]

#: Deadline of a whole test, before scaling (pytest-timeout, when present).
TEST_TIMEOUT_S = 60


def pytest_collection_modifyitems(config: pytest.Config, items: list[Any]) -> None:
    """Give every test a scaled deadline unless it sets its own."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    from pushy.testing import scaled

    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(scaled(TEST_TIMEOUT_S)))


@pytest.fixture(autouse=True)
def no_engine_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test whose node logged an ERROR (a bug, never bad input)."""
    yield
    records = caplog.get_records("setup") + caplog.get_records("call") + caplog.records
    errors = [
        f"{r.name}: {r.getMessage()}"
        for r in records
        if r.levelno >= logging.ERROR and r.name.split(".")[0] == "pushy"
    ]
    assert not errors, "the node logged errors:\n" + "\n".join(errors)


def fetch_stats(node: Node) -> dict[str, Any]:
    """``GET /v1/stats`` on the node's push port, decoded."""
    from pushy.testing import scaled

    response = httpx.get(
        f"{node.push_url}/v1/stats", timeout=scaled(5), trust_env=False
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def stats() -> Callable[[Node], dict[str, Any]]:
    """``stats(node)`` -> the node's ``GET /v1/stats`` document."""
    return fetch_stats


@pytest.fixture
def wait_rejects() -> Callable[..., dict[str, int]]:
    """``wait_rejects(node, before)`` -> reject counters once they changed.

    ``before`` is a ``rejects`` mapping read earlier. Counters are summed
    over io threads when read, so they are polled until they move.
    """
    from pushy.testing import wait_until

    def wait(
        node: Node, before: dict[str, int], timeout: float | None = None
    ) -> dict[str, int]:
        def changed() -> dict[str, int] | None:
            now = fetch_stats(node)["rejects"]
            return now if now != before else None

        return wait_until(changed, timeout=timeout, message="a reject to be counted")

    return wait


@pytest.fixture
def raw_device() -> Iterator[Callable[..., tuple[RawWebSocket, Any]]]:
    """``raw_device(node, device="d1", token=None)`` -> (socket, hello).

    Opens a raw WebSocket as that device (token signed with the node's
    secret unless given); every socket is closed at teardown.
    """
    from pushy.testing import token_for
    from wsraw import open_device

    sockets: list[RawWebSocket] = []

    def open_one(
        node: Node, device: str = "d1", token: str | None = None
    ) -> tuple[RawWebSocket, Any]:
        if token is None:
            token = token_for(device, secret=node.config.secret)
        ws, hello = open_device(node.port, token, host=node.host)
        sockets.append(ws)
        return ws, hello

    yield open_one
    for ws in sockets:
        ws.close()


#: registry_ttl_s of the ``fleet`` nodes: records refresh every 0.67 s.
FLEET_TTL = 2.0


@pytest.fixture
def fleet(
    redis_server: RedisServer, pushy_node_factory: Callable[..., Node]
) -> Callable[..., Node]:
    """``fleet(node_id, **overrides)`` -> a started node on the test's Redis.

    The nodes run in this process with a ``FLEET_TTL`` registry TTL unless
    ``registry_ttl_s`` is overridden.
    """

    def make(node_id: str, **overrides: Any) -> Node:
        options = {"registry_ttl_s": FLEET_TTL, **overrides}
        return pushy_node_factory(node_id=node_id, redis=redis_server.url, **options)

    return make


#: Set by ``scripts/dev.sh sanitize``: the engine runs under ASan, whose
#: quarantine keeps freed memory resident, so memory bounds cannot be
#: asserted (what such tests check besides memory still runs).
SANITIZED = os.environ.get("PUSHY_SANITIZED") == "1"


def stop_process(process: subprocess.Popen[str]) -> None:
    """SIGSTOP ``process`` and wait until every thread of it has stopped.

    The signal is only queued when ``send_signal`` returns: a thread busy on
    the other core can still answer a request sent right after it.
    """
    from pushy.testing import scaled

    process.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + scaled(5)
    tasks = Path(f"/proc/{process.pid}/task")
    while True:
        states = [
            (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            for task in tasks.iterdir()
        ]
        if all(state in ("T", "t") for state in states):
            return
        assert time.monotonic() < deadline, f"not stopped: {states}"
        time.sleep(0.001)


def report(line: str) -> None:
    """Print a measured figure (seen with ``-s``) and append it to the file
    named by ``PUSHY_REPORT``, when that is set."""
    print(line)
    if os.environ.get("PUSHY_REPORT"):
        with open(os.environ["PUSHY_REPORT"], "a") as f:
            f.write(line + "\n")


def rss_kib(pid: int | str = "self") -> int:
    """Resident memory (VmRSS) of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")
