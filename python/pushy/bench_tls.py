"""``pushy bench tls``: what TLS on the device port costs, against plain
WebSocket in the same run.

Each run opens the same idle connections twice, once over TLS (the nodes
with a test certificate, ``pushy-loadgen --tls``) and once plain, the
order alternating from run to run, each on fresh nodes (see ``pushy bench
idle``, whose run it is). A TLS upgrade is a full handshake (no session is
resumed) with an ECDSA P-256 certificate.

The TLS handshake's own cost is the difference of the nodes' CPU per
upgrade, TLS against plain: the rest of an upgrade (token check, registry
write, hello) is the same in both. The registry TTL defaults to 120 s, so
that no refresh round (every third of it) runs during a connect phase and
adds to its CPU time.

Limitations: the load generators' side of each handshake (more costly
than the node's) runs on the same cores as the nodes; the kernel slab
counts both socket ends; the CPU figures are taken at the paced rate
(``--rate``), below what saturates the host.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import bench, benchkit
from .errors import PushyError

__all__ = ["add_parser", "run_tls"]

TLS_DOC = """\
TLS on the device port against plain WebSocket, in the same run: the idle
scenario (pushy bench idle) twice per run, over TLS and plain, the order
alternating: --connections connections on --nodes node processes sharing
the port (one Redis), opened by pushy-loadgen processes at --rate
connects/s (a full TLS handshake each, ECDSA P-256 certificate), measured
once steady after a registry refresh round. It reports per connection the
node RSS (the goal's bytes per idle TLS connection) and RSS + kernel slab;
the nodes' CPU per upgrade, TLS and plain, and the difference: the CPU of
a TLS handshake, whose inverse is the goal's TLS handshakes per second per
core; whole TLS upgrades per node CPU-second; the load generators' CPU per
upgrade; and the TLS / plain ratios, to DIR/tls.json and tls.png."""

#: Goals of the benchmark plan.
GOALS = {
    "tls_rss_per_conn": ("<=", 16 * 1024),
    "tls_handshakes_per_core_s": (">=", 2500.0),
}


def add_parser(scenarios: Any) -> None:
    """Add ``tls`` to the ``pushy bench`` scenario parsers."""
    tls = scenarios.add_parser(
        "tls", help="TLS against plain: bytes per idle connection, handshakes "
        "per CPU-second", description=TLS_DOC,
    )
    bench._add_connection_options(tls, 18_000, 18_000, 1_000, "connects/s in all")
    bench._add_idle_options(tls, registry_ttl_s=120)
    bench._add_run_options(tls, run_tls)


def run_tls(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Run the TLS scenario; return the results (also written as JSON).

    Raises:
        PushyError: bad options, a process failed, or a connection failed
            (the results are written first).
    """
    from .testing import tls_files

    sizes, addrs = bench._plan(args)
    if args.heartbeat_s <= 0 or args.settle_s < 0:
        raise PushyError("--heartbeat-s must be above 0, --settle-s at least 0")
    pairs: list[dict[str, Any]] = []
    with bench._workspace(args) as (url, tmp, _):
        files = tls_files(tmp / "tls")
        tokens = bench._token_files(tmp, "t", sizes)
        count = benchkit.count
        say(f"tls: {args.connections:,} connections over TLS and plain on "
            f"{count(args.nodes, 'node')}, {count(len(sizes), 'load generator')}, "
            f"{args.rate:,.0f} connects/s, Redis {url}, {count(args.runs, 'run')}")
        bench._say_method_note(args, say)
        for index in range(args.runs):
            # Alternate the order, so that neither always runs on a machine
            # warmed (or tired) by the other.
            order = ("tls", "plain") if index % 2 == 0 else ("plain", "tls")
            pair: dict[str, Any] = {}
            for kind in order:
                say(f"run {index}, {kind}:")
                pair[kind] = bench._idle_run(
                    index, url, args, sizes, tokens, addrs, tmp, say,
                    tls=files if kind == "tls" else None,
                )
            pair.update(_derived(pair["tls"], pair["plain"]))
            say(f"run {index}: TLS {pair['tls_rss_per_conn']:,.0f} B/conn against "
                f"{pair['plain_rss_per_conn']:,.0f} plain; node CPU per upgrade "
                f"{pair['tls_node_cpu_us_per_upgrade']:,.0f} us against "
                f"{pair['plain_node_cpu_us_per_upgrade']:,.0f}: a handshake costs "
                f"{pair['tls_handshake_cpu_us']:,.0f} us "
                f"({pair['tls_handshakes_per_core_s']:,.0f} per core-second)")
            pairs.append(pair)
    stat = bench._spread(pairs)
    keys = ("tls_rss_per_conn", "plain_rss_per_conn", "rss_per_conn_ratio",
            "tls_rss_slab_per_conn", "plain_rss_slab_per_conn",
            "tls_node_cpu_us_per_upgrade", "plain_node_cpu_us_per_upgrade",
            "tls_handshake_cpu_us", "tls_handshakes_per_core_s",
            "tls_upgrades_per_node_cpu_s", "plain_upgrades_per_node_cpu_s",
            "node_cpu_ratio", "tls_loadgen_cpu_us_per_upgrade",
            "plain_loadgen_cpu_us_per_upgrade", "tls_handshake_p50_us",
            "tls_handshake_p99_us")
    summary: dict[str, Any] = {k: stat(lambda p, k=k: p[k]) for k in keys}
    summary["failed"] = sum(p[k]["failed"] for p in pairs for k in ("tls", "plain"))
    verdicts = {
        name: bench._verdict(summary[name]["median"], op, goal)
        for name, (op, goal) in GOALS.items()
    }
    result = {
        "scenario": "tls",
        "units": "bytes per connection; microseconds of CPU per upgrade; "
        "upgrades per node CPU-second",
        "connections": args.connections,
        "nodes": args.nodes,
        "threads": args.threads,
        "loadgens": sizes,
        "rate": args.rate,
        "source_addrs": addrs,
        "certificate": "ECDSA P-256, full handshakes",
        "goals": {
            k: {"op": op, "goal": g, "verdict": verdicts[k]}
            for k, (op, g) in GOALS.items()
        },
        "runs": pairs,
        "summary": summary,
    }
    bench._publish(
        result, args, lambda path: _plot(pairs, path), say,
        footer=[f"goal {name} {GOALS[name][0]} {GOALS[name][1]:,g}: {verdict}"
                for name, verdict in verdicts.items()],
    )
    failed = [p[k] for p in pairs for k in ("tls", "plain")]
    bench._failures(failed, "tls")
    return result


def _derived(tls: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run compared: TLS, plain and their ratio."""
    def per_cpu_s(run: dict[str, Any]) -> float:
        us = run["node_cpu_us_per_upgrade"]
        return 1e6 / us if us > 0 else 0.0

    out: dict[str, Any] = {}
    for kind, run in (("tls", tls), ("plain", plain)):
        out[f"{kind}_rss_per_conn"] = run["rss_per_conn"]
        out[f"{kind}_rss_slab_per_conn"] = run["rss_slab_per_conn"]
        out[f"{kind}_node_cpu_us_per_upgrade"] = run["node_cpu_us_per_upgrade"]
        out[f"{kind}_upgrades_per_node_cpu_s"] = per_cpu_s(run)
        out[f"{kind}_loadgen_cpu_us_per_upgrade"] = run["loadgen_cpu_us_per_upgrade"]
    out["rss_per_conn_ratio"] = (
        tls["rss_per_conn"] / plain["rss_per_conn"] if plain["rss_per_conn"] else 0.0
    )
    handshake = tls["node_cpu_us_per_upgrade"] - plain["node_cpu_us_per_upgrade"]
    out["tls_handshake_cpu_us"] = handshake
    out["tls_handshakes_per_core_s"] = 1e6 / handshake if handshake > 0 else 0.0
    out["node_cpu_ratio"] = (
        tls["node_cpu_us_per_upgrade"] / plain["node_cpu_us_per_upgrade"]
        if plain["node_cpu_us_per_upgrade"] else 0.0
    )
    lat = tls.get("tls_latency_us") or {"p50": 0, "p99": 0}
    out["tls_handshake_p50_us"] = lat["p50"]
    out["tls_handshake_p99_us"] = lat["p99"]
    return out


def _plot(pairs: list[dict[str, Any]], path: Path) -> None:
    plt = bench._pyplot()
    if plt is None:
        return
    fig, (mem, cpu) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(pairs))
    width = 0.4
    for offset, kind in ((0.0, "tls"), (width, "plain")):
        mem.bar([x + offset for x in xs], [p[f"{kind}_rss_per_conn"] for p in pairs],
                width, label=kind)
    mem.axhline(GOALS["tls_rss_per_conn"][1], color="black", linestyle="--",
                label="TLS goal")
    mem.set_xticks([x + width / 2 for x in xs])
    mem.set_xticklabels([f"run {k}" for k in xs])
    mem.set(ylabel="node RSS per idle connection (bytes)",
            title="pushy bench tls: memory")
    mem.legend()
    width = 0.27
    series = (("tls_handshakes_per_core_s", "TLS handshakes"),
              ("tls_upgrades_per_node_cpu_s", "TLS upgrades"),
              ("plain_upgrades_per_node_cpu_s", "plain upgrades"))
    for k, (key, label) in enumerate(series):
        cpu.bar([x + k * width for x in xs], [p[key] for p in pairs], width,
                label=label)
    cpu.axhline(GOALS["tls_handshakes_per_core_s"][1], color="black",
                linestyle="--", label="handshakes goal")
    cpu.set_xticks([x + width for x in xs])
    cpu.set_xticklabels([f"run {k}" for k in xs])
    cpu.set(ylabel="per node CPU-second", title="connection setup")
    bench._save(plt, fig, cpu, path)
