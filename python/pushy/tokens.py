"""Device tokens: JWTs that a node verifies at the WebSocket upgrade.

A token carries the device id in ``sub``, the account id in ``acc``, the time
it was issued in ``iat`` and its expiry in ``exp`` (whole seconds, as libjwt
reads them), and optionally an audience in ``aud`` and the device's
metadata in ``meta``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

import jwt

from .config import ALGORITHMS
from .errors import TokenError

__all__ = ["MAX_META_BYTES", "issue_token"]

#: Largest ``meta`` claim a node accepts, in bytes of its JSON text.
MAX_META_BYTES = 1024


def issue_token(
    secret: str | bytes | None,
    device: str,
    account: str | None = None,
    ttl: float = 3600,
    algorithm: str = "HS256",
    audience: str | None = None,
    private_key: str | bytes | None = None,
    *,
    claims: Mapping[str, Any] | None = None,
    now: float | None = None,
    meta: Mapping[str, Any] | None = None,
) -> str:
    """Sign a device token.

    Args:
        secret: HMAC secret for HS256/HS384/HS512; ignored (may be ``None``)
            for RS256/ES256.
        device: device id, the ``sub`` claim.
        account: account id, the ``acc`` claim; omitted when ``None``.
        ttl: seconds until the token expires. ``exp`` is rounded up to a whole
            second, so a token with ttl 0 stays valid until the next whole
            second; a ttl of -1 or less gives an already expired token.
        algorithm: one of HS256, HS384, HS512, RS256, ES256.
        audience: the ``aud`` claim; omitted when ``None``.
        private_key: PEM private key for RS256/ES256.
        claims: extra claims, added last (they may replace the ones above).
        now: issue time as a Unix timestamp; the current time by default.
        meta: the ``meta`` claim, a JSON object of at most
            :data:`MAX_META_BYTES` bytes once encoded; omitted when ``None``.
            Nodes put it in the device's ``connected`` event (and keep no
            copy), so the device-list service can show it to the account's
            other devices.

    Returns:
        The encoded token.

    Raises:
        TokenError: the device id is empty, the algorithm is unsupported, the
            key is missing or cannot sign, or ``meta`` is not a JSON object of
            at most :data:`MAX_META_BYTES` bytes.
    """
    if not isinstance(device, str) or not device:
        raise TokenError(f"device must be a non-empty string, got {device!r}")
    if algorithm not in ALGORITHMS:
        raise TokenError(
            f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}"
        )
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TokenError(f"ttl must be a number of seconds, got {ttl!r}")
    if algorithm.startswith("HS"):
        if not secret:
            raise TokenError(f"secret must be set to sign {algorithm} tokens")
        key: str | bytes = secret
    else:
        if not private_key:
            raise TokenError(
                f"private_key must be set (PEM) to sign {algorithm} tokens"
            )
        key = private_key

    issued = time.time() if now is None else now
    payload: dict[str, Any] = {
        "sub": device,
        "iat": int(issued),
        "exp": math.ceil(issued + ttl),
    }
    if account is not None:
        payload["acc"] = account
    if audience is not None:
        payload["aud"] = audience
    if meta is not None:
        payload["meta"] = _check_meta(meta)
    if claims:
        payload.update(claims)
    try:
        return jwt.encode(payload, key, algorithm=algorithm)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise TokenError(f"cannot sign a {algorithm} token: {exc}") from exc


def _check_meta(meta: Any) -> dict[str, Any]:
    """Return ``meta`` as a dict once it proved a small JSON object.

    Raises:
        TokenError: not a mapping, not JSON-encodable, or longer than
            :data:`MAX_META_BYTES` bytes as JSON (PyJWT's compact encoding).
    """
    if not isinstance(meta, Mapping):
        raise TokenError(f"meta must be a JSON object (a dict), got {meta!r}")
    try:
        text = json.dumps(dict(meta), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TokenError(f"meta must be JSON-encodable: {exc}") from exc
    size = len(text.encode())
    if size > MAX_META_BYTES:
        raise TokenError(
            f"meta must be at most {MAX_META_BYTES} bytes of JSON, got {size}"
        )
    return dict(meta)
