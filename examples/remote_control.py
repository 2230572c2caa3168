#!/usr/bin/env python3
"""A phone remote-controls a TV player through a local two-node cluster.

The app protocol lives entirely inside the ``data`` of device-to-device
messages (docs/d2d.md): the phone sends commands, the TV answers each with
its player state, and the node only carries the envelope and tells the
sender what happened to each message (its ``status``).

    phone -> tv    {"cmd": "play"} | {"cmd": "pause"} | {"cmd": "seek", "to": S}
    tv -> phone    {"re": ID, "state": "playing"|"paused", "position": S}

It starts a redis-server on a free port (or uses ``--redis URL``) and a
cluster of two ``pushy serve`` processes sharing one device port, connects
the TV and the phone to different nodes, runs a few commands, shows a
message to a device that is not there (404) and one to a device of another
account (403), and stops everything.

Run it from a clone after ``scripts/dev.sh install``::

    .venv/bin/python examples/remote_control.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import time
from typing import Any

import pushy
from pushy.testing import RedisServer


class TvPlayer:
    """The TV side: a player that obeys the phone's commands."""

    def __init__(self, device: pushy.DeviceClient) -> None:
        self.device = device
        self.state = "paused"
        self.position = 0.0
        self.started_at: float | None = None

    def now(self) -> float:
        if self.started_at is None:
            return self.position
        return self.position + time.monotonic() - self.started_at

    def apply(self, command: dict[str, Any]) -> None:
        cmd = command.get("cmd")
        if cmd == "play" and self.state != "playing":
            self.state, self.started_at = "playing", time.monotonic()
        elif cmd == "pause" and self.state == "playing":
            self.position, self.started_at = self.now(), None
            self.state = "paused"
        elif cmd == "seek":
            self.position = float(command.get("to", 0))
            if self.started_at is not None:
                self.started_at = time.monotonic()

    async def serve(self) -> None:
        """Answer every command with the player's state, until cancelled."""
        while True:
            message = await self.device.wait_for("d2d")
            self.apply(message["data"])
            reply = {
                "re": message["id"],
                "state": self.state,
                "position": round(self.now(), 1),
            }
            status = await self.device.d2d(message["from"], reply, timeout=5)
            if status["code"] != 200:
                print(f"tv: reply to {message['from']} answered {status}")


async def command(phone: pushy.DeviceClient, tv: str, data: dict[str, Any]) -> None:
    """Send one command to the TV; print its status and the TV's answer."""
    started = time.perf_counter()
    mid = await phone.send_d2d(tv, data)
    status = await phone.wait_for("status", id=mid, timeout=5)
    if status["code"] != 200:
        print(f"phone -> {tv} {data}: {status['code']} {status.get('reason', '')}")
        return
    answer = await phone.wait_for("d2d", timeout=5)
    took = (time.perf_counter() - started) * 1000
    print(
        f"phone -> {tv} {data}: 200; tv answered {answer['data']} "
        f"({took:.1f} ms round trip)"
    )


async def connect_apart(
    url: str, secret: str
) -> tuple[pushy.DeviceClient, pushy.DeviceClient]:
    """Connect the TV and the phone, the phone on another node than the TV.

    The nodes share one device port and the kernel picks a node for each
    connection, so the phone connects again until it lands elsewhere.
    """
    tv = pushy.DeviceClient(url, pushy.issue_token(secret, "living-room-tv", "home"))
    await tv.connect()
    for _ in range(50):
        phone = pushy.DeviceClient(url, pushy.issue_token(secret, "phone-1", "home"))
        await phone.connect()
        if phone.node != tv.node:
            return tv, phone
        await phone.close()
    return tv, phone  # pragma: no cover - the kernel never spread them


async def run(redis_url: str) -> None:
    secret = secrets.token_urlsafe(32)
    with pushy.Cluster(2, redis_url, secret=secret, name="home") as cluster:
        for node in cluster.nodes:
            print(f"node {node.node_id}: push {node.push_url}")
        print(f"devices connect to {cluster.url}")
        tv, phone = await connect_apart(cluster.url, secret)
        print(f"living-room-tv on {tv.node}, phone-1 on {phone.node}")
        player = asyncio.create_task(TvPlayer(tv).serve())
        try:
            await command(phone, "living-room-tv", {"cmd": "play"})
            await asyncio.sleep(0.3)
            await command(phone, "living-room-tv", {"cmd": "pause"})
            await command(phone, "living-room-tv", {"cmd": "seek", "to": 42})
            await command(phone, "living-room-tv", {"cmd": "play"})
            await command(phone, "kitchen-tv", {"cmd": "play"})
            neighbour = pushy.DeviceClient(
                cluster.url, pushy.issue_token(secret, "neighbour-tv", "next-door")
            )
            async with neighbour:
                await command(phone, "neighbour-tv", {"cmd": "play"})
        finally:
            player.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await player
            await phone.close()
            await tv.close()
    print("cluster stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", metavar="URL", help="a Redis to use")
    args = parser.parse_args()
    if args.redis:
        asyncio.run(run(args.redis))
        return
    with RedisServer() as redis:
        print(f"redis-server on {redis.url}")
        asyncio.run(run(redis.url))


if __name__ == "__main__":
    main()
