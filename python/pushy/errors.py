"""Exceptions raised by pushy.

Every exception that pushy raises on purpose derives from :class:`PushyError`.
The engine (``pushy._core``) raises these same classes: a C++
``pushy::config_error`` arrives in Python as :class:`ConfigError`.

==========================  ====================================================
exception                   raised when
==========================  ====================================================
:class:`ConfigError`        a configuration value is invalid, a port is in use,
                            or an option is not available yet
:class:`TokenError`         a token cannot be signed (bad key or algorithm)
:class:`ConnectError`       a device client cannot connect (TCP failure, or the
                            node answered the upgrade with an HTTP status)
:class:`TokenRejected`      the node answered the upgrade with HTTP 401
:class:`ConnectionClosed`   a device connection is closed (normally or not)
:class:`PushError`          a push could not be sent over HTTP at all
==========================  ====================================================

A push that reaches the node but is not delivered is *not* an exception: it is
a :class:`pushy.PushResult` with its own status and code.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConnectError",
    "ConnectionClosed",
    "PushError",
    "PushyError",
    "TokenError",
    "TokenRejected",
]


class PushyError(Exception):
    """Base class of every exception raised by pushy."""


class ConfigError(PushyError, ValueError):
    """A configuration that cannot run.

    Raised for a bad value, an unknown option, an option that is not
    available yet, or a port that is already in use.
    """


class PushError(PushyError):
    """A push request that failed in transport.

    Raised when the node cannot be reached or does not answer with JSON.
    Delivery outcomes (not connected, timeout, ...) are returned as a
    :class:`pushy.PushResult` instead.
    """


class ConnectionClosed(PushyError):
    """The device connection is closed.

    Args:
        code: WebSocket close code received from the node; 1006 when the
            connection was lost without a close frame.
        reason: close reason received from the node, possibly empty.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        text = f"connection closed with code {code}"
        if reason:
            text += f": {reason}"
        super().__init__(text)


class ConnectError(PushyError):
    """A device client could not connect.

    Args:
        message: what went wrong.
        status: HTTP status of the rejected upgrade, or ``None`` when no HTTP
            response was received (connection refused, timeout, ...).
        headers: response headers of the rejected upgrade (lower-case names).
        body: response body of the rejected upgrade.
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> None:
        self.status = status
        self.headers = dict(headers or {})
        self.body = body
        super().__init__(message)


class TokenError(PushyError):
    """A token that cannot be issued or was not accepted."""


class TokenRejected(ConnectError, TokenError):
    """The node answered the WebSocket upgrade with HTTP 401."""
