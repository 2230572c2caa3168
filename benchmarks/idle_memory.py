#!/usr/bin/env python3
"""Idle-connection memory benchmark of a Pushy node.

Each run starts a fresh node in its own process, measures its resident memory
(``VmRSS``) and the kernel's ``Slab`` before and after N authenticated idle
WebSocket connections are opened by several ``pushy-loadgen`` processes, and
reports per connection:

* node RSS delta / N (user-space bytes of the node per idle connection);
* (node RSS delta + Slab delta) / N. The loopback load generator's sockets
  are in the same kernel, so the slab delta counts both socket ends; a real
  server pays about half of it.

Runs are repeated (fresh node each time) and the median, min and max are
printed and written as JSON (default ``bench-results/idle_memory.json``).

Example::

    benchmarks/build.sh
    .venv/bin/python benchmarks/idle_memory.py --connections 10000 --runs 3

Needs PyJWT and httpx, the pushy package this interpreter imports (with its
built extension; else ``python/pushy`` of the source tree) and the load
generator (built with ``benchmarks/build.sh`` when missing or stale). The
package is copied once per invocation, so every run measures the same build
even if the working tree is rebuilt meanwhile. Each run also records the
node's CPU time per upgrade and the host's listen-queue drops; connects are
paced (``--rate`` per load generator) below what one io thread accepts, since
an overflowing listen queue only adds 1 s SYN retries to the handshakes.

Limitations:
    Loopback only (127.0.0.0/8). ``Slab`` is system-wide, so other activity on
    the host shows up in it; the node RSS figure is the steadier one. Each
    load generator process holds fewer than 19,000 sockets (the host caps a
    process at 20,000 open files), and so must the node: N above 19,000
    needs several nodes sharing the port, which this driver does not do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt

ROOT = Path(__file__).resolve().parent.parent
try:
    import pushy  # noqa: F401
except ImportError:  # a source tree built in place
    sys.path.insert(0, str(ROOT / "python"))
from pushy.benchkit import (
    MAX_PER_PROCESS,
    BenchError,
    Loadgen,
    cpu_seconds,
    listen_drops,
    merge_reasons,
    read_status_kib,
    sample_memory,
    split,
    stop_loadgens,
    summarize,
    wait_for,
)

BUILD_SCRIPT = ROOT / "benchmarks" / "build.sh"
LOADGEN_SOURCE = ROOT / "benchmarks" / "loadgen.cpp"
DEFAULT_LOADGEN = ROOT / "build" / "bench" / "pushy-loadgen"

# The node process of --node core: the engine without the Python wrapper,
# configured from PUSHY_BENCH_NODE_CONFIG (JSON), printing its ports as one
# JSON line and running until its stdin closes or SIGTERM arrives.
NODE_SCRIPT = r"""
import json, os, signal, sys
from pushy import _core
node = _core.Node(json.loads(os.environ["PUSHY_BENCH_NODE_CONFIG"]))
node.start()
print(json.dumps({"port": node.port, "push_port": node.push_port,
                  "node_id": node.node_id}), flush=True)
def _stop(*_):
    raise SystemExit(0)
signal.signal(signal.SIGTERM, _stop)
try:
    sys.stdin.read()
finally:
    node.stop()
"""

_CLI_LISTENING = re.compile(
    r"devices ws://[^/]*:(?P<port>\d+)/.*push http://[^/]*:(?P<push>\d+)"
)
_LOG_PROBLEM = re.compile(r"\b(warn|warning|error|critical)\b", re.IGNORECASE)


@dataclass
class NodeProcess:
    """A node running in a child process, with its log files."""

    proc: subprocess.Popen[bytes]
    port: int
    push_port: int
    stdout_path: Path
    stderr_path: Path
    mode: str

    @property
    def pid(self) -> int:
        """The node's process id (the process whose RSS is measured)."""
        return self.proc.pid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        description="Measure a Pushy node's memory per idle connection.",
    )
    p.add_argument(
        "--connections",
        type=int,
        default=10_000,
        metavar="N",
        help="idle connections per run [10000]",
    )
    p.add_argument(
        "--per-process",
        type=int,
        default=5_000,
        metavar="M",
        help="connections per load generator process, < 19000 [5000]",
    )
    p.add_argument(
        "--runs", type=int, default=3, help="runs, each with a fresh node [3]"
    )
    p.add_argument("--threads", type=int, default=1, help="node io threads [1]")
    p.add_argument(
        "--rate",
        type=float,
        default=2_500,
        metavar="R",
        help="connects per second per load generator [2500]",
    )
    p.add_argument(
        "--source-addrs",
        default="127.0.0.2,127.0.0.3,127.0.0.4",
        help="comma list of 127.0.0.0/8 source addresses "
        "[127.0.0.2,127.0.0.3,127.0.0.4]",
    )
    p.add_argument(
        "--heartbeat-s",
        type=float,
        default=60,
        help="node heartbeat (ping) interval [60]",
    )
    p.add_argument(
        "--settle-s",
        type=float,
        default=3,
        metavar="S",
        help="wait after the count settles, before measuring [3]",
    )
    p.add_argument(
        "--node",
        choices=("cli", "core"),
        default="cli",
        help="start the node with 'pushy serve' (cli) or with "
        "pushy._core.Node in 'python -c' (core) [cli]",
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter of the node process [this one]",
    )
    p.add_argument(
        "--loadgen",
        type=Path,
        default=DEFAULT_LOADGEN,
        help="load generator binary [build/bench/pushy-loadgen]",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=Path("bench-results/idle_memory.json"),
        help="results file [bench-results/idle_memory.json]",
    )
    p.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="copy node and load generator logs of each run here",
    )
    args = p.parse_args(argv)
    if args.connections < 1 or args.runs < 1 or args.threads < 0:
        p.error("--connections and --runs must be at least 1, --threads >= 0")
    if not 1 <= args.per_process < MAX_PER_PROCESS:
        p.error(f"--per-process must be 1-{MAX_PER_PROCESS - 1}")
    if args.connections >= MAX_PER_PROCESS:
        p.error(
            f"--connections must be below {MAX_PER_PROCESS}: one node "
            "process cannot hold more on this host"
        )
    for addr in args.source_addrs.split(","):
        if not addr.startswith("127."):
            p.error("--source-addrs must be in 127.0.0.0/8")
    return args


# ------------------------------------------------------------------ helpers


def ensure_loadgen(path: Path) -> Path:
    """Build the load generator when it is missing or older than its source.

    Only the default binary is rebuilt; a given one must exist.
    """
    if path == DEFAULT_LOADGEN:
        stale = (
            not path.exists() or path.stat().st_mtime < LOADGEN_SOURCE.stat().st_mtime
        )
        if stale:
            subprocess.run([str(BUILD_SCRIPT), str(path.parent)], check=True)
    if not os.access(path, os.X_OK):
        raise BenchError(f"load generator {path} is not an executable file")
    return path


def write_tokens(secret: str, n: int, directory: Path, sizes: list[int]) -> list[Path]:
    """Write one token file per load generator; return their paths.

    Token i of the run has device id ``bench-i``, account ``bench``, and
    expires in an hour (longer than any run).
    """
    exp = int(time.time()) + 3600
    paths: list[Path] = []
    start = 0
    for k, size in enumerate(sizes):
        path = directory / f"tokens-{k}.txt"
        with open(path, "w") as f:
            for i in range(start, start + size):
                claims = {"sub": f"bench-{i}", "acc": "bench", "exp": exp}
                f.write(jwt.encode(claims, secret, algorithm="HS256") + "\n")
        paths.append(path)
        start += size
    assert start == n
    return paths


def log_problems(*paths: Path) -> list[str]:
    """Return the log lines of the given files at warning level or above."""
    lines: list[str] = []
    for path in paths:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if _LOG_PROBLEM.search(line):
                    lines.append(line.strip())
    return lines


# --------------------------------------------------------------- processes


def package_dir() -> Path:
    """The pushy package to measure: the one this interpreter imports (a
    virtual environment's, after ``scripts/dev.sh install``), else the
    source tree's ``python/pushy`` when it holds a built extension."""
    try:
        import pushy
    except ImportError:
        return ROOT / "python" / "pushy"
    installed = Path(pushy.__file__).resolve().parent
    if list(installed.glob("_core*.so")):
        return installed
    return ROOT / "python" / "pushy"


def snapshot_package(dest: Path) -> dict[str, str]:
    """Copy the pushy package (with its built extension) under ``dest``.

    Every node of the invocation imports this copy, so all runs measure the
    same build and a rebuild of the working tree during a run cannot change
    (or crash) a running node. Returns the extension's name and SHA-256.
    """
    src = package_dir()
    shutil.copytree(src, dest / "pushy", ignore=shutil.ignore_patterns("__pycache__"))
    found = sorted((dest / "pushy").glob("_core*.so"))
    if not found:
        raise BenchError(f"no built extension (_core*.so) in {src}")
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    return {"extension": found[0].name, "sha256": digest}


def clean_env(python_path: Path) -> dict[str, str]:
    """The environment of the children: this one without PUSHY_* settings,
    importing pushy from ``python_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHY_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(python_path), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def start_node(args: argparse.Namespace, secret: str, workdir: Path) -> NodeProcess:
    """Start a node process on free loopback ports and wait for its ports."""
    out = workdir / "node.stdout"
    err = workdir / "node.stderr"
    env = clean_env(args.python_path)
    if args.node == "core":
        env["PUSHY_BENCH_NODE_CONFIG"] = json.dumps(
            {
                "host": "127.0.0.1",
                "port": 0,
                "push_host": "127.0.0.1",
                "push_port": 0,
                "secret": secret,
                "heartbeat_s": args.heartbeat_s,
                "threads": args.threads,
            }
        )
        cmd = [args.python, "-c", NODE_SCRIPT]
    else:
        env["PUSHY_SECRET"] = secret
        cmd = [
            args.python,
            "-m",
            "pushy",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--push-host",
            "127.0.0.1",
            "--push-port",
            "0",
            "--threads",
            str(args.threads),
            "--heartbeat-s",
            str(args.heartbeat_s),
        ]
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=fo, stderr=fe, env=env, cwd=workdir
        )

    def ports() -> tuple[int, int] | None:
        if proc.poll() is not None:
            raise BenchError(
                f"node exited with {proc.returncode}: "
                f"{err.read_text(errors='replace')[-2000:]}"
            )
        text = out.read_text(errors="replace")
        if args.node == "core":
            if "\n" not in text:
                return None
            info = json.loads(text.partition("\n")[0])
            return info["port"], info["push_port"]
        m = _CLI_LISTENING.search(text)
        return (int(m["port"]), int(m["push"])) if m else None

    try:
        port, push_port = wait_for(ports, 30, "the node's ports")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return NodeProcess(proc, port, push_port, out, err, args.node)


def stop_node(node: NodeProcess) -> int:
    """Stop the node (stdin closed and SIGTERM) and return its exit code."""
    if node.proc.poll() is None:
        try:
            if node.proc.stdin:
                node.proc.stdin.close()
        except OSError:
            pass
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()
    return node.proc.returncode


def node_stats(client: httpx.Client, node: NodeProcess) -> dict[str, Any]:
    """Return the node's ``GET /v1/stats`` document."""
    r = client.get(f"http://127.0.0.1:{node.push_port}/v1/stats")
    r.raise_for_status()
    return r.json()


def describe_exit(node: NodeProcess) -> str:
    """Say whether the node is still running, and how it ended if not."""
    rc = node.proc.poll()
    if rc is None:
        return "the node is still running"
    how = f"killed by signal {-rc}" if rc < 0 else f"exited with {rc}"
    tail = node.stderr_path.read_text(errors="replace")[-2000:]
    return f"the node {how}; its log ends with:\n{tail}"


def keep_logs(run_dir: Path, dest: Path) -> None:
    """Copy the node and load generator logs of a run to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in run_dir.iterdir():
        if f.suffix in (".stdout", ".stderr"):
            (dest / f.name).write_bytes(f.read_bytes())


# ---------------------------------------------------------------------- run


def one_run(
    args: argparse.Namespace,
    index: int,
    workdir: Path,
    secret: str,
    sizes: list[int],
    tokens: list[Path],
) -> dict[str, Any]:
    """Run the benchmark once against a fresh node; return its figures."""
    t_start = time.monotonic()
    run_dir = workdir / f"run-{index}"
    run_dir.mkdir()
    node = start_node(args, secret, run_dir)
    gens: list[Loadgen] = []
    try:
        with httpx.Client(timeout=10) as client:
            # Let the node finish starting before the baseline.
            wait_for(lambda: node_stats(client, node), 10, "the stats endpoint")
            time.sleep(1.0)
            before = sample_memory([node.pid])
            cpu_before = cpu_seconds(node.pid)
            drops_before = listen_drops()

            n_wanted = sum(sizes)
            # Bound every phase: connect at --rate, then hold until stopped.
            connect_s = max(sizes) / args.rate + 15
            hold_s = connect_s + 120 + args.settle_s
            t_connect = time.monotonic()
            gens = [
                Loadgen.start(
                    args.loadgen, port=node.port, tokens=path, connections=size,
                    rate=args.rate, hold_s=hold_s, workdir=run_dir,
                    name=f"loadgen-{k}", source_addrs=args.source_addrs.split(","),
                )
                for k, (size, path) in enumerate(zip(sizes, tokens, strict=True))
            ]  # fmt: skip
            ready = [
                wait_for(
                    g.ready,
                    connect_s + 30,
                    "the load generators' handshakes",
                )
                for g in gens
            ]
            connect_wall_s = time.monotonic() - t_connect
            cpu_connect = cpu_seconds(node.pid) - cpu_before
            drops = listen_drops() - drops_before
            connected = sum(r["connected"] for r in ready)

            # Wait until the node's count stops moving (and matches).
            last: list[int] = []

            def settled() -> bool:
                last.append(node_stats(client, node)["connections"])
                return len(last) >= 3 and last[-1] == last[-2] == last[-3]

            wait_for(settled, 30, "the connection count to settle", 0.5)
            time.sleep(args.settle_s)
            stats = node_stats(client, node)
            after = sample_memory([node.pid])
            peak_rss = read_status_kib(node.pid, "VmHWM") * 1024
            held = stats["connections"]

            stop_loadgens(gens)
            try:
                wait_for(
                    lambda: node_stats(client, node)["connections"] == 0,
                    20,
                    "the node to see every connection closed",
                    0.2,
                )
                closed_ok = True
            except BenchError:
                closed_ok = False
            end_stats = node_stats(client, node)
    except (httpx.HTTPError, OSError) as exc:
        raise BenchError(f"run {index}: {exc}; {describe_exit(node)}") from exc
    finally:
        for g in gens:
            if g.proc.poll() is None:
                g.proc.kill()
                g.proc.wait()
        node_rc = stop_node(node)
        if args.keep_logs:
            keep_logs(run_dir, args.keep_logs / f"run-{index}")

    problems = log_problems(node.stdout_path, node.stderr_path)

    rss_delta = after["rss"] - before["rss"]
    slab_delta = after["slab"] - before["slab"]
    reports = [g.report for g in gens]
    failed = merge_reasons(reports, "failed_by_reason")
    dropped = merge_reasons(reports, "dropped_by_reason")
    rejects = {k: v for k, v in end_stats.get("rejects", {}).items() if v}
    return {
        "run": index,
        "connections_wanted": n_wanted,
        "connections_connected": connected,
        "connections_held": held,
        "rss_before": before["rss"],
        "rss_after": after["rss"],
        "rss_peak": peak_rss,
        "rss_delta": rss_delta,
        "slab_before": before["slab"],
        "slab_after": after["slab"],
        "slab_delta": slab_delta,
        "slab_unreclaimable_delta": (
            after["slab_unreclaimable"] - before["slab_unreclaimable"]
        ),
        "rss_per_conn": rss_delta / held if held else None,
        "slab_per_conn": slab_delta / held if held else None,
        "rss_slab_per_conn": (rss_delta + slab_delta) / held if held else None,
        "connect_wall_s": connect_wall_s,
        "node_cpu_s_connect": cpu_connect,
        "node_cpu_us_per_upgrade": cpu_connect / connected * 1e6 if connected else None,
        "listen_drops": drops,
        "upgrade_rate_per_s": connected
        / max((r["connect_phase_s"] for r in reports if r), default=math.inf),
        "handshake_p50_us": [
            r.get("handshake_latency_us", {}).get("p50") for r in reports
        ],
        "handshake_p99_us": [
            r.get("handshake_latency_us", {}).get("p99") for r in reports
        ],
        "failed_by_reason": failed,
        "dropped_by_reason": dropped,
        "closed_clean": sum(r.get("closed_clean", 0) for r in reports),
        "all_closed_on_node": closed_ok,
        "node_rejects": rejects,
        "node_stats_at_measure": stats,
        "node_exit_code": node_rc,
        "node_log_problems": problems[:50],
        "node_log_problem_count": len(problems),
        "loadgens": reports,
        "run_s": time.monotonic() - t_start,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results; return the exit code."""
    args = parse_args(argv)
    args.loadgen = ensure_loadgen(args.loadgen.resolve())
    sizes = split(args.connections, args.per_process)
    secret = secrets.token_hex(32)
    runs: list[dict[str, Any]] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pushy-idle-") as tmp:
        workdir = Path(tmp)
        args.python_path = workdir / "python"
        build = snapshot_package(args.python_path)
        tokens = write_tokens(secret, args.connections, workdir, sizes)
        print(
            f"idle memory: {args.connections} connections "
            f"({' + '.join(map(str, sizes))} per load generator), "
            f"{args.runs} runs, node via {args.node}, "
            f"{args.threads} io thread(s)",
            flush=True,
        )
        for i in range(args.runs):
            r = one_run(args, i, workdir, secret, sizes, tokens)
            runs.append(r)
            print(
                f"run {i}: held {r['connections_held']}/"
                f"{r['connections_wanted']}, node RSS "
                f"{r['rss_per_conn']:.0f} B/conn, RSS+slab "
                f"{r['rss_slab_per_conn']:.0f} B/conn (slab "
                f"{r['slab_per_conn']:.0f}), "
                f"{r['upgrade_rate_per_s']:.0f} upgrades/s "
                f"({r['node_cpu_us_per_upgrade']:.0f} us node CPU each, "
                f"{r['listen_drops']} listen drops), "
                f"{r['run_s']:.1f} s, failed {r['failed_by_reason'] or 0}, "
                f"dropped {r['dropped_by_reason'] or 0}, node log "
                f"warnings/errors {r['node_log_problem_count']}",
                flush=True,
            )

    def figure(key: str) -> dict[str, float]:
        return summarize([r[key] for r in runs if r[key] is not None])

    summary = {
        "rss_per_conn": figure("rss_per_conn"),
        "rss_slab_per_conn": figure("rss_slab_per_conn"),
        "slab_per_conn": figure("slab_per_conn"),
        "upgrade_rate_per_s": figure("upgrade_rate_per_s"),
        "node_cpu_us_per_upgrade": figure("node_cpu_us_per_upgrade"),
        "run_s": figure("run_s"),
    }
    result = {
        "benchmark": "idle_memory",
        "units": "bytes per connection; rates per second; times in seconds",
        "note": "slab is system-wide and counts both loopback socket ends",
        "config": {
            "connections": args.connections,
            "per_process": sizes,
            "runs": args.runs,
            "threads": args.threads,
            "rate_per_process": args.rate,
            "source_addrs": args.source_addrs.split(","),
            "heartbeat_s": args.heartbeat_s,
            "settle_s": args.settle_s,
            "node": args.node,
        },
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "build": build,
        "summary": summary,
        "total_s": time.monotonic() - t0,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    print(f"over {args.runs} runs (median [min, max]):")
    for key, label in (
        ("rss_per_conn", "node RSS / conn (B)"),
        ("rss_slab_per_conn", "RSS + slab / conn (B)"),
        ("slab_per_conn", "slab / conn (B, both ends)"),
        ("upgrade_rate_per_s", "upgrades/s"),
        ("node_cpu_us_per_upgrade", "node CPU us / upgrade"),
        ("run_s", "run time (s)"),
    ):
        s = summary[key]
        print(f"  {label:28} {s['median']:9.1f} [{s['min']:.1f}, {s['max']:.1f}]")
    print(f"results written to {args.output}")
    bad = any(
        r["connections_held"] != r["connections_wanted"] or r["dropped_by_reason"]
        for r in runs
    )
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"idle_memory: {exc}", file=sys.stderr)
        sys.exit(1)
