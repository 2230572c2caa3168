"""``pushy demo``: a node, a few simulated devices, and pushes to watch.

The demo starts a node on free ports with a random secret, connects simulated
devices, pushes messages to them (``ack="written"`` and ``ack="client"``,
a batch, and one push to an unknown device) and prints every outcome as it
happens. Then it keeps serving and prints how to connect a device of your own
and how to push to it with curl, until Ctrl-C (or ``--duration``, or at once
with ``--no-wait``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .device import DeviceClient
from .errors import ConnectError, ConnectionClosed, PushyError
from .node import Node
from .push import PushClient, PushResult
from .tokens import issue_token

__all__ = ["DEMO_ACCOUNT", "DEMO_DEVICES", "add_parser", "run"]

#: Ids of the simulated devices.
DEMO_DEVICES = ("living-room-tv", "kitchen-tv", "alice-phone", "bob-phone", "car")

#: Account of the simulated devices.
DEMO_ACCOUNT = "demo"


def add_parser(commands: Any) -> None:
    """Add the ``demo`` command to the ``pushy`` sub-command parsers."""
    demo = commands.add_parser(
        "demo",
        help="run a node with simulated devices and show pushes",
        description="Start a node on free ports with simulated devices, push "
        "to them printing each outcome, then keep serving until Ctrl-C.",
    )
    demo.add_argument(
        "--devices",
        type=int,
        default=5,
        metavar="N",
        help=f"simulated devices, at most {len(DEMO_DEVICES)} [5]",
    )
    demo.add_argument("--host", default="127.0.0.1", help="address [127.0.0.1]")
    demo.add_argument("--port", type=int, default=0, help="device port [free]")
    demo.add_argument("--push-port", type=int, default=0, help="push port [free]")
    stop = demo.add_mutually_exclusive_group()
    stop.add_argument(
        "--no-wait",
        action="store_true",
        help="exit after the pushes instead of serving",
    )
    stop.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="serve S seconds after the pushes, then exit",
    )
    demo.add_argument(
        "--log-level",
        choices=("trace", "debug", "info", "warning", "error", "critical", "off"),
        default=None,
        help="log level [PUSHY_LOG_LEVEL or warning]",
    )
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; return the exit code.

    Raises:
        ConfigError: a port is in use or an option is invalid.
    """
    import os

    from .cli import _setup_logging

    _setup_logging(args.log_level or os.environ.get("PUSHY_LOG_LEVEL") or "warning")
    count = max(1, min(args.devices, len(DEMO_DEVICES)))
    secret = secrets.token_urlsafe(48)
    node = Node(host=args.host, port=args.port, push_port=args.push_port, secret=secret)
    node.start()
    try:
        return asyncio.run(_demo(node, secret, DEMO_DEVICES[:count], args))
    except KeyboardInterrupt:
        return 0
    finally:
        node.stop()
        _say(f"pushy demo: node {node.node_id} stopped")


async def _demo(
    node: Node, secret: str, devices: tuple[str, ...], args: argparse.Namespace
) -> int:
    _say(
        f"pushy demo: node {node.node_id} listening: devices {node.url}, "
        f"push {node.push_url}"
    )

    # Connect the simulated devices; each prints what it receives.
    clients: dict[str, DeviceClient] = {}
    for device in devices:
        token = issue_token(secret, device, account=DEMO_ACCOUNT, ttl=24 * 3600)
        client = DeviceClient(node.url, token, device=device)
        try:
            await client.connect()
        except ConnectError as exc:
            _say(f"  device {device:<15} could not connect: {exc}")
            continue
        clients[device] = client
        _say(f"  device {device:<15} connected to node {client.node}")
    listeners = [asyncio.create_task(_listen(c)) for c in clients.values()]

    async with PushClient(node.push_url) as pusher:
        await _pushes(pusher, list(clients))
        await _device_to_device(clients)
        _instructions(node, secret)

        if not args.no_wait:
            await _serve(args.duration)

    for task in listeners:
        task.cancel()
    await asyncio.gather(*listeners, return_exceptions=True)
    for client in clients.values():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), timeout=2)
    return 0


async def _pushes(pusher: PushClient, devices: list[str]) -> None:
    """Push to each device, to an unknown one, and as a batch; print each."""
    # Open the HTTP connection first so that latencies show the push alone.
    await pusher.ahealthy()
    _say("")
    _say("pushing (service -> node -> device):")
    number = 0
    for i, device in enumerate(devices):
        ack = "written" if i % 2 == 0 else "client"
        data = {"title": f"hello {device}", "n": i + 1}
        number += 1
        await _push_one(pusher, number, device, data, ack)
    number += 1
    await _push_one(pusher, number, "ghost-device", {"title": "anyone?"}, "written")

    if devices:
        _say("pushing a batch (one request, one result per push):")
        items = [(device, {"title": "batch", "to": device}) for device in devices]
        try:
            results = await pusher.apush_many(items)
        except PushyError as exc:
            _say(f"  batch failed: {exc}")
            return
        for (device, _), result in zip(items, results, strict=True):
            _say(f"  batch  {_outcome(device, 'written', result)}")


async def _device_to_device(clients: dict[str, DeviceClient]) -> None:
    """A phone sends a message to a TV and to a device that is not there."""
    names = list(clients)
    if len(names) < 2:
        return
    sender, target = clients[names[-1]], names[0]
    _say(f"device to device ({names[-1]} -> node -> {target}):")
    for to, data in ((target, {"cmd": "play"}), ("ghost-device", {"cmd": "play"})):
        mid = await sender.send_d2d(to, data)
        _say(f"  device {names[-1]:<15} sent d2d {mid} to {to}: {_short(data)}")
        # The listeners print the target's message and the sender's status.
        await asyncio.sleep(0.2)


async def _push_one(
    pusher: PushClient, number: int, device: str, data: Any, ack: str
) -> None:
    try:
        result = await pusher.apush(device, data, ack=ack, timeout=5.0)
    except PushyError as exc:
        _say(f"  push {number}: {device:<15} failed: {exc}")
        return
    _say(f"  push {number}: {_outcome(device, ack, result)}")


def _outcome(device: str, ack: str, result: PushResult) -> str:
    micro = result.latency * 1e6
    return (
        f"{device:<15} ack={ack:<7} -> {result.code} {result.status:<13} "
        f"{micro:>9,.0f} {_micro()}"
    )


async def _listen(client: DeviceClient) -> None:
    """Print what a simulated device receives; ack pushes that ask for it."""
    name = client.device
    while True:
        try:
            message = await client.receive()
        except ConnectionClosed as exc:
            reason = f" ({exc.reason})" if exc.reason else ""
            _say(f"  device {name:<15} disconnected: code {exc.code}{reason}")
            return
        except PushyError as exc:
            _say(f"  device {name:<15} got a bad message: {exc}")
            continue
        kind = message.get("t")
        if kind == "push":
            acked = " (acking)" if message.get("ack") else ""
            _say(
                f"  device {name:<15} received push {message.get('id')}: "
                f"{_short(message.get('data'))}{acked}"
            )
            if message.get("ack"):
                with contextlib.suppress(PushyError):
                    await client.ack(message["id"])
        elif kind == "d2d":
            _say(
                f"  device {name:<15} received d2d from {message.get('from')}: "
                f"{_short(message.get('data'))}"
            )
        elif kind == "status":
            _say(
                f"  device {name:<15} got status {message.get('code')} "
                f"for message {message.get('id')}"
            )
        else:
            _say(f"  device {name:<15} received {_short(message)}")


def _instructions(node: Node, secret: str) -> None:
    push_url = node.push_url
    body = '{"device":"my-device","data":{"hello":"world"}}'
    data = '{"hello":"world"}'
    pushy, python = _commands()
    _say("")
    _say("try it yourself, in another terminal:")
    _say("  # connect a device of your own")
    _say(
        f"  TOKEN=$({pushy} token --secret={shlex.quote(secret)} "
        f"--device my-device --account {DEMO_ACCOUNT})"
    )
    _say(f'  {python} -m websockets "{node.url}?token=$TOKEN"')
    _say("  # push to it (or to living-room-tv)")
    _say(
        f"  curl -s -X POST {push_url}/v1/push "
        f"-H 'content-type: application/json' -d '{body}'"
    )
    _say(f"  {pushy} push --url {push_url} --to my-device --data '{data}'")
    _say("  # look at the node")
    _say(f"  curl -s {push_url}/v1/stats")
    _say("")


def _commands() -> tuple[str, str]:
    """How to run ``pushy`` and this Python from another terminal.

    Plain names when they are on ``PATH`` (an activated virtual environment),
    else full paths (``scripts/dev.sh demo`` runs ``.venv/bin/pushy``).
    """
    python = sys.executable
    pushy = str(Path(python).with_name("pushy"))
    if not Path(pushy).exists():
        pushy = f"{shlex.quote(python)} -m pushy"
    if shutil.which("python") == python:
        python = "python"
    if shutil.which("pushy") == pushy:
        pushy = "pushy"
    return pushy, python


async def _serve(duration: float | None) -> None:
    """Wait for Ctrl-C/SIGTERM, or ``duration`` seconds when given."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
                handled.append(signum)
    if duration is None:
        _say("serving; press Ctrl-C to stop")
    else:
        _say(f"serving for {duration:g} s; press Ctrl-C to stop sooner")
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=duration)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


def _short(value: Any, limit: int = 60) -> str:
    import json

    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _can_print(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _micro() -> str:
    return "µs" if _can_print("µs") else "us"


def _say(text: str) -> None:
    print(text, flush=True)
