"""``pushy bench``: benchmarks that start their own Redis, nodes and devices.

``pushy bench push`` measures direct push: a cluster of node processes on
one Redis registry, devices held by the ``pushy-loadgen`` load generator
(several processes, each under the per-process file limit), and a
:class:`pushy.PushClient` (``redis=``) pushing to random devices in
batches. It reports pushes delivered per second, the latency of each push
from the call to its answer (p50/p99/p99.9), and the node processes'
CPU-seconds per million pushes; results go to ``DIR/push.json`` with a
latency plot next to it.

``pushy bench d2d``, ``queue``, ``idle`` and ``connect`` measure
device-to-device latency, indirect push, memory per idle connection and
connection setup; ``pushy bench peers`` (:mod:`pushy.peers`) runs the idle
and unicast workloads against Pushy and against Nchan in the same run and
reports their ratios.

Limitations: the pushes are sent closed-loop, in batches of ``--batch``
concurrent pushes, so latencies include the wait behind the rest of the
batch (a second phase sends 2,000 pushes one at a time for the latency of
a push that waits behind no other); the load generator, the nodes, Redis
and the client share the machine's cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import benchkit
from .benchkit import cpu_seconds, summarize
from .cluster import Cluster
from .errors import PushyError
from .push import PushClient
from .tokens import issue_token

__all__ = [
    "add_parser",
    "loadgen_path",
    "run_connect",
    "run_d2d",
    "run_idle",
    "run_push",
    "run_queue",
    "run_storm",
]

_SECRET = "pushy-bench-secret-" + "0123456789abcdef" * 3

_PUSH_DOC = """\
Direct push through the Python push library: a cluster of --nodes node
processes on one Redis registry, --devices devices held by pushy-loadgen
processes, and a PushClient(redis=...) pushing --pushes pushes to random
devices in batches of --batch concurrent pushes. It reports pushes
delivered per second, the latency of each push from the call to its
answer (p50/p99/p99.9), and the nodes' CPU-seconds per million pushes, to
DIR/push.json and push.png."""
_PER_PROCESS = 5000


def add_parser(commands: Any) -> None:
    """Add ``bench`` and its scenarios to the ``pushy`` command parsers."""
    bench = commands.add_parser(
        "bench",
        help="run a benchmark",
        description="Run a benchmark scenario; results are written as JSON "
        "(and a plot) under --results.",
    )
    scenarios = bench.add_subparsers(dest="scenario", metavar="SCENARIO")
    push = scenarios.add_parser(
        "push",
        help="direct push through PushClient(redis=) to devices on a cluster",
        description=_PUSH_DOC,
    )
    _add_fleet_options(push)
    push.add_argument("--pushes", type=int, default=200000, metavar="N",
                      help="pushes per run [200000]")
    push.add_argument("--batch", type=int, default=2000, metavar="N",
                      help="concurrent pushes per batch [2000]")
    _add_run_options(push, run_push)

    d2d = scenarios.add_parser(
        "d2d",
        help="device-to-device latency across two nodes, open loop",
        description=_D2D_DOC,
    )
    d2d.add_argument("--rates", default="1000,20000", metavar="R,R",
                     help="messages/s to send, one phase each [1000,20000]")
    d2d.add_argument("--seconds", type=benchkit.number, default=10, metavar="S",
                     help="seconds of sending per run [10]")
    d2d.add_argument("--pairs", type=int, default=1000, metavar="N",
                     help="sender and target devices [1000]")
    _add_run_options(d2d, run_d2d)

    queue = scenarios.add_parser(
        "queue",
        help="indirect push: enqueue to delivery through a message processor",
        description=_QUEUE_DOC,
    )
    _add_fleet_options(queue)
    queue.add_argument("--messages", type=int, default=100000, metavar="N",
                       help="messages enqueued per run [100000]")
    queue.add_argument("--rate", type=benchkit.number, default=0, metavar="R",
                       help="messages/s to enqueue, open loop; 0 = as fast "
                       "as one client can [0]")
    queue.add_argument("--ack", choices=("written", "client"), default="written",
                       help="when a message counts as delivered [written]")
    _add_run_options(queue, run_queue)

    idle = scenarios.add_parser(
        "idle",
        help="memory per idle connection, many nodes sharing the port",
        description=_IDLE_DOC,
    )
    _add_connection_options(idle, 200_000, 16_000, 5_000, "connects/s in all")
    _add_idle_options(idle, registry_ttl_s=30)
    _add_run_options(idle, run_idle)

    connect = scenarios.add_parser(
        "connect",
        help="authenticated upgrades and registry writes per second",
        description=_CONNECT_DOC,
    )
    _add_connection_options(connect, 60_000, 15_000, 50_000,
                            "upgrades/s in all, open loop")
    _add_run_options(connect, run_connect)
    from . import bench_direct

    bench_direct.add_parsers(scenarios)
    _add_storm_parser(scenarios)
    from . import peers  # it builds on this module

    peers.add_parser(scenarios)
    from . import bench_tls

    bench_tls.add_parser(scenarios)
    bench.set_defaults(func=lambda args: _usage(bench))


def _add_idle_options(parser: argparse.ArgumentParser, registry_ttl_s: float) -> None:
    """The options of the scenarios that measure idle connections (idle,
    tls): the nodes' heartbeat and registry TTL, and the settling time."""
    parser.add_argument("--heartbeat-s", type=benchkit.number, default=60, metavar="S",
                        help="the nodes' ping interval [60]")
    parser.add_argument("--settle-s", type=benchkit.number, default=3, metavar="S",
                        help="wait after the count settles, before measuring [3]")
    parser.add_argument("--registry-ttl-s", type=benchkit.number, default=registry_ttl_s,
                        metavar="S", help="the nodes' registry TTL; each node "
                        f"refreshes its records every third of it [{registry_ttl_s:g}]")


def _add_fleet_options(parser: argparse.ArgumentParser) -> None:
    """--devices and --nodes of the scenarios that push to a cluster."""
    parser.add_argument("--devices", type=int, default=10000, metavar="N",
                        help="devices held by pushy-loadgen [10000]")
    parser.add_argument("--nodes", type=int, default=2, metavar="N",
                        help="node processes sharing the device port [2]")


def _add_run_options(parser: argparse.ArgumentParser, run: Any) -> None:
    """The options every scenario takes, and ``run`` as its handler."""
    parser.add_argument("--runs", type=int, default=3, metavar="N",
                        help="runs; the summary is their median, min, max [3]")
    parser.add_argument("--redis", metavar="URL",
                        help="an existing Redis [start a redis-server]")
    parser.add_argument("--results", default="bench-results", metavar="DIR",
                        help="folder of the JSON results and plots "
                        "[bench-results]")
    parser.set_defaults(func=_cli(run))


def _redis_of(args: argparse.Namespace) -> tuple[Any, str]:
    """The scenario's Redis: ``--redis`` (checked to answer), or a
    ``redis-server`` started on a free port (returned, to stop)."""
    from .testing import RedisServer

    if not args.redis:
        server = RedisServer().start()
        return server, server.url
    import redis

    try:
        with redis.Redis.from_url(args.redis, socket_timeout=2) as client:
            client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise PushyError(f"--redis {args.redis!r} does not answer: {exc}") from None
    return None, args.redis


@contextlib.contextmanager
def _workspace(args: argparse.Namespace) -> Iterator[tuple[str, Path, int | None]]:
    """A scenario's Redis (see :func:`_redis_of`) and temporary folder, both
    removed at the end. Yields the Redis URL, the folder, and the pid of the
    ``redis-server`` when the scenario started it (else ``None``)."""
    tmp = Path(tempfile.mkdtemp(prefix="pushy-bench-"))
    try:
        redis, url = _redis_of(args)
        try:
            pid = redis.process.pid if redis is not None and redis.process else None
            yield url, tmp, pid
        finally:
            if redis is not None:
                redis.stop()
            else:
                # The user's Redis keeps nothing of the runs.
                _forget_runs(url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def loadgen_path() -> str:
    """The ``pushy-loadgen`` executable installed with the package.

    Raises:
        PushyError: it is not there (a package built without it).
    """
    return tool_path("pushy-loadgen")


def tool_path(name: str) -> str:
    """A benchmark executable installed with the package (``pushy-loadgen``,
    ``pushy-pusher``): in the package's ``bin`` folder, else on PATH.

    Raises:
        PushyError: it is not there (a package built without it).
    """
    here = Path(__file__).resolve().parent / "bin" / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found:
        return found
    raise PushyError(f"{name} not found (expected {here}); reinstall the package")


def _node_stats(node: Any) -> dict[str, Any]:
    """``GET /v1/stats`` of a cluster node."""
    assert node.push_url is not None
    with urllib.request.urlopen(node.push_url + "/v1/stats", timeout=5) as r:
        return json.load(r)


def _connections(cluster: Cluster) -> int:
    """The devices connected to the running nodes of ``cluster``."""
    return sum(
        int(_node_stats(node)["connections"]) for node in cluster.nodes if node.running
    )


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def run_push(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Run the push scenario; return the results (also written as JSON)."""
    if min(args.devices, args.nodes, args.pushes, args.batch, args.runs) < 1:
        raise PushyError("--devices, --nodes, --pushes, --batch and --runs must "
                         "be >= 1")
    _check_capacity(args.devices, args.nodes, "devices")
    loadgen = loadgen_path()
    devices = [f"bench-{i}" for i in range(args.devices)]
    procs: list[subprocess.Popen[bytes]] = []
    with _workspace(args) as (url, tmp, _):
        prefix = _run_prefix("push")
        cluster = Cluster(args.nodes, url, secret=_SECRET, name="bench",
                          redis_prefix=prefix,
                          max_connections=_NODE_MAX_CONNECTIONS).start()
        try:
            say(f"cluster of {benchkit.count(args.nodes, 'node')} on {url}; connecting "
                f"{args.devices:,} devices")
            for start in range(0, args.devices, _PER_PROCESS):
                chunk = devices[start : start + _PER_PROCESS]
                tokens = tmp / f"tokens-{start}.txt"
                tokens.write_text(
                    "".join(issue_token(_SECRET, d, "bench", ttl=86400) + "\n"
                            for d in chunk)
                )
                procs.append(subprocess.Popen(
                    [loadgen, "--port", str(cluster.port), "--connections",
                     str(len(chunk)), "--tokens", str(tokens), "--rate", "5000",
                     "--hold-s", "86400", "--source-addrs", _DEVICE_SOURCES],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ))
            deadline = time.monotonic() + 120
            while _connections(cluster) < args.devices:
                if time.monotonic() > deadline:
                    raise PushyError(
                        f"only {_connections(cluster)} of {args.devices} "
                        "devices connected within 120 s"
                    )
                time.sleep(0.2)
            say(f"{args.devices:,} devices connected")
            runs = [
                _push_run(cluster, url, prefix, devices, args, say)
                for _ in range(args.runs)
            ]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
            cluster.stop()

    summary = _summarise(runs)
    result = {
        "scenario": "push",
        "devices": args.devices,
        "nodes": args.nodes,
        "pushes_per_run": args.pushes,
        "batch": args.batch,
        "runs": runs,
        "summary": summary,
    }
    written = _write_results(result, Path(args.results), "push",
                             lambda path: _plot(runs, path))
    _table(summary, say)
    say(written)
    return result


def _push_run(
    cluster: Cluster, url: str, prefix: str, devices: list[str],
    args: argparse.Namespace, say: Any,
) -> dict[str, Any]:
    pids = [n.pid for n in cluster.nodes if n.pid is not None]
    rng = random.Random(1)
    with PushClient(redis=url, prefix=prefix, timeout=30) as client:
        # Warm the route cache and the peer links.
        client.push_many([(d, 0) for d in devices[: min(len(devices), 2000)]])
        cpu0 = sum(cpu_seconds(p) for p in pids)
        started = time.perf_counter()
        latencies: list[float] = []
        codes: dict[int, int] = {}
        sent = 0
        while sent < args.pushes:
            n = min(args.batch, args.pushes - sent)
            batch = [(rng.choice(devices), {"seq": sent + i}) for i in range(n)]
            for r in client.push_many(batch):
                codes[r.code] = codes.get(r.code, 0) + 1
                latencies.append(r.latency)
            sent += n
        elapsed = time.perf_counter() - started
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        # Then one push at a time: the latency of a push that waits behind
        # no other.
        single = [
            client.push(rng.choice(devices), {"seq": i}).latency
            for i in range(min(args.pushes, 2000))
        ]
    delivered = codes.get(200, 0)
    run = {
        "pushes": sent,
        "delivered": delivered,
        "codes": {str(k): v for k, v in sorted(codes.items())},
        "seconds": elapsed,
        "delivered_per_s": delivered / elapsed,
        "node_cpu_s": cpu,
        "node_cpu_s_per_1m": cpu / max(delivered, 1) * 1e6,
        "latency_us": {
            "p50": _percentile(latencies, 50) * 1e6,
            "p99": _percentile(latencies, 99) * 1e6,
            "p99.9": _percentile(latencies, 99.9) * 1e6,
            "max": max(latencies) * 1e6,
        },
        "single_latency_us": {
            "p50": _percentile(single, 50) * 1e6,
            "p99": _percentile(single, 99) * 1e6,
            "p99.9": _percentile(single, 99.9) * 1e6,
        },
        # Every k-th latency, at most about 20,000, for the plot.
        "latencies_us_sample": [
            round(x * 1e6, 1) for x in latencies[:: max(1, len(latencies) // 20000)]
        ],
    }
    say(f"run: {delivered:,}/{sent:,} delivered in {elapsed:.2f} s "
        f"({run['delivered_per_s']:,.0f}/s), node CPU {cpu:.2f} s "
        f"({run['node_cpu_s_per_1m']:.2f} s per 1M), batched p50 "
        f"{run['latency_us']['p50']:.0f} us, p99 {run['latency_us']['p99']:.0f} us; "
        f"one at a time p50 {run['single_latency_us']['p50']:.0f} us, p99 "
        f"{run['single_latency_us']['p99']:.0f} us")
    return run


def _spread(runs: list[dict[str, Any]]) -> Any:
    """Return ``stat(get)``: the median, min and max of ``get(run)``."""

    def stat(get: Any) -> dict[str, float]:
        return summarize(get(r) for r in runs)

    return stat


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return None
    return plt


def _write_results(
    result: dict[str, Any], out: Path, name: str, plot: Any
) -> str:
    """Stamp ``result`` with the machine and time, write ``out/NAME.json``
    and the plot ``out/NAME.png``; returns the line that says so."""
    result["machine"] = {"cpus": os.cpu_count()}
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    png = out / f"{name}.png"
    png.unlink(missing_ok=True)  # an earlier run's plot is not this one's
    plot(png)
    if not png.exists():
        return (f"results written to {out / (name + '.json')}; no plot: "
                "matplotlib is not installed (pip install 'pushy[bench]')")
    return f"results written to {out / (name + '.json')} and {png}"


def _publish(
    result: dict[str, Any], args: argparse.Namespace, plot: Any, say: Any,
    heading: str = "over the runs (median [min, max]):",
    footer: Sequence[str] = (),
) -> None:
    """Write ``result`` and its plot (see :func:`_write_results`, named
    after its scenario), then print the heading, its summary, the lines of
    ``footer`` (the goals) and where it was written."""
    written = _write_results(result, Path(args.results), result["scenario"], plot)
    say(heading)
    _say_summary(result["summary"], say)
    for line in footer:
        say(line)
    say(written)


def _verdict(value: float, op: str, goal: float) -> str:
    """``met (VALUE)`` or ``missed (VALUE)`` against a goal ``op goal``."""
    met = value <= goal if op == "<=" else value >= goal
    whole = abs(value) >= 100 or float(value).is_integer()
    shown = f"{value:,.0f}" if whole else f"{value:,.2f}"
    return f"{'met' if met else 'missed'} ({shown})"


def _save(plt: Any, fig: Any, ax: Any, path: Path) -> None:
    """Add the legend, write the figure to ``path`` and free it."""
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    stat = _spread(runs)

    return {
        "delivered_per_s": stat(lambda r: r["delivered_per_s"]),
        "node_cpu_s_per_1m": stat(lambda r: r["node_cpu_s_per_1m"]),
        "p50_us": stat(lambda r: r["latency_us"]["p50"]),
        "p99_us": stat(lambda r: r["latency_us"]["p99"]),
        "p99.9_us": stat(lambda r: r["latency_us"]["p99.9"]),
        "single_p50_us": stat(lambda r: r["single_latency_us"]["p50"]),
        "single_p99_us": stat(lambda r: r["single_latency_us"]["p99"]),
        "single_p99.9_us": stat(lambda r: r["single_latency_us"]["p99.9"]),
        "failed": sum(r["pushes"] - r["delivered"] for r in runs),
    }


def _table(summary: dict[str, Any], say: Any) -> None:
    say("over the runs (median [min, max]):")
    _say_summary(summary, say)


def _say_summary(summary: dict[str, Any], say: Any, indent: str = "  ") -> None:
    """Print ``summary`` as a table: each figure's median, min and max, or
    a count."""
    rows = []
    for key, s in summary.items():
        if isinstance(s, dict) and "median" in s:
            values = (s["median"], s["min"], s["max"])
            rows.append((key, *(_figure(v, values) for v in values)))
        elif isinstance(s, bool):
            rows.append((key, 'yes' if s else 'no', '', ''))
        elif isinstance(s, int):
            rows.append((key, f"{s:,}", "", ""))
        else:
            rows.append((key, str(s), "", ""))
    for line in benchkit.figure_table(rows, ("figure", "median", "min", "max")):
        say(indent + line)


def _figure(v: float, row: tuple[float, ...]) -> str:
    """``v`` as the table shows it: whole numbers without decimals, small
    ones with two, the rest with one (the same for every cell of a row)."""
    if all(float(x).is_integer() for x in row):
        return f"{v:,.0f}"
    if max(abs(x) for x in row) < 100:
        return f"{v:,.2f}"
    return f"{v:,.1f}"


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(runs):
        values = sorted(run["latencies_us_sample"])
        ax.plot(values, [k / len(values) for k in range(len(values))],
                label=f"run {i}")
    ax.set(xscale="log", xlabel="push latency, call to answer (us)",
           ylabel="fraction of pushes", title="pushy bench push")
    _save(plt, fig, ax, path)


class _Stopped(BaseException):
    """SIGTERM reached ``pushy bench``: unwind like Ctrl-C, stopping every
    process the scenario started."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Stopped


def _check_common(args: argparse.Namespace) -> None:
    """Check the options every scenario shares before anything starts:
    the results folder can be written, and the node options are in range.

    Raises:
        PushyError: one is not.
    """
    out = Path(args.results)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".pushy-bench-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PushyError(f"--results {args.results!r} cannot be written: "
                         f"{exc.strerror or exc}") from None
    threads = getattr(args, "threads", 1)
    if not 1 <= threads <= 64:
        raise PushyError(f"--threads must be 1-64, got {threads}")
    ttl = getattr(args, "registry_ttl_s", 30)
    if not 1 <= ttl <= 86400:
        raise PushyError(f"--registry-ttl-s must be 1-86400, got {ttl:g}")
    for name, high in _LONGEST_S.items():
        value = getattr(args, name, None)
        if value is not None and value > high:
            option = "--" + name.replace("_", "-")
            raise PushyError(f"{option} must be at most {high:,} s, got {value:g}")
    nodes = getattr(args, "nodes", 1)
    if nodes > _MAX_NODES:
        raise PushyError(f"--nodes must be at most {_MAX_NODES} on one host, "
                         f"got {nodes}")


#: The longest each duration option may be: a run is bounded in time.
_LONGEST_S = {
    "seconds": 3600, "settle_s": 3600, "before_s": 3600, "after_s": 3600,
    "timeout_s": 3600, "drain_timeout_s": 3600, "heartbeat_s": 86400,
}

#: Node processes one scenario starts at most: 64 hold over a million
#: connections, more than this host has memory for.
_MAX_NODES = 64


def _cli(run: Any) -> Any:
    """The ``pushy bench`` handler of scenario ``run``: exit 1 on a failure,
    130 when interrupted (Ctrl-C or SIGTERM, after stopping what it
    started)."""

    def handler(args: argparse.Namespace) -> int:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            _check_common(args)
            run(args)
        except PushyError as exc:
            print(f"pushy: error: {exc}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, _Stopped):
            print("pushy: interrupted; the benchmark's processes were stopped",
                  file=sys.stderr)
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
        return 0

    return handler


_D2D_DOC = """\
Device-to-device latency across two nodes: node A holds --pairs sender devices,
node B as many targets (both on one Redis registry, each held by a pushy-loadgen
process). The senders send {"t":"d2d"} messages open loop at each rate of
--rates, round robin, to the targets; each message's id is its intended send
time, so the latency from then to its status at the sender includes every
wait (no coordinated omission). A warm-up second fills the route cache
first. Each run starts fresh nodes; it reports the sender-side
p50/p99/p99.9, the node-side histogram of A (arrival to status sent), codes and
node CPU-seconds per million messages, to DIR/d2d.json and d2d.png."""


def _start_loadgen(
    loadgen: str, port: int, tokens: list[str], tmp: Path, name: str, *extra: str
) -> subprocess.Popen[str]:
    """Start a pushy-loadgen holding one connection per token."""
    path = tmp / f"{name}.tokens"
    path.write_text("".join(t + "\n" for t in tokens))
    return subprocess.Popen(
        [loadgen, "--port", str(port), "--connections", str(len(tokens)),
         "--tokens", str(path), "--rate", "5000", "--json",
         "--source-addrs", _DEVICE_SOURCES, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


#: Source addresses of the devices of push, queue and d2d: one address
#: gives the shared device port some 28,000 ephemeral ports, too few for
#: two nodes' worth of devices.
_DEVICE_SOURCES = "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5"


def _wait_ready(proc: subprocess.Popen[str], what: str) -> None:
    """Wait for the loadgen's ready line; fail if not every device connected."""
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if not line:
        raise PushyError(f"{what} load generator exited: {proc.communicate()}")
    ready = json.loads(line)
    if ready.get("failed"):
        raise PushyError(f"{what}: {ready['failed']} devices failed to connect")


def _finish(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise PushyError(f"load generator gave no report: {err[-2000:]}") from None


def _d2d_run(
    url: str, rate: float, args: argparse.Namespace, tmp: Path, say: Any
) -> dict[str, Any]:
    loadgen = loadgen_path()
    prefix = _run_prefix("d2d")
    # The nodes' per-connection rate limit (100/s by default) stays out of
    # the way: each sender sends rate / pairs a second, as does each
    # warm-up device at the warm-up's rate.
    warm_rate = max(2000, args.pairs * 2)
    most = max(rate, warm_rate) / args.pairs
    limit = {"d2d_rate": max(100.0, 4 * most), "d2d_burst": max(100, math.ceil(most))}
    a = Cluster(1, url, secret=_SECRET, name="a", redis_prefix=prefix,
                **limit).start()
    b = Cluster(1, url, secret=_SECRET, name="b", redis_prefix=prefix,
                **limit).start()
    procs: list[subprocess.Popen[str]] = []
    try:
        def tokens(prefix: str) -> list[str]:
            return [issue_token(_SECRET, f"{prefix}{i}", "bench", ttl=86400)
                    for i in range(args.pairs)]

        targets = _start_loadgen(loadgen, b.port, tokens("t"), tmp, "targets",
                                 "--hold-s", "86400")
        procs.append(targets)
        _wait_ready(targets, "targets")
        to = ["--d2d-to", f"t:{args.pairs}"]
        warm = _start_loadgen(
            loadgen, a.port, tokens("w"), tmp, "warm", "--hold-s", "0",
            "--d2d-rate", str(warm_rate), "--d2d-s", "1", *to,
        )
        procs.append(warm)
        _finish(warm, 60)
        node_a, node_b = a.nodes[0], b.nodes[0]
        pids = [p for p in (node_a.pid, node_b.pid) if p is not None]
        before = _node_stats(node_a)["d2d"]
        delivered_before = _node_stats(node_b)["d2d"]["delivered"]
        senders = _start_loadgen(
            loadgen, a.port, tokens("s"), tmp, "senders", "--hold-s", "0",
            "--d2d-rate", str(rate), "--d2d-s", str(args.seconds), *to,
        )
        procs.append(senders)
        _wait_ready(senders, "senders")
        cpu0 = sum(cpu_seconds(p) for p in pids)
        started = time.monotonic()
        with benchkit.Progress("sending", args.seconds, say,
                               unit="s of sending") as progress:
            while senders.poll() is None and time.monotonic() - started < args.seconds:
                time.sleep(0.25)
                progress.update(min(time.monotonic() - started, args.seconds))
        report = _finish(senders, args.seconds + 60)["d2d"]
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        after = _node_stats(node_a)["d2d"]
        delivered = _node_stats(node_b)["d2d"]["delivered"] - delivered_before
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        a.stop()
        b.stop()
    codes = report["codes"]
    ok = int(codes.get("200", 0))
    run = {
        "rate": rate,
        "sent": report["sent"],
        "dropped_by_sender": report["dropped"],
        "answered": report["answered"],
        "codes": codes,
        "send_s": report["send_s"],
        "achieved_per_s": report["sent"] / max(report["send_s"], 1e-9),
        "latency_us": report["latency_us"],
        "node_latency_us": _interval_percentiles(
            before["latency_us"]["buckets"], after["latency_us"]["buckets"]
        ),
        "node_received": after["received"] - before["received"],
        "target_node_delivered": delivered,
        "node_cpu_s": cpu,
        "node_cpu_s_per_1m": cpu / max(ok, 1) * 1e6,
    }
    lat = run["latency_us"]
    node_lat = run["node_latency_us"]
    say(f"  {rate:>8,.0f}/s: {ok:,}/{run['sent']:,} answered 200, p50 "
        f"{lat['p50']:,} us, p99 {lat['p99']:,} us, p99.9 {lat['p99.9']:,} us; "
        f"node p50 {node_lat['p50']:,.0f} us, p99 {node_lat['p99']:,.0f} us; "
        f"node CPU {run['node_cpu_s_per_1m']:.2f} s per 1M")
    if ok < run["sent"] or run["dropped_by_sender"]:
        other = ", ".join(f"{n:,} answered {code}" for code, n in sorted(codes.items())
                          if code != "200")
        raise benchkit.BenchError(
            f"d2d at {rate:,.0f}/s: {run['sent'] - ok:,} of {run['sent']:,} "
            f"messages not answered 200 ({other or 'no answer'}), "
            f"{run['dropped_by_sender']:,} dropped by the senders"
        )
    return run


def _interval_percentiles(
    before: list[list[float]], after: list[list[float]]
) -> dict[str, float]:
    """Percentiles of what a node's histogram counted between two readings.

    Each reading is the node's ``buckets``: ``[upper edge in us, count]``.
    A percentile is the upper edge of its bucket (at most 19% high).
    """
    counts = {edge: n for edge, n in after}
    for edge, n in before:
        counts[edge] = counts.get(edge, 0) - n
    edges = sorted(e for e, n in counts.items() if n > 0)
    total = sum(counts[e] for e in edges)

    def at(q: float) -> float:
        rank, seen = q * total, 0
        for edge in edges:
            seen += counts[edge]
            if seen >= rank:
                return edge
        return edges[-1] if edges else 0.0

    return {"count": total, "p50": at(0.5), "p99": at(0.99), "p99.9": at(0.999)}


def run_d2d(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Run the d2d scenario; return the results (also written as JSON)."""
    rates = benchkit.numbers(args.rates, "--rates")
    if not rates or min(rates) <= 0 or args.seconds <= 0 or args.runs < 1:
        raise PushyError("--rates, --seconds and --runs must be above 0")
    if max(rates) > 200_000 or max(rates) * args.seconds > 10_000_000:
        raise PushyError("--rates must be at most 200000 messages/s, and at "
                         "most 10,000,000 messages per run (--rates x --seconds)")
    if not 1 <= args.pairs <= 18000:
        raise PushyError("--pairs must be between 1 and 18000")
    phases: list[dict[str, Any]] = []
    with _workspace(args) as (url, tmp, _):
        for rate in rates:
            say(f"d2d at {rate:,.0f}/s, {args.pairs:,} senders on node a, "
                f"{args.pairs:,} targets on node b, "
                f"{benchkit.count(args.runs, 'run')}")
            runs = []
            for _ in range(args.runs):
                run = _d2d_run(url, rate, args, tmp, say)
                # Four hops: sender -> node A -> node B -> node A -> sender.
                run["floor_us"] = _hops_floor(4, rate, args.seconds)
                floor = run["floor_us"]["from_due_us"]
                say(f"  the host's floor (4 bare hops): p50 {floor['p50']:,} us, "
                    f"p99 {floor['p99']:,} us")
                runs.append(run)
            phases.append({"rate": rate, "runs": runs, "summary": _d2d_summary(runs)})
    result = {
        "scenario": "d2d",
        "pairs": args.pairs,
        "seconds": args.seconds,
        "phases": phases,
    }
    written = _write_results(result, Path(args.results), "d2d",
                             lambda path: _d2d_plot(phases, path))
    say("over the runs (median [min, max]):")
    for phase in phases:
        say(f"  at {phase['rate']:,.0f}/s:")
        _say_summary(phase["summary"], say, "    ")
    say(written)
    return result


def _hops_floor(hops: int, rate: float, seconds: float) -> dict[str, Any]:
    """The host's floor at ``rate``: ``pushy-hops``, a message relayed by
    bare processes over ``hops`` loopback TCP hops (2 for a direct push:
    service -> node -> device; 4 for a d2d message and its status), for at
    most ``seconds`` (and 50,000 messages)."""
    count = max(100, min(50_000, int(rate * seconds)))
    cmd = [tool_path("pushy-hops"), "--hops", str(hops), "--rate", str(rate),
           "--count", str(count)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              timeout=60 + count / rate)
        return dict(json.loads(done.stdout))
    except (subprocess.TimeoutExpired, ValueError):
        raise benchkit.BenchError("pushy-hops gave no report") from None


def _d2d_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    stat = _spread(runs)

    return {
        "p50_us": stat(lambda r: r["latency_us"]["p50"]),
        "p99_us": stat(lambda r: r["latency_us"]["p99"]),
        "p99.9_us": stat(lambda r: r["latency_us"]["p99.9"]),
        "node_p50_us": stat(lambda r: r["node_latency_us"]["p50"]),
        "node_p99_us": stat(lambda r: r["node_latency_us"]["p99"]),
        "node_p99.9_us": stat(lambda r: r["node_latency_us"]["p99.9"]),
        "floor_p50_us": stat(lambda r: r["floor_us"]["from_due_us"]["p50"]),
        "floor_p99_us": stat(lambda r: r["floor_us"]["from_due_us"]["p99"]),
        "achieved_per_s": stat(lambda r: r["achieved_per_s"]),
        "node_cpu_s_per_1m": stat(lambda r: r["node_cpu_s_per_1m"]),
        "not_200": sum(r["sent"] - int(r["codes"].get("200", 0)) for r in runs),
        "dropped_by_sender": sum(r["dropped_by_sender"] for r in runs),
    }


def _d2d_plot(phases: list[dict[str, Any]], path: Path) -> None:
    _percentile_bars(
        [(f"{p['rate']:,.0f}/s", p["summary"], "{}_us") for p in phases],
        "send to status, at the sender (us)",
        "pushy bench d2d (two nodes, median of runs)", path,
    )


def _percentile_bars(
    groups: list[tuple[str, dict[str, Any], str]], ylabel: str, title: str,
    path: Path,
) -> None:
    """A bar per (label, figures, key) group at p50, p99 and p99.9; a
    figure is ``figures[key.format(q)]``, a number or a median/min/max."""
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ("p50", "p99", "p99.9")
    width = 0.8 / max(len(groups), 1)
    shown: list[float] = []
    for k, (label, figures, key) in enumerate(groups):
        values = [figures[key.format(q)] for q in labels]
        values = [v["median"] if isinstance(v, dict) else v for v in values]
        shown += [v for v in values if v > 0]
        ax.bar([i + k * width for i in range(len(labels))], values, width,
               label=label)
    ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels)
    ax.set(yscale="log", ylabel=ylabel, title=title)
    # A log axis starts the bars a decade below the smallest, so that each
    # bar's height reads as its value.
    if shown:
        ax.set_ylim(bottom=max(1.0, min(shown) / 10), top=max(shown) * 3)
    _save(plt, fig, ax, path)


_QUEUE_DOC = """\
Indirect push, end to end: a cluster of --nodes node processes on one Redis,
--devices devices held by pushy-loadgen (which acks pushes that ask for it),
one message processor (a 'pushy processor' process) and a PushClient that
enqueues --messages messages to random devices, in pipelined batches of
1,000, as fast as it can or open loop at --rate. Each message carries its
enqueue time (CLOCK_MONOTONIC), so the latency from enqueue to the device
is measured where it arrives. A warm-up round (one message per device)
fills the processor's route cache first. It reports messages delivered per
second (first enqueue to last delivery), the latency p50/p99/p99.9, and the
CPU-seconds per million messages of the nodes and of the processor, to
DIR/queue.json and queue.png."""


def run_queue(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Run the queue scenario; return the results (also written as JSON)."""
    if min(args.devices, args.nodes, args.messages, args.runs) < 1 or args.rate < 0:
        raise PushyError("--devices, --nodes, --messages and --runs must be >= 1 "
                         "and --rate >= 0")
    _check_capacity(args.devices, args.nodes, "devices")
    with _workspace(args) as (url, tmp, _):
        runs = [_queue_run(url, args, tmp, say) for _ in range(args.runs)]
    stat = _spread(runs)
    summary = {
        "delivered_per_s": stat(lambda r: r["delivered_per_s"]),
        "enqueued_per_s": stat(lambda r: r["enqueued_per_s"]),
        "p50_us": stat(lambda r: r["latency_us"]["p50"]),
        "p99_us": stat(lambda r: r["latency_us"]["p99"]),
        "p99.9_us": stat(lambda r: r["latency_us"]["p99.9"]),
        "node_cpu_s_per_1m": stat(lambda r: r["node_cpu_s_per_1m"]),
        "processor_cpu_s_per_1m": stat(lambda r: r["processor_cpu_s_per_1m"]),
        "not_delivered": sum(r["messages"] - r["delivered"] for r in runs),
    }
    result = {
        "scenario": "queue",
        "devices": args.devices,
        "nodes": args.nodes,
        "messages_per_run": args.messages,
        "rate": args.rate,
        "ack": args.ack,
        "runs": runs,
        "summary": summary,
    }
    _publish(result, args, lambda path: _queue_plot(runs, path), say)
    return result


def _start_processor(url: str, prefix: str) -> subprocess.Popen[str]:
    """Start a ``pushy processor`` process on the queue of ``prefix`` and
    wait for its start line.

    Raises:
        PushyError: it did not start (it is stopped).
    """
    processor = subprocess.Popen(
        [sys.executable, "-m", "pushy", "processor", "--redis", url,
         "--redis-prefix", prefix, "--consumer", "bench",
         "--max-in-flight", "50000", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert processor.stdout is not None
    if "consuming" not in processor.stdout.readline():
        processor.kill()
        processor.communicate(timeout=30)
        raise PushyError("the message processor did not start")
    return processor


def _delivered(cluster: Cluster) -> int:
    return sum(int(_node_stats(n)["pushes"]["delivered"]) for n in cluster.nodes)


def _queue_run(
    url: str, args: argparse.Namespace, tmp: Path, say: Any
) -> dict[str, Any]:
    loadgen = loadgen_path()
    prefix = _run_prefix("queue")
    cluster = Cluster(args.nodes, url, secret=_SECRET, name="queue",
                      redis_prefix=prefix,
                      max_connections=_NODE_MAX_CONNECTIONS).start()
    procs: list[subprocess.Popen[str]] = []
    processor: subprocess.Popen[str] | None = None
    devices = [f"q{i}" for i in range(args.devices)]
    try:
        for start in range(0, args.devices, 18000):
            chunk = devices[start : start + 18000]
            tokens = [issue_token(_SECRET, d, "bench", ttl=86400) for d in chunk]
            proc = _start_loadgen(loadgen, cluster.port, tokens, tmp,
                                  f"devices-{start}", "--hold-s", "86400",
                                  "--pushes")
            procs.append(proc)
            _wait_ready(proc, "devices")
        processor = _start_processor(url, prefix)
        pids = [n.pid for n in cluster.nodes if n.pid is not None]
        rng = random.Random(1)
        with PushClient(redis=url, prefix=prefix, timeout=30) as client:
            # Warm-up: one message per device fills the processor's routes.
            warm0 = _delivered(cluster)
            client.enqueue_many([(d, 0) for d in devices], ttl=600)
            _wait_delivered(cluster, warm0 + len(devices), 120)
            base = _delivered(cluster)
            cpu0 = sum(cpu_seconds(p) for p in pids)
            pcpu0 = cpu_seconds(processor.pid)
            started = time.perf_counter()
            sent = 0
            while sent < args.messages:
                n = min(1000, args.messages - sent)
                if args.rate > 0:
                    due = started + sent / args.rate
                    wait = due - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    n = min(n, max(1, int(args.rate / 100)))
                ts = time.monotonic_ns()
                client.enqueue_many(
                    [(rng.choice(devices), {"ts": ts, "seq": sent + i})
                     for i in range(n)],
                    ttl=600, ack=args.ack,
                )
                sent += n
            enqueued = time.perf_counter() - started
            _wait_delivered(cluster, base + sent, 300)
            elapsed = time.perf_counter() - started
            cpu = sum(cpu_seconds(p) for p in pids) - cpu0
            pcpu = cpu_seconds(processor.pid) - pcpu0
        delivered = _delivered(cluster) - base
    finally:
        if processor is not None:
            processor.terminate()
            processor.communicate(timeout=30)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        reports = [_finish(p, 60) for p in procs]
        cluster.stop()
    lat = [r["pushes"]["latency_us"] for r in reports]
    run = {
        "messages": sent,
        "delivered": min(delivered, sent),
        "enqueue_s": enqueued,
        "seconds": elapsed,
        "enqueued_per_s": sent / enqueued,
        "delivered_per_s": min(delivered, sent) / elapsed,
        # One load generator holds up to 18,000 devices; with several, p50
        # is their median and the tails their worst.
        "latency_us": {
            "p50": statistics.median(x["p50"] for x in lat),
            "p99": max(x["p99"] for x in lat),
            "p99.9": max(x["p99.9"] for x in lat),
            "max": max(x["max"] for x in lat),
        },
        "node_cpu_s": cpu,
        "processor_cpu_s": pcpu,
        "node_cpu_s_per_1m": cpu / max(sent, 1) * 1e6,
        "processor_cpu_s_per_1m": pcpu / max(sent, 1) * 1e6,
    }
    say(f"run: {sent:,} messages enqueued in {enqueued:.2f} s, delivered in "
        f"{elapsed:.2f} s ({run['delivered_per_s']:,.0f}/s); latency p50 "
        f"{run['latency_us']['p50']:,} us, p99 {run['latency_us']['p99']:,} us; "
        f"CPU per 1M: nodes {run['node_cpu_s_per_1m']:.1f} s, processor "
        f"{run['processor_cpu_s_per_1m']:.1f} s")
    return run


def _wait_delivered(cluster: Cluster, target: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _delivered(cluster) < target:
        if time.monotonic() > deadline:
            raise PushyError(
                f"only {_delivered(cluster):,} of {target:,} pushes delivered "
                f"within {timeout:g} s"
            )
        time.sleep(0.05)


def _queue_plot(runs: list[dict[str, Any]], path: Path) -> None:
    _percentile_bars(
        [(f"run {k}", r["latency_us"], "{}") for k, r in enumerate(runs)],
        "enqueue to device (us)", "pushy bench queue", path,
    )


# ------------------------------------------------------- idle and connect

_IDLE_DOC = """\
Idle connections on this host: a cluster of --nodes node processes sharing
the device port (SO_REUSEPORT) on one Redis registry, and --connections
authenticated idle connections opened by pushy-loadgen processes of at
most --per-process each, at --rate connects/s in all, from the source
addresses of --source-addrs (each gives one range of ephemeral ports).
Once every connection is open, each node has since refreshed all its
registry records (a refresh round comes every third of --registry-ttl-s)
and the counts have settled, it takes the nodes' resident memory (VmRSS,
summed), the kernel's Slab and Redis's used_memory, and compares them with
a baseline taken before the first connect. It reports per connection the
node RSS growth, the slab growth (both socket ends: the load generator is
on the same kernel), their sum,
and Redis's growth; the connect phase's upgrade rate; and the connections
that failed or dropped, by reason. Each run starts fresh nodes; results go
to DIR/idle.json and idle.png."""

_CONNECT_DOC = """\
Connection setup rate on this host: a cluster of --nodes node processes on
one Redis registry and pushy-loadgen processes of at most --per-process
connections each, opening --connections authenticated connections open
loop at --rate upgrades/s in all (split evenly). An upgrade counts once its
hello has arrived, and a node sends hello once Redis has answered the
record's write. It reports the upgrades per second achieved over the
connect phase, the handshake (to 101) and hello latencies, the failures by
reason, the registry writes the nodes counted, and the CPU-seconds per
million upgrades of the nodes, of the load generators and of Redis (when
this command started it). Each run starts fresh nodes; results go to
DIR/connect.json and connect.png."""

#: A node refuses upgrades (503) beyond this, below the 19,000 sockets a
#: process may hold here.
_NODE_MAX_CONNECTIONS = 18_900
#: Connections per node the scenarios plan for when several nodes share
#: the port: SO_REUSEPORT spreads them by a hash, within about 2% of the
#: share here, so a node stays below _NODE_MAX_CONNECTIONS; and at least the
#: 18,000 per process of the benchmark method.
_NODE_SHARE = 18_300
#: Below this many connections per node, per-connection memory figures
#: carry the node's fixed costs (the benchmark method asks for 18,000).
_METHOD_PER_NODE = 18_000


def _capacity(nodes: int) -> int:
    """Connections ``nodes`` node processes hold here: one takes every
    connection up to its limit, several a hash's share each."""
    return _NODE_MAX_CONNECTIONS if nodes == 1 else nodes * _NODE_SHARE


def _check_capacity(count: int, nodes: int, what: str = "connections") -> None:
    """Raise when ``nodes`` cannot hold ``count`` connections.

    Raises:
        PushyError: they cannot; the message names the nodes needed.
    """
    capacity = _capacity(nodes)
    if count <= capacity:
        return
    each = ("below the 19,000 sockets of a process" if nodes == 1
            else f"{_NODE_SHARE:,} each, below the 19,000 sockets of a "
            "process, as the port's hash spreads them")
    raise PushyError(
        f"{benchkit.count(nodes, 'node')} hold{'s' if nodes == 1 else ''} at most "
        f"{capacity:,} "
        f"{what} here ({each}); expected --nodes of at least "
        f"{math.ceil(count / _NODE_SHARE)}"
    )


def _say_method_note(args: argparse.Namespace, say: Any) -> None:
    """Say so when a memory run has fewer connections per node than the
    benchmark method asks for."""
    per_node = args.connections / max(args.nodes, 1)
    if per_node < _METHOD_PER_NODE:
        say(f"note: {per_node:,.0f} connections per node, fewer than the "
            f"{_METHOD_PER_NODE:,} of the benchmark method: the per-connection "
            "figures carry the node's fixed costs")


def _add_connection_options(
    parser: argparse.ArgumentParser, connections: int, per_process: int,
    rate: float, rate_help: str,
) -> None:
    """The options of the idle and connect scenarios."""
    parser.add_argument("--connections", type=int, default=connections,
                        metavar="N", help=f"connections per run [{connections}]")
    parser.add_argument("--nodes", type=int, default=0, metavar="K",
                        help="node processes sharing the device port; 0: one "
                        f"up to {_NODE_MAX_CONNECTIONS:,} connections, else "
                        f"N / {_NODE_SHARE}, rounded up [0]")
    parser.add_argument("--per-process", type=int, default=per_process,
                        metavar="P", help="connections per load generator, "
                        f"below 19000 [{per_process}]")
    parser.add_argument("--rate", type=benchkit.number, default=rate, metavar="R",
                        help=f"{rate_help} [{rate:g}]")
    parser.add_argument("--source-addrs", default="127.0.0.2-17",
                        metavar="A,B|A-N", help="load generator source "
                        "addresses in 127.0.0.0/8, a comma list or a range of "
                        "the last byte [127.0.0.2-17]")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="io threads per node [1]")


def _source_addrs(text: str) -> list[str]:
    """Parse ``--source-addrs``: ``A,B,...`` or ``127.0.0.2-17``.

    Raises:
        PushyError: an address outside 127.0.0.0/8, or a bad range.
    """
    addrs: list[str] = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        head, _, last = item.rpartition(".")
        first, dash, end = last.partition("-")
        try:
            lo, hi = int(first), int(end) if dash else int(first)
        except ValueError:
            raise PushyError(f"--source-addrs: bad address {item!r}") from None
        if not 0 <= lo <= hi <= 255:
            raise PushyError(f"--source-addrs: bad range {item!r}")
        addrs += [f"{head}.{i}" for i in range(lo, hi + 1)]
    for a in addrs:
        parts = a.split(".")
        if len(parts) != 4 or parts[0] != "127" or not all(
            p.isdigit() and int(p) <= 255 for p in parts
        ):
            raise PushyError(f"--source-addrs must be in 127.0.0.0/8, got {a!r}")
    if not addrs:
        raise PushyError("--source-addrs is empty")
    return list(dict.fromkeys(addrs))  # each address once


def _ephemeral_ports() -> int:
    """How many ports ``ip_local_port_range`` offers per address pair."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(hi) - int(lo) + 1
    except (OSError, ValueError):
        return 28_232


def _plan(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    """Check the idle and connect options; pick ``args.nodes`` when 0.
    Returns the connections of each load generator and the source
    addresses.

    Raises:
        PushyError: a value out of range, or more connections than the
            nodes, load generators or source addresses can hold.
    """
    if args.connections < 1 or args.runs < 1 or args.rate <= 0 or args.nodes < 0:
        raise PushyError("--connections, --runs and --rate must be above 0, "
                         "--nodes at least 0")
    if not 1 <= args.per_process < benchkit.MAX_PER_PROCESS:
        raise PushyError(f"--per-process must be 1-{benchkit.MAX_PER_PROCESS - 1}")
    if args.connections / args.rate > 3600:
        raise PushyError(f"--rate {args.rate:g} would take over an hour to open "
                         f"{args.connections:,} connections")
    if args.nodes == 0:
        args.nodes = (1 if args.connections <= _NODE_MAX_CONNECTIONS
                      else math.ceil(args.connections / _NODE_SHARE))
    _check_capacity(args.connections, args.nodes)
    addrs = _source_addrs(args.source_addrs)
    ports = _ephemeral_ports()
    if args.connections > len(addrs) * (ports - 1000):
        raise PushyError(
            f"{len(addrs)} source addresses give {len(addrs) * ports:,} "
            f"ephemeral ports to the shared device port; expected more "
            f"--source-addrs for {args.connections:,} connections"
        )
    return benchkit.split(args.connections, args.per_process), addrs


def _token_files(tmp: Path, prefix: str, sizes: list[int]) -> list[list[str]]:
    """Write one token file per load generator: devices ``PREFIX0`` ...
    ``PREFIX(N-1)`` of account ``bench``, valid for a day. Returns each
    generator's ``--tokens FILE`` options."""
    paths: list[list[str]] = []
    start = 0
    for k, size in enumerate(sizes):
        path = tmp / f"{prefix}tokens-{k}.txt"
        path.write_text("".join(
            issue_token(_SECRET, f"{prefix}{i}", "bench", ttl=86400) + "\n"
            for i in range(start, start + size)
        ))
        paths.append(["--tokens", str(path)])
        start += size
    return paths


#: The Redis key prefixes this process's runs used, removed from a Redis
#: of the user's (--redis) when the scenario ends.
_prefixes: list[str] = []


def _run_prefix(name: str) -> str:
    """A Redis key prefix of one run's own."""
    prefix = f"b{name}{os.getpid()}-{time.monotonic_ns() % 10**9}:"
    _prefixes.append(prefix)
    return prefix


def _forget_runs(url: str) -> None:
    """Delete every key of the runs' prefixes from the Redis at ``url``
    (the registry records, event and queue streams the runs left)."""
    import redis

    with contextlib.suppress(redis.RedisError, OSError):
        with redis.Redis.from_url(url, socket_timeout=10) as client:
            for prefix in _prefixes:
                keys = list(client.scan_iter(match=prefix + "*", count=1000))
                for start in range(0, len(keys), 1000):
                    client.unlink(*keys[start : start + 1000])
    _prefixes.clear()


def _bench_cluster(
    args: argparse.Namespace, url: str, name: str, prefix: str | None = None,
    **options: Any,
) -> Cluster:
    """Start the fresh cluster of one run (``--nodes`` nodes of
    ``--threads`` io threads), on ``prefix`` or a Redis prefix of its own."""
    prefix = prefix or _run_prefix(name)
    return Cluster(
        args.nodes, url, secret=_SECRET, name=name, redis_prefix=prefix,
        threads=args.threads, max_connections=_NODE_MAX_CONNECTIONS, **options,
    ).start()


def _open_connections(
    port: int, held: Callable[[], int], args: argparse.Namespace,
    sizes: list[int], inputs: list[list[str]], addrs: list[str], tmp: Path,
    say: Any, handshake_timeout_s: float = 10, extra: Sequence[str] = (),
    rate: float | None = None,
) -> tuple[list[benchkit.Loadgen], dict[str, Any]]:
    """Start the load generators of a run on ``port`` at ``rate`` (default
    ``--rate``) connects/s in all and wait until each has ended its
    connect phase, showing how many connections the server holds
    (``held()``). Generator k gets ``inputs[k]`` (its ``--tokens FILE``,
    or ``--subscribe PATH:FIRST``) and every one ``extra``. Returns the
    load generators (holding their connections until stopped, or for a
    bounded time) and what was seen: their ready events, the wall time,
    and ``[seconds, connections]`` samples every 0.5 s. A handshake not
    done in ``handshake_timeout_s`` fails (``timeout_connect``,
    ``timeout_101``, ...)."""
    loadgen = loadgen_path()
    wanted = sum(sizes)
    rate = (args.rate if rate is None else rate) / len(sizes)
    connect_s = max(sizes) / rate
    # Bounded: handshakes time out; a generator gives up its connections
    # by itself if this process never stops it.
    timeout = connect_s + handshake_timeout_s + 60
    hold_s = timeout + 300
    started = time.monotonic()
    gens = [
        benchkit.Loadgen.start(
            loadgen, port=port, tokens=None, connections=size,
            rate=rate, hold_s=hold_s, workdir=tmp, name=f"loadgen-{k}",
            source_addrs=addrs,
            extra=[*own, "--handshake-timeout-s", str(handshake_timeout_s),
                   *extra],
        )
        for k, (size, own) in enumerate(zip(sizes, inputs, strict=True))
    ]
    ready: list[dict[str, Any] | None] = [None] * len(gens)
    samples: list[list[float]] = [[0.0, 0]]
    next_sample = started + 0.5
    try:
        with benchkit.Progress("connecting", wanted, say,
                               unit="connected") as progress:
            while None in ready:
                now = time.monotonic()
                if now - started > timeout:
                    raise benchkit.BenchError(
                        f"the load generators did not end their connect phase "
                        f"within {timeout:.0f} s"
                    )
                ready = [r or g.ready() for r, g in zip(ready, gens, strict=True)]
                if now >= next_sample and None in ready:
                    count = held()
                    samples.append([now - started, count])
                    next_sample += 0.5
                    progress.update(count)
                time.sleep(0.05)
    except BaseException:
        benchkit.stop_loadgens(gens)
        raise
    wall = time.monotonic() - started
    samples.append([wall, held()])
    return gens, {"ready": ready, "wall_s": wall, "samples": samples}


def _loadgen_figures(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The connect-phase figures of a run's load generator reports.

    The rate is all connections established over the longest connect phase
    (the generators start together). With several generators, a latency's
    p50 is the median of theirs and p99 and max the worst.
    """
    connected = sum(int(r.get("connected", 0)) for r in reports)
    phase = max((float(r.get("connect_phase_s", 0)) for r in reports), default=0)

    def latency(key: str) -> dict[str, float]:
        lat = [r[key] for r in reports if key in r]
        if not lat:
            return {"p50": 0, "p99": 0, "max": 0}
        return {"p50": statistics.median(x["p50"] for x in lat),
                "p99": max(x["p99"] for x in lat),
                "max": max(x["max"] for x in lat)}

    return {
        "connected": connected,
        "failed": sum(int(r.get("failed", 0)) for r in reports),
        "failed_by_reason": benchkit.merge_reasons(reports, "failed_by_reason"),
        "dropped_by_reason": benchkit.merge_reasons(reports, "dropped_by_reason"),
        "connect_phase_s": phase,
        "upgrades_per_s": connected / phase if phase > 0 else 0.0,
        "handshake_latency_us": latency("handshake_latency_us"),
        "hello_latency_us": latency("hello_latency_us"),
        **({"tls_latency_us": latency("tls_latency_us")}
           if any("tls_latency_us" in r for r in reports) else {}),
    }


def _redis_info(url: str, section: str) -> dict[str, Any]:
    """Redis's ``INFO section``."""
    import redis

    with redis.Redis.from_url(url, socket_timeout=5) as client:
        return dict(client.info(section))


def _close_all(cluster: Cluster, gens: list[benchkit.Loadgen]) -> bool:
    """Stop the load generators, wait (bounded) until the nodes hold no
    connection, and stop the nodes; returns whether every one was closed."""
    benchkit.stop_loadgens(gens)
    try:
        benchkit.wait_for(lambda: _connections(cluster) == 0, 30,
                          "the nodes to see every connection closed", 0.2)
        closed = True
    except (benchkit.BenchError, OSError):
        closed = False
    cluster.stop()
    return closed


def _failures(runs: list[dict[str, Any]], what: str) -> None:
    """Raise when a run did not open every connection (results are written
    before)."""
    bad = [r for r in runs if r["failed"] or r["connected"] < r["wanted"]
           or r.get("held", r["wanted"]) < r["wanted"]]
    if bad:
        reasons = benchkit.merge_reasons(bad, "failed_by_reason")
        dropped = benchkit.merge_reasons(bad, "dropped_by_reason")
        lost = sum(r["wanted"] - min(r["connected"], r.get("held", r["connected"]))
                   for r in bad)
        raise PushyError(
            f"{what}: {lost:,} connections failed or dropped in {len(bad)} of "
            f"{len(runs)} runs: failed {reasons or 0}, dropped {dropped or 0}"
        )


def run_idle(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Run the idle scenario; return the results (also written as JSON).

    Raises:
        PushyError: bad options, a process failed, or a connection failed
            (the results are written first).
    """
    sizes, addrs = _plan(args)
    if args.heartbeat_s <= 0 or args.settle_s < 0:
        raise PushyError("--heartbeat-s must be above 0, --settle-s at least 0")
    runs: list[dict[str, Any]] = []
    with _workspace(args) as (url, tmp, _):
        tokens = _token_files(tmp, "i", sizes)
        say(f"idle: {args.connections:,} connections on "
            f"{benchkit.count(args.nodes, 'node')}, "
            f"{benchkit.count(len(sizes), 'load generator')} "
            f"({max(sizes):,} at most each), "
            f"{args.rate:,.0f} connects/s, {len(addrs)} source addresses, "
            f"Redis {url}, {benchkit.count(args.runs, 'run')}")
        _say_method_note(args, say)
        for index in range(args.runs):
            runs.append(_idle_run(index, url, args, sizes, tokens, addrs, tmp, say))
    stat = _spread(runs)
    summary = {
        "rss_slab_per_conn": stat(lambda r: r["rss_slab_per_conn"]),
        "rss_per_conn": stat(lambda r: r["rss_per_conn"]),
        "rss_per_conn_connected": stat(lambda r: r["rss_per_conn_connected"]),
        "slab_per_conn": stat(lambda r: r["slab_per_conn"]),
        "redis_per_conn": stat(lambda r: r["redis_per_conn"]),
        "held": stat(lambda r: r["held"]),
        "upgrades_per_s": stat(lambda r: r["upgrades_per_s"]),
        "node_cpu_us_per_upgrade": stat(lambda r: r["node_cpu_us_per_upgrade"]),
        "failed": sum(r["failed"] for r in runs),
        "dropped": sum(sum(r["dropped_by_reason"].values()) for r in runs),
    }
    result = {
        "scenario": "idle",
        "units": "bytes per connection; rates per second",
        "connections": args.connections,
        "nodes": args.nodes,
        "threads": args.threads,
        "loadgens": sizes,
        "rate": args.rate,
        "source_addrs": addrs,
        "heartbeat_s": args.heartbeat_s,
        "registry": "redis",
        "registry_ttl_s": args.registry_ttl_s,
        "runs": runs,
        "summary": summary,
    }
    _publish(result, args, lambda path: _idle_plot(runs, path), say,
             "over the runs (median [min, max]; bytes per connection):")
    _failures(runs, "idle")
    return result


def _steady_state(cluster: Cluster, registry_ttl_s: float, settle_s: float) -> None:
    """Wait for the steady state of idle connections: each node has
    refreshed as many registry records as it holds since the call (a full
    refresh round: the memory it takes stays with the node), the counts
    have stayed the same for three readings, and ``settle_s`` more seconds
    have passed.

    Raises:
        BenchError: no such state within ``registry_ttl_s`` + 60 s.
    """
    refreshed0 = [int(_node_stats(n)["fleet"]["refreshed"]) for n in cluster.nodes]
    last: list[list[int]] = []

    def settled() -> bool:
        stats = [_node_stats(n) for n in cluster.nodes]
        held = [int(st["connections"]) for st in stats]
        done = all(
            int(st["fleet"]["refreshed"]) - r0 >= h
            for st, r0, h in zip(stats, refreshed0, held, strict=True)
        )
        last.append(held)
        return done and len(last) >= 3 and last[-1] == last[-2] == last[-3]

    benchkit.wait_for(settled, registry_ttl_s + 60,
                      "a registry refresh round and a steady count", 0.5)
    time.sleep(settle_s)


def _idle_run(
    index: int, url: str, args: argparse.Namespace, sizes: list[int],
    tokens: list[list[str]], addrs: list[str], tmp: Path, say: Any,
    tls: Any = None,
) -> dict[str, Any]:
    """One run of the idle scenario; over TLS with ``tls`` (a
    :class:`pushy.testing.TLSFiles`): the nodes get its certificate and the
    load generators ``--tls``."""
    started = time.monotonic()
    options: dict[str, Any] = {}
    if tls is not None:
        options = {"tls_cert": tls.cert, "tls_key": tls.key}
    cluster = _bench_cluster(args, url, f"idle{index}", heartbeat_s=args.heartbeat_s,
                             registry_ttl_s=args.registry_ttl_s, **options)
    gens: list[benchkit.Loadgen] = []
    try:
        pids = [n.pid for n in cluster.nodes if n.pid is not None]
        # Let the nodes settle before the baseline.
        time.sleep(1.0)
        before = benchkit.sample_memory(pids)
        redis0 = _redis_info(url, "memory")["used_memory"]
        cpu0 = sum(cpu_seconds(p) for p in pids)
        drops0 = benchkit.listen_drops()
        # A slow connect phase is no failure here: handshakes get 30 s.
        gens, seen = _open_connections(cluster.port, lambda: _connections(cluster),
                                       args, sizes, tokens, addrs, tmp, say,
                                       handshake_timeout_s=30,
                                       extra=["--tls"] if tls is not None else ())
        connected_at = time.monotonic()
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        loadgen_cpu = sum(g.cpu_seconds() for g in gens)
        drops = benchkit.listen_drops() - drops0
        rss_connected = benchkit.sample_memory(pids)["rss"]
        say(f"  connected; measuring after the nodes' next registry refresh "
            f"round (every {args.registry_ttl_s / 3:g} s)")
        _steady_state(cluster, args.registry_ttl_s, args.settle_s)
        stats = [_node_stats(n) for n in cluster.nodes]
        per_node = [int(st["connections"]) for st in stats]
        after = benchkit.sample_memory(pids)
        after_s = time.monotonic() - connected_at
        redis1 = _redis_info(url, "memory")["used_memory"]
        peak = sum(benchkit.read_status_kib(p, "VmHWM") for p in pids) * 1024
        registered = sum(
            int(_node_stats(n)["fleet"]["registered"]) for n in cluster.nodes
        )
    finally:
        closed = _close_all(cluster, gens)
    figures = _loadgen_figures([g.report for g in gens])
    held = sum(per_node)
    rss = after["rss"] - before["rss"]
    slab = after["slab"] - before["slab"]

    def per_conn(v: float) -> float:
        return v / held if held else 0.0

    run = {
        "wanted": args.connections,
        **figures,
        "held": held,
        "per_node": per_node,
        "registered": registered,
        "rss_delta": rss,
        "slab_delta": slab,
        "slab_unreclaimable_delta": (
            after["slab_unreclaimable"] - before["slab_unreclaimable"]
        ),
        "redis_delta": redis1 - redis0,
        "rss_peak": peak,
        "rss_per_conn": per_conn(rss),
        "rss_per_conn_connected": per_conn(rss_connected - before["rss"]),
        "slab_per_conn": per_conn(slab),
        "rss_slab_per_conn": per_conn(rss + slab),
        "redis_per_conn": per_conn(redis1 - redis0),
        "node_cpu_s_connect": cpu,
        "node_cpu_us_per_upgrade": cpu / max(figures["connected"], 1) * 1e6,
        "loadgen_cpu_us_per_upgrade": loadgen_cpu / max(figures["connected"], 1)
        * 1e6,
        "tls_handshakes": sum(int(st.get("tls_handshakes", 0)) for st in stats),
        "listen_drops": drops,
        "connect_wall_s": seen["wall_s"],
        "measured_after_s": after_s,
        "progress": seen["samples"],
        "all_closed": closed,
        "run_s": time.monotonic() - started,
    }
    say(f"run {index}: {held:,}/{args.connections:,} held on "
        f"{benchkit.count(args.nodes, 'node')} "
        f"({min(per_node):,} to {max(per_node):,} each), node RSS "
        f"{run['rss_per_conn']:,.0f} B/conn ({run['rss_per_conn_connected']:,.0f} "
        f"before the refresh round), RSS + slab "
        f"{run['rss_slab_per_conn']:,.0f} B/conn, Redis "
        f"{run['redis_per_conn']:,.0f} B/conn; {run['upgrades_per_s']:,.0f} "
        f"upgrades/s, {drops:,} listen drops; failed "
        f"{run['failed_by_reason'] or 0}, dropped {run['dropped_by_reason'] or 0}")
    return run


def _idle_plot(runs: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, (bars, curve) = plt.subplots(1, 2, figsize=(11, 4))
    keys = (("rss_per_conn", "node RSS"), ("slab_per_conn", "kernel slab"),
            ("rss_slab_per_conn", "RSS + slab"), ("redis_per_conn", "Redis"))
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        bars.bar([i + k * width for i in range(len(keys))],
                 [run[key] for key, _ in keys], width, label=f"run {k}")
        t, n = zip(*run["progress"], strict=True) if run["progress"] else ((), ())
        curve.plot(t, n, marker=".", label=f"run {k}")
    bars.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(keys))])
    bars.set_xticklabels([label for _, label in keys])
    bars.set(ylabel="bytes per idle connection",
             title=f"pushy bench idle: {runs[0]['wanted']:,} connections")
    bars.legend()
    curve.set(xlabel="seconds since the first connect",
              ylabel="connections on the nodes", title="connect phase")
    _save(plt, fig, curve, path)


def run_connect(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Run the connect scenario; return the results (also written as JSON).

    Raises:
        PushyError: bad options, a process failed, or a connection failed
            (the results are written first).
    """
    sizes, addrs = _plan(args)
    runs: list[dict[str, Any]] = []
    with _workspace(args) as (url, tmp, redis_pid):
        tokens = _token_files(tmp, "c", sizes)
        say(f"connect: {args.connections:,} upgrades per run at "
            f"{args.rate:,.0f}/s from {benchkit.count(len(sizes), 'load generator')}, "
            f"{benchkit.count(args.nodes, 'node')} on Redis {url}, "
            f"{benchkit.count(args.runs, 'run')}")
        for index in range(args.runs):
            run = _connect_run(index, url, redis_pid, args, sizes, tokens, addrs,
                               tmp, say)
            run["floor"] = _connect_floor(args)
            floor = run["floor"]
            say(f"  the host's floor (a bare client and server, the same TCP "
                f"work): {floor['connections_per_s']:,.0f} connections/s, CPU per "
                f"connection {floor['client_cpu_us_per_connection']:.1f} us client, "
                f"{floor['server_cpu_us_per_connection']:.1f} us server")
            runs.append(run)
    stat = _spread(runs)
    summary = {
        "upgrades_per_s": stat(lambda r: r["upgrades_per_s"]),
        "registry_writes_per_s": stat(lambda r: r["registry_writes_per_s"]),
        "hello_p50_us": stat(lambda r: r["hello_latency_us"]["p50"]),
        "hello_p99_us": stat(lambda r: r["hello_latency_us"]["p99"]),
        "handshake_p50_us": stat(lambda r: r["handshake_latency_us"]["p50"]),
        "handshake_p99_us": stat(lambda r: r["handshake_latency_us"]["p99"]),
        "node_cpu_s_per_1m": stat(lambda r: r["node_cpu_s_per_1m"]),
        "loadgen_cpu_s_per_1m": stat(lambda r: r["loadgen_cpu_s_per_1m"]),
        "floor_connections_per_s": stat(lambda r: r["floor"]["connections_per_s"]),
        "floor_client_cpu_us": stat(
            lambda r: r["floor"]["client_cpu_us_per_connection"]),
        "floor_server_cpu_us": stat(
            lambda r: r["floor"]["server_cpu_us_per_connection"]),
        "failed": sum(r["failed"] for r in runs),
        "registry_errors": sum(r["registry_errors"] for r in runs),
    }
    if redis_pid is not None:
        summary["redis_cpu_s_per_1m"] = stat(lambda r: r["redis_cpu_s_per_1m"])
    result = {
        "scenario": "connect",
        "units": "rates per second; latencies in microseconds",
        "connections": args.connections,
        "nodes": args.nodes,
        "threads": args.threads,
        "loadgens": sizes,
        "rate": args.rate,
        "source_addrs": addrs,
        "runs": runs,
        "summary": summary,
    }
    _publish(result, args, lambda path: _connect_plot(runs, args.rate, path), say)
    _failures(runs, "connect")
    return result


def _connect_run(
    index: int, url: str, redis_pid: int | None, args: argparse.Namespace,
    sizes: list[int], tokens: list[list[str]], addrs: list[str], tmp: Path,
    say: Any,
) -> dict[str, Any]:
    cluster = _bench_cluster(args, url, f"conn{index}")
    gens: list[benchkit.Loadgen] = []

    def fleet(key: str) -> int:
        return sum(int(_node_stats(n)["fleet"][key]) for n in cluster.nodes)

    try:
        pids = [n.pid for n in cluster.nodes if n.pid is not None]
        benchkit.wait_for(lambda: all(
            _node_stats(n)["fleet"]["redis"] == "up" for n in cluster.nodes
        ), 10, "the nodes' Redis links")
        time.sleep(0.5)
        registered0, errors0 = fleet("registered"), fleet("registry_errors")
        cpu0 = sum(cpu_seconds(p) for p in pids)
        rcpu0 = cpu_seconds(redis_pid) if redis_pid else 0.0
        drops0 = benchkit.listen_drops()
        gens, seen = _open_connections(cluster.port, lambda: _connections(cluster),
                                       args, sizes, tokens, addrs, tmp, say)
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        rcpu = cpu_seconds(redis_pid) - rcpu0 if redis_pid else 0.0
        lcpu = sum(g.cpu_seconds() for g in gens)
        drops = benchkit.listen_drops() - drops0
        registered = fleet("registered") - registered0
        errors = fleet("registry_errors") - errors0
    finally:
        _close_all(cluster, gens)
    figures = _loadgen_figures([g.report for g in gens])
    n = max(figures["connected"], 1)
    phase = figures["connect_phase_s"]
    run = {
        "wanted": args.connections,
        "rate_target_per_s": args.rate,
        **figures,
        "registered": registered,
        "registry_errors": errors,
        "registry_writes_per_s": registered / phase if phase > 0 else 0.0,
        "node_cpu_s": cpu,
        "node_cpu_s_per_1m": cpu / n * 1e6,
        "loadgen_cpu_s_per_1m": lcpu / n * 1e6,
        "redis_cpu_s_per_1m": rcpu / n * 1e6,
        "listen_drops": drops,
        "connect_wall_s": seen["wall_s"],
    }
    lat = run["hello_latency_us"]
    say(f"run {index}: {figures['connected']:,}/{args.connections:,} upgraded in "
        f"{phase:.2f} s ({run['upgrades_per_s']:,.0f}/s of {args.rate:,.0f}/s), "
        f"{registered:,} registry writes ({errors} errors); hello p50 "
        f"{lat['p50']:,.0f} us, p99 {lat['p99']:,.0f} us; CPU-s per 1M: nodes "
        f"{run['node_cpu_s_per_1m']:.1f}, load generators "
        f"{run['loadgen_cpu_s_per_1m']:.1f}; {drops:,} listen drops; failed "
        f"{figures['failed_by_reason'] or 0}")
    return run


def _connect_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The host's floor for connection setup: ``pushy-connects``, a bare
    client and a bare server doing an upgrade's TCP work (connect, a
    400-byte request, a 250-byte answer) for as many connections (at most
    18,000), from as many source addresses."""
    cmd = [tool_path("pushy-connects"),
           "--connections", str(min(args.connections, 18_000)),
           "--sources", str(min(len(_source_addrs(args.source_addrs)), 200))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              timeout=120)
        return dict(json.loads(done.stdout))
    except (subprocess.TimeoutExpired, ValueError):
        raise benchkit.BenchError("pushy-connects gave no report") from None


def _connect_plot(runs: list[dict[str, Any]], target: float, path: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, (rate, lat) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"run {k}" for k in range(len(runs))]
    width = 0.4
    xs = range(len(runs))
    rate.bar([x - width / 2 for x in xs], [r["upgrades_per_s"] for r in runs],
             width, label="upgrades achieved")
    rate.bar([x + width / 2 for x in xs],
             [r["floor"]["connections_per_s"] for r in runs], width,
             label="floor: bare TCP connections")
    rate.set_xticks(list(xs))
    rate.set_xticklabels(labels)
    rate.axhline(target, color="black", linestyle="--", label="offered")
    rate.set(ylabel="authenticated upgrades per second",
             title="pushy bench connect")
    # Room above the bars for the legend.
    top = max([target] + [r["floor"]["connections_per_s"] for r in runs]
              + [r["upgrades_per_s"] for r in runs])
    rate.set_ylim(top=top * 1.45)
    rate.legend(loc="upper right", fontsize="small")
    width = 0.8 / 4
    series = (("handshake_latency_us", "p50"), ("handshake_latency_us", "p99"),
              ("hello_latency_us", "p50"), ("hello_latency_us", "p99"))
    for k, (key, q) in enumerate(series):
        lat.bar([i + k * width for i in range(len(runs))],
                [max(r[key][q], 1) for r in runs], width,
                label=f"{key.split('_')[0]} {q}")
    lat.set_xticks([i + width * 1.5 for i in range(len(runs))])
    lat.set_xticklabels(labels)
    lat.set(yscale="log", ylabel="from connect() (us)", title="latency")
    highest = max(max(r[key][q], 1) for r in runs for key, q in series)
    lat.set_ylim(bottom=10, top=highest * 30)  # room for the legend
    lat.legend(loc="upper right", fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------ storm

_STORM_DOC = """\
A reconnect storm: the node that holds every device is killed (SIGKILL)
while messages are queued to the devices. Node 0 of a cluster of --nodes
node processes starts alone on the shared device port (SO_REUSEPORT), on
one Redis registry; pushy-loadgen processes of at most --per-process
devices each connect --devices devices to it at --connect-rate, with
--reconnect (a dropped device connects again after a random wait below a
step that starts at --reconnect-min-ms and doubles up to
--reconnect-max-ms). Then the other nodes join the port, a message
processor (a 'pushy processor' process) starts, and a PushClient queues
messages to random devices open loop at --rate, from --before-s seconds
before the kill to --after-s seconds after it. It measures the time from
the kill until every device is connected to another node and registered
there (a node sends the new hello once Redis has the device's record; every
record is then read back and must name a live node), the latency from each
drop to its new hello, the surviving nodes' CPU time and the host's listen
drops in the storm, and, once the queue has drained (within
--drain-timeout-s), the messages enqueued, delivered (distinct, counted at
the devices by a sequence number), duplicated, dead-lettered and still
queued: lost = enqueued - delivered - dead letters - still queued. Each run
starts fresh nodes; results go to DIR/storm.json and storm.png."""

#: Queue shards of the processor and the client (both default to 4).
_QUEUE_SHARDS = 4
#: A storm node may hold every device: a process holds 20,000 files here.
_STORM_MAX_CONNECTIONS = 19_200


def _add_storm_parser(scenarios: Any) -> None:
    """The ``storm`` scenario's options."""
    storm = scenarios.add_parser(
        "storm",
        help="a node with 19k devices killed: re-registration, queued messages",
        description=_STORM_DOC,
    )
    add = storm.add_argument
    add("--devices", type=int, default=19_000, metavar="N",
        help="devices, all on the node that is killed; at most 19000 [19000]")
    add("--nodes", type=int, default=4, metavar="N",
        help="node processes, the killed one included; at least 2 [4]")
    add("--rate", type=benchkit.number, default=2000, metavar="R",
        help="messages/s enqueued, open loop [2000]")
    add("--before-s", type=benchkit.number, default=3, metavar="S",
        help="seconds of enqueueing before the kill [3]")
    add("--after-s", type=benchkit.number, default=7, metavar="S",
        help="seconds of enqueueing after the kill [7]")
    add("--ack", choices=("written", "client"), default="written",
        help="when a message counts as delivered [written]")
    add("--per-process", type=int, default=10_000, metavar="P",
        help="devices per load generator, below 19000 [10000]")
    add("--connect-rate", type=benchkit.number, default=5000, metavar="R",
        help="connects/s of the devices before the kill, in all [5000]")
    add("--source-addrs", default="127.0.0.2-5", metavar="A,B|A-N",
        help="load generator source addresses in 127.0.0.0/8 [127.0.0.2-5]")
    add("--reconnect-min-ms", type=benchkit.number, default=100, metavar="MS",
        help="first backoff step of a dropped device [100]")
    add("--reconnect-max-ms", type=benchkit.number, default=5000, metavar="MS",
        help="largest backoff step [5000]")
    add("--threads", type=int, default=1, metavar="N", help="io threads per node [1]")
    add("--timeout-s", type=benchkit.number, default=60, metavar="S",
        help="the devices must be registered again within this [60]")
    add("--drain-timeout-s", type=benchkit.number, default=120, metavar="S",
        help="the queue must drain within this after the last enqueue [120]")
    _add_run_options(storm, run_storm)


def _storm_check(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    """Check the storm options; return the devices of each load generator
    and the source addresses.

    Raises:
        PushyError: a value out of range.
    """
    if not 1 <= args.devices <= benchkit.MAX_PER_PROCESS:
        raise PushyError(
            f"--devices must be 1-{benchkit.MAX_PER_PROCESS} (one node holds "
            f"them all), got {args.devices}"
        )
    if args.nodes < 2:
        raise PushyError(f"--nodes must be at least 2 (one is killed), got {args.nodes}")
    if args.runs < 1 or args.threads < 1:
        raise PushyError("--runs and --threads must be at least 1")
    if min(args.rate, args.before_s, args.after_s, args.connect_rate,
           args.timeout_s, args.drain_timeout_s) <= 0:
        raise PushyError("--rate, --before-s, --after-s, --connect-rate, "
                         "--timeout-s and --drain-timeout-s must be above 0")
    if not 0 < args.reconnect_min_ms <= args.reconnect_max_ms <= 3_600_000:
        raise PushyError("--reconnect-min-ms must be above 0 and at most "
                         "--reconnect-max-ms, at most 3600000")
    if not 1 <= args.per_process < benchkit.MAX_PER_PROCESS:
        raise PushyError(f"--per-process must be 1-{benchkit.MAX_PER_PROCESS - 1}")
    addrs = _source_addrs(args.source_addrs)
    if args.devices > len(addrs) * (_ephemeral_ports() - 1000):
        raise PushyError("expected more --source-addrs for that many --devices")
    return benchkit.split(args.devices, args.per_process), addrs


def run_storm(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Run the storm scenario; return the results (also written as JSON).

    Raises:
        PushyError: bad options, a process failed, or a run did not
            register every device again or lost messages (the results are
            written first).
    """
    sizes, addrs = _storm_check(args)
    runs: list[dict[str, Any]] = []
    with _workspace(args) as (url, tmp, redis_pid):
        tokens = _token_files(tmp, "s", sizes)
        say(f"storm: {args.devices:,} devices on node 0 of {args.nodes}, "
            f"{benchkit.count(len(sizes), 'load generator')}, {args.rate:,.0f} "
            f"messages/s from {args.before_s:g} s before the kill to "
            f"{args.after_s:g} s after, Redis {url}, "
            f"{benchkit.count(args.runs, 'run')}")
        for index in range(args.runs):
            runs.append(_storm_run(index, url, redis_pid, args, sizes, tokens,
                                   addrs, tmp, say))
    stat = _spread(runs)
    summary = {
        "reregistered_s": stat(lambda r: r["reregistered_s"]),
        "all_connected_s": stat(lambda r: r["all_connected_s"]),
        "registry_checked_s": stat(lambda r: r["registry_checked_s"]),
        "reconnect_p50_ms": stat(lambda r: r["reconnect_latency_ms"]["p50"]),
        "reconnect_p99_ms": stat(lambda r: r["reconnect_latency_ms"]["p99"]),
        "reconnect_max_ms": stat(lambda r: r["reconnect_latency_ms"]["max"]),
        "node_cpu_s_storm": stat(lambda r: r["node_cpu_s_storm"]),
        "listen_drops": stat(lambda r: r["listen_drops"]),
        "delivery_p99_ms": stat(lambda r: r["messages"]["latency_ms"]["p99"]),
        "delivery_max_ms": stat(lambda r: r["messages"]["latency_ms"]["max"]),
        "enqueued": sum(r["messages"]["enqueued"] for r in runs),
        "delivered": sum(r["messages"]["delivered"] for r in runs),
        "duplicates": sum(r["messages"]["duplicates"] for r in runs),
        "dead_letters": sum(r["messages"]["dead_letters"] for r in runs),
        "still_queued": sum(r["messages"]["still_queued"] for r in runs),
        "lost": sum(r["messages"]["lost"] for r in runs),
        "not_reregistered": sum(r["not_reregistered"] for r in runs),
        "goal_3s_met": all(r["reregistered_s"] <= 3 for r in runs),
    }
    result = {
        "scenario": "storm",
        "units": "seconds from the kill; latencies in milliseconds",
        "devices": args.devices,
        "nodes": args.nodes,
        "threads": args.threads,
        "loadgens": sizes,
        "source_addrs": addrs,
        "rate": args.rate,
        "before_s": args.before_s,
        "after_s": args.after_s,
        "ack": args.ack,
        "connect_rate": args.connect_rate,
        "reconnect_min_ms": args.reconnect_min_ms,
        "reconnect_max_ms": args.reconnect_max_ms,
        "runs": runs,
        "summary": summary,
    }
    _publish(result, args, lambda path: _storm_plot(runs, path), say)
    bad = [r for r in runs if r["not_reregistered"] or r["messages"]["lost"]
           or r["messages"]["still_queued"] or r["messages"]["enqueue_errors"]]
    if bad:
        errors = benchkit.merge_reasons([r["messages"] for r in bad],
                                        "enqueue_errors")
        raise PushyError(
            f"storm: {len(bad)} of {len(runs)} runs did not register every "
            f"device again or did not deliver every message: "
            f"{summary['not_reregistered']:,} devices not registered again, "
            f"{summary['lost']:,} messages lost, {summary['still_queued']:,} "
            f"still queued; enqueue errors: {errors or 'none'}"
        )
    return result


class _Enqueuer:
    """Queues ``{"ts", "seq"}`` messages to random devices open loop at
    ``rate``, from a thread of its own, until :meth:`stop`; ``seq`` counts
    from 0, so the devices can tell every message apart."""

    def __init__(self, url: str, prefix: str, devices: list[str], rate: float,
                 ack: str) -> None:
        self.sent = 0
        self.errors: dict[str, int] = {}
        self._url, self._prefix, self._devices = url, prefix, devices
        self._rate, self._ack = rate, ack
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="enqueuer",
                                        daemon=True)

    def start(self) -> _Enqueuer:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop and return how many messages Redis took."""
        self._stop.set()
        self._thread.join(60)
        return self.sent

    def _run(self) -> None:
        try:
            self._enqueue()
        except Exception as exc:  # noqa: BLE001 - any failure fails the run
            # Part of a batch may be queued: the count would be wrong from
            # here on, so the run stops enqueueing and reports the error.
            what = f"{type(exc).__name__}: {exc}"[:200]
            self.errors[what] = self.errors.get(what, 0) + 1

    def _enqueue(self) -> None:
        rng = random.Random(7)
        tick = max(1, int(self._rate / 100))  # at most 100 batches a second
        with PushClient(redis=self._url, prefix=self._prefix, timeout=10) as client:
            started = time.perf_counter()
            while not self._stop.is_set():
                wait = started + self.sent / self._rate - time.perf_counter()
                if wait > 0:
                    self._stop.wait(wait)
                    continue
                ts = time.monotonic_ns()
                batch = [(rng.choice(self._devices), {"ts": ts, "seq": self.sent + i})
                         for i in range(tick)]
                client.enqueue_many(batch, ttl=600, ack=self._ack)
                self.sent += tick


def _storm_run(
    index: int, url: str, redis_pid: int | None, args: argparse.Namespace,
    sizes: list[int], tokens: list[Path], addrs: list[str], tmp: Path, say: Any,
) -> dict[str, Any]:
    prefix = _run_prefix(f"storm{index}-")
    cluster = Cluster(
        args.nodes, url, secret=_SECRET, name=f"storm{index}", redis_prefix=prefix,
        threads=args.threads, max_connections=_STORM_MAX_CONNECTIONS,
    )
    doomed, *others = cluster.nodes
    devices = [f"s{i}" for i in range(args.devices)]
    gens: list[benchkit.Loadgen] = []
    processor: subprocess.Popen[str] | None = None
    enqueuer: _Enqueuer | None = None
    try:
        doomed.start(cluster.start_timeout)
        say(f"run {index}: connecting {args.devices:,} devices to {doomed.node_id}")
        gens, _ = _open_connections(
            cluster.port, lambda: _connections(cluster), args, sizes, tokens,
            addrs, tmp, say, handshake_timeout_s=30,
            rate=args.connect_rate,
            extra=["--reconnect", "--pushes", "--stats-s", "0.05",
                   "--reconnect-min-ms", str(args.reconnect_min_ms),
                   "--reconnect-max-ms", str(args.reconnect_max_ms)],
        )  # fmt: skip
        held = int(_node_stats(doomed)["connections"])
        if held != args.devices:
            raise PushyError(f"{doomed.node_id} holds {held:,} of {args.devices:,} "
                             "devices after the connect phase")
        for node in others:
            node.start(cluster.start_timeout)
        benchkit.wait_for(lambda: all(
            _node_stats(n)["fleet"]["redis"] == "up" for n in cluster.nodes
        ), 10, "the nodes' Redis links")
        processor = _start_processor(url, prefix)
        enqueuer = _Enqueuer(url, prefix, devices, args.rate, args.ack).start()
        time.sleep(args.before_s)
        watched = _watch_storm(doomed, others, gens, redis_pid, enqueuer, url, prefix,
                               devices, args, say)
        sent = enqueuer.stop()
        drained = _drain(url, prefix, gens, sent, args, say)
    finally:
        if enqueuer is not None:
            enqueuer.stop()
        totals = ""
        if processor is not None:
            processor.terminate()
            try:
                totals = processor.communicate(timeout=30)[0].strip()
            except subprocess.TimeoutExpired:
                processor.kill()
                processor.communicate()
        benchkit.stop_loadgens(gens)
        cluster.stop()
    reports = [g.report for g in gens]
    pushes = [r.get("pushes", {}) for r in reports]
    storm = [r.get("reconnect", {}) for r in reports]
    last = max((int(r.get("last_reconnect_ns", 0)) for r in storm), default=0)
    first = min((int(r["first_loss_ns"]) for r in storm if r.get("first_loss_ns")),
                default=0)
    killed = watched["killed_ns"]
    delivered = sum(int(p.get("distinct", 0)) for p in pushes)
    lat = [p["latency_us"] for p in pushes if p.get("latency_us", {}).get("count")]
    messages = {
        "enqueued": sent,
        "enqueue_errors": enqueuer.errors if enqueuer else {},
        "enqueued_in_storm": watched["enqueued_in_storm"],
        "delivered": delivered,
        "received": sum(int(p.get("received", 0)) for p in pushes),
        "duplicates": sum(int(p.get("duplicates", 0)) for p in pushes),
        "dead_letters": drained["dead_letters"],
        "still_queued": drained["still_queued"],
        "lost": sent - delivered - drained["dead_letters"] - drained["still_queued"],
        "drain_s": drained["drain_s"],
        # Enqueue to device; with several load generators p50 is the
        # median of theirs and p99 and max the worst.
        "latency_ms": {
            "p50": statistics.median(x["p50"] for x in lat) / 1000 if lat else 0,
            "p99": max((x["p99"] for x in lat), default=0) / 1000,
            "max": max((x["max"] for x in lat), default=0) / 1000,
        },
    }
    run = {
        "devices": args.devices,
        "killed": doomed.node_id,
        "reregistered_s": (last - killed) / 1e9 if last > killed else None,
        "first_loss_after_kill_s": (first - killed) / 1e9 if first else None,
        **{k: v for k, v in watched.items() if k not in ("killed_ns",)},
        "drops": sum(int(r.get("dropped", 0)) for r in reports),
        "reconnects": sum(int(r.get("reconnects", 0)) for r in storm),
        "reconnect_attempts": sum(int(r.get("attempts", 0)) for r in storm),
        "reconnect_failed_by_reason": benchkit.merge_reasons(storm, "failed_by_reason"),
        "reconnect_gave_up": sum(int(r.get("gave_up", 0)) for r in storm),
        "reconnect_latency_ms": _pooled_latency(storm),
        "messages": messages,
        "processor_totals": totals.splitlines()[-1] if totals else "",
    }
    m = messages
    say(f"run {index}: every device connected elsewhere {run['all_connected_s']:.2f} s "
        f"after the kill, the last registered at {run['reregistered_s']:.2f} s "
        f"(registry checked at {run['registry_checked_s']:.2f} s); reconnect "
        f"p50 {run['reconnect_latency_ms']['p50']:,.0f} ms, p99 "
        f"{run['reconnect_latency_ms']['p99']:,.0f} ms; {run['listen_drops']:,} "
        f"listen drops; messages: {m['enqueued']:,} enqueued, {m['delivered']:,} "
        f"delivered, {m['duplicates']:,} duplicates, {m['dead_letters']:,} dead, "
        f"{m['still_queued']:,} queued, {m['lost']:,} lost")
    return run


def _watch_storm(
    doomed: Any, others: list[Any], gens: list[benchkit.Loadgen],
    redis_pid: int | None, enqueuer: _Enqueuer, url: str, prefix: str,
    devices: list[str], args: argparse.Namespace, say: Any,
) -> dict[str, Any]:
    """Kill ``doomed`` and follow the storm: every 0.1 s, the devices on
    each surviving node, the records they wrote since the kill and the
    devices the load generators hold, until all are connected again and
    every record in Redis names a surviving node, and on until
    ``--after-s`` has passed since the kill.

    Raises:
        BenchError: the devices were not all registered again within
            ``--timeout-s``.
    """
    pids = [n.pid for n in others if n.pid is not None]
    live = {n.node_id for n in others}

    def fleet(node: Any) -> dict[str, Any]:
        return dict(_node_stats(node)["fleet"])

    registered0 = sum(int(fleet(n)["registered"]) for n in others)
    cpu0 = sum(cpu_seconds(p) for p in pids)
    lcpu0 = sum(g.cpu_seconds() for g in gens)
    rcpu0 = cpu_seconds(redis_pid) if redis_pid else 0.0
    drops0 = benchkit.listen_drops()
    sent0 = enqueuer.sent
    samples: list[dict[str, Any]] = [{
        "t": 0.0, "per_node": [0] * len(others), "registered": 0,
        "loadgens_open": args.devices,
    }]
    killed = time.monotonic_ns()
    # The signal only: the process takes a while to exit (its kernel closes
    # every socket), and that is part of the storm.
    assert doomed.process is not None
    doomed.process.send_signal(signal.SIGKILL)
    connected_s = checked_s = exited_s = None
    found: dict[str, int] = {}
    figures: dict[str, Any] = {}
    next_say = 1.0
    while True:
        t = (time.monotonic_ns() - killed) / 1e9
        if exited_s is None and doomed.process.poll() is not None:
            exited_s = t
        try:
            stats = [_node_stats(n) for n in others]
        except OSError as exc:  # too busy to answer in 5 s, or gone
            if t > args.timeout_s:
                raise benchkit.BenchError(f"a surviving node does not answer: {exc}")
            time.sleep(0.1)
            continue
        per_node = [int(st["connections"]) for st in stats]
        registered = sum(int(st["fleet"]["registered"]) for st in stats) - registered0
        held = sum(int((g.last_event("stats") or {}).get("open", 0)) for g in gens)
        samples.append({"t": round(t, 3), "per_node": per_node,
                        "registered": registered, "loadgens_open": held})
        if connected_s is None and sum(per_node) == held == args.devices:
            connected_s = t
            figures = {
                "node_cpu_s_storm": sum(cpu_seconds(p) for p in pids) - cpu0,
                "loadgen_cpu_s_storm": sum(g.cpu_seconds() for g in gens) - lcpu0,
                "redis_cpu_s_storm": (cpu_seconds(redis_pid) - rcpu0
                                      if redis_pid else 0.0),
                "listen_drops": benchkit.listen_drops() - drops0,
                "enqueued_in_storm": enqueuer.sent - sent0,
                "rejects": _merged_rejects(stats),
                "registry_errors": sum(int(st["fleet"]["registry_errors"])
                                       for st in stats),
            }
        if connected_s is not None and checked_s is None:
            found = _registry_nodes(url, prefix, devices)
            if set(found) <= live:
                checked_s = (time.monotonic_ns() - killed) / 1e9
        if checked_s is not None and t >= args.after_s:
            break
        if t > args.timeout_s:
            raise benchkit.BenchError(
                f"the devices were not all registered again within "
                f"{args.timeout_s:g} s of the kill: nodes hold {sum(per_node):,}, "
                f"load generators {held:,} of {args.devices:,}; records by node "
                f"{found or 'not read'}"
            )
        if t >= next_say:
            say(f"  {t:4.1f} s after the kill: {sum(per_node):,} connected to "
                f"the other nodes, {registered:,} registered")
            next_say += 1.0
        time.sleep(0.1)
    return {
        "killed_ns": killed,
        "killed_exited_s": exited_s,
        "all_connected_s": connected_s,
        "registry_checked_s": checked_s,
        "records_by_node": found,
        "not_reregistered": args.devices - sum(found.get(n, 0) for n in live),
        "per_node_after": dict(zip((n.node_id for n in others),
                                   samples[-1]["per_node"], strict=True)),
        **figures,
        "timeline": samples,
    }


def _merged_rejects(stats: list[dict[str, Any]]) -> dict[str, int]:
    """The nodes' ``rejects`` counters, summed, the non-zero ones."""
    total: dict[str, int] = {}
    for st in stats:
        for why, n in st.get("rejects", {}).items():
            if isinstance(n, int) and n:
                total[why] = total.get(why, 0) + n
    return total


def _registry_nodes(url: str, prefix: str, devices: list[str]) -> dict[str, int]:
    """Read every device's registry record; return how many name each
    node (``"none"``: no record)."""
    import redis

    counts: dict[str, int] = {}
    with redis.Redis.from_url(url, socket_timeout=10, decode_responses=True) as r:
        for start in range(0, len(devices), 2000):
            keys = [f"{prefix}dev:{{{d}}}" for d in devices[start : start + 2000]]
            for value in r.mget(keys):
                node = "none" if value is None else str(value).split("\t", 1)[0]
                counts[node] = counts.get(node, 0) + 1
    return counts


def _queue_counts(url: str, prefix: str) -> tuple[int, int]:
    """Return the entries still in the queue's shards, and the dead letters."""
    import redis

    with redis.Redis.from_url(url, socket_timeout=10) as r:
        queued = sum(int(r.xlen(f"{prefix}q:{k}")) for k in range(_QUEUE_SHARDS))
        return queued, int(r.xlen(f"{prefix}q:dead"))


def _drain(
    url: str, prefix: str, gens: list[benchkit.Loadgen], sent: int,
    args: argparse.Namespace, say: Any,
) -> dict[str, Any]:
    """Wait (up to ``--drain-timeout-s``) until the queue's shards are
    empty, then (up to 10 s more) until the devices have received every
    message that is not a dead letter. Returns ``still_queued``,
    ``dead_letters`` and ``drain_s``; a queue that does not drain is
    reported, not raised."""
    started = time.monotonic()

    def distinct() -> int:
        return sum(int((g.last_event("stats") or {}).get("distinct", 0)) for g in gens)

    queued, dead = _queue_counts(url, prefix)
    while queued and time.monotonic() - started < args.drain_timeout_s:
        time.sleep(0.2)
        queued, dead = _queue_counts(url, prefix)
    if not queued:
        end = time.monotonic() + 10
        while distinct() < sent - dead and time.monotonic() < end:
            time.sleep(0.1)
    drain_s = time.monotonic() - started
    if queued:
        say(f"  {queued:,} messages still queued {args.drain_timeout_s:g} s "
            "after the last enqueue")
    return {"still_queued": queued, "dead_letters": dead, "drain_s": drain_s}


def _pooled_latency(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The reconnect latency over all load generators, in ms, from each
    one's 100 quantiles weighted by its count (so within a quantile step
    of the exact figure): p50, p90, p99, max, and ``cdf``, ``[ms,
    fraction]`` at 100 points."""
    points: list[tuple[float, float]] = []
    top = 0.0
    for r in reports:
        lat = r.get("latency_us", {})
        qs, n = lat.get("quantiles") or [], int(lat.get("count", 0))
        points += [(q / 1000, n / len(qs)) for q in qs]
        top = max(top, float(lat.get("max", 0)) / 1000)
    points.sort()
    total = sum(w for _, w in points)
    if not total:
        return {"count": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "cdf": []}
    cdf: list[list[float]] = []
    seen = 0.0
    for ms, w in points:
        seen += w
        cdf.append([ms, seen / total])

    def at(q: float) -> float:
        return next(ms for ms, f in cdf if f >= q - 1e-9)

    step = max(1, len(cdf) // 100)
    return {"count": round(total), "p50": at(0.5), "p90": at(0.9),
            "p99": at(0.99), "max": top, "cdf": cdf[::step] + [cdf[-1]]}


def _storm_plot(runs: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, (nodes, reg, lat) = plt.subplots(1, 3, figsize=(15, 4))
    first = runs[0]
    t = [s["t"] for s in first["timeline"]]
    for k, node in enumerate(first["per_node_after"]):
        nodes.plot(t, [s["per_node"][k] for s in first["timeline"]], label=node)
    nodes.plot(t, [s["loadgens_open"] for s in first["timeline"]], "k:",
               label="open at the load generators")
    nodes.set(xlabel="seconds since the kill", ylabel="devices connected",
              title=f"pushy bench storm: {first['devices']:,} devices, run 0")
    nodes.legend()
    for k, run in enumerate(runs):
        reg.plot([s["t"] for s in run["timeline"]],
                 [s["registered"] for s in run["timeline"]], label=f"run {k}")
    reg.axvline(3, color="black", linestyle="--", label="goal (3 s)")
    reg.set(xlabel="seconds since the kill",
            ylabel="records written by the other nodes",
            title="devices registered again")
    reg.legend()
    for k, run in enumerate(runs):
        cdf = run["reconnect_latency_ms"]["cdf"]
        lat.plot([ms / 1000 for ms, _ in cdf], [f for _, f in cdf], label=f"run {k}")
    lat.set(xlabel="seconds from a drop to the new hello",
            ylabel="fraction of the devices", title="reconnect latency")
    _save(plt, fig, lat, path)
