"""Which Pub/Sub endpoint a spec reaches, and whether without TLS / credentials."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sluice.connectors.pubsub.client import _plain


def spec(endpoint: str | None, anonymous_auth: bool = False) -> SimpleNamespace:
    return SimpleNamespace(endpoint=endpoint, anonymous_auth=anonymous_auth)


@pytest.mark.parametrize(
    ("endpoint", "anonymous", "emulator", "plain"),
    [
        ("127.0.0.1:8085", True, None, "127.0.0.1:8085"),
        ("http://127.0.0.1:8085", False, None, "127.0.0.1:8085"),  # the reference's form
        ("http://127.0.0.1:8085/", True, None, "127.0.0.1:8085"),
        ("127.0.0.1:8085", False, "127.0.0.1:8085", "127.0.0.1:8085"),
        (None, False, "10.0.0.1:8085", "10.0.0.1:8085"),  # PUBSUB_EMULATOR_HOST alone
        ("pubsub.example.com:443", False, None, None),  # private endpoint, with credentials
        ("https://pubsub.example.com", False, None, None),
        (None, False, None, None),  # Google
    ],
)
def test_plain_host(
    endpoint: str | None,
    anonymous: bool,
    emulator: str | None,
    plain: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if emulator is None:
        monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    else:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator)
    assert _plain(spec(endpoint, anonymous)) == plain
