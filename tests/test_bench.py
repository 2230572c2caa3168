"""``pushy bench idle``, ``connect``, ``tls``, ``unicast``, ``latency``,
``storm`` and ``peers``, ``benchmarks/idle_memory.py`` and the load generator's reconnects,
run small: real nodes, a real redis-server, a real nginx with Nchan, real
``pushy-loadgen`` and ``pushy-pusher`` processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pushy import Cluster, PushClient, benchkit
from pushy.bench import loadgen_path
from pushy.testing import RedisServer, scaled, token_for, wait_until
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
    # The floor: bare processes doing the same TCP work for as many.
    floor = run["floor"]
    assert floor["connections"] == floor["done"] == 2000 and floor["failed"] == 0
    assert floor["connections_per_s"] > 0
    assert floor["client_cpu_us_per_connection"] > 0
    assert floor["server_cpu_us_per_connection"] > 0
    assert "floor_connections_per_s" in result["summary"]
    assert (tmp_path / "connect.png").stat().st_size > 0
    assert "hello_p99_us" in proc.stdout


def test_bench_tls_measures_tls_and_plain_connections_in_the_same_run(
    tmp_path: Path,
) -> None:
    proc = run_pushy(
        "bench", "tls", "--connections", "1000", "--nodes", "1",
        "--per-process", "500", "--rate", "1000", "--source-addrs", "127.0.0.2-3",
        "--runs", "2", "--settle-s", "0.2", "--registry-ttl-s", "3",
        "--results", str(tmp_path), timeout=scaled(240),
    )  # fmt: skip

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "tls.json").read_text())
    assert result["connections"] == 1000 and len(result["runs"]) == 2
    for pair in result["runs"]:
        tls, plain = pair["tls"], pair["plain"]
        assert tls["connected"] == tls["held"] == plain["connected"] == 1000
        assert tls["failed"] == plain["failed"] == 0
        # Every TLS connection was a full handshake at the node, plain none.
        assert tls["tls_handshakes"] == 1000 and plain["tls_handshakes"] == 0
        assert 0 < tls["tls_latency_us"]["p50"] <= tls["hello_latency_us"]["p50"]
        assert "tls_latency_us" not in plain
        # An idle TLS connection holds its OpenSSL state: several KB more.
        assert pair["tls_rss_per_conn"] > pair["plain_rss_per_conn"] + 4000
        assert pair["tls_handshake_cpu_us"] == pytest.approx(
            tls["node_cpu_us_per_upgrade"] - plain["node_cpu_us_per_upgrade"]
        )
    assert set(result["goals"]) == {"tls_rss_per_conn", "tls_handshakes_per_core_s"}
    assert (tmp_path / "tls.png").stat().st_size > 0
    assert "goal tls_rss_per_conn" in proc.stdout


def test_bench_idle_refuses_more_connections_than_its_nodes_hold() -> None:
    proc = run_pushy("bench", "idle", "--connections", "40000", "--nodes", "1")

    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "expected --nodes of at least 3" in proc.stderr


def test_bench_push_and_queue_refuse_more_devices_than_their_nodes_hold() -> None:
    for scenario in ("push", "queue"):
        proc = run_pushy("bench", scenario, "--devices", "20000", "--nodes", "1")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "1 node holds at most 18,900 devices" in proc.stderr
    proc = run_pushy("bench", "push", "--runs", "0")
    assert proc.returncode == 1 and "--runs must be >= 1" in proc.stderr


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["latency", "--rates", "nan"], 1, "--rates must be finite numbers"),
        (["storm", "--rate", "nan"], 2, "argument --rate: expected a finite number"),
        (["queue", "--rate", "inf"], 2, "argument --rate: expected a finite number"),
        (["d2d", "--rates", "1e9"], 1, "--rates must be at most 200000"),
        (["d2d", "--seconds", "1e9"], 1, "--seconds must be at most 3,600 s"),
        (["idle", "--settle-s", "1e12"], 1, "--settle-s must be at most 3,600 s"),
        (["idle", "--rate", "0.001"], 1, "would take over an hour"),
        (["idle", "--registry-ttl-s", "0.5"], 1, "--registry-ttl-s must be 1-86400"),
        (["unicast", "--pushes", "100000000"], 1, "--pushes must be at most"),
    ],
)
def test_bench_refuses_numbers_out_of_range_before_anything_starts(
    args: list[str], code: int, says: str, tmp_path: Path
) -> None:
    proc = run_pushy("bench", *args, "--results", str(tmp_path / "r"), timeout=scaled(30))

    assert proc.returncode == code, proc.stdout + proc.stderr
    assert says in proc.stderr
    assert "redis" not in proc.stdout  # nothing started


def test_bench_on_a_given_redis_leaves_no_key_behind(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    proc = run_pushy(
        "bench", "idle", "--connections", "300", "--per-process", "300",
        "--rate", "2000", "--runs", "1", "--settle-s", "0.2",
        "--registry-ttl-s", "3", "--redis", redis_server.url,
        "--results", str(tmp_path), timeout=scaled(120),
    )  # fmt: skip

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fewer than the 18,000 of the benchmark method" in proc.stdout
    assert redis_server.command("DBSIZE") == 0


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
    # The floor: a bare sender, the same number of sends of a push's size.
    floor = run["floor"]
    assert (floor["sockets"], floor["messages"], floor["bytes"]) == (1000, 20000, 168)
    assert floor["received_bytes"] == 20000 * 168
    assert floor["sender_cpu_s_per_1m"] > 0 and floor["receiver_cpu_s_per_1m"] > 0
    assert run["node_cpu_over_floor"] == pytest.approx(
        run["node_cpu_s_per_1m"] / floor["sender_cpu_s_per_1m"]
    )
    assert (tmp_path / "unicast.png").stat().st_size > 0
    assert "delivered_per_node_cpu_s" in proc.stdout
    assert "floor_sender_cpu_s_per_1m" in proc.stdout
    assert "goal delivered_per_s >= 300,000: " in proc.stdout
    assert "goal node_cpu_s_per_1m <= 2: " in proc.stdout


def test_bench_latency_paces_open_loop_and_measures_at_the_devices(
    tmp_path: Path,
) -> None:
    proc = run_pushy(
        "bench", "latency", *DIRECT, "--rates", "500,2000", "--seconds", "1",
        "--data-bytes", "8000", "--results", str(tmp_path), timeout=scaled(180),
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
        # The host's floor, measured in the same run: two bare hops.
        floor = run["floor_us"]
        assert floor["hops"] == 2 and floor["count"] == max(100, sent)
        assert 0 < floor["from_send_us"]["p50"] <= floor["from_due_us"]["p99"]
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_pusher_refuses_bad_options() -> None:
    pusher = Path(loadgen_path()).with_name("pushy-pusher")
    proc = subprocess.run([str(pusher), "--redis", "redis://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=30, check=False)

    assert proc.returncode == 2
    assert "--devices PREFIX:N" in proc.stderr


def test_bench_storm_registers_every_device_again_and_loses_no_message(
    tmp_path: Path,
) -> None:
    proc = run_pushy(
        "bench", "storm", "--devices", "2000", "--nodes", "2", "--per-process",
        "1000", "--rate", "1000", "--before-s", "1", "--after-s", "3",
        "--runs", "1", "--results", str(tmp_path), timeout=scaled(240),
    )  # fmt: skip

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "storm.json").read_text())
    assert (result["devices"], result["nodes"], result["loadgens"]) == (
        2000, 2, [1000, 1000]
    )
    (run,) = result["runs"]
    assert run["killed"] == "storm0-0"
    assert run["records_by_node"] == {"storm0-1": 2000}
    assert run["per_node_after"] == {"storm0-1": 2000}
    assert run["not_reregistered"] == 0
    assert run["drops"] == run["reconnects"] == 2000
    assert run["reconnect_gave_up"] == 0
    assert 0 < run["reregistered_s"] <= run["registry_checked_s"]
    assert 0 < run["all_connected_s"] <= run["registry_checked_s"]
    lat = run["reconnect_latency_ms"]
    assert lat["count"] == 2000
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert lat["cdf"][-1][1] == pytest.approx(1)
    m = run["messages"]
    assert m["enqueued"] > 0 and m["enqueue_errors"] == {}
    assert m["enqueued_in_storm"] > 0
    assert m["delivered"] == m["enqueued"]
    assert m["received"] == m["delivered"] + m["duplicates"]
    assert (m["dead_letters"], m["still_queued"], m["lost"]) == (0, 0, 0)
    assert run["timeline"][0]["loadgens_open"] == 2000
    assert run["timeline"][-1]["per_node"] == [2000]
    assert result["summary"]["lost"] == 0
    assert (tmp_path / "storm.png").stat().st_size > 0
    assert "reregistered_s" in proc.stdout


def test_bench_storm_refuses_more_devices_than_one_node_holds() -> None:
    proc = run_pushy("bench", "storm", "--devices", "20000")

    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "--devices must be 1-19000" in proc.stderr


def test_loadgen_reconnects_the_devices_of_a_killed_node_and_counts_distinct_pushes(
    tmp_path: Path, redis_server: RedisServer, cluster_factory: Callable[..., Cluster]
) -> None:
    cluster = cluster_factory(2, redis=redis_server.url)
    doomed, other = cluster.nodes
    other.stop()  # every device on the node that will be killed
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(token_for(f"l{i}") + "\n" for i in range(300)))
    gen = benchkit.Loadgen.start(
        loadgen_path(), port=cluster.port, tokens=tokens, connections=300,
        rate=2000, hold_s=scaled(120), workdir=tmp_path, name="loadgen",
        extra=["--reconnect", "--pushes", "--stats-s", "0.05"],
    )  # fmt: skip
    try:
        wait_until(gen.ready, scaled(30), message="the load generator's connect phase")
        assert doomed.push_url is not None
        with PushClient(doomed.push_url) as client:
            codes = [client.push("l7", {"seq": n}).code for n in (1, 1, 2)]
        assert codes == [200, 200, 200]
        other.start(scaled(20))
        doomed.kill()

        def all_back() -> bool:
            stats = gen.last_event("stats") or {}
            return stats.get("open") == 300 and stats.get("reconnects") == 300

        wait_until(all_back, scaled(60), message="every device connected again")
    finally:
        benchkit.stop_loadgens([gen])

    report = gen.report
    assert report["connected"] == 300 and report["failed"] == 0
    assert report["dropped"] == 300
    assert (report["pushes"]["distinct"], report["pushes"]["duplicates"]) == (2, 1)
    storm = report["reconnect"]
    assert storm["reconnects"] == 300 and storm["gave_up"] == 0
    assert storm["waiting_at_end"] == 0
    assert storm["latency_us"]["count"] == 300
    assert len(storm["latency_us"]["quantiles"]) == 100
    assert 0 < storm["first_loss_ns"] < storm["last_reconnect_ns"]
    assert storm["span_s"] > 0


def test_bench_peers_measures_pushy_and_nchan_in_the_same_run(tmp_path: Path) -> None:
    proc = run_pushy(
        "bench", "peers", "--connections", "1000", "--pushes", "5000",
        "--window", "500", "--rate", "4000", "--registry-ttl-s", "3",
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
    # The floor: a bare sender of as many messages to as many connections.
    floor = run["floor"]
    assert (floor["sockets"], floor["messages"]) == (1000, 5000)
    assert run["floor_over_nchan"] == pytest.approx(
        run["nchan"]["node_cpu_s_per_1m"] / floor["sender_cpu_s_per_1m"]
    )
    assert "floor: bare sender CPU-s per 1M" in proc.stdout
    assert "the floor allows any server at most" in proc.stdout
    goals = result["summary"]["goals"]
    assert set(goals) == {"delivered_per_cpu_s", "rss_per_conn", "rss_slab_per_conn"}
    assert all(isinstance(g["met"], bool) for g in goals.values())
    assert (tmp_path / "peers.png").stat().st_size > 0
    assert "Pushy/Nchan" in proc.stdout and "goal:" in proc.stdout


def test_bench_peers_refuses_more_connections_than_one_node_holds() -> None:
    proc = run_pushy("bench", "peers", "--connections", "30000")

    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "--connections must be 1-18,900" in proc.stderr
