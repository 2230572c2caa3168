"""``pushy.Cluster``, the ``cluster_factory`` fixture and ``pushy cluster``
(DESIGN 4, 5, 7): node processes sharing one device port and one Redis.

Argument errors need no engine; the other tests run real ``pushy serve``
processes on a real redis-server, with real devices and real HTTP. Every
timing is scaled by ``pushy.testing.TIME_UNIT``.
"""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pushy
import pytest
from pushy import Cluster, DeviceClient, PushClient
from pushy.testing import TEST_SECRET, RedisServer, scaled, token_for, wait_until
from pushy_cli import PushyProcess, run_pushy

ClusterFactory = Callable[..., Cluster]

#: A Redis URL for clusters that are never started.
UNUSED_REDIS = "redis://127.0.0.1:1"


def node_directory(redis: RedisServer, prefix: str = "pushy:") -> dict[str, str]:
    """Node id -> peer address, as the nodes publish them in Redis."""
    keys = redis.command("KEYS", f"{prefix}node:*")
    return {k.removeprefix(f"{prefix}node:"): redis.command("GET", k) for k in keys}


# Cluster: arguments (no engine needed).


@pytest.mark.parametrize(
    ("nodes", "redis", "options", "message"),
    [
        (0, UNUSED_REDIS, {}, "nodes must be at least 1"),
        (1, "", {}, "needs redis"),
        (1, "http://127.0.0.1:6379", {}, "redis must be a url"),
        (1, "redis://127.0.0.1:99999", {}, "port that is not 1-65535"),
        (1, UNUSED_REDIS, {"port": 70000}, "port must be between"),
        (1, UNUSED_REDIS, {"heartbeat": 5}, "unknown option 'heartbeat'"),
        (1, UNUSED_REDIS, {"push_port": 9000}, "push_port is set by the cluster"),
        (1, UNUSED_REDIS, {"registry_ttl_s": 0.5}, "registry_ttl_s must be"),
        (1, UNUSED_REDIS, {"redis_prefix": "a b"}, "redis_prefix must be"),
    ],
    ids=[
        "no-nodes",
        "no-redis",
        "not-a-redis-url",
        "redis-port-out-of-range",
        "port-out-of-range",
        "unknown-option",
        "option-owned-by-the-cluster",
        "ttl-below-one-second",
        "prefix-with-a-blank",
    ],
)
def test_cluster_with_bad_arguments_is_a_config_error_before_any_process(
    nodes: int, redis: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(pushy.ConfigError, match=message):
        Cluster(nodes, redis, secret=TEST_SECRET, **options)


def test_cluster_gives_every_node_the_shared_port_its_id_and_the_options() -> None:
    cluster = Cluster(
        2,
        UNUSED_REDIS,
        secret=TEST_SECRET,
        name="t",
        heartbeat_s=5,
        deflate=False,
        allowed_origins=["https://a.example", "https://b.example"],
        log_level="debug",
    )

    assert cluster.port != 0
    assert cluster.url == f"ws://127.0.0.1:{cluster.port}/v1/connect"
    assert [n.node_id for n in cluster.nodes] == ["t-0", "t-1"]
    for i, node in enumerate(cluster.nodes):
        args = " ".join(node.args)
        assert f"--port {cluster.port} " in args
        assert "--push-port 0 --peer-port 0 " in args
        assert f"--node-id t-{i} --redis {UNUSED_REDIS}" in args
        assert "--heartbeat-s 5" in args
        assert "--no-deflate" in args
        assert "--allowed-origins https://a.example,https://b.example" in args
        assert "--log-level debug" in args
        assert TEST_SECRET not in args  # in the environment, not on ps
        assert not node.running and node.pid is None


# pushy cluster: usage errors (no engine needed).


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "2"], "required: --redis"),
        (["--redis", UNUSED_REDIS], "required: --nodes"),
        (["--nodes", "-1", "--redis", UNUSED_REDIS], "--nodes must be at least 1"),
        (["--nodes", "two", "--redis", UNUSED_REDIS], "--nodes"),
        (["--nodes", "2", "--redis", UNUSED_REDIS, "--port", "70000"], "port"),
        (
            ["--nodes", "2", "--redis", UNUSED_REDIS, "--registry-ttl-s", "0"],
            "registry_ttl_s",
        ),
        (
            ["--nodes", "2", "--redis", UNUSED_REDIS, "--push-port", "9000"],
            "unrecognized arguments: --push-port",
        ),
    ],
    ids=[
        "no-redis",
        "no-nodes",
        "negative-nodes",
        "nodes-not-a-number",
        "port-out-of-range",
        "zero-ttl",
        "push-port-is-per-node",
    ],
)
def test_pushy_cluster_with_a_bad_option_exits_2_with_pushy_error(
    args: list[str], message: str
) -> None:
    done = run_pushy("cluster", *args, "--secret", TEST_SECRET)

    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr[done.stderr.index("pushy: error:") :]
    assert message in error, error
    assert done.stdout == ""


# Starting clusters (the engine with Redis support).


def test_node_that_cannot_start_is_reported_with_its_output(
    redis_server: RedisServer,
) -> None:
    with socket.socket() as taken:  # no SO_REUSEPORT: the nodes cannot share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cluster = Cluster(
            2,
            redis_server.url,
            secret=TEST_SECRET,
            port=port,
            start_timeout=scaled(20),
        )

        with pytest.raises(
            pushy.PushyError, match="node-0 exited with code 2 before listening"
        ) as err:
            cluster.start()

    assert f"127.0.0.1:{port}" in str(err.value)  # the node's own error
    assert not any(node.running for node in cluster.nodes)


def test_two_node_cluster_shares_the_device_port_with_distinct_ports_and_ids(
    redis_server: RedisServer, cluster_factory: ClusterFactory
) -> None:
    cluster = cluster_factory(2, redis=redis_server.url, name="pair")

    first, second = cluster.nodes
    assert (first.node_id, second.node_id) == ("pair-0", "pair-1")
    assert first.url == second.url == cluster.url
    assert first.push_url != second.push_url
    assert first.peer_address != second.peer_address
    assert first.pid != second.pid and first.running and second.running
    assert node_directory(redis_server) == {
        "pair-0": first.peer_address,
        "pair-1": second.peer_address,
    }


async def test_devices_on_the_shared_port_are_reached_through_every_node(
    redis_server: RedisServer, cluster_factory: ClusterFactory
) -> None:
    cluster = cluster_factory(2, redis=redis_server.url)
    devices = [DeviceClient(cluster.url, token_for(f"d{i}")) for i in range(6)]
    for device in devices:
        await device.connect()

    try:
        for node in cluster.nodes:
            async with PushClient(node.push_url) as client:
                for i, device in enumerate(devices):
                    result = await client.apush(f"d{i}", node.node_id)
                    assert (result.code, result.node) == (200, device.node), result
                    push = await device.wait_for("push", timeout=scaled(5))
                    assert push["data"] == node.node_id
        assert {d.node for d in devices} <= {n.node_id for n in cluster.nodes}
    finally:
        for device in devices:
            await device.close()


def test_killed_node_restarts_with_the_same_id_and_device_port(
    redis_server: RedisServer, cluster_factory: ClusterFactory
) -> None:
    cluster = cluster_factory(2, redis=redis_server.url, registry_ttl_s=2)
    node = cluster.nodes[0]
    old_pid = node.pid

    assert node.kill() == -signal.SIGKILL
    assert not node.running and node.push_url is None

    node.start(scaled(20))

    assert node.running and node.pid != old_pid
    assert node.url == cluster.url
    assert node.node_id == "node-0"
    wait_until(
        lambda: node_directory(redis_server).get("node-0") == node.peer_address,
        message="the restarted node in the node directory",
    )


def test_stop_ends_every_node_with_sigterm_and_exit_code_0(
    redis_server: RedisServer,
) -> None:
    with Cluster(
        2, redis_server.url, secret=TEST_SECRET, start_timeout=scaled(20)
    ) as cluster:
        processes = [node.process for node in cluster.nodes]
        assert len(node_directory(redis_server)) == 2

    assert [p.returncode for p in processes if p is not None] == [0, 0]
    assert not any(node.running for node in cluster.nodes)
    assert node_directory(redis_server) == {}


# pushy cluster and pushy serve in the foreground.


@pytest.fixture
def foreground() -> Iterator[Callable[..., PushyProcess]]:
    """``foreground(*args)`` -> a running ``pushy ARGS``; killed at teardown."""
    started: list[PushyProcess] = []

    def start(*args: str) -> PushyProcess:
        started.append(PushyProcess(*args))
        return started[-1]

    yield start
    for process in started:
        process.close()


async def test_pushy_cluster_prints_every_node_and_stops_all_on_sigint(
    redis_server: RedisServer, foreground: Callable[..., PushyProcess]
) -> None:
    cli = foreground(
        "cluster", "--nodes", "2", "--redis", redis_server.url,
        "--secret", TEST_SECRET, "--name", "fg", "--log-level", "debug",
    )  # fmt: skip

    last = cli.wait_line(r"cluster of 2 nodes, devices (\S+)", scaled(40))
    url = last[1]
    lines = re.findall(r"node (\S+) listening: push (\S+), peer (\S+)", cli.output)
    assert [line[0] for line in lines] == ["fg-0", "fg-1"]
    assert len({line[1] for line in lines}) == 2
    assert node_directory(redis_server) == {line[0]: line[2] for line in lines}
    async with DeviceClient(url, token_for("tv-1")) as device:
        assert device.node in ("fg-0", "fg-1")

    code = cli.finish(signal.SIGINT, scaled(30))

    assert code == 0, cli.output
    assert "pushy: cluster stopped" in "".join(cli.stdout)
    assert re.search(r"^\[fg-[01]\] ", "".join(cli.stderr), re.MULTILINE), cli.output
    assert node_directory(redis_server) == {}


def test_serve_with_redis_prints_its_peer_address_in_the_start_line(
    redis_server: RedisServer, foreground: Callable[..., PushyProcess]
) -> None:
    served = foreground(
        "serve", "--host", "127.0.0.1", "--port", "0", "--push-port", "0",
        "--peer-port", "0", "--secret", TEST_SECRET, "--node-id", "solo",
        "--redis", redis_server.url,
    )  # fmt: skip

    line = served.wait_line(
        r"pushy: node solo listening: devices ws://\S+, push http://\S+, "
        r"peer (127\.0\.0\.1:\d+)$",
        scaled(30),
    )

    assert node_directory(redis_server) == {"solo": line[1]}
    assert served.finish(signal.SIGTERM, scaled(30)) == 0, served.output
