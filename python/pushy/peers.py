"""``pushy bench peers``: Pushy against Nchan, the same workloads in one run.

Nchan (Debian's ``nginx`` with ``libnginx-mod-nchan``) is the peer of the
benchmark plan: a WebSocket subscriber per device on a channel of its own,
one HTTP POST per message. :class:`NchanServer` runs an nginx of its own
(its configuration, pid file and logs in a temporary folder, never the
system's nginx service) on a free loopback port; :func:`ensure_nchan`
installs the packages with ``apt-get`` when they are missing and this runs
as root.

Each run measures both systems one after the other (the order alternates
from run to run), on the same number of connections held by one
``pushy-loadgen`` process:

1. idle: one Pushy node process with one io thread on Redis, or one nginx
   with ``--nchan-workers`` workers; the growth of the server's resident
   memory and of the kernel's slab per connection, once the connections
   are open and steady (for Pushy, after a registry refresh round);
2. unicast on the same connections: a warm-up message to every device,
   then ``--pushes`` messages to random devices, Pushy's through its push
   library (``pushy-pusher``, the engine of ``PushClient(redis=...)``)
   with ``--window`` in flight, Nchan's
   as one POST each (``pushy-loadgen --publish``, ``--publishers``
   keep-alive connections with ``--pipeline`` requests in flight), as fast
   as each goes. Delivery is counted where the message arrives, at the
   device; the server's CPU time (Pushy: the node; Nchan: master and
   workers) over the phase gives CPU-seconds per million delivered and
   messages delivered per CPU-second.

It prints a table of both systems and their ratio (median [min, max] over
the runs) with the benchmark goals (Pushy delivers at least 5 times as many
messages per CPU-second, with at most a third of Nchan's bytes per
connection), and writes ``DIR/peers.json`` and ``DIR/peers.png``.

Limitations:
    One host, loopback: the load generator, the publisher or push client,
    Redis and the server share the cores, and the kernel slab counts both
    ends of each connection. The delivery latencies are taken under full
    load (every message is sent as fast as the system answers), so they
    include the wait behind the messages ahead (Pushy's window, Nchan's
    pipelines). Installing the Debian packages also
    installs (and on a host with a service manager starts) the system's
    nginx service; the benchmark never uses it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import bench, bench_direct, benchkit
from .benchkit import cpu_seconds
from .cluster import _stop_with_parent, free_port
from .errors import PushyError

__all__ = ["NCHAN_MODULE", "NCHAN_PACKAGES", "NchanServer", "add_parser",
           "ensure_nchan", "run_peers"]

#: The Debian packages of Nchan.
NCHAN_PACKAGES = ("nginx", "libnginx-mod-nchan")
#: The module file of ``libnginx-mod-nchan``.
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")

_PEERS_DOC = """\
Pushy against Nchan (Debian's nginx + libnginx-mod-nchan, a channel per
device) in the same run: --connections idle connections held by one
pushy-loadgen on one Pushy node (one io thread, on Redis) and on an nginx
of --nchan-workers workers, then --pushes messages to random devices on
those connections: Pushy's through its push library (pushy-pusher) with
--window in flight, Nchan's one HTTP POST each. It reports the server's RSS and
the kernel's slab per connection, messages delivered (counted at the
devices) per second and per server CPU-second, and the ratio of each
Pushy figure to Nchan's, with the goals (>= 5x messages per CPU-second,
<= 1/3 of the bytes per connection). Nchan runs from a temporary folder,
never as the system's nginx service; the packages are installed with
apt-get when missing and this runs as root. Results go to
DIR/peers.json and peers.png."""

#: Goals of the benchmark plan: the ratio Pushy / Nchan of each figure.
_GOALS = {
    "delivered_per_cpu_s": (">=", 5.0),
    "rss_per_conn": ("<=", 1 / 3),
    "rss_slab_per_conn": ("<=", 1 / 3),
}


def add_parser(scenarios: Any) -> None:
    """Add ``peers`` to the ``pushy bench`` scenario parsers."""
    peers = scenarios.add_parser(
        "peers",
        help="Pushy against Nchan: bytes per connection, messages per CPU-second",
        description=_PEERS_DOC,
    )
    peers.add_argument("--connections", type=int, default=18_000, metavar="N",
                       help="connections held on each system "
                       f"(at most {bench._NODE_MAX_CONNECTIONS}) [18000]")
    peers.add_argument("--pushes", type=int, default=200_000, metavar="M",
                       help="messages to random devices per run and system "
                       "[200000]")
    peers.add_argument("--window", type=int, default=2000, metavar="W",
                       help="Pushy: pushes in flight [2000]")
    peers.add_argument("--nchan-workers", type=int, default=1, metavar="W",
                       help="nginx worker processes [1]")
    peers.add_argument("--publishers", type=int, default=4, metavar="K",
                       help="Nchan: keep-alive HTTP connections of the "
                       "publisher [4]")
    peers.add_argument("--pipeline", type=int, default=32, metavar="D",
                       help="Nchan: requests in flight per publisher "
                       "connection [32]")
    peers.add_argument("--rate", type=benchkit.number, default=5000, metavar="R",
                       help="connects per second [5000]")
    peers.add_argument("--registry-ttl-s", type=benchkit.number, default=30, metavar="S",
                       help="Pushy's registry TTL; the idle figures are taken "
                       "after a refresh round, every third of it [30]")
    peers.add_argument("--settle-s", type=benchkit.number, default=3, metavar="S",
                       help="wait after the counts settle, before measuring [3]")
    # One node process with one io thread against one nginx worker.
    peers.set_defaults(nodes=1, threads=1)
    bench._add_run_options(peers, run_peers)


def ensure_nchan(say: Callable[[str], None] = print) -> str:
    """Return the ``nginx`` executable, with the Nchan module beside it.

    When ``nginx`` or ``libnginx-mod-nchan`` is missing and this process
    runs as root, installs them with ``apt-get`` (``apt-get update``, then
    ``apt-get install --no-install-recommends``).

    Raises:
        PushyError: they are missing and cannot be installed here, or the
            installation failed.
    """

    def found() -> str | None:
        nginx = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/bin/nginx") if Path(p).exists()),
            None,
        )
        return nginx if nginx and NCHAN_MODULE.exists() else None

    nginx = found()
    if nginx:
        return nginx
    packages = " ".join(NCHAN_PACKAGES)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PushyError(
            f"pushy bench peers needs Nchan: expected nginx and {NCHAN_MODULE}; "
            f"install the Debian packages {packages} (apt-get install {packages}, "
            "as root)"
        )
    say(f"installing the Debian packages {packages} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
         *NCHAN_PACKAGES],
    ):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=900, check=False)
        except subprocess.TimeoutExpired:
            raise PushyError(f"{' '.join(cmd)} did not end within 900 s") from None
        if done.returncode != 0:
            raise PushyError(
                f"{' '.join(cmd)} failed with {done.returncode}: "
                f"{(done.stderr or done.stdout)[-2000:]}"
            )
    nginx = found()
    if not nginx:
        raise PushyError(f"{packages} installed, but no nginx or {NCHAN_MODULE}")
    return nginx


_NGINX_CONF = """\
# nginx with Nchan for pushy bench peers: everything in this folder.
load_module {module};
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {nofile};
{user}pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections {worker_connections};
    multi_accept on;
}}

http {{
    access_log off;
    keepalive_requests 1000000000;
    client_body_temp_path {dir}/temp/body;
    proxy_temp_path {dir}/temp/proxy;
    fastcgi_temp_path {dir}/temp/fastcgi;
    uwsgi_temp_path {dir}/temp/uwsgi;
    scgi_temp_path {dir}/temp/scgi;

    server {{
        listen 127.0.0.1:{port} backlog=4096;

        # A device subscribes to its own channel.
        location ~ ^/sub/(.+)$ {{
            nchan_subscriber websocket;
            nchan_channel_id $1;
        }}

        # One message per request. A channel keeps only its last message,
        # briefly: the messages go to the subscribers connected now.
        location ~ ^/pub/(.+)$ {{
            nchan_publisher http;
            nchan_channel_id $1;
            nchan_message_buffer_length 1;
            nchan_message_timeout 5s;
        }}

        location = /status {{
            nchan_stub_status;
        }}
    }}
}}
"""


class NchanServer:
    """An nginx with the Nchan module, run in the foreground from a folder
    of its own: ``nginx.conf``, the pid file, the error log and the temp
    folders are in ``workdir``; the access log is off.

    Subscribers connect a WebSocket to ``/sub/ID`` (channel ``ID``), and a
    POST to ``/pub/ID`` publishes its body to them; ``/status`` is Nchan's
    stub status. It stops (SIGTERM, then SIGKILL) at :meth:`stop`, at the
    end of a ``with`` block, and when this process dies.

    Args:
        workdir: the folder (created; left for the caller to remove).
        workers: nginx worker processes.
        max_connections: connections a worker accepts.
        nginx: the executable (default: :func:`ensure_nchan`).

    Attributes:
        port: the loopback port it listens on (once started).
        process: the master process (once started).
    """

    def __init__(
        self, workdir: Path, *, workers: int = 1, max_connections: int = 19_500,
        nginx: str | None = None,
    ) -> None:
        if workers < 1:
            raise PushyError(f"workers must be at least 1, got {workers}")
        self.workdir = Path(workdir)
        self.workers = workers
        self.max_connections = max_connections
        self.nginx = nginx
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._pids: list[int] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> str:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if nofile == resource.RLIM_INFINITY or nofile > 1 << 20:
            nofile = 1 << 20
        return _NGINX_CONF.format(
            module=NCHAN_MODULE,
            workers=self.workers,
            nofile=nofile,
            # Workers of a root master run as nobody otherwise, who cannot
            # read this folder.
            user="user root;\n" if os.geteuid() == 0 else "",
            dir=self.workdir,
            # nginx closes idle ("reusable") connections, a WebSocket
            # subscriber among them, once fewer than a sixteenth of its
            # connection slots are free: the slots are sized so that
            # max_connections leave more than that free. A slot costs no
            # descriptor until it is used.
            worker_connections=math.ceil(self.max_connections * 16 / 15) + 100,
            port=self.port,
        )

    def start(self, timeout: float = 15.0) -> NchanServer:
        """Write the configuration, start nginx on a free port and wait
        until its workers run and ``/status`` answers; returns self.

        Raises:
            PushyError: nginx exited or did not answer within ``timeout``.
        """
        nginx = self.nginx or ensure_nchan()
        (self.workdir / "temp").mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        log = self.workdir / "error.log"
        for _ in range(3):  # another process may take the free port first
            self.port = free_port()
            conf.write_text(self._config())
            with open(self.workdir / "nginx.out", "wb") as out:
                self.process = subprocess.Popen(
                    [nginx, "-p", str(self.workdir), "-c", str(conf), "-e", str(log)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    preexec_fn=(
                        _stop_with_parent
                        if threading.current_thread() is threading.main_thread()
                        else None
                    ),
                )
            try:
                benchkit.wait_for(self._ready, timeout, "nginx to answer", 0.05)
                return self
            except benchkit.BenchError:
                text = self._output()
                self.stop()
                if "Address already in use" not in text:
                    raise PushyError(f"nginx did not start: {text[-2000:]}") from None
        raise PushyError("nginx found no free port in 3 tries")

    def _output(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            with contextlib.suppress(OSError):
                parts.append((self.workdir / name).read_text(errors="replace"))
        return "\n".join(parts)

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise benchkit.BenchError(f"nginx exited with {self.process.returncode}")
        self._pids = _children(self.process.pid)
        if len(self._pids) < self.workers:
            return False
        try:
            self.status()
        except benchkit.BenchError:
            return False
        return True

    def status(self) -> dict[str, str]:
        """Nchan's stub status (``subscribers``, ``channels``, ...).

        Raises:
            BenchError: nginx did not answer.
        """
        try:
            with urllib.request.urlopen(self.url + "/status", timeout=5) as r:
                text = r.read().decode()
        except OSError as exc:
            raise benchkit.BenchError(f"nginx did not answer /status: {exc}") from None
        return dict(
            (m[1], m[2]) for m in re.finditer(r"^([^:\n]+): *(.*)$", text, re.M)
        )

    def subscribers(self) -> int:
        """The subscribers connected now."""
        return int(self.status()["subscribers"])

    def pids(self) -> list[int]:
        """The master's pid and its workers'."""
        assert self.process is not None
        return [self.process.pid, *self._pids]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop nginx (SIGTERM: its fast shutdown), killing the master and
        its workers if they are still there after ``timeout``."""
        proc, self.process = self.process, None
        if proc is None:
            return
        workers = _children(proc.pid) or self._pids
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> NchanServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    """The pids of the processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


# ------------------------------------------------------------ the scenario


def run_peers(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Run the peers scenario; return the results (also written as JSON).

    Raises:
        PushyError: bad options, Nchan missing and not installable, a
            process failed, or a connection or a message was lost (the
            results are written first).
    """
    _check(args)
    nginx = ensure_nchan(say)
    runs: list[dict[str, Any]] = []
    with bench._workspace(args) as (url, tmp, _):
        tokens = bench._token_files(tmp, "p", [args.connections])
        devices = [f"p{i}" for i in range(args.connections)]
        say(f"peers: {args.connections:,} connections and {args.pushes:,} "
            f"messages per system and run; Pushy: 1 node, 1 io thread, Redis "
            f"{url}, {args.window:,} in flight; Nchan: "
            f"{benchkit.count(args.nchan_workers, 'worker')}, "
            f"{benchkit.count(args.publishers, 'publisher connection')} x "
            f"{args.pipeline} in flight; {benchkit.count(args.runs, 'run')}")
        for index in range(args.runs):
            sides: dict[str, Callable[[], dict[str, Any]]] = {
                "pushy": lambda: _pushy_side(index, url, args, tokens, devices,
                                             tmp, say),
                "nchan": lambda: _nchan_side(index, nginx, args, tmp, say),
            }
            # Alternate which system goes first, against drift of the host.
            order = ["pushy", "nchan"] if index % 2 == 0 else ["nchan", "pushy"]
            run: dict[str, Any] = {"index": index, "order": order}
            for name in order:
                say(f"run {index}: {name}")
                run[name] = sides[name]()
            run["ratios"] = _ratios(run["pushy"], run["nchan"])
            # The floor: a bare sender, as many sends of a push's size.
            run["floor"] = bench_direct.fanout_floor(
                args.connections, args.pushes, bench_direct._push_frame_bytes(0))
            floor_cpu = run["floor"]["sender_cpu_s_per_1m"]
            run["floor_over_nchan"] = (
                run["nchan"]["node_cpu_s_per_1m"] / floor_cpu if floor_cpu else None
            )
            say(f"run {index}: the host's floor (a bare sender): {floor_cpu:.2f} "
                f"CPU-s per 1M, so no server can deliver more than "
                f"{run['floor_over_nchan'] or 0:.2f} times Nchan's messages per "
                "CPU-second here")
            runs.append(run)
            say(f"run {index}: Pushy / Nchan: " + ", ".join(
                f"{k} {v:.3g}" for k, v in run["ratios"].items() if v is not None
            ))
    summary = _summary(runs)
    result = {
        "scenario": "peers",
        "units": "bytes per connection; messages per second and per CPU-second",
        "connections": args.connections,
        "pushes_per_run": args.pushes,
        "pushy": {"nodes": 1, "threads": 1, "window": args.window,
                  "registry": "redis", "registry_ttl_s": args.registry_ttl_s},
        "nchan": {"workers": args.nchan_workers, "publishers": args.publishers,
                  "pipeline": args.pipeline, "version": _nchan_version(nginx)},
        "runs": runs,
        "summary": summary,
    }
    written = bench._write_results(result, Path(args.results), "peers",
                                   lambda path: _plot(result, path))
    _table(summary, say)
    say(written)
    _check_delivery(runs)
    return result


def _check(args: argparse.Namespace) -> None:
    """Refuse options out of range before anything starts."""
    if not 1 <= args.connections <= bench._NODE_MAX_CONNECTIONS:
        raise PushyError(f"--connections must be 1-{bench._NODE_MAX_CONNECTIONS:,} "
                         "(one node process)")
    if min(args.pushes, args.window, args.runs) < 1:
        raise PushyError("--pushes, --window and --runs must be at least 1")
    if not 1 <= args.nchan_workers <= 64:
        raise PushyError("--nchan-workers must be 1-64")
    if not 1 <= args.publishers <= 1000 or not 1 <= args.pipeline <= 4096:
        raise PushyError("--publishers must be 1-1000 and --pipeline 1-4096")
    if args.rate <= 0 or args.registry_ttl_s <= 0 or args.settle_s < 0:
        raise PushyError("--rate and --registry-ttl-s must be above 0, "
                         "--settle-s at least 0")


def _nchan_version(nginx: str) -> str:
    """The version of the Nchan package, or ``unknown``."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "libnginx-mod-nchan"],
            capture_output=True, text=True, timeout=10, check=False,
        )
        if done.returncode == 0 and done.stdout:
            return done.stdout
    return "unknown"


_SOURCE_ADDRS = ["127.0.0.2"]


def _pushy_side(
    index: int, url: str, args: argparse.Namespace, tokens: list[list[str]],
    devices: list[str], tmp: Path, say: Any,
) -> dict[str, Any]:
    """One run on Pushy: a fresh node, the idle figures, then the unicast."""
    prefix = bench._run_prefix(f"peers{index}")
    cluster = bench._bench_cluster(args, url, f"peers{index}", prefix,
                                   registry_ttl_s=args.registry_ttl_s)
    gens: list[benchkit.Loadgen] = []
    try:
        pids = [n.pid for n in cluster.nodes if n.pid is not None]
        time.sleep(1.0)  # let the node settle before the baseline
        before = benchkit.sample_memory(pids)
        gens, _ = bench._open_connections(
            cluster.port, lambda: bench._connections(cluster), args,
            [args.connections], tokens, _SOURCE_ADDRS, tmp, say,
            handshake_timeout_s=30, extra=["--pushes"],
        )
        say(f"  connected; measuring after the node's next registry refresh "
            f"round (every {args.registry_ttl_s / 3:g} s)")
        bench._steady_state(cluster, args.registry_ttl_s, args.settle_s)
        held = bench._connections(cluster)
        after = benchkit.sample_memory(pids)
        say(f"  unicast: {args.pushes:,} pushes, {args.window:,} in flight")
        unicast = _pushy_unicast(pids, url, prefix, gens[0], devices, args, tmp, say)
    finally:
        bench._close_all(cluster, gens)
    return _side(held, before, after, unicast, gens, say)


def _pushy_unicast(
    pids: list[int], url: str, prefix: str, gen: benchkit.Loadgen,
    devices: list[str], args: argparse.Namespace, tmp: Path, say: Any,
) -> dict[str, Any]:
    """Push to every device once (warm-up: routes cached, peer links open),
    then ``--pushes`` times to random devices, ``--window`` in flight,
    through ``pushy-pusher`` (the push library of ``PushClient(redis=)``)."""
    cmd = [
        bench.tool_path("pushy-pusher"), "--redis", url, "--prefix", prefix,
        "--devices", f"p:{len(devices)}", "--warm", "--count", str(args.pushes),
        "--window", str(args.window), "--node-pids", ",".join(map(str, pids)),
    ]  # fmt: skip
    report = bench_direct._pusher(cmd, tmp / "pusher.stderr",
                                  len(devices) + args.pushes, say)
    warm = int(report["warm"]["codes"].get("200", 0))
    codes = {str(k): int(v) for k, v in report["codes"].items()}
    accepted = codes.get("200", 0)
    seen = _wait_pushes(gen, warm + accepted)
    return _unicast(args.pushes, accepted, codes, {"received": warm, "last_ns": 0},
                    seen, int(report["t0_ns"]), float(report["node_cpu_s"]),
                    float(report["cpu_s"]))


def _nchan_side(
    index: int, nginx: str, args: argparse.Namespace, tmp: Path, say: Any
) -> dict[str, Any]:
    """One run on Nchan: a fresh nginx, the idle figures, then the unicast."""
    server = NchanServer(tmp / f"nchan{index}", workers=args.nchan_workers,
                         nginx=nginx).start()
    gens: list[benchkit.Loadgen] = []
    try:
        pids = server.pids()
        time.sleep(1.0)
        before = benchkit.sample_memory(pids)
        gens, seen = bench._open_connections(
            server.port, server.subscribers, args, [args.connections],
            [["--subscribe", "/sub/n:0"]], _SOURCE_ADDRS, tmp, say,
            handshake_timeout_s=30, extra=["--pushes"],
        )
        connected = int(seen["ready"][0]["connected"])
        last: list[int] = []

        def settled() -> bool:
            last.append(server.subscribers())
            return len(last) >= 3 and last[-1] == last[-2] == last[-3] == connected

        with contextlib.suppress(benchkit.BenchError):  # a loss shows in held
            benchkit.wait_for(settled, 30, "a steady subscriber count", 0.5)
        time.sleep(args.settle_s)
        held = server.subscribers()
        after = benchkit.sample_memory(pids)
        say(f"  unicast: {args.pushes:,} messages, one POST each")
        unicast = _nchan_unicast(server, pids, gens[0], args, say)
    finally:
        try:
            benchkit.stop_loadgens(gens)
        finally:
            server.stop()
    return _side(held, before, after, unicast, gens, say)


def _publish(
    server: NchanServer, args: argparse.Namespace, messages: int,
    gen: benchkit.Loadgen, say: Any,
) -> Any:
    """Run ``pushy-loadgen --publish``: ``messages`` POSTs to random
    channels, showing how many the devices of ``gen`` received meanwhile;
    returns its report."""
    cmd = [
        bench.loadgen_path(), "--port", str(server.port),
        "--publish", str(messages), "--publish-to", f"/pub/n:{args.connections}",
        "--publish-conns", str(args.publishers), "--pipeline", str(args.pipeline),
        "--json",
    ]  # fmt: skip
    # The publisher gives up by itself after 10 s without an answer.
    deadline = time.monotonic() + 60 + messages / 1000
    base = gen.pushes()["received"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        with benchkit.Progress("publishing", messages, say,
                               unit="received") as progress:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise benchkit.BenchError("the publisher did not end")
                progress.update(gen.pushes()["received"] - base)
                time.sleep(0.25)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    try:
        return json.loads(out.strip().splitlines()[-1])["publish"]
    except (IndexError, ValueError, KeyError):
        raise benchkit.BenchError(
            f"the publisher exited with {proc.returncode}: {err[-2000:]}"
        ) from None


def _nchan_unicast(
    server: NchanServer, pids: list[int], gen: benchkit.Loadgen,
    args: argparse.Namespace, say: Any,
) -> dict[str, Any]:
    """Publish to every channel once on average (warm-up), then
    ``--pushes`` messages to random channels."""
    warm = _publish(server, args, args.connections, gen, say)
    base = _wait_pushes(gen, sum(_accepted(warm["codes"])))
    cpu0 = sum(cpu_seconds(p) for p in pids)
    # The publisher is the only child that ends in the phase.
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic_ns()
    report = _publish(server, args, args.pushes, gen, say)
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    accepted = sum(_accepted(report["codes"]))
    seen = _wait_pushes(gen, base["received"] + accepted)
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    client_cpu = (child1.ru_utime + child1.ru_stime
                  - child0.ru_utime - child0.ru_stime)
    return _unicast(args.pushes, accepted, report["codes"], base, seen, t0, cpu,
                    client_cpu)


def _accepted(codes: dict[str, int]) -> Iterable[int]:
    """The counts of the 2xx codes of a ``code: count`` map."""
    return (n for code, n in codes.items() if 200 <= int(code) < 300)


def _wait_pushes(
    gen: benchkit.Loadgen, target: int, stall_s: float = 5.0
) -> dict[str, int]:
    """Wait until the load generator has received ``target`` pushes, or
    none more for ``stall_s``; returns its last count (see
    :meth:`benchkit.Loadgen.pushes`)."""
    seen = gen.pushes()
    moved = time.monotonic()
    while seen["received"] < target and time.monotonic() - moved < stall_s:
        time.sleep(0.02)
        now = gen.pushes()
        if now["received"] != seen["received"]:
            moved = time.monotonic()
        seen = now
    return seen


def _unicast(
    sent: int, accepted: int, codes: dict[str, int], base: dict[str, int],
    seen: dict[str, int], t0: int, cpu: float, client_cpu: float,
) -> dict[str, Any]:
    """The unicast figures of one side: ``accepted`` of the ``sent``
    messages were answered 2xx; the devices' count went from ``base`` to
    ``seen``; the phase began at ``t0`` (CLOCK_MONOTONIC ns) and cost the
    server ``cpu`` and the sender ``client_cpu`` seconds."""
    delivered = seen["received"] - base["received"]
    seconds = max(seen["last_ns"] - t0, 1) / 1e9
    return {
        "pushes": sent,
        "accepted": accepted,
        "codes": dict(sorted(codes.items())),
        "delivered": delivered,
        "not_delivered": max(sent - delivered, 0),
        "unicast_s": seconds,
        "delivered_per_s": delivered / seconds,
        "node_cpu_s": cpu,
        "node_cpu_s_per_1m": cpu / max(delivered, 1) * 1e6,
        "delivered_per_cpu_s": delivered / cpu if cpu > 0 else 0.0,
        "client_cpu_s_per_1m": client_cpu / max(delivered, 1) * 1e6,
    }


def _side(
    held: int, before: dict[str, int], after: dict[str, int],
    unicast: dict[str, Any], gens: list[benchkit.Loadgen], say: Any,
) -> dict[str, Any]:
    """The figures of one system in one run, said in a line."""
    figures = bench._loadgen_figures([g.report for g in gens])
    rss = after["rss"] - before["rss"]
    slab = after["slab"] - before["slab"]
    pushes = next((g.report.get("pushes", {}) for g in gens), {})

    def per_conn(v: float) -> float:
        return v / held if held else 0.0

    side = {
        "wanted": sum(g.connections for g in gens),
        "connected": figures["connected"],
        "held": held,
        "failed": figures["failed"],
        "failed_by_reason": figures["failed_by_reason"],
        "dropped_by_reason": figures["dropped_by_reason"],
        "upgrades_per_s": figures["upgrades_per_s"],
        "handshake_latency_us": figures["handshake_latency_us"],
        "rss_delta": rss,
        "slab_delta": slab,
        "rss_per_conn": per_conn(rss),
        "slab_per_conn": per_conn(slab),
        "rss_slab_per_conn": per_conn(rss + slab),
        **unicast,
        "latency_us": pushes.get("latency_us", {}),
    }
    say(f"  {held:,} held; RSS {side['rss_per_conn']:,.0f} B/conn, slab "
        f"{side['slab_per_conn']:,.0f} B/conn; {side['delivered']:,}/"
        f"{side['pushes']:,} delivered, {side['delivered_per_s']:,.0f}/s, "
        f"{side['node_cpu_s_per_1m']:.2f} CPU-s per 1M, "
        f"{side['delivered_per_cpu_s']:,.0f} per CPU-s")
    return side


_RATIO_KEYS = ("delivered_per_cpu_s", "delivered_per_s", "node_cpu_s_per_1m",
               "rss_per_conn", "slab_per_conn", "rss_slab_per_conn")


def _ratios(pushy: dict[str, Any], nchan: dict[str, Any]) -> dict[str, float | None]:
    """Pushy's figure over Nchan's, for each of :data:`_RATIO_KEYS` (None
    where Nchan's is not above 0)."""
    return {
        k: pushy[k] / nchan[k] if nchan[k] > 0 else None for k in _RATIO_KEYS
    }


#: The figures of the table: key, label, format.
_FIGURES = (
    ("held", "connections held", "{:,.0f}"),
    ("rss_per_conn", "server RSS per connection (B)", "{:,.0f}"),
    ("slab_per_conn", "kernel slab per connection (B)", "{:,.0f}"),
    ("rss_slab_per_conn", "RSS + slab per connection (B)", "{:,.0f}"),
    ("delivered_per_s", "delivered per second", "{:,.0f}"),
    ("node_cpu_s_per_1m", "server CPU-s per 1M delivered", "{:,.2f}"),
    ("delivered_per_cpu_s", "delivered per server CPU-s", "{:,.0f}"),
    ("client_cpu_s_per_1m", "sender CPU-s per 1M delivered", "{:,.2f}"),
    ("p50_us", "delivery latency p50 (us)", "{:,.0f}"),
    ("p99_us", "delivery latency p99 (us)", "{:,.0f}"),
)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of each figure and ratio over the runs, the
    goals' verdicts, and what failed."""

    def stat(values: Iterable[float | None]) -> dict[str, float] | None:
        v = [x for x in values if x is not None]
        return benchkit.summarize(v) if v else None

    def lat(side: dict[str, Any], q: str) -> float | None:
        return side["latency_us"].get(q) if side["latency_us"] else None

    summary: dict[str, Any] = {}
    for name in ("pushy", "nchan"):
        sides = [r[name] for r in runs]
        figures = {k: stat(s[k] for s in sides) for k, _, _ in _FIGURES
                   if not k.endswith("_us")}
        figures["p50_us"] = stat(lat(s, "p50") for s in sides)
        figures["p99_us"] = stat(lat(s, "p99") for s in sides)
        figures["failed_connections"] = sum(
            s["wanted"] - s["held"] for s in sides
        )
        figures["not_delivered"] = sum(s["not_delivered"] for s in sides)
        summary[name] = figures
    summary["ratios"] = {k: stat(r["ratios"][k] for r in runs) for k in _RATIO_KEYS}
    summary["floor"] = {
        "sender_cpu_s_per_1m": stat(r["floor"]["sender_cpu_s_per_1m"] for r in runs),
        "floor_over_nchan": stat(r["floor_over_nchan"] for r in runs),
    }
    goals = {}
    for key, (op, bound) in _GOALS.items():
        got = summary["ratios"][key]
        measured = got["median"] if got else None
        met = measured is not None and (
            measured >= bound if op == ">=" else measured <= bound
        )
        goals[key] = {"goal": f"{op} {bound:.3g}", "measured": measured, "met": met}
    summary["goals"] = goals
    return summary


def _cell(s: dict[str, float] | None, fmt: str) -> str:
    if s is None:
        return "-"
    return (f"{fmt.format(s['median'])} [{fmt.format(s['min'])}, "
            f"{fmt.format(s['max'])}]")


def _table(summary: dict[str, Any], say: Any) -> None:
    """Print both systems' figures and their ratio, then the goals."""
    say("over the runs (median [min, max]):")
    say(f"  {'figure':<32} {'Pushy':<28} {'Nchan':<28} Pushy/Nchan")
    for key, label, fmt in _FIGURES:
        ratio = summary["ratios"].get(key)
        say(f"  {label:<32} {_cell(summary['pushy'][key], fmt):<28} "
            f"{_cell(summary['nchan'][key], fmt):<28} {_cell(ratio, '{:.3g}')}")
    for key in ("failed_connections", "not_delivered"):
        say(f"  {key.replace('_', ' '):<32} {summary['pushy'][key]:<28,} "
            f"{summary['nchan'][key]:<28,}")
    floor = summary["floor"]
    say(f"  {'floor: bare sender CPU-s per 1M':<32} "
        f"{_cell(floor['sender_cpu_s_per_1m'], '{:,.2f}'):<28}")
    say(f"  the floor allows any server at most "
        f"{_cell(floor['floor_over_nchan'], '{:.3g}')} times Nchan's messages "
        "per CPU-second here")
    labels = {
        "delivered_per_cpu_s": "messages delivered per server CPU-second",
        "rss_per_conn": "bytes per connection, server RSS",
        "rss_slab_per_conn": "bytes per connection, RSS + kernel slab",
    }
    for key, goal in summary["goals"].items():
        got = goal["measured"]
        verdict = "met" if goal["met"] else "missed"
        say(f"  goal: {labels[key]}, Pushy/Nchan {goal['goal']}: "
            f"{'-' if got is None else f'{got:.3g}'} ({verdict})")


def _plot(result: dict[str, Any], path: Path) -> None:
    """Side-by-side bars of both systems' bytes per connection and
    messages per CPU-second, and the ratios against their goals."""
    plt = bench._pyplot()
    if plt is None:
        return
    summary = result["summary"]
    fig, (mem, cpu, ratio) = plt.subplots(1, 3, figsize=(14, 4))
    keys = (("rss_per_conn", "server RSS"), ("slab_per_conn", "kernel slab"),
            ("rss_slab_per_conn", "RSS + slab"))
    for k, name in enumerate(("pushy", "nchan")):
        values = [(summary[name][key] or {"median": 0})["median"] for key, _ in keys]
        mem.bar([i + k * 0.4 for i in range(len(keys))], values, 0.4,
                label=name.capitalize())
        got = summary[name]["delivered_per_cpu_s"] or {"median": 0}
        cpu.bar([name.capitalize()], [got["median"]], color=f"C{k}")
    mem.set_xticks([i + 0.2 for i in range(len(keys))])
    mem.set_xticklabels([label for _, label in keys])
    mem.set(ylabel="bytes per idle connection",
            title=f"{result['connections']:,} connections")
    mem.legend()
    cpu.set(ylabel="messages delivered per server CPU-second",
            title=f"unicast, {result['pushes_per_run']:,} messages")
    names = list(_GOALS)
    # A log axis: a ratio that is not above 0 (slab noise) shows as none.
    values = [max((summary["ratios"][k] or {"median": 0})["median"], 1e-3)
              for k in names]
    ratio.bar(range(len(names)), values, color="C2")
    for i, k in enumerate(names):
        ratio.hlines(_GOALS[k][1], i - 0.4, i + 0.4, colors="black",
                     linestyles="--", label="goal" if i == 0 else None)
    ratio.set_xticks(range(len(names)))
    ratio.set_xticklabels(["msgs per CPU-s", "RSS / conn", "RSS+slab / conn"])
    ratio.set(yscale="log", ylabel="Pushy / Nchan (median of runs)",
              title="ratios")
    bench._save(plt, fig, ratio, path)


def _check_delivery(runs: list[dict[str, Any]]) -> None:
    """Raise when a run lost a connection or a message (after the results
    were written)."""
    lost = [
        f"run {r['index']} {name}: {r[name]['wanted'] - r[name]['held']} "
        f"connections, {r[name]['not_delivered']} messages"
        for r in runs for name in ("pushy", "nchan")
        if r[name]["held"] < r[name]["wanted"] or r[name]["not_delivered"]
    ]
    if lost:
        raise PushyError("peers: lost " + "; ".join(lost))
