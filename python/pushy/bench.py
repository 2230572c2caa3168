"""``pushy bench``: benchmarks that start their own Redis, nodes and devices.

``pushy bench push`` measures direct push: a cluster of node processes on
one Redis registry, devices held by the ``pushy-loadgen`` load generator
(several processes, each under the per-process file limit), and a
:class:`pushy.PushClient` (``redis=``) pushing to random devices in
batches. It reports pushes delivered per second, the latency of each push
from the call to its answer (p50/p99/p99.9), and the node processes'
CPU-seconds per million pushes; results go to ``RESULTS/push.json`` with a
latency plot next to it.

Limitations: the pushes are sent closed-loop, in batches of ``--batch``
concurrent pushes, so latencies include the wait behind the rest of the
batch (a second phase sends 2,000 pushes one at a time for the latency of
a push that waits behind no other); the load generator, the nodes, Redis
and the client share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .benchkit import cpu_seconds, summarize
from .cluster import Cluster
from .errors import PushyError
from .push import PushClient
from .tokens import issue_token

__all__ = [
    "add_parser",
    "loadgen_path",
    "run_d2d",
    "run_push",
    "run_queue",
]

_SECRET = "pushy-bench-secret-" + "0123456789abcdef" * 3
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
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    push.add_argument("--devices", type=int, default=10000, metavar="N",
                      help="devices held by pushy-loadgen [10000]")
    push.add_argument("--nodes", type=int, default=2, metavar="N",
                      help="node processes sharing the device port [2]")
    push.add_argument("--pushes", type=int, default=200000, metavar="N")
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
    d2d.add_argument("--seconds", type=float, default=10, metavar="S",
                     help="seconds of sending per run [10]")
    d2d.add_argument("--pairs", type=int, default=1000, metavar="N",
                     help="sender and target devices [1000]")
    _add_run_options(d2d, run_d2d)

    queue = scenarios.add_parser(
        "queue",
        help="indirect push: enqueue to delivery through a message processor",
        description=_QUEUE_DOC,
    )
    queue.add_argument("--devices", type=int, default=10000, metavar="N",
                       help="devices held by pushy-loadgen [10000]")
    queue.add_argument("--nodes", type=int, default=2, metavar="N",
                       help="node processes sharing the device port [2]")
    queue.add_argument("--messages", type=int, default=100000, metavar="N",
                       help="messages enqueued per run [100000]")
    queue.add_argument("--rate", type=float, default=0, metavar="R",
                       help="messages/s to enqueue, open loop; 0 = as fast "
                       "as one client can [0]")
    queue.add_argument("--ack", choices=("written", "client"), default="written",
                       help="when a message counts as delivered [written]")
    _add_run_options(queue, run_queue)

    bench.set_defaults(func=lambda args: _usage(bench))


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


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def loadgen_path() -> str:
    """The ``pushy-loadgen`` executable installed with the package.

    Raises:
        PushyError: it is not there (a package built without it).
    """
    here = Path(__file__).resolve().parent / "bin" / "pushy-loadgen"
    if here.exists():
        return str(here)
    found = shutil.which("pushy-loadgen")
    if found:
        return found
    raise PushyError(
        f"pushy-loadgen not found (expected {here}); reinstall the package"
    )


def _node_stats(node: Any) -> dict[str, Any]:
    """``GET /v1/stats`` of a cluster node."""
    assert node.push_url is not None
    with urllib.request.urlopen(node.push_url + "/v1/stats", timeout=5) as r:
        return json.load(r)


def _connections(cluster: Cluster) -> int:
    return sum(int(_node_stats(node)["connections"]) for node in cluster.nodes)


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def run_push(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Run the push scenario; return the results (also written as JSON)."""
    if args.devices < 1 or args.nodes < 1 or args.pushes < 1 or args.batch < 1:
        raise PushyError("--devices, --nodes, --pushes and --batch must be >= 1")
    loadgen = loadgen_path()
    tmp = Path(tempfile.mkdtemp(prefix="pushy-bench-"))
    devices = [f"bench-{i}" for i in range(args.devices)]
    redis, url = _redis_of(args)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cluster = Cluster(args.nodes, url, secret=_SECRET, name="bench").start()
        try:
            say(f"cluster of {args.nodes} nodes on {url}; connecting "
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
                     "--hold-s", "86400"],
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
                _push_run(cluster, url, devices, args, say)
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
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)

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
    cluster: Cluster, url: str, devices: list[str], args: argparse.Namespace,
    say: Any,
) -> dict[str, Any]:
    pids = [n.pid for n in cluster.nodes if n.pid is not None]
    rng = random.Random(1)
    with PushClient(redis=url, timeout=30) as client:
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
    plot(out / f"{name}.png")
    return f"results written to {out / (name + '.json')} and {out / (name + '.png')}"


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
    for key in ("delivered_per_s", "node_cpu_s_per_1m", "p50_us", "p99_us",
                "p99.9_us", "single_p50_us", "single_p99_us", "single_p99.9_us"):
        s = summary[key]
        say(f"  {key:<20} {s['median']:>12,.1f} [{s['min']:,.1f}, {s['max']:,.1f}]")
    say(f"  {'failed pushes':<20} {summary['failed']:>12,}")


def _say_summary(summary: dict[str, Any], say: Any, indent: str = "  ") -> None:
    """Print each figure of ``summary``: median [min, max], or a count."""
    for key, s in summary.items():
        if isinstance(s, dict) and "median" in s:
            say(f"{indent}{key:<26} {s['median']:>12,.1f} "
                f"[{s['min']:,.1f}, {s['max']:,.1f}]")
        elif isinstance(s, int):
            say(f"{indent}{key:<26} {s:>12,}")
        else:
            say(f"{indent}{key:<26} {s!s:>12}")


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


def _cli(run: Any) -> Any:
    """The ``pushy bench`` handler of scenario ``run``: exit 1 on a failure."""

    def handler(args: argparse.Namespace) -> int:
        try:
            run(args)
        except PushyError as exc:
            print(f"pushy: error: {exc}", file=sys.stderr)
            return 1
        return 0

    return handler


_D2D_DOC = """\
Device-to-device latency across two nodes: node A holds N sender devices,
node B N targets (both on one Redis registry, each held by a pushy-loadgen
process). The senders send {"t":"d2d"} messages open loop at each rate of
--rates, round robin, to the targets; each message's id is its intended send
time, so the latency from then to its status at the sender includes every
wait (no coordinated omission). A warm-up second fills the route cache
first. Each run starts fresh nodes; it reports the sender-side p50/p99/
p99.9, the node-side histogram of A (arrival to status sent), codes and
node CPU-seconds per million messages, to RESULTS/d2d.json and d2d.png."""


def _start_loadgen(
    loadgen: str, port: int, tokens: list[str], tmp: Path, name: str, *extra: str
) -> subprocess.Popen[str]:
    """Start a pushy-loadgen holding one connection per token."""
    path = tmp / f"{name}.tokens"
    path.write_text("".join(t + "\n" for t in tokens))
    return subprocess.Popen(
        [loadgen, "--port", str(port), "--connections", str(len(tokens)),
         "--tokens", str(path), "--rate", "5000", "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


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
    a = Cluster(1, url, secret=_SECRET, name="a").start()
    b = Cluster(1, url, secret=_SECRET, name="b").start()
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
            "--d2d-rate", str(max(2000, args.pairs * 2)), "--d2d-s", "1", *to,
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
        f"{lat['p50']} us, p99 {lat['p99']} us, p99.9 {lat['p99.9']} us; node "
        f"p50 {node_lat['p50']:.0f} us, p99 {node_lat['p99']:.0f} us; node CPU "
        f"{run['node_cpu_s_per_1m']:.2f} s per 1M")
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
    try:
        rates = [float(r) for r in str(args.rates).split(",") if r.strip()]
    except ValueError:
        raise PushyError(f"--rates must be numbers, got {args.rates!r}") from None
    if not rates or min(rates) <= 0 or args.seconds <= 0 or args.runs < 1:
        raise PushyError("--rates, --seconds and --runs must be above 0")
    if not 1 <= args.pairs <= 18000:
        raise PushyError("--pairs must be between 1 and 18000")
    tmp = Path(tempfile.mkdtemp(prefix="pushy-bench-"))
    redis, url = _redis_of(args)
    phases: list[dict[str, Any]] = []
    try:
        for rate in rates:
            say(f"d2d at {rate:,.0f}/s, {args.pairs:,} senders on node a, "
                f"{args.pairs:,} targets on node b, {args.runs} runs")
            runs = [_d2d_run(url, rate, args, tmp, say) for _ in range(args.runs)]
            phases.append({"rate": rate, "runs": runs, "summary": _d2d_summary(runs)})
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
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


def _d2d_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    stat = _spread(runs)

    return {
        "p50_us": stat(lambda r: r["latency_us"]["p50"]),
        "p99_us": stat(lambda r: r["latency_us"]["p99"]),
        "p99.9_us": stat(lambda r: r["latency_us"]["p99.9"]),
        "node_p50_us": stat(lambda r: r["node_latency_us"]["p50"]),
        "node_p99_us": stat(lambda r: r["node_latency_us"]["p99"]),
        "node_p99.9_us": stat(lambda r: r["node_latency_us"]["p99.9"]),
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
    for k, (label, figures, key) in enumerate(groups):
        values = [figures[key.format(q)] for q in labels]
        values = [v["median"] if isinstance(v, dict) else v for v in values]
        ax.bar([i + k * width for i in range(len(labels))], values, width,
               label=label)
    ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels)
    ax.set(yscale="log", ylabel=ylabel, title=title)
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
RESULTS/queue.json and queue.png."""


def run_queue(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Run the queue scenario; return the results (also written as JSON)."""
    if min(args.devices, args.nodes, args.messages, args.runs) < 1 or args.rate < 0:
        raise PushyError("--devices, --nodes, --messages and --runs must be >= 1 "
                         "and --rate >= 0")
    tmp = Path(tempfile.mkdtemp(prefix="pushy-bench-"))
    redis, url = _redis_of(args)
    try:
        runs = [_queue_run(url, args, tmp, say) for _ in range(args.runs)]
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
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
    written = _write_results(result, Path(args.results), "queue",
                             lambda path: _queue_plot(runs, path))
    say("over the runs (median [min, max]):")
    _say_summary(summary, say)
    say(written)
    return result


def _delivered(cluster: Cluster) -> int:
    return sum(int(_node_stats(n)["pushes"]["delivered"]) for n in cluster.nodes)


def _queue_run(
    url: str, args: argparse.Namespace, tmp: Path, say: Any
) -> dict[str, Any]:
    loadgen = loadgen_path()
    prefix = f"bq{os.getpid()}-{time.monotonic_ns() % 10**9}:"
    cluster = Cluster(args.nodes, url, secret=_SECRET, name="queue",
                      redis_prefix=prefix).start()
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
        processor = subprocess.Popen(
            [sys.executable, "-m", "pushy", "processor", "--redis", url,
             "--redis-prefix", prefix, "--consumer", "bench",
             "--max-in-flight", "50000", "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert processor.stdout is not None
        if "consuming" not in processor.stdout.readline():
            raise PushyError("the message processor did not start")
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

