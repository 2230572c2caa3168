"""The ``pushy`` command line, run as a user runs it: in a subprocess
(:mod:`pushy_cli`)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import pushy
import pytest
from pushy import DeviceClient, Node
from pushy.testing import TEST_SECRET, scaled
from pushy_cli import PushyProcess, arun_pushy, run_pushy

#: Secrets of the nodes started here; 64 bytes, so that PyJWT does not warn.
FILE_SECRET = "file-secret-" + "f" * 52
ENV_SECRET = "env-secret-" + "e" * 53
FLAG_SECRET = "flag-secret-" + "a" * 52

LISTENING = re.compile(
    r"pushy: node (?P<node>\S+) listening: "
    r"devices (?P<url>wss?://\S+), push (?P<push_url>http://\S+)"
)

#: Loopback on free ports: what every ``serve`` here needs unless it says.
FREE_PORTS = ["--host", "127.0.0.1", "--port", "0", "--push-port", "0"]


class Served(PushyProcess):
    """A ``pushy serve`` process that printed the ports it listens on."""

    node_id = ""
    url = ""
    push_url = ""

    @property
    def port(self) -> int:
        return _port_of(self.url)

    @property
    def push_port(self) -> int:
        return _port_of(self.push_url)

    def wait_listening(self, timeout: float) -> None:
        """Read stdout until the node prints its ports."""
        match = self.wait_line(LISTENING, timeout)
        self.node_id = match["node"]
        self.url = match["url"]
        self.push_url = match["push_url"]


def _port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """``serve(*args, env=None, cwd=None)`` -> a listening ``pushy serve``.

    Processes still running at teardown are killed.
    """
    started: list[Served] = []

    def start(
        *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> Served:
        served = Served("serve", *args, env=env, cwd=cwd)
        started.append(served)
        served.wait_listening(scaled(30))
        return served

    yield start
    for served in started:
        served.close()


async def connect(url: str, secret: str, device: str = "d1") -> DeviceClient:
    client = DeviceClient(url, pushy.issue_token(secret, device, account="acct"))
    await client.connect()
    return client


# pushy token.


def test_token_prints_a_jwt_with_device_account_and_ttl_claims() -> None:
    before = time.time()

    done = run_pushy(
        "token", "--secret", TEST_SECRET, "--device", "tv-1", "--account", "acme",
        "--ttl", "60",
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    claims = jwt.decode(token, TEST_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "tv-1"
    assert claims["acc"] == "acme"
    assert 60 <= claims["exp"] - claims["iat"] <= 61
    assert before + 59 <= claims["exp"] <= time.time() + 61
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


async def test_token_from_the_command_line_is_accepted_by_a_node(
    pushy_node: Node,
) -> None:
    done = await arun_pushy(
        "token", "--secret", TEST_SECRET, "--device", "cli-tv", "--account", "a"
    )
    assert done.returncode == 0, done.stderr

    async with DeviceClient(pushy_node.url, done.stdout.strip()) as device:
        assert device.hello is not None
        assert device.hello["device"] == "cli-tv"


def test_token_takes_the_secret_from_pushy_secret() -> None:
    done = run_pushy(
        "token", "--device", "tv-1", "--account", "a", env={"PUSHY_SECRET": ENV_SECRET}
    )

    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), ENV_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "tv-1"


def test_token_without_a_secret_exits_2_with_pushy_error() -> None:
    done = run_pushy("token", "--device", "tv-1", "--account", "a")

    assert done.returncode == 2
    assert "pushy: error:" in done.stderr
    assert "secret" in done.stderr
    assert done.stdout == ""


def test_token_with_a_ttl_that_is_not_positive_exits_2() -> None:
    done = run_pushy(
        "token", "--secret", FLAG_SECRET, "--device", "tv", "--account", "a",
        "--ttl", "-5",
    )

    assert done.returncode == 2
    assert "pushy: error: --ttl must be a positive number" in done.stderr
    assert done.stdout == ""


def test_token_with_a_short_secret_is_issued_with_one_warning() -> None:
    done = run_pushy("token", "--secret", "abc", "--device", "tv", "--account", "a")

    assert done.returncode == 0
    assert done.stdout.count(".") == 2  # a JWT
    assert done.stderr == (
        "pushy: warning: the secret is 3 bytes; HS256 wants at least 32 "
        "(RFC 7518 section 3.2): tokens signed with it can be forged by "
        "guessing it\n"
    )


# pushy serve and pushy push.


async def test_serve_prints_ports_delivers_a_cli_push_and_drains_on_sigterm(
    serve: Callable[..., Served],
) -> None:
    served = serve(*FREE_PORTS, "--secret", FLAG_SECRET, "--reconnect-grace-s", "1")
    assert served.port != 0 and served.push_port != 0
    assert served.port != served.push_port
    device = await connect(served.url, FLAG_SECRET, "tv-1")
    assert device.hello is not None and device.hello["node"] == served.node_id

    pushed = await arun_pushy(
        "push", "--to", "tv-1", "--data", '{"x":1}', "--url", served.push_url
    )
    frame = await device.wait_for("push", timeout=scaled(5))

    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    result = json.loads(pushed.stdout)
    assert result["status"] == "delivered"
    assert result["code"] == 200
    assert result["node"] == served.node_id
    assert frame["data"] == {"x": 1}
    assert frame["id"] == result["id"]

    # SIGTERM drains: the device is asked to reconnect, and closed with 1001
    # when it has not left a grace period later.
    served.process.send_signal(signal.SIGTERM)
    reconnect = await device.wait_for("reconnect", timeout=scaled(15))
    code = await device.wait_closed(timeout=scaled(10))
    exit_code = await asyncio.to_thread(served.process.wait, scaled(10))

    assert reconnect["reason"] == "drain"
    assert code == 1001
    assert exit_code == 0, served.output
    assert f"node {served.node_id} draining over 10 s" in "".join(served.stdout)
    assert f"node {served.node_id} drained and stopped" in "".join(served.stdout)


async def test_serve_stops_on_sigint_like_ctrl_c(serve: Callable[..., Served]) -> None:
    served = serve(*FREE_PORTS, "--secret", FLAG_SECRET)
    device = await connect(served.url, FLAG_SECRET)

    served.process.send_signal(signal.SIGINT)
    code = await device.wait_closed(timeout=scaled(10))
    exit_code = await asyncio.to_thread(served.process.wait, scaled(10))

    assert code == 1001
    assert exit_code == 0, served.output


async def test_second_signal_during_a_drain_stops_serve_at_once(
    serve: Callable[..., Served],
) -> None:
    served = serve(*FREE_PORTS, "--secret", FLAG_SECRET, "--drain-s", "60")
    device = await connect(served.url, FLAG_SECRET)

    served.process.send_signal(signal.SIGTERM)
    await device.wait_for("reconnect", timeout=scaled(5))
    served.process.send_signal(signal.SIGTERM)
    code = await device.wait_closed(timeout=scaled(10))
    exit_code = await asyncio.to_thread(served.process.wait, scaled(10))

    assert code == 1001
    assert exit_code == 0, served.output
    out = "".join(served.stdout)
    assert f"node {served.node_id} draining over 60 s" in out
    assert f"node {served.node_id} stopped" in out and "drained" not in out


async def test_serve_takes_options_from_a_toml_config_file(
    serve: Callable[..., Served], tmp_path: Path
) -> None:
    config = tmp_path / "pushy.toml"
    config.write_text(
        'host = "127.0.0.1"\n'
        "port = 0\n"
        "push-port = 0\n"  # dashes work as in the flags
        f'secret = "{FILE_SECRET}"\n'
        'node_id = "file-node"\n'
        "heartbeat_s = 7\n"
        "lifetime_s = 500\n"
    )

    served = serve("--config", str(config))
    device = await connect(served.url, FILE_SECRET)

    assert served.node_id == "file-node"
    assert device.hello is not None
    assert device.hello["node"] == "file-node"
    assert device.hello["heartbeat_s"] == 7
    assert 0 < device.hello["reconnect_in_s"] <= 500
    await device.close()


async def test_serve_takes_options_from_pushy_environment_variables(
    serve: Callable[..., Served],
) -> None:
    served = serve(
        env={
            "PUSHY_HOST": "127.0.0.1",
            "PUSHY_PORT": "0",
            "PUSHY_PUSH_PORT": "0",
            "PUSHY_SECRET": ENV_SECRET,
            "PUSHY_NODE_ID": "env-node",
            "PUSHY_HEARTBEAT_S": "9",
        }
    )
    device = await connect(served.url, ENV_SECRET)

    assert device.hello is not None
    assert device.hello["node"] == "env-node"
    assert device.hello["heartbeat_s"] == 9
    await device.close()


async def test_serve_options_prefer_flag_over_environment_over_file(
    serve: Callable[..., Served], tmp_path: Path
) -> None:
    config = tmp_path / "pushy.toml"
    config.write_text(
        'host = "127.0.0.1"\n'
        "port = 0\n"
        "push_port = 0\n"
        f'secret = "{FILE_SECRET}"\n'  # only here: used
        'node_id = "file-node"\n'  # file, env and flag: the flag wins
        "heartbeat_s = 7\n"  # file and env: the environment wins
        "lifetime_s = 1000\n"  # file and flag: the flag wins
    )

    served = serve(
        "--config", str(config), "--node-id", "flag-node", "--lifetime-s", "100",
        env={"PUSHY_NODE_ID": "env-node", "PUSHY_HEARTBEAT_S": "9"},
    )  # fmt: skip
    device = await connect(served.url, FILE_SECRET)

    assert device.hello is not None
    assert device.hello["node"] == "flag-node"
    assert device.hello["heartbeat_s"] == 9
    assert 0 < device.hello["reconnect_in_s"] <= 100
    await device.close()


@pytest.mark.parametrize(
    ("args", "env", "mentions"),
    [
        (["--port", "abc"], {}, "--port"),
        (["--port", "70000"], {}, "port"),
        (["--heartbeat-s", "-1"], {}, "heartbeat_s"),
        (["--threads", "lots"], {}, "--threads"),
        ([], {"PUSHY_HEARTBEAT_S": "soon"}, "PUSHY_HEARTBEAT_S"),
        ([], {"PUSHY_DEFLATE": "maybe"}, "PUSHY_DEFLATE"),
        (["--secret", ""], {}, "secret"),
        (["--config", "/nonexistent/pushy.toml"], {}, "config file"),
        (["--algorithm", "none"], {}, "--algorithm"),
        (["--lifetime-s", "1e12"], {}, "lifetime_s must be at most 31536000 seconds"),
        (["--upgrade-timeout-s", "1e10"], {}, "upgrade_timeout_s must be at most 3600"),
    ],
    ids=[
        "port-not-a-number",
        "port-out-of-range",
        "negative-heartbeat",
        "threads-not-a-number",
        "env-heartbeat-not-a-number",
        "env-deflate-not-a-bool",
        "no-secret",
        "missing-config-file",
        "unknown-algorithm",
        "lifetime-beyond-a-year",
        "upgrade-timeout-beyond-an-hour",
    ],
)
def test_serve_with_a_bad_option_value_exits_2_with_pushy_error(
    args: list[str], env: dict[str, str], mentions: str
) -> None:
    secret = [] if "--secret" in args else ["--secret", FLAG_SECRET]

    done = run_pushy("serve", *FREE_PORTS, *secret, *args, env=env)

    assert done.returncode == 2, done.stdout + done.stderr
    assert "pushy: error:" in done.stderr
    error = done.stderr[done.stderr.index("pushy: error:") :]
    assert mentions in error, error
    assert "listening" not in done.stdout


def test_signals_are_taken_by_a_handler_that_takes_no_lock() -> None:
    # pushy serve (and cluster, processor, devicelist) poll what the handler
    # records; the handler itself only appends to a list.
    from pushy.cli import _Signals

    previous = signal.getsignal(signal.SIGTERM)
    signals = _Signals()
    try:
        assert not signals.wait(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.wait(scaled(5))
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.wait(scaled(5))
        assert not signals.wait(0.01)
    finally:
        signals.restore()
    assert signals.received == [signal.SIGTERM, signal.SIGINT, signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_serve_with_an_unknown_key_in_the_config_file_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "pushy.toml"
    config.write_text(f'secret = "{FILE_SECRET}"\nheartbeat = 5\n')

    done = run_pushy("serve", "--config", str(config), *FREE_PORTS)

    assert done.returncode == 2, done.stdout + done.stderr
    assert "pushy: error:" in done.stderr
    assert "heartbeat" in done.stderr


def test_serve_on_a_port_in_use_exits_2_with_pushy_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        done = run_pushy(
            "serve", "--host", "127.0.0.1", "--port", str(port), "--push-port", "0",
            "--secret", FLAG_SECRET,
        )  # fmt: skip

    assert done.returncode == 2, done.stdout + done.stderr
    assert "pushy: error:" in done.stderr
    assert str(port) in done.stderr


async def test_push_to_an_unknown_device_exits_1_and_prints_not_connected(
    pushy_node: Node,
) -> None:
    done = await arun_pushy(
        "push", "--to", "nobody", "--data", "1", "--url", pushy_node.push_url
    )

    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "not_connected"
    assert result["code"] == 404


async def test_push_with_ack_client_exits_0_once_the_device_acks(
    pushy_node: Node, device_factory: Callable[..., Any]
) -> None:
    device = await device_factory("tv-1", auto_ack=True)
    reading = asyncio.create_task(device.wait_for("push", timeout=scaled(10)))

    done = await arun_pushy(
        "push", "--to", "tv-1", "--data", '"hi"', "--ack", "client",
        "--timeout-ms", str(round(scaled(5) * 1000)), "--url", pushy_node.push_url,
    )  # fmt: skip
    frame = await reading

    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["status"] == "delivered"
    assert frame["ack"] is True and frame["data"] == "hi"


def test_push_with_data_that_is_not_json_exits_2_with_pushy_error(
    pushy_node: Node,
) -> None:
    done = run_pushy(
        "push", "--to", "tv-1", "--data", "{oops", "--url", pushy_node.push_url
    )

    assert done.returncode == 2
    assert "pushy: error:" in done.stderr
    assert "--data" in done.stderr


def test_push_to_a_node_that_is_not_there_exits_1_with_pushy_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port once the probe is closed.

    done = run_pushy(
        "push", "--to", "tv-1", "--data", "1", "--url", f"http://127.0.0.1:{port}"
    )

    assert done.returncode == 1
    assert "pushy: error:" in done.stderr
    assert done.stdout == ""


# pushy demo.


def test_demo_exits_0_after_showing_delivered_pushes_and_a_curl_command() -> None:
    done = run_pushy("demo", "--duration", str(scaled(0.5)))

    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"push \d+: living-room-tv .* 200 delivered", out), out
    assert re.search(r"ack=client\s+-> 200 delivered", out), out
    assert re.search(r"ghost-device .* 404 not_connected", out), out
    assert "received push" in out
    assert re.search(r"device living-room-tv\s+received d2d from car: ", out), out
    assert re.search(r"device car\s+got status 200 for message", out), out
    assert re.search(r"device car\s+got status 404 for message", out), out
    curl = re.search(r"curl -s -X POST (http://127\.0\.0\.1:\d+)/v1/push", out)
    assert curl, out
    assert "stopped" in out.splitlines()[-1]


def test_demo_with_no_wait_exits_0_after_the_pushes() -> None:
    done = run_pushy("demo", "--no-wait", "--devices", "2")

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("200 delivered") >= 2
    assert "serving" not in done.stdout
