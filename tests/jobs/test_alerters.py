"""Alerters (``--alerter URL``) delivering to real local servers: an HTTP
server in a thread for Slack, webhooks and PagerDuty, aiosmtpd for email."""

from __future__ import annotations

import base64
import datetime as dt
import io
import ipaddress
import json
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from sluice.errors import AlertError, ConfigError
from sluice.jobs.alerters import (
    Alerters,
    EmailAlerter,
    PagerDutyAlerter,
    SlackAlerter,
    StdoutAlerter,
    WebhookAlerter,
    build_alerter,
    build_alerters,
)
from sluice.jobs.notify import AlertEvent

AT = dt.datetime(2026, 3, 29, 1, 30, tzinfo=dt.UTC)
FAILURE = AlertEvent(
    kind="failure",
    job="load_users",
    run_id="r-41",
    attempt=2,
    at=AT,
    error="connection to postgresql://app:hunter2@db:5432/app refused",
    workflow="nightly",
)
RECOVERY = AlertEvent(kind="recovery", job="load_users", run_id="r-42", attempt=3, at=AT)
FAILURE_TEXT = (
    "sluice job load_users (workflow nightly) failed on attempt 2 (run r-41): "
    "connection to postgresql://app:***@db:5432/app refused"
)
RECOVERY_TEXT = "sluice job load_users recovered: attempt 3 succeeded (run r-42)"


# -- a local HTTP server ---------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class HttpSink:
    """What the test server received; ``status`` is what it answers."""

    port: int = 0
    status: int = 200
    requests: list[Received] = field(default_factory=list)

    def url(self, scheme: str, path: str) -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"


@pytest.fixture
def http() -> Iterator[HttpSink]:
    sink = HttpSink()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            sink.requests.append(
                Received(
                    "POST",
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    json.loads(raw),
                )
            )
            body = b'{"status":"success"}' if sink.status < 300 else b"no_service"
            self.send_response(sink.status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield sink
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


# -- Slack, webhooks, PagerDuty ------------------------------------------------------


def test_slack_posts_the_text_of_failure_and_recovery(http: HttpSink) -> None:
    alerter = build_alerter(http.url("slack+http", "/services/T000/B000/XXXX"))
    assert isinstance(alerter, SlackAlerter)
    alerter.notify(FAILURE)
    alerter.notify(RECOVERY)
    assert [r.path for r in http.requests] == ["/services/T000/B000/XXXX"] * 2
    assert http.requests[0].headers["content-type"] == "application/json"
    assert [r.body for r in http.requests] == [
        {"text": f":red_circle: {FAILURE_TEXT}"},
        {"text": f":large_green_circle: {RECOVERY_TEXT}"},
    ]


def test_slack_urls_map_to_the_https_incoming_webhook() -> None:
    for url in (
        "slack://hooks.slack.com/services/T000/B000/XXXX",
        "https://hooks.slack.com/services/T000/B000/XXXX",
    ):
        alerter = build_alerter(url)
        assert isinstance(alerter, SlackAlerter)
        assert alerter.endpoint == "https://hooks.slack.com/services/T000/B000/XXXX"
        assert alerter.shown == url.replace("XXXX", "***")
    hook = build_alerter("webhook://alerts.example.com/sluice?team=data")
    assert isinstance(hook, WebhookAlerter)
    assert hook.endpoint == "https://alerts.example.com/sluice?team=data"


def test_webhook_posts_the_event_as_json_with_basic_auth(http: HttpSink) -> None:
    alerter = build_alerter(http.url("http", "/hook?team=data").replace("//", "//ops:s%40cret@"))
    alerter.notify(FAILURE)
    (request,) = http.requests
    assert request.path == "/hook?team=data"
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"ops:s@cret").decode()
    assert request.body == {
        "kind": "failure",
        "job": "load_users",
        "workflow": "nightly",
        "run_id": "r-41",
        "attempt": 2,
        "at": "2026-03-29T01:30:00+00:00",
        "error": "connection to postgresql://app:***@db:5432/app refused",
        "summary": FAILURE_TEXT,
    }
    build_alerter(http.url("webhook+http", "/hook2")).notify(RECOVERY)
    assert http.requests[1].path == "/hook2"
    assert http.requests[1].body["kind"] == "recovery"
    assert http.requests[1].body["error"] is None
    assert "authorization" not in http.requests[1].headers


def test_pagerduty_triggers_on_failure_and_resolves_on_recovery(http: HttpSink) -> None:
    endpoint = http.url("http", "/v2/enqueue")
    alerter = build_alerter(
        f"pagerduty://R0UT1NGKEY?severity=critical&source=etl-1&component=warehouse&endpoint={endpoint}"
    )
    assert isinstance(alerter, PagerDutyAlerter)
    alerter.notify(FAILURE)
    alerter.notify(RECOVERY)
    assert [r.path for r in http.requests] == ["/v2/enqueue", "/v2/enqueue"]
    assert http.requests[0].body == {
        "routing_key": "R0UT1NGKEY",
        "dedup_key": "sluice/load_users",
        "event_action": "trigger",
        "payload": {
            "summary": FAILURE_TEXT,
            "source": "etl-1",
            "severity": "critical",
            "timestamp": "2026-03-29T01:30:00+00:00",
            "component": "warehouse",
            "group": "nightly",
            "custom_details": {
                "job": "load_users",
                "run_id": "r-41",
                "attempt": 2,
                "error": "connection to postgresql://app:***@db:5432/app refused",
                "workflow": "nightly",
            },
        },
    }
    assert http.requests[1].body == {
        "routing_key": "R0UT1NGKEY",
        "dedup_key": "sluice/load_users",
        "event_action": "resolve",
    }


def test_pagerduty_defaults_to_the_events_api() -> None:
    alerter = build_alerter("pagerduty://R0UT1NGKEY")
    assert isinstance(alerter, PagerDutyAlerter)
    assert alerter.endpoint == "https://events.pagerduty.com/v2/enqueue"
    assert alerter.severity == "error"
    assert alerter.shown == "pagerduty://***"


def test_a_refused_delivery_raises_naming_the_redacted_url(http: HttpSink) -> None:
    http.status = 500
    alerter = build_alerter(http.url("slack+http", "/services/T/B/SECRETPART"))
    with pytest.raises(AlertError, match=r"HTTP 500") as caught:
        alerter.notify(FAILURE)
    assert "/services/T/B/***" in str(caught.value)
    assert "SECRETPART" not in str(caught.value)


# -- fan-out ------------------------------------------------------------------------


class Raising:
    def notify(self, event: AlertEvent) -> None:
        raise RuntimeError("alerter bug")


def test_alerters_fan_out_and_a_raising_one_does_not_stop_the_others(
    http: HttpSink, caplog: pytest.LogCaptureFixture
) -> None:
    # A closed port: connection refused, a real delivery failure.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = int(s.getsockname()[1])
    alerters = build_alerters(
        [
            f"webhook+http://ops:topsecret@127.0.0.1:{dead}/hook",
            http.url("webhook+http", "/first"),
            http.url("slack+http", "/services/T/B/X"),
        ]
    )
    assert len(alerters) == 3
    assert alerters.urls[0] == f"webhook+http://ops:***@127.0.0.1:{dead}/hook"
    members = list(alerters.members)
    members.insert(1, ("bug://", Raising()))
    fan_out = Alerters(tuple(members))
    with caplog.at_level(logging.WARNING, logger="sluice.jobs.alerters"):
        fan_out.notify(FAILURE)  # must not raise
    assert [r.path for r in http.requests] == ["/first", "/services/T/B/X"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert f"webhook+http://ops:***@127.0.0.1:{dead}/hook" in messages[0]
    assert "cannot deliver" in messages[0]
    assert "bug://" in messages[1] and "RuntimeError: alerter bug" in messages[1]
    assert not any("topsecret" in m for m in messages)


def test_stdout_alerter_writes_one_line() -> None:
    out = io.StringIO()
    StdoutAlerter(out).notify(FAILURE)
    assert out.getvalue() == f"2026-03-29T01:30:00Z ALERT FAILURE: {FAILURE_TEXT}\n"
    assert isinstance(build_alerter("stdout://"), StdoutAlerter)


# -- bad URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://ops:hunter2@files/x", "unknown alerter scheme 'ftp://': expected one of stdout://"),
        (
            "hooks.slack.com/services/T/B/X",
            "not an alerter URL: expected one of stdout://, slack://",
        ),
        ("slack://", "no host"),
        ("stdout://extra", "stdout:// takes nothing"),
        ("email://ops:hunter2@mail:587", "no recipient"),
        ("email://ops:hunter2@mail:587?to=a@x&starttls=maybe", "starttls='maybe'"),
        ("email://mail?to=a@x&starttls=true&ssl=true", "exclude each other"),
        ("email://mail?to=a@x&cc=b@x", "unknown query parameter 'cc'"),
        ("email://mail?to=a@x&from=b@x&from=c@x", "query parameter 'from' given twice"),
        ("pagerduty://", "expected pagerduty://ROUTING_KEY"),
        ("pagerduty://KEY?severity=fatal", "severity='fatal'"),
        ("pagerduty://KEY?endpoint=ftp://x", "expected an http:// or https:// URL"),
        ("webhook://host:99999/x", "port"),
    ],
)
def test_bad_urls_are_config_errors_naming_the_url(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_alerter(url)
    text = str(caught.value)
    assert text.startswith("--alerter: ")
    assert expected in text
    assert "hunter2" not in text


def test_build_alerters_reports_every_bad_url_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        build_alerters(["stdout://", "sms://1234", "pagerduty://SECRETKEY?severity=loud"])
    problems = caught.value.problems
    assert len(problems) == 2
    assert "sms://1234" in problems[0].message
    assert "pagerduty://***" in problems[1].message
    assert "SECRETKEY" not in str(caught.value)


# -- email --------------------------------------------------------------------------


@dataclass
class Mailbox:
    port: int
    messages: list[tuple[str, list[str], Message]] = field(default_factory=list)
    logins: list[tuple[bytes, bytes]] = field(default_factory=list)


class _Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd hook name
        self.box.messages.append(
            (envelope.mail_from, list(envelope.rcpt_tos), message_from_bytes(envelope.content))
        )
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture(params=["plain", "starttls", "ssl"])
def smtp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Mailbox, str]]:
    """A local SMTP server asking for AUTH (user ``ops``, password ``p@ss``);
    with ``starttls`` it requires STARTTLS first, with ``ssl`` it speaks TLS
    from the start (SMTPS), both with a self-signed certificate; the second
    value is the query the alerter URL needs."""
    box = Mailbox(_free_port())

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        assert isinstance(data, LoginPassword)
        box.logins.append((data.login, data.password))
        return AuthResult(success=(data.login, data.password) == (b"ops", b"p@ss"), handled=False)

    kwargs: dict[str, Any] = {"authenticator": authenticate, "auth_required": True}
    query = ""
    if request.param in {"starttls", "ssl"}:
        cert, key = _self_signed(tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        if request.param == "starttls":
            kwargs |= {"tls_context": context, "require_starttls": True}
        else:
            # SMTPS: TLS from the first byte. aiosmtpd does not count a TLS
            # listener as TLS for AUTH, so it must be told AUTH is fine here.
            kwargs |= {"ssl_context": context, "auth_require_tls": False}
        query = f"&{request.param}=true&ca_file={cert}"
    else:
        # Only this test's loopback server takes AUTH without TLS.
        kwargs["auth_require_tls"] = False
    controller = Controller(_Handler(box), hostname="127.0.0.1", port=box.port, **kwargs)
    controller.start()
    try:
        yield box, query
    finally:
        controller.stop()


# The plain server takes AUTH without TLS, and aiosmtpd warns so on each connection.
NO_TLS_WARNING = "ignore:Requiring AUTH while not requiring TLS:UserWarning"


@pytest.mark.filterwarnings(NO_TLS_WARNING)
def test_email_sends_one_mail_per_event(smtp: tuple[Mailbox, str]) -> None:
    box, query = smtp
    url = (
        f"email://ops:p%40ss@127.0.0.1:{box.port}"
        f"?from=sluice@example.com&to=oncall@example.com&to=data@example.com{query}"
    )
    alerter = build_alerter(url)
    assert isinstance(alerter, EmailAlerter)
    alerter.notify(FAILURE)
    alerter.notify(RECOVERY)
    assert box.logins == [(b"ops", b"p@ss")] * 2
    assert [(m[0], m[1]) for m in box.messages] == [
        ("sluice@example.com", ["oncall@example.com", "data@example.com"])
    ] * 2
    failure, recovery = (m[2] for m in box.messages)
    assert failure["Subject"] == "[sluice] job load_users FAILED"
    assert failure["To"] == "oncall@example.com, data@example.com"
    body = failure.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert body.decode().replace("\r\n", "\n") == (
        f"{FAILURE_TEXT}\n\n"
        "job:      load_users\n"
        "workflow: nightly\n"
        "run:      r-41\n"
        "attempt:  2\n"
        "at:       2026-03-29T01:30:00+00:00\n\n"
        "error:\n"
        "connection to postgresql://app:***@db:5432/app refused\n"
    )
    assert recovery["Subject"] == "[sluice] job load_users recovered"


@pytest.mark.filterwarnings(NO_TLS_WARNING)
def test_email_with_a_wrong_password_raises_without_the_password(
    smtp: tuple[Mailbox, str],
) -> None:
    box, query = smtp
    alerter = build_alerter(f"email://ops:Wr0ngPw@127.0.0.1:{box.port}?to=a@example.com{query}")
    with pytest.raises(AlertError, match="cannot send mail") as caught:
        alerter.notify(FAILURE)
    assert "Wr0ngPw" not in str(caught.value)
    assert "ops:***@127.0.0.1" in str(caught.value)
    assert box.messages == []
