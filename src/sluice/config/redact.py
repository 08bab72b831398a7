"""Keeping secrets out of reprs, errors, logs and ``flow plan``.

A value is secret when its key names a secret (``*_password``,
``secret_access_key``, ...); inside any string that looks like a URL the
password part of ``user:password@`` and ``password=`` query values are
masked.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

_SECRET_KEY = re.compile(r"(password|secret|token|passwd|credential)", re.IGNORECASE)
# scheme://user:password@host  -> scheme://user:***@host
# The password runs to the LAST "@" of the authority: a raw "@" inside it must not leak the rest.
_URL_USERINFO = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^/\s]*)(?=@[^@/\s]*(?:[/?#\s]|$))"
)
# ?password=x&... / ;password=x
# ?password=x, &password=x, ;password=x and libpq keyword DSNs ("host=h password=x").
_URL_QUERY_PW = re.compile(
    r"(?P<head>(?:^|(?<=[?&;\s]))(?:password|passwd|pwd|secret|token)=)(?P<pw>[^&;\s]*)", re.I
)


# A malformed URL ("postgresql//admin:SECRET@host", "admin:SECRET@host")
# still carries the password between the last ":" and the "@" of a
# "user:password@host" token; mask it too.
_BARE_USERINFO = re.compile(r"(?P<head>[^\s:@/'\"]+:)(?P<pw>[^\s@'\"/][^\s@'\"]*)(?=@)")


def is_secret_key(key: str) -> bool:
    """True when a config key holds a secret (its value is never shown)."""
    return bool(_SECRET_KEY.search(key))


def redact_text(text: str) -> str:
    """Mask passwords inside URLs anywhere in ``text``."""
    text = _URL_USERINFO.sub(lambda m: m.group("head") + MASK, text)
    text = _BARE_USERINFO.sub(
        lambda m: m.group(0) if m.group("pw") == MASK else m.group("head") + MASK, text
    )
    return _URL_QUERY_PW.sub(lambda m: m.group("head") + MASK, text)


def redact_value(key: str, value: Any) -> Any:
    """``value`` as it may be shown for config key ``key``."""
    if value is None:
        return None
    if is_secret_key(key):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [redact_value(key, v) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    return value
