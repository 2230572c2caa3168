"""``pushy bench idle``, ``connect``, ``peers`` and
``benchmarks/idle_memory.py``, run small: real nodes, a real redis-server, a
real nginx with Nchan, real ``pushy-loadgen`` processes."""

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


def test_bench_peers_measures_pushy_and_nchan_in_the_same_run(tmp_path: Path) -> None:
    proc = run_pushy(
        "bench", "peers", "--connections", "1000", "--pushes", "5000",
        "--batch", "500", "--rate", "4000", "--registry-ttl-s", "3",
        "--settle-s", "0.5", "--runs", "1", "--results", str(tmp_path),
        timeout=scaled(240),
    )  # fmt: skip

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "peers.json").read_text())
    assert (result["connections"], result["pushes_per_run"]) == (1000, 5000)
    (run,) = result["runs"]
    for name in ("pushy", "nchan"):
        side = run[name]
        assert side["connected"] == side["held"] == 1000, name
        assert side["failed"] == 0 and side["dropped_by_reason"] == {}, name
        assert side["pushes"] == side["accepted"] == side["delivered"] == 5000, name
        assert side["not_delivered"] == 0, name
        assert side["rss_per_conn"] > 0 and side["node_cpu_s"] > 0, name
        assert side["delivered_per_cpu_s"] == pytest.approx(
            side["delivered"] / side["node_cpu_s"]
        )
        assert side["latency_us"]["count"] >= 5000, name
    assert run["pushy"]["codes"] == {"200": 5000}
    assert sum(run["nchan"]["codes"].values()) == 5000
    ratios = run["ratios"]
    assert ratios["delivered_per_cpu_s"] == pytest.approx(
        run["pushy"]["delivered_per_cpu_s"] / run["nchan"]["delivered_per_cpu_s"]
    )
    assert ratios["rss_per_conn"] == pytest.approx(
        run["pushy"]["rss_per_conn"] / run["nchan"]["rss_per_conn"]
    )
    goals = result["summary"]["goals"]
    assert set(goals) == {"delivered_per_cpu_s", "rss_per_conn", "rss_slab_per_conn"}
    assert all(isinstance(g["met"], bool) for g in goals.values())
    assert (tmp_path / "peers.png").stat().st_size > 0
    assert "Pushy/Nchan" in proc.stdout and "goal:" in proc.stdout


def test_bench_peers_refuses_more_connections_than_one_node_holds() -> None:
    proc = run_pushy("bench", "peers", "--connections", "30000")

    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "--connections must be 1-18,900" in proc.stderr
