"""``pushy cluster``, ``pushy push --redis`` and ``pushy bench`` as a user
runs them: real processes, a real redis-server, real devices."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from pushy import DeviceClient
from pushy.testing import TEST_SECRET, RedisServer, scaled, token_for
from pushy_cli import PushyProcess, arun_pushy, run_pushy


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0", "--redis", "redis://127.0.0.1:1"], "at least 1"),
        (["--nodes", "2", "--redis", "http://x", "--secret", "s"], "redis must"),
        (["--nodes", "2", "--redis", "redis://127.0.0.1:1"], "secret"),
    ],
)
def test_cluster_with_bad_options_exits_2_with_a_clear_error(
    args: list[str], message: str
) -> None:
    proc = run_pushy("cluster", *args)

    assert proc.returncode == 2, proc.stderr
    assert "pushy: error:" in proc.stderr and message in proc.stderr, proc.stderr


def start_cluster(redis_server: RedisServer) -> tuple[PushyProcess, str]:
    """``pushy cluster --nodes 2`` on ``redis_server``; returns it and its
    device URL once every node listens."""
    cli = PushyProcess(
        "cluster", "--nodes", "2", "--redis", redis_server.url,
        "--secret", TEST_SECRET,
    )  # fmt: skip
    try:
        return cli, cli.wait_line(r"cluster of 2 nodes, devices (\S+)", scaled(40))[1]
    except BaseException:
        cli.close()
        raise


async def test_cluster_runs_nodes_on_one_device_port_and_stops_on_sigterm(
    redis_server: RedisServer,
) -> None:
    cli, url = start_cluster(redis_server)
    try:
        found = re.findall(r"node (\S+) listening: push (\S+), peer (\S+)", cli.output)
        assert [m[0] for m in found] == ["node-0", "node-1"]
        assert len({m[1] for m in found}) == 2  # own push ports

        # Devices on the shared port reach one node or the other, and a push
        # through the registry finds each.
        devices = [DeviceClient(url, token_for(f"d{i}")) for i in range(6)]
        for d in devices:
            await d.connect()
        pushed = await arun_pushy(
            "push", "--redis", redis_server.url, "--to", "d3", "--data", '{"hello": 1}'
        )
        assert pushed.returncode == 0, pushed.stderr
        answer = json.loads(pushed.stdout)
        assert answer["code"] == 200 and answer["node"] == devices[3].node
        assert (await devices[3].wait_for("push"))["data"] == {"hello": 1}
        for d in devices:
            await d.close()
        code = cli.finish(signal.SIGTERM)
    finally:
        cli.close()
    assert code == 0, cli.output
    assert "cluster stopped" in "".join(cli.stdout)


def node_pid(cli_pid: int, node_id: str) -> int:
    """The pid of the child of ``pushy cluster`` that runs ``node_id``."""
    for task in Path(f"/proc/{cli_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if node_id.encode() in args:
                return int(child)
    raise AssertionError(f"no process of {node_id}")


async def test_cluster_keeps_serving_when_one_node_is_killed(
    redis_server: RedisServer,
) -> None:
    cli, url = start_cluster(redis_server)
    try:
        os.kill(node_pid(cli.process.pid, "node-1"), signal.SIGKILL)
        warning = "node node-1 exited with -9; 1 of 2 nodes still running"
        deadline = time.monotonic() + scaled(10)
        while warning not in "".join(cli.stderr):
            assert time.monotonic() < deadline, cli.output
            await asyncio.sleep(0.05)

        # New devices reach the node left, and pushes reach them.
        device = DeviceClient(url, token_for("after"))
        await device.connect()
        assert device.node == "node-0"
        pushed = await arun_pushy(
            "push", "--redis", redis_server.url, "--to", "after", "--data", "2"
        )
        assert pushed.returncode == 0, pushed.stderr
        assert (await device.wait_for("push"))["data"] == 2
        await device.close()
        code = cli.finish(signal.SIGTERM)
    finally:
        cli.close()
    assert code == 0, cli.output


def test_push_with_redis_to_an_unknown_device_exits_1(
    redis_server: RedisServer,
) -> None:
    proc = run_pushy(
        "push", "--redis", redis_server.url, "--to", "ghost", "--data", "1"
    )

    assert proc.returncode == 1
    assert json.loads(proc.stdout)["status"] == "not_connected"


def test_bench_push_writes_json_and_a_plot(tmp_path: Path) -> None:
    proc = run_pushy(
        "bench", "push", "--devices", "300", "--pushes", "3000", "--batch", "500",
        "--runs", "1", "--results", str(tmp_path), timeout=scaled(180),
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "push.json").read_text())
    assert result["devices"] == 300
    (run,) = result["runs"]
    assert run["delivered"] == run["pushes"] == 3000
    assert run["codes"] == {"200": 3000}
    assert run["node_cpu_s"] > 0
    assert 0 < run["latency_us"]["p50"] <= run["latency_us"]["p99"]
    assert (tmp_path / "push.png").stat().st_size > 0
    assert "delivered_per_s" in proc.stdout


def test_bench_d2d_writes_latencies_codes_and_a_plot(tmp_path: Path) -> None:
    proc = run_pushy(
        "bench", "d2d", "--rates", "500,2000", "--seconds", "1", "--pairs", "10",
        "--runs", "1", "--results", str(tmp_path), timeout=scaled(180),
    )  # fmt: skip
    # 200 messages a second per sender at 2,000/s: twice the nodes' default
    # d2d rate limit, which the scenario raises out of the way.

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "d2d.json").read_text())
    assert [p["rate"] for p in result["phases"]] == [500, 2000]
    for phase in result["phases"]:
        (run,) = phase["runs"]
        assert run["sent"] == phase["rate"] * 1
        assert run["codes"] == {"200": run["sent"]}
        assert run["target_node_delivered"] == run["sent"]
        latency = run["latency_us"]
        assert latency["count"] == run["sent"]
        assert 0 < latency["p50"] <= latency["p99"] <= latency["p99.9"]
        assert run["node_latency_us"]["count"] == run["sent"]
        assert run["node_cpu_s"] > 0
    assert (tmp_path / "d2d.png").stat().st_size > 0
    assert "p99.9_us" in proc.stdout


def test_bench_queue_writes_throughput_latency_cpu_and_a_plot(tmp_path: Path) -> None:
    proc = run_pushy(
        "bench", "queue", "--devices", "200", "--messages", "2000", "--ack", "client",
        "--runs", "1", "--results", str(tmp_path), timeout=scaled(180),
    )  # fmt: skip

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "queue.json").read_text())
    assert (result["devices"], result["ack"]) == (200, "client")
    (run,) = result["runs"]
    assert run["delivered"] == run["messages"] == 2000
    latency = run["latency_us"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["p99.9"]
    assert run["node_cpu_s"] > 0 and run["processor_cpu_s"] > 0
    assert run["delivered_per_s"] > 0
    assert (tmp_path / "queue.png").stat().st_size > 0
    assert "processor_cpu_s_per_1m" in proc.stdout
