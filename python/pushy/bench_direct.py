"""``pushy bench unicast`` and ``pushy bench latency``: direct push from a
service to devices, the cost and the speed of the push path.

The service is ``pushy-pusher``, a C++ program on the push library (the
engine of ``PushClient(redis=...)``): it looks each device up in the
registry, then in its route cache, and sends the push over a peer link to
the node that holds it. The devices are held by ``pushy-loadgen``
processes with ``--pushes``: each push's data carries the time it was due
(CLOCK_MONOTONIC ns), so its latency is taken where it arrives.

Limitations: the nodes, the devices, the service and Redis share the
host's cores, and on loopback a node's TCP sends also run the receiving
end's TCP (the device's kernel work on a real network), so a node's CPU
figure here is higher than it would be on a host of its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from . import bench, benchkit
from .errors import PushyError

__all__ = ["add_parsers", "fanout_floor", "run_latency", "run_unicast"]

UNICAST_DOC = """\
Direct pushes delivered per second and their CPU cost: --connections
devices on --nodes node processes sharing the device port (on one Redis),
and a service (pushy-pusher, the push library) sending --pushes pushes to
random devices as fast as the answers come back, --window in flight. Each
run starts fresh nodes and devices and pushes once to every device first
(untimed), so the route cache and the peer links are warm. It reports the
pushes delivered per second (counted by the devices), the CPU-seconds per
million delivered of the nodes, the devices and the service, and the
latency from send to answer, to DIR/unicast.json and unicast.png."""

LATENCY_DOC = """\
Direct push latency, service to device, open loop: a service
(pushy-pusher, the push library) sends to random devices at each rate of
--rates for --seconds, each push due at a fixed time and carrying that
time, so a late send counts in its latency (no coordinated omission). The
devices measure due time to arrival; the service measures due time to the
node's answer. Each run of each rate starts fresh nodes, devices and
service, warmed by one untimed push per device. It reports p50/p99/p99.9
at the device and at the service, sent, delivered and failed pushes, and
node CPU-seconds per million, to DIR/latency.json and latency.png."""


def add_parsers(scenarios: Any) -> None:
    """Add the unicast and latency scenarios to ``pushy bench``."""
    unicast = scenarios.add_parser(
        "unicast", help="direct pushes per second and CPU-seconds per 1M",
        description=UNICAST_DOC,
    )
    _add_direct_options(unicast)
    unicast.add_argument("--pushes", type=int, default=1_000_000, metavar="N",
                         help="timed pushes per run [1000000]")
    unicast.add_argument("--window", type=int, default=4000, metavar="W",
                         help="pushes in flight [4000]")
    bench._add_run_options(unicast, run_unicast)

    latency = scenarios.add_parser(
        "latency", help="direct push latency, service to device, open loop",
        description=LATENCY_DOC,
    )
    _add_direct_options(latency)
    latency.add_argument("--rates", default="1000,10000", metavar="R,R",
                         help="pushes/s, one phase each [1000,10000]")
    latency.add_argument("--seconds", type=benchkit.number, default=10, metavar="S",
                         help="seconds of pushing per run [10]")
    bench._add_run_options(latency, run_latency)


def _add_direct_options(parser: argparse.ArgumentParser) -> None:
    bench._add_connection_options(parser, 10_000, 10_000, 10_000,
                                  "device connects/s in all")
    parser.add_argument("--data-bytes", type=int, default=0, metavar="B",
                        help="padding added to each push's data [0]")


def _check(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    # A push's data is at most the node's max_push_bytes (64 KiB) with its
    # {"ts":...} around the padding.
    if not 0 <= args.data_bytes <= 65_000:
        raise PushyError("--data-bytes must be 0-65000")
    return bench._plan(args)


def run_unicast(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Run the unicast scenario; return the results (also written as JSON).

    Raises:
        PushyError: bad options, a process failed, or pushes failed (the
            results are written first).
    """
    if args.pushes < 1 or args.window < 1:
        raise PushyError("--pushes and --window must be at least 1")
    if args.pushes > 10_000_000:
        raise PushyError(f"--pushes must be at most 10,000,000, got {args.pushes:,}")
    sizes, addrs = _check(args)
    runs: list[dict[str, Any]] = []
    with bench._workspace(args) as (url, tmp, _):
        tokens = bench._token_files(tmp, "u", sizes)
        say(f"unicast: {args.pushes:,} pushes per run, {args.window:,} in "
            f"flight, to {args.connections:,} devices on "
            f"{benchkit.count(args.nodes, 'node')} "
            f"({benchkit.count(args.threads, 'io thread')} each), Redis {url}, "
            f"{benchkit.count(args.runs, 'run')}")
        for index in range(args.runs):
            mode = ["--count", str(args.pushes), "--window", str(args.window)]
            run = _direct_run(index, url, args, sizes, tokens, addrs, tmp, mode, say,
                              "u", args.pushes)
            run["floor"] = _fanout_floor(args)
            run["node_cpu_over_floor"] = (
                run["node_cpu_s_per_1m"] / run["floor"]["sender_cpu_s_per_1m"]
            )
            runs.append(run)
            say(f"run {index}: {run['delivered']:,}/{run['sent']:,} delivered in "
                f"{run['seconds']:.2f} s ({run['delivered_per_s']:,.0f}/s); "
                f"CPU-s per 1M: nodes {run['node_cpu_s_per_1m']:.2f}, devices "
                f"{run['device_cpu_s_per_1m']:.2f}, service "
                f"{run['service_cpu_s_per_1m']:.2f}; answer p50 "
                f"{run['answer_latency_us']['p50']:,} us; the host's floor (a bare "
                f"sender, the same sends): {run['floor']['sender_cpu_s_per_1m']:.2f} "
                f"CPU-s per 1M, {run['floor']['messages_per_s']:,.0f}/s")
    stat = bench._spread(runs)
    summary = {
        "delivered_per_s": stat(lambda r: r["delivered_per_s"]),
        "node_cpu_s_per_1m": stat(lambda r: r["node_cpu_s_per_1m"]),
        "device_cpu_s_per_1m": stat(lambda r: r["device_cpu_s_per_1m"]),
        "service_cpu_s_per_1m": stat(lambda r: r["service_cpu_s_per_1m"]),
        "host_cpu_s_per_1m": stat(lambda r: r["host_cpu_s_per_1m"]),
        "delivered_per_node_cpu_s": stat(lambda r: r["delivered_per_node_cpu_s"]),
        "answer_p50_us": stat(lambda r: r["answer_latency_us"]["p50"]),
        "answer_p99_us": stat(lambda r: r["answer_latency_us"]["p99"]),
        "device_p50_us": stat(lambda r: r["device_latency_us"]["p50"]),
        "device_p99_us": stat(lambda r: r["device_latency_us"]["p99"]),
        "floor_sender_cpu_s_per_1m": stat(lambda r: r["floor"]["sender_cpu_s_per_1m"]),
        "floor_receiver_cpu_s_per_1m": stat(
            lambda r: r["floor"]["receiver_cpu_s_per_1m"]),
        "floor_messages_per_s": stat(lambda r: r["floor"]["messages_per_s"]),
        "node_cpu_over_floor": stat(lambda r: r["node_cpu_over_floor"]),
        "failed": sum(r["sent"] - r["delivered"] for r in runs),
    }
    result = {
        "scenario": "unicast",
        "units": "rates per second; CPU-seconds per 1M delivered; microseconds",
        "connections": args.connections,
        "nodes": args.nodes,
        "threads": args.threads,
        "pushes_per_run": args.pushes,
        "window": args.window,
        "data_bytes": args.data_bytes,
        "runs": runs,
        "summary": summary,
        "goals": {"delivered_per_s": 300_000, "node_cpu_s_per_1m": 2},
    }
    goals = result["goals"]
    floor = summary["floor_sender_cpu_s_per_1m"]["median"]
    footer = [
        f"goal delivered_per_s >= {goals['delivered_per_s']:,}: "
        + bench._verdict(summary["delivered_per_s"]["median"], ">=",
                         goals["delivered_per_s"])
        + f"; the floor sends {summary['floor_messages_per_s']['median']:,.0f}/s",
        f"goal node_cpu_s_per_1m <= {goals['node_cpu_s_per_1m']:,}: "
        + bench._verdict(summary["node_cpu_s_per_1m"]["median"], "<=",
                         goals["node_cpu_s_per_1m"])
        + f"; a bare sender pays {floor:.2f}",
    ]
    bench._publish(result, args, lambda path: _unicast_plot(runs, path), say,
                   footer=footer)
    _check_delivered(runs, "unicast")
    return result


def run_latency(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Run the latency scenario; return the results (also written as JSON).

    Raises:
        PushyError: bad options, a process failed, or pushes failed (the
            results are written first).
    """
    rates = benchkit.numbers(args.rates, "--rates")
    if not rates or min(rates) <= 0 or args.seconds <= 0:
        raise PushyError("--rates and --seconds must be above 0")
    if max(rates) > 200_000 or max(rates) * args.seconds > 10_000_000:
        raise PushyError("--rates must be at most 200000 pushes/s, and at most "
                         "10,000,000 pushes per run (--rates x --seconds)")
    sizes, addrs = _check(args)
    phases: list[dict[str, Any]] = []
    with bench._workspace(args) as (url, tmp, _):
        tokens = bench._token_files(tmp, "l", sizes)
        for rate in rates:
            say(f"latency at {rate:,g}/s for {args.seconds:g} s, "
                f"{args.connections:,} devices on "
                f"{benchkit.count(args.nodes, 'node')}, "
                f"{benchkit.count(args.runs, 'run')}")
            runs = []
            for index in range(args.runs):
                mode = ["--rate", str(rate), "--seconds", str(args.seconds)]
                run = _direct_run(index, url, args, sizes, tokens, addrs, tmp,
                                  mode, say, "l", int(rate * args.seconds))
                # Two hops: service -> node -> device.
                run["floor_us"] = bench._hops_floor(2, rate, args.seconds)
                runs.append(run)
                dev, ans = run["device_latency_us"], run["answer_latency_us"]
                say(f"  run {index}: {run['delivered']:,}/{run['sent']:,} "
                    f"delivered ({run['sent_per_s']:,.0f}/s sent); at the device "
                    f"p50 {dev['p50']:,} us, p99 {dev['p99']:,} us, p99.9 "
                    f"{dev['p99.9']:,} us; answer p50 {ans['p50']:,} us, p99 "
                    f"{ans['p99']:,} us; node CPU {run['node_cpu_s_per_1m']:.2f} "
                    f"s per 1M; the host's floor (2 bare hops) p50 "
                    f"{run['floor_us']['from_due_us']['p50']:,} us, p99 "
                    f"{run['floor_us']['from_due_us']['p99']:,} us")
            stat = bench._spread(runs)
            summary = {
                "device_p50_us": stat(lambda r: r["device_latency_us"]["p50"]),
                "device_p99_us": stat(lambda r: r["device_latency_us"]["p99"]),
                "device_p99.9_us": stat(lambda r: r["device_latency_us"]["p99.9"]),
                "answer_p50_us": stat(lambda r: r["answer_latency_us"]["p50"]),
                "answer_p99_us": stat(lambda r: r["answer_latency_us"]["p99"]),
                "answer_p99.9_us": stat(lambda r: r["answer_latency_us"]["p99.9"]),
                "floor_p50_us": stat(lambda r: r["floor_us"]["from_due_us"]["p50"]),
                "floor_p99_us": stat(lambda r: r["floor_us"]["from_due_us"]["p99"]),
                "sent_per_s": stat(lambda r: r["sent_per_s"]),
                "node_cpu_s_per_1m": stat(lambda r: r["node_cpu_s_per_1m"]),
                "failed": sum(r["sent"] - r["delivered"] for r in runs),
            }
            phases.append({"rate": rate, "runs": runs, "summary": summary})
    result = {
        "scenario": "latency",
        "units": "microseconds; rates per second",
        "connections": args.connections,
        "nodes": args.nodes,
        "threads": args.threads,
        "seconds": args.seconds,
        "data_bytes": args.data_bytes,
        "phases": phases,
        "goals": {"at_rate": 10_000, "device_p50_us": 50, "device_p99_us": 300},
    }
    written = bench._write_results(result, Path(args.results), "latency",
                                   lambda path: _latency_plot(phases, path))
    say("over the runs (median [min, max]):")
    for phase in phases:
        say(f"  at {phase['rate']:,g}/s:")
        bench._say_summary(phase["summary"], say, "    ")
    goals = result["goals"]
    for phase in phases:
        if phase["rate"] != goals["at_rate"]:
            continue
        figures = phase["summary"]
        for q in ("p50", "p99"):
            goal = goals[f"device_{q}_us"]
            say(f"goal at {goals['at_rate']:,}/s device_{q}_us <= {goal}: "
                + bench._verdict(figures[f"device_{q}_us"]["median"], "<=", goal)
                + f"; two bare hops take {figures[f'floor_{q}_us']['median']:,.0f}")
    say(written)
    _check_delivered([r for p in phases for r in p["runs"]], "latency")
    return result


def _direct_run(
    index: int, url: str, args: argparse.Namespace, sizes: list[int],
    tokens: list[list[str]], addrs: list[str], tmp: Path, mode: list[str], say: Any,
    device_prefix: str, expected: int,
) -> dict[str, Any]:
    """One run: fresh nodes and devices, a warm-up push per device, then
    the ``expected`` timed pushes of ``mode`` (the pusher's options)."""
    prefix = bench._run_prefix(f"{args.scenario}{index}")
    cluster = bench._bench_cluster(args, url, f"{args.scenario}{index}", prefix)
    gens: list[benchkit.Loadgen] = []
    try:
        node_pids = [n.pid for n in cluster.nodes if n.pid is not None]
        gens, seen = bench._open_connections(
            cluster.port, lambda: bench._connections(cluster), args, sizes,
            tokens, addrs, tmp, say, extra=["--pushes"],
        )
        failed = sum(int((r or {}).get("failed", 0)) for r in seen["ready"])
        if failed:
            raise benchkit.BenchError(f"{failed} devices failed to connect")
        cmd = [
            bench.tool_path("pushy-pusher"), "--redis", url, "--prefix", prefix,
            "--devices", f"{device_prefix}:{args.connections}", "--warm",
            "--data-bytes", str(args.data_bytes),
            "--node-pids", ",".join(map(str, node_pids)),
            "--device-pids", ",".join(str(g.proc.pid) for g in gens), *mode,
        ]  # fmt: skip
        report = _pusher(cmd, tmp / f"pusher-{index}.stderr",
                         args.connections + expected, say)
    finally:
        bench._close_all(cluster, gens)
    received = sum(int(g.report.get("pushes", {}).get("received", 0)) for g in gens)
    warm = int(report["warm"]["codes"].get("200", 0))
    at_devices = received - warm
    delivered = int(report["delivered"])
    seconds = float(report["seconds"])
    n = max(delivered, 1)
    host_cpu = report["node_cpu_s"] + report["device_cpu_s"] + report["cpu_s"]
    device_lat = _device_latency([g.report for g in gens])
    return {
        "sent": int(report["sent"]),
        "delivered": delivered,
        "received_by_devices": at_devices,
        "codes": report["codes"],
        "first_failure": report["first_failure"],
        "warm": report["warm"],
        "seconds": seconds,
        "send_s": float(report["send_s"]),
        "sent_per_s": float(report["sent_per_s"]),
        "delivered_per_s": at_devices / seconds if seconds > 0 else 0.0,
        "node_cpu_s": report["node_cpu_s"],
        "device_cpu_s": report["device_cpu_s"],
        "service_cpu_s": report["cpu_s"],
        "node_cpu_s_per_1m": report["node_cpu_s"] / n * 1e6,
        "device_cpu_s_per_1m": report["device_cpu_s"] / n * 1e6,
        "service_cpu_s_per_1m": report["cpu_s"] / n * 1e6,
        "host_cpu_s_per_1m": host_cpu / n * 1e6,
        "delivered_per_node_cpu_s": delivered / max(report["node_cpu_s"], 1e-9),
        "answer_latency_us": report["latency_us"],
        "send_late_us": report.get("send_late_us", {}),
        "device_latency_us": device_lat,
        "route_cache": {"hits": report["cache_hits"],
                        "misses": report["cache_misses"]},
    }


def _push_frame_bytes(data_bytes: int) -> int:
    """The size of the WebSocket frame of one of pushy-pusher's pushes
    (header included) with ``data_bytes`` of padding."""
    data = '{"ts":1000000000000000'
    if data_bytes:
        data += ',"pad":"' + "x" * data_bytes + '"'
    body = f'{{"t":"push","id":1000000,"from":"service:bench","data":{data}}},"ack":false}}'
    return len(body) + (2 if len(body) < 126 else 4)


def _fanout_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The host's floor for the unicast run of ``args`` (see
    :func:`fanout_floor`)."""
    return fanout_floor(args.connections, args.pushes,
                        _push_frame_bytes(args.data_bytes))


def fanout_floor(connections: int, messages: int, size: int) -> dict[str, Any]:
    """The host's floor for unicast: ``pushy-fanout``, a bare sender
    writing ``messages`` (at most 1,000,000) of ``size`` bytes, one send()
    each, to random ones of ``connections`` loopback connections (at most
    18,000), read by a bare receiver."""
    cmd = [bench.tool_path("pushy-fanout"),
           "--sockets", str(min(connections, 18_000)),
           "--messages", str(min(messages, 1_000_000)),
           "--bytes", str(size)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              timeout=120)
    except subprocess.TimeoutExpired:
        raise benchkit.BenchError("pushy-fanout did not end within 120 s") from None
    try:
        report = dict(json.loads(done.stdout))
    except ValueError:
        report = {}
    if done.returncode != 0 or not report:
        raise benchkit.BenchError(
            f"pushy-fanout failed ({done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[:200]}"
        )
    return report


def _pusher(
    cmd: list[str], stderr_path: Path, total: int, say: Any
) -> dict[str, Any]:
    """Run ``pushy-pusher`` to its end (bounded), showing how many of the
    ``total`` pushes (warm-up included) were answered; return its report."""
    deadline = time.monotonic() + 900
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        with benchkit.Progress("pushing", total, say,
                               unit="answered (warm-up included)") as progress:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise benchkit.BenchError("pushy-pusher did not end within 900 s")
                progress.update(_answered(stderr_path))
                time.sleep(0.25)
        out = proc.communicate(timeout=10)[0].strip()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if proc.returncode != 0 or not out.startswith("{"):
        errors = [line for line in stderr_path.read_text(errors="replace").splitlines()
                  if not line.startswith('{"event":"progress"')]
        raise benchkit.BenchError(
            f"pushy-pusher exited with {proc.returncode}: {' '.join(errors)[-2000:]}"
        )
    return dict(json.loads(out.splitlines()[-1]))


def _answered(stderr_path: Path) -> int:
    """The last progress count ``pushy-pusher`` wrote to its stderr."""
    try:
        with open(stderr_path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 200))
            tail = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(tail):
        if line.startswith('{"event":"progress"') and line.endswith("}"):
            return int(json.loads(line)["answered"])
    return 0


def _device_latency(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The devices' latency figures: with several load generators, p50 is
    the median of theirs (weighted by count) and the tails the worst."""
    lat = [r["pushes"]["latency_us"] for r in reports
           if r.get("pushes", {}).get("latency_us", {}).get("count")]
    if not lat:
        return {"count": 0, "p50": 0, "p99": 0, "p99.9": 0, "max": 0}
    ordered = sorted(lat, key=lambda x: x["p50"])
    total = sum(x["count"] for x in lat)
    seen, p50 = 0, ordered[-1]["p50"]
    for x in ordered:
        seen += x["count"]
        if seen * 2 >= total:
            p50 = x["p50"]
            break
    return {"count": total, "p50": p50,
            "p99": max(x["p99"] for x in lat),
            "p99.9": max(x["p99.9"] for x in lat),
            "max": max(x["max"] for x in lat)}


def _check_delivered(runs: list[dict[str, Any]], what: str) -> None:
    """Raise when a run lost pushes: answered other than 200, or not seen by
    the devices (the results are written before)."""
    bad = [r for r in runs
           if r["delivered"] < r["sent"] or r["received_by_devices"] < r["delivered"]]
    if bad:
        first = bad[0]
        raise PushyError(
            f"{what}: pushes failed in {len(bad)} of {len(runs)} runs "
            f"(first: {first['delivered']:,} of {first['sent']:,} answered 200, "
            f"{first['received_by_devices']:,} seen by the devices; "
            f"{first['codes']}; {first['first_failure']})"
        )


def _unicast_plot(runs: list[dict[str, Any]], path: Path) -> None:
    plt = bench._pyplot()
    if plt is None:
        return
    fig, (rate, cpu) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"run {k}" for k in range(len(runs))]
    rate.bar(labels, [r["delivered_per_s"] for r in runs], label="delivered")
    rate.axhline(300_000, color="black", linestyle="--", label="goal")
    rate.set(ylabel="pushes delivered per second", title="pushy bench unicast")
    rate.legend()
    width = 0.25
    for k, (key, label) in enumerate((("node_cpu_s_per_1m", "nodes"),
                                      ("device_cpu_s_per_1m", "devices"),
                                      ("service_cpu_s_per_1m", "service"))):
        cpu.bar([i + k * width for i in range(len(runs))],
                [r[key] for r in runs], width, label=label)
    cpu.axhline(2, color="black", linestyle="--", label="node goal")
    cpu.set_xticks([i + width for i in range(len(runs))])
    cpu.set_xticklabels(labels)
    cpu.set(ylabel="CPU-seconds per 1M delivered", title="cost")
    bench._save(plt, fig, cpu, path)


def _latency_plot(phases: list[dict[str, Any]], path: Path) -> None:
    groups = []
    for p in phases:
        rate = f"{p['rate']:,.0f}/s"
        groups.append((f"{rate} at the device", p["summary"], "device_{}_us"))
        groups.append((f"{rate} answer", p["summary"], "answer_{}_us"))
        groups.append((f"{rate} 2 bare hops", p["runs"][0]["floor_us"]["from_due_us"],
                       "{}"))
    bench._percentile_bars(groups, "from due time (us)",
                           "pushy bench latency (median of runs)", path)
