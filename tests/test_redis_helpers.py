"""``pushy.testing.RedisServer`` and the ``redis_server`` fixture (DESIGN 4).

Real ``redis-server`` processes on free loopback ports, spoken to over RESP
by the helper's own client. Every timing is scaled by ``TIME_UNIT``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pushy
import pytest
from pushy.testing import RedisServer, redis_server, scaled, wait_until


def refuses_connections(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` any more."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=scaled(1)):
            return False
    except OSError:
        return True


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_fixture_server_answers_commands_on_its_loopback_port(
    redis_server: RedisServer,
) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}"
    assert redis_server.running
    assert redis_server.command("PING") == "PONG"
    assert redis_server.command("DBSIZE") == 0

    assert redis_server.command("SET", "pushy:k", "välue", "PX", 60_000) == "OK"
    assert redis_server.command("GET", "pushy:k") == "välue"
    assert redis_server.command("GET", "pushy:missing") is None
    assert 0 < redis_server.command("PTTL", "pushy:k") <= 60_000
    assert redis_server.command("KEYS", "pushy:*") == ["pushy:k"]
    assert redis_server.command("DEL", "pushy:k", "pushy:missing") == 1
    info = redis_server.command("INFO", "server")
    assert f"tcp_port:{redis_server.port}" in info


def test_server_runs_without_persistence(redis_server: RedisServer) -> None:
    assert redis_server.command("CONFIG", "GET", "save") == ["save", ""]
    assert redis_server.command("CONFIG", "GET", "appendonly") == [
        "appendonly",
        "no",
    ]


def test_error_reply_raises_pushy_error(redis_server: RedisServer) -> None:
    with pytest.raises(pushy.PushyError, match="redis error: ERR"):
        redis_server.command("NOSUCHCOMMAND")

    assert redis_server.command("PING") == "PONG"


def test_restart_after_stop_comes_back_on_the_same_port_empty(
    redis_server: RedisServer,
) -> None:
    port = redis_server.port
    redis_server.command("SET", "pushy:dev:{tv-1}", "node-a")

    redis_server.stop()

    assert not redis_server.running
    assert refuses_connections(port)
    with pytest.raises(OSError):
        redis_server.command("PING")

    redis_server.start()

    assert redis_server.port == port
    assert redis_server.command("PING") == "PONG"
    assert redis_server.command("GET", "pushy:dev:{tv-1}") is None
    assert redis_server.command("DBSIZE") == 0


def test_kill_ends_the_server_at_once_and_start_brings_it_back(
    redis_server: RedisServer,
) -> None:
    assert redis_server.process is not None
    pid = redis_server.process.pid
    redis_server.command("SET", "k", "v")

    redis_server.kill()

    assert redis_server.process is None and not redis_server.running
    assert process_gone(pid)
    assert refuses_connections(redis_server.port)

    redis_server.start()

    assert redis_server.command("GET", "k") is None


def test_with_block_starts_and_stops_the_server_and_removes_its_directory() -> None:
    server = redis_server()
    assert not server.running  # made, not started

    with server as started:
        assert started is server
        assert server.command("PING") == "PONG"
        directory = Path(server._dir)
        assert directory.is_dir()
        port = server.port

    assert not server.running
    assert refuses_connections(port)
    assert not directory.exists()


def test_missing_binary_is_a_pushy_error_naming_the_debian_package(
    tmp_path: Path,
) -> None:
    with pytest.raises(pushy.PushyError, match="Debian package redis-server"):
        RedisServer(binary=str(tmp_path / "redis-server"))


def test_server_that_cannot_bind_its_port_reports_its_log() -> None:
    server = RedisServer()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.port))
        taken.listen()

        with pytest.raises(pushy.PushyError, match="(?s)exited.*in use"):
            server.start()

    assert not server.running


def test_server_left_running_is_killed_when_the_interpreter_exits() -> None:
    script = (
        "from pushy.testing import RedisServer\n"
        "server = RedisServer().start()\n"
        "print(server.process.pid, server._dir, flush=True)\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
    )

    assert done.returncode == 0, done.stderr
    pid, directory = done.stdout.split()
    wait_until(lambda: process_gone(int(pid)), message="redis-server gone")
    assert not Path(directory).exists()
