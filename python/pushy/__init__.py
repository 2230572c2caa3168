"""Pushy: a WebSocket push platform with a C++ engine.

The engine (the private module ``pushy._core``) is loaded the first time a
:class:`Node` starts, so the rest of the package (configuration, tokens, the
device and push clients) works without it.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from . import errors
from .cluster import Cluster
from .config import NodeConfig
from .device import DeviceClient
from .devicelist import DeviceListService
from .errors import (
    ConfigError,
    ConnectError,
    ConnectionClosed,
    PushError,
    PushyError,
    TokenError,
    TokenRejected,
)
from .node import Node
from .processor import MessageProcessor
from .push import PushClient, PushResult
from .tokens import issue_token

__all__ = [
    "Cluster",
    "ConfigError",
    "ConnectError",
    "ConnectionClosed",
    "DeviceClient",
    "DeviceListService",
    "MessageProcessor",
    "Node",
    "NodeConfig",
    "PushClient",
    "PushError",
    "PushResult",
    "PushyError",
    "TokenError",
    "TokenRejected",
    "__version__",
    "errors",
    "issue_token",
]

try:
    __version__ = _metadata.version("pushy")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"
