#!/usr/bin/env python3
"""Pushy quick start: a node, two devices, two pushes.

Starts a node on free loopback ports, connects two devices, pushes one
message to each (``ack="written"`` and ``ack="client"``), prints what the
service and the devices saw, and stops the node.

Run it from a clone after ``scripts/dev.sh install``::

    .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

import asyncio
import json
import secrets

import pushy


async def push_and_receive(
    pusher: pushy.PushClient,
    device: pushy.DeviceClient,
    data: dict,
    ack: str,
) -> None:
    """Push ``data`` to ``device`` while it reads (and acks) the message."""

    async def receive() -> dict:
        message = await device.receive(timeout=5)
        if message["ack"]:
            await device.ack(message["id"])
        return message

    result, message = await asyncio.gather(
        pusher.apush(device.device, data, ack=ack, timeout=5), receive()
    )
    print(f"{device.device} received: {json.dumps(message)}")
    print(
        f"push to {device.device} (ack={ack}): {result.code} {result.status} "
        f"in {result.latency * 1000:.1f} ms"
    )


async def main() -> None:
    secret = secrets.token_urlsafe(32)
    async with pushy.Node(host="127.0.0.1", port=0, push_port=0, secret=secret) as node:
        print(f"node {node.node_id}: devices {node.url}, push {node.push_url}")

        tv = pushy.DeviceClient(node.url, pushy.issue_token(secret, "tv-1", "home"))
        phone = pushy.DeviceClient(
            node.url, pushy.issue_token(secret, "phone-1", "home")
        )
        for device in (tv, phone):
            hello = await device.connect()
            print(f"{device.device} connected: {json.dumps(hello)}")

        async with pushy.PushClient(node.push_url) as pusher:
            # Open the HTTP connection first, so latencies show the push alone.
            await pusher.ahealthy()
            await push_and_receive(pusher, tv, {"title": "Hello, TV"}, "written")
            await push_and_receive(pusher, phone, {"title": "Hello, phone"}, "client")
            print(f"stats: {json.dumps((await pusher.astats())['pushes'])}")

        await tv.close()
        await phone.close()
    print("node stopped")


if __name__ == "__main__":
    asyncio.run(main())
