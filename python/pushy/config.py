"""Node configuration: every limit and timing of a node, with safe defaults.

A :class:`NodeConfig` is a plain, immutable value. It is validated when it is
made and copied by :class:`pushy.Node`; use :func:`dataclasses.replace` (which
validates again) to derive a changed copy.

Configuration comes from three sources, later ones winning::

    TOML file  <  PUSHY_* environment variables  <  explicit overrides

See :meth:`NodeConfig.from_sources`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["ALGORITHMS", "ENV_PREFIX", "NodeConfig"]

#: Token signature algorithms a node can verify.
ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "ES256")

#: Prefix of the environment variables read by :meth:`NodeConfig.from_sources`.
ENV_PREFIX = "PUSHY_"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """Configuration of one node.

    The field names are the external contract: they are the keys of the TOML
    file, the ``PUSHY_*`` environment variables (upper-case) and the
    ``pushy serve`` options (dashes instead of underscores).

    Args:
        host: address of the device (WebSocket) port.
        port: device port; 0 picks a free port.
        push_host: address of the internal push API (HTTP).
        push_port: push API port, never the device port; 0 picks a free port.
        secret: HMAC secret for HS256/HS384/HS512 tokens.
        public_key: PEM public key for RS256/ES256 tokens.
        algorithm: token signature algorithm, one of :data:`ALGORITHMS`.
        audience: when set, a token's ``aud`` claim must match it.
        tls_cert: path (a string or an ``os.PathLike``) of a PEM certificate
            chain (leaf first), relative to the working directory: the device
            port then speaks TLS only (``wss://``). Needs ``tls_key``.
            Empty (the default): plain WebSocket, for a node behind a TLS
            terminator or on a private network.
        tls_key: path of the PEM private key of ``tls_cert``.
        node_id: id of the node; empty picks a random id at start.
        redis: Redis URL of the shared registry
            (``redis://[[user]:password@]host[:port][/db]``); empty runs the
            embedded (in-process) registry.
        redis_prefix: prefix of every Redis key, so several deployments can
            share one server.
        peer_host: address of the peer-link port, where other nodes and
            push clients reach this node (with ``redis`` only). It is
            published in the registry, so it must be reachable by them.
        peer_port: peer-link port; 0 picks a free port.
        registry_ttl_s: TTL of a device's registry record; the node
            refreshes it every third of that, so a node that dies leaves
            records that expire within this time.
        threads: number of io threads; 0 picks the number of cores.
        heartbeat_s: seconds between WebSocket pings to a device.
        pong_timeout_s: seconds to wait for a pong before closing.
        lifetime_s: seconds before a device is asked to reconnect.
        upgrade_timeout_s: deadline of the HTTP upgrade.
        tls_handshake_timeout_s: deadline of the TLS handshake (with
            ``tls_cert``), before the upgrade's own.
        close_timeout_s: deadline of the closing handshake.
        max_message_bytes: largest message a device may send.
        max_push_bytes: largest push body a service may send.
        max_header_bytes: largest HTTP header block of an upgrade.
        max_headers: most HTTP headers in an upgrade.
        max_connections: most devices connected at once (HTTP 503 beyond
            it); 0 takes what the open-file limit leaves once the node's own
            sockets and the upgrades in progress have theirs.
        max_pending_upgrades: upgrades (TLS handshakes included) in
            progress at once; beyond it the node accepts no more until one
            ends, and new connections wait in the kernel's listen queue. It
            bounds the memory and CPU a connection storm takes; 0 is
            unlimited. Held to a quarter of the open-file limit.
        allowed_origins: ``Origin`` values allowed for browsers; empty allows
            any. A string is split on commas.
        deflate: offer permessage-deflate (costs tens of KiB per connection).
        reuse_port: bind the device port with ``SO_REUSEPORT`` so that
            several node processes on this host share it (the kernel spreads
            new connections over them); :class:`pushy.Cluster` sets it. Off,
            a second node on a port in use fails to start.
        push_timeout_s: default timeout of a push that waits for the device's
            ack.
        d2d_rate: device-to-device messages per second a connection may
            send; above it messages are answered 429.
        d2d_burst: messages a connection may send at once above the rate
            (the size of its token bucket).
        max_d2d_bytes: largest ``data`` of a device-to-device message
            (413 above it).
        route_cache_ttl_s: how long a device's route (its node) and a
            sender's permission to reach another account's device are
            trusted without asking Redis; while Redis cannot answer, older
            entries still serve device-to-device messages.
        events_maxlen: (with ``redis``) the ``{redis_prefix}events``
            stream of connection events, and the ``svc:NAME`` streams of
            upstream ``send`` messages, are trimmed to about this many
            entries (``XADD MAXLEN ~``); 0 writes no events (and leaves
            service streams untrimmed).

        accept_rate: upgrades accepted per second (0: no limit); above it
            HTTP 503 with ``Retry-After: 1``, counted ``accept_rate``.
        accept_burst: upgrades accepted at once above the rate (the token
            bucket); 0 means one second's worth.
        max_outbound_bytes: bytes a device may leave unread before it is
            closed as a slow consumer (4003).
        reconnect_grace_s: a device asked to reconnect (lifetime or drain)
            that is still connected this much later is closed with 1001.
        drain_s: seconds over which a drain that names none (``POST
            /v1/drain`` without ``over_s``, SIGTERM of ``pushy serve``)
            spreads the reconnects.

    Raises:
        ConfigError: a field has the wrong type or is out of range.
    """

    host: str = "0.0.0.0"
    port: int = 8080
    push_host: str = "127.0.0.1"
    push_port: int = 8081
    secret: str = field(default="", repr=False)
    public_key: str = field(default="", repr=False)
    algorithm: str = "HS256"
    audience: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    node_id: str = ""
    redis: str = ""
    redis_prefix: str = "pushy:"
    peer_host: str = "127.0.0.1"
    peer_port: int = 0
    registry_ttl_s: float = 30.0
    threads: int = 1
    heartbeat_s: float = 60.0
    pong_timeout_s: float = 15.0
    lifetime_s: float = 1800.0
    upgrade_timeout_s: float = 10.0
    tls_handshake_timeout_s: float = 10.0
    close_timeout_s: float = 5.0
    max_message_bytes: int = 64 * 1024
    max_push_bytes: int = 64 * 1024
    max_header_bytes: int = 8 * 1024
    max_headers: int = 64
    max_connections: int = 0
    max_pending_upgrades: int = 1024
    allowed_origins: list[str] = field(default_factory=list)
    deflate: bool = False
    reuse_port: bool = False
    push_timeout_s: float = 5.0
    d2d_rate: float = 100.0
    d2d_burst: int = 200
    max_d2d_bytes: int = 16 * 1024
    route_cache_ttl_s: float = 10.0
    events_maxlen: int = 1_000_000
    accept_rate: float = 0.0
    accept_burst: int = 0
    max_outbound_bytes: int = 1 << 20
    reconnect_grace_s: float = 5.0
    drain_s: float = 10.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _check_field(f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)

    # Derived values and conversions.

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Return the names of every configuration field, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_core(self) -> dict[str, Any]:
        """Return the configuration as the dict that ``pushy._core.Node`` takes.

        The keys are exactly the field names; lists are copied.
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["allowed_origins"] = list(self.allowed_origins)
        return out

    def replace(self, **changes: Any) -> NodeConfig:
        """Return a copy with some fields changed (``None`` values are ignored).

        Args:
            **changes: field names and new values.

        Raises:
            ConfigError: a name is not a field, or a value is invalid.
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        _check_names(changes, "option")
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Check the fields against each other (a node checks again at start).

        Raises:
            ConfigError: the configuration cannot verify tokens (no secret for
                an HS algorithm, no public key for RS256/ES256), only one of
                ``tls_cert`` and ``tls_key`` is set, or the two ports are the
                same.
        """
        if self.algorithm.startswith("HS"):
            if not self.secret:
                raise ConfigError(
                    f"secret must be set for {self.algorithm} tokens "
                    "(or set algorithm and public_key)"
                )
        elif not self.public_key:
            raise ConfigError(
                f"public_key must be set (PEM) for {self.algorithm} tokens"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(
                "tls_cert and tls_key go together: set both for TLS, or neither"
            )
        if self.port != 0 and self.port == self.push_port:
            raise ConfigError(f"push_port must differ from port, both are {self.port}")

    # Sources.

    @classmethod
    def from_sources(
        cls,
        toml_path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> NodeConfig:
        """Build a configuration from a TOML file, the environment and overrides.

        Later sources win: TOML file < ``PUSHY_*`` variables < overrides.

        The TOML file holds top-level keys named after the fields; dashes and
        underscores are both accepted (``push-port`` or ``push_port``).
        Environment variables are the upper-case field names with the
        ``PUSHY_`` prefix (``PUSHY_PUSH_PORT``, ``PUSHY_SECRET``);
        ``PUSHY_ALLOWED_ORIGINS`` is a comma list and ``PUSHY_DEFLATE``
        takes 1/0, true/false, yes/no or on/off. Other ``PUSHY_*`` variables
        are ignored. Overrides whose value is ``None`` are ignored, so
        unset command-line options can be passed as they are.

        Args:
            toml_path: path of a TOML file, or ``None`` for none.
            env: environment to read; ``None`` reads :data:`os.environ`.
            **overrides: field values that win over every other source.

        Raises:
            ConfigError: the file cannot be read or parsed, it or the
                overrides name an unknown field, or a value is invalid.
        """
        values: dict[str, Any] = {}
        if toml_path is not None:
            values.update(_read_toml(Path(toml_path)))
        values.update(_read_env(os.environ if env is None else env))
        explicit = {
            k.replace("-", "_"): v for k, v in overrides.items() if v is not None
        }
        _check_names(explicit, "option")
        values.update(explicit)
        return cls(**values)


# Field checks. Each returns the normalised value or raises ConfigError.

_INT_RANGES: dict[str, tuple[int, int]] = {
    "port": (0, 65535),
    "push_port": (0, 65535),
    "peer_port": (0, 65535),
    "threads": (0, 1024),
    "max_message_bytes": (1, 2**31 - 1),
    "max_push_bytes": (1, 2**31 - 1),
    "max_header_bytes": (1, 2**20),
    "max_headers": (1, 1024),
    "max_connections": (0, 2**31 - 1),
    "max_pending_upgrades": (0, 1_000_000),
    "d2d_burst": (1, 1_000_000),
    "max_d2d_bytes": (1, 8 * 2**20),
    "events_maxlen": (0, 1_000_000_000),
    "accept_burst": (0, 10_000_000),
    "max_outbound_bytes": (4096, 2**30),
}

_POSITIVE_FLOATS = (
    "heartbeat_s",
    "pong_timeout_s",
    "lifetime_s",
    "upgrade_timeout_s",
    "tls_handshake_timeout_s",
    "close_timeout_s",
    "push_timeout_s",
    "registry_ttl_s",
    "d2d_rate",
    "route_cache_ttl_s",
    "reconnect_grace_s",
)

#: The longest each timing may be (a deadline further off would overflow
#: the engine's clock arithmetic; these are far beyond any use).
_TIMING_LIMITS: dict[str, float] = {
    "heartbeat_s": 86400.0,
    "pong_timeout_s": 86400.0,
    "lifetime_s": 31_536_000.0,
    "upgrade_timeout_s": 3600.0,
    "tls_handshake_timeout_s": 3600.0,
    "close_timeout_s": 3600.0,
    "push_timeout_s": 3600.0,
    "route_cache_ttl_s": 3600.0,
    "reconnect_grace_s": 3600.0,
}

#: Fields that may be 0, with their largest value.
_NON_NEGATIVE_FLOATS: dict[str, float] = {
    "accept_rate": 10_000_000.0,
    "drain_s": 86400.0,
}

_STRINGS = (
    "host",
    "push_host",
    "secret",
    "public_key",
    "algorithm",
    "audience",
    "tls_cert",
    "tls_key",
    "node_id",
    "redis",
    "redis_prefix",
    "peer_host",
)


def _check_redis_url(url: str) -> None:
    """Check the form of a Redis URL (the node checks it again, and connects).

    Raises:
        ConfigError: not ``redis://[[user]:password@]host[:port][/db]``, or a
            port or database out of range. The message hides the password.
    """
    from urllib.parse import urlsplit

    shown = re.sub(r"(//[^/@]*:)[^/@]*@", r"\1***@", url)
    form = "redis://[[user]:password@]host[:port][/db]"
    if not url.startswith("redis://"):
        raise ConfigError(f"redis must be a url like {form}, got {shown!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(
            f"redis url {shown!r} has a port that is not 1-65535"
        ) from None
    if not parts.hostname:
        raise ConfigError(f"redis url {shown!r} names no host; expected {form}")
    if port == 0:
        raise ConfigError(f"redis url {shown!r} has a port that is not 1-65535")
    db = parts.path.lstrip("/")
    if db and (not db.isdigit() or int(db) > 1_000_000):
        raise ConfigError(
            f"redis url {shown!r} has a database that is not a number; "
            f"expected {form}"
        )


def _check_field(name: str, value: Any) -> Any:
    if name in _INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        low, high = _INT_RANGES[name]
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value
    if name in _POSITIVE_FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            unit = "seconds" if name.endswith("_s") else "messages per second"
            raise ConfigError(f"{name} must be a number of {unit}, got {value!r}")
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number, got {value}")
        if name == "registry_ttl_s" and not 1 <= value <= 86400:
            raise ConfigError(
                f"registry_ttl_s must be between 1 and 86400, got {value}"
            )
        high = _TIMING_LIMITS.get(name)
        if high is not None and value > high:
            raise ConfigError(f"{name} must be at most {high:.0f} seconds, got {value:g}")
        return value
    if name in _NON_NEGATIVE_FLOATS:
        high = _NON_NEGATIVE_FLOATS[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if not (math.isfinite(value) and 0 <= value <= high):
            raise ConfigError(f"{name} must be between 0 and {high:g}, got {value}")
        return value
    if name in ("tls_cert", "tls_key") and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if name in _STRINGS:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        if name in ("host", "push_host") and not value:
            raise ConfigError(f"{name} must be a host address, got ''")
        if name == "algorithm" and value not in ALGORITHMS:
            raise ConfigError(
                f"algorithm must be one of {', '.join(ALGORITHMS)}, got {value!r}"
            )
        if name == "redis" and value:
            _check_redis_url(value)
        if name == "peer_host" and not value:
            raise ConfigError("peer_host must be a host address, got ''")
        if name == "redis_prefix" and (
            not value or len(value) > 64 or any(c in value for c in " \t\r\n{}")
        ):
            raise ConfigError(
                "redis_prefix must be 1 to 64 characters without blanks or "
                f"braces, got {value!r}"
            )
        return value
    if name in ("deflate", "reuse_port"):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if name == "allowed_origins":
        if isinstance(value, str):
            value = _split_list(value)
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, str) for v in value
        ):
            raise ConfigError(
                f"allowed_origins must be a list of strings, got {value!r}"
            )
        return [v.strip() for v in value if v.strip()]
    raise AssertionError(f"unchecked field {name}")  # pragma: no cover


def _check_names(values: Mapping[str, Any], what: str) -> None:
    known = set(NodeConfig.field_names())
    for name in values:
        if name not in known:
            raise ConfigError(f"unknown {what} {name!r}; expected one of the fields")


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {str(path)!r}: {exc.strerror}"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not valid TOML: {exc}"
        ) from exc
    known = set(NodeConfig.field_names())
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(
                f"unknown key {key!r} in config file {str(path)!r}; "
                "expected a NodeConfig field name"
            )
        values[name] = value
    return values


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    types = {f.name: f.type for f in dataclasses.fields(NodeConfig)}
    values: dict[str, Any] = {}
    for name, type_name in types.items():
        var = ENV_PREFIX + name.upper()
        if var not in env:
            continue
        text = env[var]
        values[name] = _parse_env(var, text, str(type_name))
    return values


def _parse_env(var: str, text: str, type_name: str) -> Any:
    text = text.strip()
    if type_name == "int":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{var} must be an integer, got {text!r}") from None
    if type_name == "float":
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{var} must be a number, got {text!r}") from None
    if type_name == "bool":
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{var} must be 1/0, true/false, yes/no or on/off")
    if type_name == "list[str]":
        return _split_list(text)
    return text
