"""The ``pushy`` command line.

=====================  =====================================================
command                does
=====================  =====================================================
``pushy serve``        run a node in the foreground until SIGINT/SIGTERM
``pushy token``        print a device token
``pushy push``         push one message through a node's push API
``pushy demo``         run a node with simulated devices and show pushes
``pushy cluster``      run N nodes on one device port and one Redis registry
``pushy processor``    run a message processor of the queue in the foreground
``pushy devicelist``   run the device-list service until SIGINT/SIGTERM
``pushy bench``        run a benchmark (``pushy bench push``)
=====================  =====================================================

Every ``serve`` option can also come from the TOML file given with
``--config`` and from ``PUSHY_*`` environment variables; the command line
wins over both. The log level can come from ``PUSHY_LOG_LEVEL``.

Exit codes: 0 success; 1 a push that was not delivered; 2 a usage or
configuration error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ALGORITHMS, NodeConfig
from .errors import ConfigError, PushError, PushyError, TokenError
from .node import TRACE, Node, set_log_level

__all__ = ["LOG_LEVELS", "build_parser", "main"]

#: Values of ``--log-level`` and the :mod:`logging` levels they stand for.
LOG_LEVELS: dict[str, int] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}


# serve options: flag, field, type, help. Defaults come from NodeConfig.
# One entry per NodeConfig field but public_key (--public-key-file),
# deflate (--deflate/--no-deflate) and reuse_port (--reuse-port); TOML keys
# and PUSHY_* variables follow from the fields themselves (config.py).
_SERVE_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--host", "host", str, "address of the device port [0.0.0.0]"),
    ("--port", "port", int, "device (WebSocket) port; 0 picks a free port [8080]"),
    ("--push-host", "push_host", str, "address of the push API [127.0.0.1]"),
    ("--push-port", "push_port", int, "push API (HTTP) port; 0 picks one [8081]"),
    ("--secret", "secret", str, "HS256 token secret (prefer PUSHY_SECRET)"),
    ("--algorithm", "algorithm", str, "token algorithm [HS256]"),
    ("--audience", "audience", str, "required 'aud' claim of tokens"),
    ("--tls-cert", "tls_cert", str, "PEM certificate chain: wss:// [plain ws://]"),
    ("--tls-key", "tls_key", str, "PEM private key of --tls-cert"),
    ("--redis", "redis", str, "Redis URL of the registry [embedded one]"),
    ("--redis-prefix", "redis_prefix", str, "prefix of Redis keys [pushy:]"),
    ("--peer-host", "peer_host", str, "address of the peer link [127.0.0.1]"),
    ("--peer-port", "peer_port", int, "peer-link port; 0 picks one [0]"),
    ("--registry-ttl-s", "registry_ttl_s", float, "device record TTL [30]"),
    ("--node-id", "node_id", str, "node id [random]"),
    ("--threads", "threads", int, "io threads; 0 = number of cores [1]"),
    ("--heartbeat-s", "heartbeat_s", float, "seconds between pings [60]"),
    ("--pong-timeout-s", "pong_timeout_s", float, "pong deadline [15]"),
    ("--lifetime-s", "lifetime_s", float, "connection lifetime [1800]"),
    ("--upgrade-timeout-s", "upgrade_timeout_s", float, "upgrade deadline [10]"),
    ("--tls-handshake-timeout-s", "tls_handshake_timeout_s", float,
     "TLS handshake deadline [10]"),
    ("--close-timeout-s", "close_timeout_s", float, "closing deadline [5]"),
    ("--max-message-bytes", "max_message_bytes", int, "device message [65536]"),
    ("--max-push-bytes", "max_push_bytes", int, "push body [65536]"),
    ("--max-header-bytes", "max_header_bytes", int, "upgrade headers [8192]"),
    ("--max-headers", "max_headers", int, "number of upgrade headers [64]"),
    ("--max-connections", "max_connections", int,
     "devices; 0 = what the open-file limit leaves [0]"),
    ("--max-pending-upgrades", "max_pending_upgrades", int,
     "upgrades in progress at once; 0 = no limit [1024]"),
    ("--allowed-origins", "allowed_origins", str, "comma list; empty = any"),
    ("--push-timeout-s", "push_timeout_s", float, "default ack timeout [5]"),
    ("--d2d-rate", "d2d_rate", float, "d2d messages/s per connection [100]"),
    ("--d2d-burst", "d2d_burst", int, "d2d token bucket size [200]"),
    ("--max-d2d-bytes", "max_d2d_bytes", int, "largest d2d data [16384]"),
    ("--route-cache-ttl-s", "route_cache_ttl_s", float, "trust a route this long [10]"),
    ("--events-maxlen", "events_maxlen", int, "~N stream entries, 0 off [1000000]"),
    ("--accept-rate", "accept_rate", float, "upgrades/s; 0 = no limit [0]"),
    ("--accept-burst", "accept_burst", int, "upgrades at once; 0 = 1 s worth [0]"),
    ("--max-outbound-bytes", "max_outbound_bytes", int, "unread bytes, then 4003 [1048576]"),
    ("--reconnect-grace-s", "reconnect_grace_s", float, "close after reconnect [5]"),
    ("--drain-s", "drain_s", float, "SIGTERM drains over this long [10]"),
]


# processor options: flag, MessageProcessor argument, default, help.
_PROCESSOR_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--batch", "batch", 256, "entries read per request"),
    ("--max-in-flight", "max_in_flight", 10000, "messages being delivered at once"),
    ("--max-waiting", "max_waiting", 100000, "messages waiting for a retry"),
    ("--claim-idle-s", "claim_idle_s", 30.0, "claim entries pending this long"),
    ("--retry-min-s", "retry_min_s", 0.1, "first retry backoff"),
    ("--retry-max-s", "retry_max_s", 5.0, "longest retry backoff"),
    ("--ack-timeout-s", "ack_timeout_s", 5.0, "wait for a device's ack"),
    ("--push-timeout-s", "push_timeout_s", 10.0, "wait for a node beyond that"),
]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors read ``pushy: error: ...``."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(2, f"pushy: error: {message}\n")


#: serve options that ``pushy cluster`` sets itself (or defines its own way).
_CLUSTER_OWNED = (
    "host", "port", "push_port", "peer_port", "node_id", "redis", "reuse_port",
)


def _add_node_options(
    parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()
) -> None:
    """Add the node options of ``pushy serve`` to ``parser``, but ``skip``."""
    for flag, dest, kind, text in _SERVE_OPTIONS:
        if dest in skip:
            continue
        if dest.endswith("port"):
            metavar = "PORT"
        elif kind is float:
            metavar = "S" if dest.endswith("_s") else "R"
        elif kind is int:
            metavar = "N"
        elif dest.startswith("tls_"):
            metavar = "FILE"
        else:
            metavar = flag.removeprefix("--").upper().replace("-", "_")
        if dest == "algorithm":
            parser.add_argument(flag, dest=dest, choices=ALGORITHMS, help=text)
        else:
            parser.add_argument(
                flag, dest=dest, type=kind, metavar=metavar, help=text
            )
    parser.add_argument(
        "--public-key-file",
        metavar="PEM",
        help="PEM public key file for RS256/ES256 tokens",
    )
    parser.add_argument(
        "--deflate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="offer permessage-deflate [off]",
    )
    if "reuse_port" not in skip:
        parser.add_argument(
            "--reuse-port",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="share the device port with other nodes (SO_REUSEPORT) [off]",
        )
    _add_log_level(parser)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``pushy`` command line."""
    from . import __version__, bench, demo

    parser = _Parser(
        prog="pushy",
        description="Pushy: a WebSocket push platform.",
        epilog="Run 'pushy COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"pushy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run a node in the foreground",
        description="Run a node until SIGINT or SIGTERM. Every option can also "
        "come from the --config TOML file and from PUSHY_* variables.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    _add_node_options(serve)
    serve.set_defaults(func=_serve)

    token = commands.add_parser(
        "token",
        help="print a device token",
        description="Print a signed device token (JWT).",
    )
    token.add_argument(
        "--secret",
        default=os.environ.get("PUSHY_SECRET"),
        help="HS256 secret [PUSHY_SECRET]",
    )
    token.add_argument("--device", required=True, help="device id (sub)")
    token.add_argument("--account", required=True, help="account id (acc)")
    token.add_argument(
        "--ttl", type=float, default=3600, metavar="SECONDS", help="lifetime [3600]"
    )
    token.add_argument("--algorithm", choices=ALGORITHMS, default="HS256")
    token.add_argument("--audience", help="aud claim")
    token.add_argument(
        "--private-key-file", metavar="PEM", help="PEM private key file for RS256/ES256"
    )
    token.add_argument(
        "--meta",
        metavar="JSON",
        help="meta claim: a JSON object of at most 1024 bytes, carried in the "
        "device's connection events",
    )
    token.set_defaults(func=_token)

    push = commands.add_parser(
        "push",
        help="push one message to a device",
        description="Push one message through a node's push API (or straight "
        "to the device's node, found in Redis) and print the result as JSON. "
        "Exits 0 if it was delivered, else 1.",
    )
    push.add_argument("--to", required=True, metavar="DEVICE", help="device id")
    push.add_argument("--data", required=True, metavar="JSON", help="JSON payload")
    push.add_argument(
        "--url",
        default=os.environ.get("PUSHY_PUSH_URL", "http://127.0.0.1:8081"),
        help="push API URL [PUSHY_PUSH_URL or http://127.0.0.1:8081]",
    )
    _add_redis_options(
        push,
        "find the device's node in this Redis registry and push to it "
        "directly (instead of --url)",
    )
    push.add_argument(
        "--ack",
        choices=("written", "client"),
        default="written",
        help="when the push counts as delivered [written]",
    )
    push.add_argument(
        "--timeout-ms",
        type=int,
        metavar="MS",
        help="ack timeout [the node's push_timeout_s]",
    )
    push.set_defaults(func=_push)

    demo.add_parser(commands)
    bench.add_parser(commands)

    cluster = commands.add_parser(
        "cluster",
        help="run several nodes sharing a Redis registry",
        description="Run N 'pushy serve' processes in the foreground, sharing "
        "one device port (SO_REUSEPORT) and the Redis registry, each with its "
        "own push port, peer port and node id NAME-I; stop them all on Ctrl-C "
        "or SIGTERM. Node options are those of 'pushy serve' and apply to "
        "every node; PUSHY_* variables reach the nodes too. The nodes' logs "
        "go to stderr, each line after '[NODE-ID] '.",
    )
    cluster.add_argument(
        "--nodes", type=int, required=True, metavar="N", help="number of nodes"
    )
    cluster.add_argument(
        "--redis", required=True, metavar="URL", help="Redis URL of the registry"
    )
    cluster.add_argument(
        "--host",
        default="127.0.0.1",
        help="address of the shared device port [127.0.0.1]",
    )
    cluster.add_argument(
        "--port",
        type=int,
        default=0,
        metavar="PORT",
        help="shared device port; 0 picks a free one [0]",
    )
    cluster.add_argument("--secret", help="HS256 token secret [PUSHY_SECRET]")
    cluster.add_argument(
        "--name", default="node", help="node ids are NAME-0, NAME-1, ... [node]"
    )
    _add_node_options(cluster, skip=(*_CLUSTER_OWNED, "secret"))
    cluster.set_defaults(func=_cluster)

    processor = commands.add_parser(
        "processor",
        help="run a message processor of the queue",
        description="Consume the queue (Redis Streams shards {prefix}q:N) with a "
        "consumer group and deliver each message by direct push, retrying "
        "while the device is offline, until SIGINT or SIGTERM. Run several "
        "(distinct --consumer names) to share the work.",
    )
    _add_redis_options(processor, "Redis URL of the registry and the queue")
    processor.add_argument(
        "--group", default="processors", help="consumer group [processors]"
    )
    processor.add_argument("--consumer", help="name in the group [HOST-PID]")
    processor.add_argument("--shards", type=int, default=4, help="queue shards [4]")
    for flag, dest, default, text in _PROCESSOR_OPTIONS:
        processor.add_argument(
            flag, dest=dest, type=type(default), default=default,
            help=f"{text} [{default:g}]",
        )
    _add_log_level(processor)
    processor.set_defaults(func=_processor)

    devicelist = commands.add_parser(
        "devicelist",
        help="run the device-list service",
        description="Run the device-list service in the foreground until "
        "SIGINT or SIGTERM: it reads the nodes' connection events from Redis "
        "(consumer group GROUP), keeps each account's online devices there and "
        "tells subscribed devices when another device of their account comes "
        "online or goes offline.",
    )
    _add_redis_options(devicelist, "Redis URL of the fleet", "--prefix")
    devicelist.add_argument(
        "--group", default="devicelist", help="consumer group [devicelist]"
    )
    devicelist.add_argument(
        "--consumer", help="consumer name, one per running service [HOST-PID]"
    )
    devicelist.add_argument(
        "--sweep-s",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between sweeps for gone nodes [5]",
    )
    devicelist.add_argument(
        "--claim-s",
        type=float,
        default=30.0,
        metavar="S",
        help="claim entries pending this long with another consumer [30]",
    )
    _add_log_level(devicelist)
    devicelist.set_defaults(func=_devicelist)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code.

    Args:
        argv: the arguments; ``sys.argv[1:]`` when ``None``.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except (ConfigError, TokenError) as exc:
        return _fail(str(exc))


# Commands.


def _raise_file_limit() -> None:
    """Raise this process's soft open-file limit to its hard limit: every
    device is a descriptor, and the node takes as many devices as the limit
    leaves (``max_connections`` 0)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    overrides = {dest: getattr(args, dest) for _, dest, _, _ in _SERVE_OPTIONS}
    overrides["deflate"] = args.deflate
    overrides["reuse_port"] = args.reuse_port
    if args.public_key_file:
        overrides["public_key"] = _read_text(args.public_key_file, "--public-key-file")
    config = NodeConfig.from_sources(args.config, **overrides)
    _warn_short_secret(config.algorithm, config.secret)
    _raise_file_limit()
    node = Node(config)

    # SIGTERM (a deploy) drains the node over drain_s; SIGINT (Ctrl-C), or
    # a second signal during a drain, stops it at once.
    signals = _Signals()
    try:
        node.start()
        peer = f", peer {node.peer_address}" if node.peer_address else ""
        print(
            f"pushy: node {node.node_id} listening: devices {node.url}, "
            f"push {node.push_url}{peer}",
            flush=True,
        )
        drained = True  # unless a signal stops the node at once
        while node.running:
            if signals.wait(0.05):
                if signals.received == [signal.SIGTERM]:
                    node.drain()
                    print(
                        f"pushy: node {node.node_id} draining over "
                        f"{config.drain_s:g} s",
                        flush=True,
                    )
                else:
                    drained = False
                    break
        if not signals.received and not node.draining:
            return _fail("node stopped unexpectedly", code=1)
    finally:
        # The handlers stay until the node is down: a second SIGTERM during
        # the shutdown is not a reason to skip the rest of it.
        node.stop()
        signals.restore()
    how = "drained and stopped" if drained and node.draining else "stopped"
    print(f"pushy: node {node.node_id} {how}", flush=True)
    return 0


def _token(args: argparse.Namespace) -> int:
    from .tokens import issue_token

    private_key = None
    if args.private_key_file:
        private_key = _read_text(args.private_key_file, "--private-key-file")
    elif args.algorithm.startswith("HS") and not args.secret:
        return _fail("--secret is required (or set PUSHY_SECRET)")
    if args.ttl <= 0:
        return _fail(f"--ttl must be a positive number of seconds, got {args.ttl:g}")
    meta = None
    if args.meta is not None:
        try:
            meta = json.loads(args.meta)
        except ValueError as exc:
            return _fail(f"--meta must be a JSON object: {exc}")
    if private_key is None:
        _warn_short_secret(args.algorithm, args.secret)
    with warnings.catch_warnings():
        # Said once above, in our words, instead of PyJWT's.
        warnings.simplefilter("ignore")
        token = issue_token(
            args.secret,
            args.device,
            account=args.account,
            ttl=args.ttl,
            algorithm=args.algorithm,
            audience=args.audience,
            private_key=private_key,
            meta=meta,
        )
    print(token)
    return 0


def _push(args: argparse.Namespace) -> int:
    from .push import PushClient

    try:
        data = json.loads(args.data)
    except ValueError as exc:
        return _fail(f"--data must be JSON: {exc}")
    timeout = None if args.timeout_ms is None else args.timeout_ms / 1000
    try:
        if args.redis:
            client = PushClient(redis=args.redis, prefix=args.redis_prefix)
        else:
            client = PushClient(args.url)
    except PushyError as exc:
        return _fail(str(exc))
    with client:
        try:
            result = client.push(args.to, data, ack=args.ack, timeout=timeout)
        except PushError as exc:
            return _fail(str(exc), code=1)
    print(json.dumps(result.to_dict()))
    return 0 if result.delivered else 1


def _cluster(args: argparse.Namespace) -> int:
    from .cluster import Cluster

    if args.nodes < 1:
        return _fail(f"--nodes must be at least 1, got {args.nodes}")
    options: dict[str, Any] = {
        dest: getattr(args, dest)
        for _, dest, _, _ in _SERVE_OPTIONS
        if dest not in _CLUSTER_OWNED and dest != "secret"
    }
    options["deflate"] = args.deflate
    if args.public_key_file:
        options["public_key"] = _read_text(args.public_key_file, "--public-key-file")
    options = {k: v for k, v in options.items() if v is not None}
    # Check what every node will run with (flags over PUSHY_* variables), so
    # that a bad option is a usage error here rather than N failed starts.
    config = NodeConfig.from_sources(
        None,
        **options,
        host=args.host,
        port=args.port,
        push_port=0,
        peer_port=0,
        redis=args.redis,
        secret=args.secret,
    )
    if config.algorithm.startswith("HS") and not config.secret:
        return _fail("a secret is needed: --secret or PUSHY_SECRET")
    _warn_short_secret(config.algorithm, config.secret)
    config.validate()
    if args.log_level is not None:
        options["log_level"] = args.log_level
    output = threading.Lock()

    def echo(node_id: str, line: str) -> None:
        with output:
            sys.stderr.write(f"[{node_id}] {line}")
            sys.stderr.flush()

    cluster = Cluster(
        args.nodes,
        args.redis,
        secret=args.secret,
        host=args.host,
        port=args.port,
        name=args.name,
        on_output=echo,
        **options,
    )
    stop = _Signals()
    try:
        try:
            cluster.start()
        except ConfigError as exc:  # refused credentials or database
            return _fail(str(exc))
        except PushyError as exc:
            return _fail(str(exc), code=1)
        for node in cluster.nodes:
            print(
                f"pushy: node {node.node_id} listening: push {node.push_url}, "
                f"peer {node.peer_address}",
                flush=True,
            )
        print(
            f"pushy: cluster of {len(cluster.nodes)} nodes, devices {cluster.url}",
            flush=True,
        )
        # A node that dies leaves the others serving: its devices reconnect
        # to them through the shared port, as in a fleet.
        gone: set[str] = set()
        while not stop.wait(0.5):
            for node in cluster.nodes:
                if node.node_id in gone or node.running or stop.received:
                    continue
                gone.add(node.node_id)
                code = node.process.returncode if node.process else None
                left = len(cluster.nodes) - len(gone)
                print(
                    f"pushy: warning: node {node.node_id} exited with {code}; "
                    f"{left} of {len(cluster.nodes)} nodes still running",
                    file=sys.stderr,
                    flush=True,
                )
            if len(gone) == len(cluster.nodes):
                return _fail("every node has exited", code=1)
    finally:
        cluster.stop()
        stop.restore()
    print("pushy: cluster stopped", flush=True)
    return 0


def _processor(args: argparse.Namespace) -> int:
    from .processor import MessageProcessor

    if not args.redis:
        return _fail("--redis is required (or set PUSHY_REDIS)")
    _setup_logging(args.log_level)
    options = {dest: getattr(args, dest) for _, dest, _, _ in _PROCESSOR_OPTIONS}
    processor = MessageProcessor(
        args.redis,
        prefix=args.redis_prefix,
        group=args.group,
        consumer=args.consumer,
        shards=args.shards,
        **options,
    )
    stop = _Signals()
    try:
        processor.start()
        print(
            f"pushy: processor {processor.consumer} consuming "
            f"{args.redis_prefix}q:0..{args.shards - 1} as group {args.group}",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        processor.stop()
        stop.restore()
    stats = processor.stats()
    print(
        f"pushy: processor {processor.consumer} stopped: "
        f"{stats['delivered']} delivered, {stats['expired']} expired, "
        f"{stats['undeliverable'] + stats['malformed']} undeliverable",
        flush=True,
    )
    return 0


def _devicelist(args: argparse.Namespace) -> int:
    from .devicelist import DeviceListService
    from .push import _redacted

    _setup_logging(args.log_level)
    if not args.redis:
        return _fail("--redis is required (or set PUSHY_REDIS)")
    service = DeviceListService(
        args.redis,
        prefix=args.redis_prefix,
        group=args.group,
        consumer=args.consumer,
        sweep_s=args.sweep_s,
        claim_s=args.claim_s,
    )
    stop = _Signals()
    try:
        try:
            service.start_thread()
        except ConfigError as exc:  # refused credentials or database
            return _fail(str(exc))
        except PushyError as exc:
            return _fail(str(exc), code=1)
        print(
            f"pushy: devicelist consumer {service.consumer} of group "
            f"{service.group} on {_redacted(args.redis)}, stream "
            f"{args.redis_prefix}events",
            flush=True,
        )
        while not stop.wait(0.5):
            if not service.running:
                return _fail("the device-list service stopped unexpectedly", code=1)
    finally:
        service.stop_thread()
        stop.restore()
    print("pushy: devicelist stopped", flush=True)
    return 0


# Helpers.


def _warn_short_secret(algorithm: str, secret: str | None) -> None:
    """Warn on stderr when an HMAC secret is shorter than its hash output.

    RFC 7518 section 3.2: a key for HS256 must have at least 256 bits.
    """
    if not algorithm.startswith("HS") or not secret:
        return
    needed = int(algorithm[2:]) // 8
    have = len(secret.encode())
    if have < needed:
        print(
            f"pushy: warning: the secret is {have} bytes; {algorithm} wants at "
            f"least {needed} (RFC 7518 section 3.2): tokens signed with it can "
            "be forged by guessing it",
            file=sys.stderr,
            flush=True,
        )


def _fail(message: str, code: int = 2) -> int:
    print(f"pushy: error: {message}", file=sys.stderr, flush=True)
    return code


def _add_redis_options(
    parser: argparse.ArgumentParser, what: str, *prefix_aliases: str
) -> None:
    """``--redis URL`` (from ``PUSHY_REDIS``) and ``--redis-prefix P``."""
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=os.environ.get("PUSHY_REDIS") or None,
        help=f"{what} [PUSHY_REDIS]",
    )
    parser.add_argument(
        "--redis-prefix",
        *prefix_aliases,
        dest="redis_prefix",
        metavar="P",
        default=os.environ.get("PUSHY_REDIS_PREFIX", "pushy:"),
        help="prefix of Redis keys [PUSHY_REDIS_PREFIX or pushy:]",
    )


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        choices=tuple(LOG_LEVELS),
        default=None,
        help="log level [PUSHY_LOG_LEVEL or info]",
    )


def _setup_logging(name: str | None) -> None:
    """Log to stderr at the level of ``--log-level`` or ``PUSHY_LOG_LEVEL``."""
    name = (name or os.environ.get("PUSHY_LOG_LEVEL") or "info").lower()
    if name not in LOG_LEVELS:
        raise ConfigError(
            f"log level must be one of {', '.join(LOG_LEVELS)}, got {name!r}"
        )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    set_log_level(LOG_LEVELS[name])


def _read_text(path: str, option: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{option}: cannot read {path!r}: {exc.strerror}") from exc


class _Signals:
    """SIGINT and SIGTERM as they arrive, for a loop on the main thread to
    poll; ``restore()`` puts the previous handlers back.

    The handler only appends to a list. A handler that took a lock (as
    ``threading.Event.set`` does) could run while the main thread holds that
    same lock inside ``Event.wait`` and block the process for good.
    Outside the main thread signals cannot be caught; Ctrl-C then raises
    KeyboardInterrupt as usual.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._seen = 0
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received.append(signum)

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True as soon as a signal has
        arrived since the last call that returned True."""
        deadline = time.monotonic() + timeout
        while len(self.received) == self._seen:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 0.05))
        self._seen = len(self.received)
        return True

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
