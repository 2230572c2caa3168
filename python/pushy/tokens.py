"""Device tokens: JWTs that a node verifies at the WebSocket upgrade.

A token carries the device id in ``sub``, the account id in ``acc``, the time
it was issued in ``iat`` and its expiry in ``exp`` (whole seconds, as libjwt
reads them), and optionally an audience in ``aud``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import jwt

from .config import ALGORITHMS
from .errors import TokenError

__all__ = ["issue_token"]


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

    Returns:
        The encoded token.

    Raises:
        TokenError: the device id is empty, the algorithm is unsupported, the
            key is missing or cannot sign.
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
    if claims:
        payload.update(claims)
    try:
        return jwt.encode(payload, key, algorithm=algorithm)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise TokenError(f"cannot sign a {algorithm} token: {exc}") from exc
