"""``pushy bench idle``, ``pushy bench connect`` and
``benchmarks/idle_memory.py``, run small: real nodes, a real redis-server,
real ``pushy-loadgen`` processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pushy.bench import loadgen_path
from pushy.testing import scaled
from pushy_cli import cli_env, run_pushy

ROOT = Path(__file__).resolve().parent.parent

SMALL = (
    "--connections", "2000", "--nodes", "2", "--per-process", "1000",
    "--rate", "4000", "--source-addrs", "127.0.0.2-3", "--runs", "1",
)  # fmt: skip


def test_bench_idle_writes_memory_per_connection_and_a_plot(tmp_path: Path) -> None:
    proc = run_pushy(
        "bench", "idle", *SMALL, "--settle-s", "0.5", "--registry-ttl-s", "3",
        "--results", str(tmp_path), timeout=scaled(180),
    )  # fmt: skip

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "idle.json").read_text())
    assert (result["connections"], result["nodes"]) == (2000, 2)
    assert result["loadgens"] == [1000, 1000]
    assert result["registry"] == "redis"
    (run,) = result["runs"]
    assert run["connected"] == run["held"] == sum(run["per_node"]) == 2000
    assert len(run["per_node"]) == 2
    assert run["registered"] == 2000
    assert run["failed"] == 0 and run["failed_by_reason"] == {}
    assert run["dropped_by_reason"] == {}
    assert run["rss_per_conn"] > 0 and run["rss_per_conn_connected"] > 0
    assert run["redis_per_conn"] > 0
    assert run["measured_after_s"] >= 1
    assert run["rss_slab_per_conn"] == pytest.approx(
        run["rss_per_conn"] + run["slab_per_conn"]
    )
    assert run["upgrades_per_s"] > 0 and run["node_cpu_us_per_upgrade"] > 0
    assert run["progress"] and run["progress"][-1][1] == 2000
    assert run["all_closed"]
    assert set(result["summary"]["rss_slab_per_conn"]) == {"median", "min", "max"}
    assert (tmp_path / "idle.png").stat().st_size > 0
    assert "rss_slab_per_conn" in proc.stdout


def test_bench_connect_writes_upgrade_rate_latency_cpu_and_a_plot(
    tmp_path: Path,
) -> None:
    proc = run_pushy(
        "bench", "connect", *SMALL, "--results", str(tmp_path), timeout=scaled(180)
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "connect.json").read_text())
    assert (result["connections"], result["rate"]) == (2000, 4000)
    (run,) = result["runs"]
    assert run["connected"] == run["registered"] == 2000
    assert run["failed"] == 0 and run["registry_errors"] == 0
    assert run["upgrades_per_s"] > 0 and run["registry_writes_per_s"] > 0
    hello = run["hello_latency_us"]
    assert 0 < hello["p50"] <= hello["p99"] <= hello["max"]
    assert run["handshake_latency_us"]["p50"] <= hello["p50"]
    assert run["node_cpu_s_per_1m"] > 0 and run["loadgen_cpu_s_per_1m"] > 0
    assert "redis_cpu_s_per_1m" in result["summary"]
    assert (tmp_path / "connect.png").stat().st_size > 0
    assert "hello_p99_us" in proc.stdout


def test_bench_idle_refuses_more_connections_than_its_nodes_hold() -> None:
    proc = run_pushy("bench", "idle", "--connections", "40000", "--nodes", "1")

    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "expected --nodes of at least 3" in proc.stderr


def test_idle_memory_script_measures_one_node(tmp_path: Path) -> None:
    out = tmp_path / "idle_memory.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "idle_memory.py"),
         "--connections", "600", "--per-process", "300", "--runs", "1",
         "--settle-s", "0.5", "--loadgen", loadgen_path(), "--output", str(out)],
        capture_output=True, text=True, env=cli_env(), timeout=scaled(180),
        check=False,
    )  # fmt: skip

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["connections_held"] == run["connections_connected"] == 600
    assert run["rss_per_conn"] > 0
    assert run["failed_by_reason"] == {} and run["dropped_by_reason"] == {}
    assert result["config"]["per_process"] == [300, 300]


DIRECT = (
    "--connections", "1000", "--nodes", "2", "--per-process", "500",
    "--rate", "4000", "--source-addrs", "127.0.0.2-3", "--runs", "1",
)  # fmt: skip


def test_bench_unicast_counts_pushes_at_the_devices_and_their_cost(
    tmp_path: Path,
) -> None:
    proc = run_pushy(
        "bench", "unicast", *DIRECT, "--pushes", "20000", "--window", "500",
        "--data-bytes", "64", "--results", str(tmp_path), timeout=scaled(180),
    )  # fmt: skip

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "unicast.json").read_text())
    assert (result["connections"], result["nodes"]) == (1000, 2)
    (run,) = result["runs"]
    assert run["sent"] == run["delivered"] == run["received_by_devices"] == 20000
    assert run["codes"] == {"200": 20000}
    # Every device got its warm-up push, and the route cache served the rest.
    assert run["warm"]["codes"] == {"200": 1000}
    assert run["route_cache"]["misses"] <= 1000 < run["route_cache"]["hits"]
    assert run["delivered_per_s"] > 0 and run["node_cpu_s"] > 0
    assert run["host_cpu_s_per_1m"] >= run["node_cpu_s_per_1m"] > 0
    answer = run["answer_latency_us"]
    assert answer["count"] == 20000
    assert 0 < answer["p50"] <= answer["p99"] <= answer["max"]
    assert run["device_latency_us"]["count"] == 20000
    assert (tmp_path / "unicast.png").stat().st_size > 0
    assert "delivered_per_node_cpu_s" in proc.stdout


def test_bench_latency_paces_open_loop_and_measures_at_the_devices(
    tmp_path: Path,
) -> None:
    proc = run_pushy(
        "bench", "latency", *DIRECT, "--rates", "500,2000", "--seconds", "1",
        "--results", str(tmp_path), timeout=scaled(180),
    )  # fmt: skip

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "latency.json").read_text())
    assert [p["rate"] for p in result["phases"]] == [500, 2000]
    for phase, sent in zip(result["phases"], (500, 2000), strict=True):
        (run,) = phase["runs"]
        assert run["sent"] == run["delivered"] == run["received_by_devices"] == sent
        # Open loop: the pushes went out at the rate asked, not faster.
        assert run["send_s"] >= 0.9
        device = run["device_latency_us"]
        assert device["count"] == sent
        assert 0 < device["p50"] <= device["p99"] <= device["p99.9"] <= device["max"]
        assert phase["summary"]["failed"] == 0
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_pusher_refuses_bad_options() -> None:
    pusher = Path(loadgen_path()).with_name("pushy-pusher")
    proc = subprocess.run([str(pusher), "--redis", "redis://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=30, check=False)

    assert proc.returncode == 2
    assert "--devices PREFIX:N" in proc.stderr
