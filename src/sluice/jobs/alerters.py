"""Alerters: where ``--alerter URL`` sends job failures and recoveries.

:func:`build_alerter` turns one URL into an :class:`~sluice.jobs.notify.Alerter`;
:func:`build_alerters` turns the repeated ``--alerter`` values into one
:class:`Alerters` that fans an event out to all of them. Every URL is checked
when it is built, so a typo fails ``flow run-due`` at start (a
:class:`~sluice.errors.ConfigError` naming the URL, secrets masked, and the
schemes there are), never at the first failure it was meant to report.

==========================================  ==========================================
URL                                         Delivers
==========================================  ==========================================
``stdout://``                               one line per event on stderr
``slack://hooks.slack.com/services/T/B/X``  ``POST https://hooks.slack.com/services/T/B/X``
                                            ``{"text": ...}`` (an incoming webhook);
                                            ``slack+http://host:port/path`` posts over
                                            plain HTTP (tests, a local relay);
                                            ``https://hooks.slack.com/...`` is Slack too
``webhook://host/path``, ``https://...``,   ``POST`` the event as JSON (``webhook://``
``http://...``                              is HTTPS, ``webhook+http://`` plain HTTP)
``email://user:pass@host:port?from=&to=``   a mail through SMTP (``smtplib``);
                                            ``starttls=true``, ``ssl=true``,
                                            ``ca_file=``; ``to`` may list several,
                                            comma-separated or repeated
``pagerduty://ROUTING_KEY``                 PagerDuty Events API v2: ``trigger`` on a
                                            failure, ``resolve`` on the recovery, one
                                            ``dedup_key`` per job; ``severity=``,
                                            ``source=``, ``component=``, ``endpoint=``
==========================================  ==========================================

Alerters deliver once, with a bounded wait, and raise
:class:`~sluice.errors.AlertError` when the far end refuses or cannot be
reached; :class:`Alerters` logs that and goes on with the next one. The
orchestrator decides *when* to alert (a recovery only after a failed attempt).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import smtplib
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import IO, Any, Final

from sluice.config.redact import MASK, redact_text
from sluice.errors import AlertError, ConfigError, ConfigProblem
from sluice.jobs.notify import Alerter, AlertEvent

log = logging.getLogger(__name__)

HTTP_TIMEOUT_SECS: Final[float] = 10.0
"""Longest wait for one HTTP or SMTP delivery: an alert must not hold a run up for long."""

ALERTER_FLAG: Final[str] = "--alerter"
"""What a :class:`ConfigProblem` about an alerter URL names as its "file"."""

SCHEMES: Final[tuple[str, ...]] = (
    "stdout://",
    "slack://",
    "slack+http://",
    "webhook://",
    "webhook+http://",
    "https://",
    "http://",
    "email://",
    "pagerduty://",
)
"""The alerter URL schemes, as a bad URL's error lists them."""

PAGERDUTY_ENDPOINT: Final[str] = "https://events.pagerduty.com/v2/enqueue"
PAGERDUTY_SEVERITIES: Final[frozenset[str]] = frozenset({"critical", "error", "warning", "info"})
SLACK_HOST: Final[str] = "hooks.slack.com"


def redact_url(url: str) -> str:
    """``url`` as logs and errors may show it.

    The password of ``user:password@`` is masked, and so are ``password=`` /
    ``token=`` query values, the secret part of a Slack webhook (its last path
    segment) and a PagerDuty routing key.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = f"{userinfo.partition(':')[0]}:{MASK}"
        netloc = f"{userinfo}@{hostport}"
    path = parts.path
    scheme = parts.scheme.lower()
    if scheme == "pagerduty":
        netloc = MASK if netloc else ""
    elif scheme.startswith("slack") or parts.hostname == SLACK_HOST:
        head, _, last = path.rpartition("/")
        if last:
            path = f"{head}/{MASK}"
    query = redact_text(parts.query)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=path, query=query))


def _bad(url: str, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(ALERTER_FLAG, "", f"{redact_url(url)}: {message}")])


def _schemes() -> str:
    return ", ".join(SCHEMES)


def summary(event: AlertEvent) -> str:
    """One line saying what happened, secrets in the error masked."""
    where = f" (workflow {event.workflow})" if event.workflow else ""
    if event.kind == "failure":
        error = redact_text(event.error) if event.error else "no error message"
        return (
            f"sluice job {event.job}{where} failed on attempt {event.attempt} "
            f"(run {event.run_id}): {error}"
        )
    return (
        f"sluice job {event.job}{where} recovered: attempt {event.attempt} succeeded "
        f"(run {event.run_id})"
    )


def event_json(event: AlertEvent) -> dict[str, Any]:
    """The event as the webhook alerter posts it: its fields, ``at`` in ISO 8601, and ``summary``."""
    return {
        "kind": event.kind,
        "job": event.job,
        "workflow": event.workflow,
        "run_id": event.run_id,
        "attempt": event.attempt,
        "at": event.at.isoformat(),
        "error": redact_text(event.error) if event.error is not None else None,
        "summary": summary(event),
    }


def _post_json(
    url: str, shown: str, body: dict[str, Any], authorization: str | None = None
) -> bytes:
    """POST ``body`` as JSON to ``url``; the response body, or :class:`AlertError`
    naming ``shown`` (the redacted URL) on a non-2xx answer or no answer."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "sluice-alerter"}
    if authorization is not None:
        headers["Authorization"] = authorization
    request = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECS) as response:
            answer: bytes = response.read()
            return answer
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:200].decode("utf-8", "replace")
        raise AlertError(f"{shown}: HTTP {exc.code} {exc.reason}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise AlertError(f"{shown}: cannot deliver: {redact_text(str(reason))}") from None


@dataclass(slots=True)
class StdoutAlerter:
    """``stdout://``: one line per event on stderr (stdout stays the command's
    own output), as the user guide has it. ``stream`` is for tests."""

    stream: IO[str] | None = None

    def notify(self, event: AlertEvent) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        stamp = event.at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        stream.write(f"{stamp} ALERT {event.kind.upper()}: {summary(event)}\n")
        stream.flush()


@dataclass(frozen=True, slots=True)
class SlackAlerter:
    """An incoming webhook: ``POST {"text": summary}``."""

    endpoint: str
    shown: str

    def notify(self, event: AlertEvent) -> None:
        icon = ":red_circle:" if event.kind == "failure" else ":large_green_circle:"
        _post_json(self.endpoint, self.shown, {"text": f"{icon} {summary(event)}"})


@dataclass(frozen=True, slots=True)
class WebhookAlerter:
    """``POST`` the event as JSON (:func:`event_json`); ``user:password@`` in
    the URL is sent as HTTP Basic authentication, not as part of the URL."""

    endpoint: str
    shown: str
    authorization: str | None = None

    def notify(self, event: AlertEvent) -> None:
        _post_json(self.endpoint, self.shown, event_json(event), self.authorization)


@dataclass(frozen=True, slots=True)
class EmailAlerter:
    """A plain-text mail per event, through SMTP.

    ``ssl`` connects with TLS from the start (SMTPS, port 465 by default);
    ``starttls`` upgrades a plain connection before logging in. ``ca_file``
    trusts a private CA instead of the system's.
    """

    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    shown: str
    user: str | None = None
    password: str | None = None
    starttls: bool = False
    use_ssl: bool = False
    ca_file: str | None = None

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def notify(self, event: AlertEvent) -> None:
        message = EmailMessage()
        verb = "FAILED" if event.kind == "failure" else "recovered"
        message["Subject"] = f"[sluice] job {event.job} {verb}"
        message["From"] = self.sender
        message["To"] = ", ".join(self.recipients)
        lines = [
            summary(event),
            "",
            f"job:      {event.job}",
            f"workflow: {event.workflow or '-'}",
            f"run:      {event.run_id}",
            f"attempt:  {event.attempt}",
            f"at:       {event.at.isoformat()}",
        ]
        if event.error:
            lines += ["", "error:", redact_text(event.error)]
        message.set_content("\n".join(lines) + "\n")
        try:
            smtp: smtplib.SMTP
            if self.use_ssl:
                smtp = smtplib.SMTP_SSL(
                    self.host, self.port, timeout=HTTP_TIMEOUT_SECS, context=self._context()
                )
            else:
                smtp = smtplib.SMTP(self.host, self.port, timeout=HTTP_TIMEOUT_SECS)
            with smtp:
                if self.starttls:
                    smtp.starttls(context=self._context())
                if self.user is not None:
                    smtp.login(self.user, self.password or "")
                smtp.send_message(message)
        except (smtplib.SMTPException, OSError) as exc:
            raise AlertError(f"{self.shown}: cannot send mail: {redact_text(str(exc))}") from None


@dataclass(frozen=True, slots=True)
class PagerDutyAlerter:
    """PagerDuty Events API v2.

    A failure triggers an incident with ``dedup_key`` ``sluice/<job>``, so
    repeated failures of one job stay one incident; the recovery resolves it.
    """

    routing_key: str
    endpoint: str
    shown: str
    severity: str = "error"
    source: str = field(default_factory=socket.gethostname)
    component: str | None = None

    @staticmethod
    def dedup_key(job: str) -> str:
        """The incident key of ``job``: the same for all its failures and its recovery."""
        return f"sluice/{job}"

    def notify(self, event: AlertEvent) -> None:
        body: dict[str, Any] = {
            "routing_key": self.routing_key,
            "dedup_key": self.dedup_key(event.job),
        }
        if event.kind == "recovery":
            body["event_action"] = "resolve"
        else:
            details: dict[str, Any] = {
                "job": event.job,
                "run_id": event.run_id,
                "attempt": event.attempt,
                "error": redact_text(event.error) if event.error is not None else None,
            }
            if event.workflow:
                details["workflow"] = event.workflow
            payload: dict[str, Any] = {
                # PagerDuty truncates summaries beyond 1024 characters.
                "summary": summary(event)[:1024],
                "source": self.source,
                "severity": self.severity,
                "timestamp": event.at.isoformat(),
                "custom_details": details,
            }
            if self.component:
                payload["component"] = self.component
            if event.workflow:
                payload["group"] = event.workflow
            body["event_action"] = "trigger"
            body["payload"] = payload
        _post_json(self.endpoint, self.shown, body)


def _query(
    url: str, query: str, allowed: set[str], repeatable: frozenset[str] = frozenset()
) -> dict[str, str]:
    """The URL's query as a dict; unknown keys, and keys given twice that
    are not ``repeatable``, are config errors. A repeated key's values are
    joined with commas."""
    out: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise _bad(url, f"unknown query parameter {key!r} (expected: {known})")
        if key in out:
            if key not in repeatable:
                raise _bad(url, f"query parameter {key!r} given twice")
            value = f"{out[key]},{value}"
        out[key] = value
    return out


def _flag(url: str, key: str, value: str | None) -> bool:
    if value is None:
        return False
    if value.lower() in {"true", "1", "yes"}:
        return True
    if value.lower() in {"false", "0", "no"}:
        return False
    raise _bad(url, f"{key}={value!r}: expected true or false")


def _port(url: str, parts: urllib.parse.SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:
        raise _bad(url, "the port is not a number in 1..65535") from None


def _email(url: str, parts: urllib.parse.SplitResult) -> EmailAlerter:
    if not parts.hostname:
        raise _bad(url, "no SMTP host: expected email://user:pass@host:port?from=...&to=...")
    q = _query(url, parts.query, {"from", "to", "starttls", "ssl", "ca_file"}, frozenset({"to"}))
    recipients = tuple(a.strip() for a in q.get("to", "").split(",") if a.strip())
    if not recipients:
        raise _bad(
            url, "no recipient: add ?to=someone@example.com (several: comma-separated or repeated)"
        )
    starttls = _flag(url, "starttls", q.get("starttls"))
    use_ssl = _flag(url, "ssl", q.get("ssl"))
    if starttls and use_ssl:
        raise _bad(url, "starttls=true and ssl=true exclude each other: pick one")
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    sender = q.get("from") or (
        user if user and "@" in user else f"sluice@{socket.gethostname() or 'localhost'}"
    )
    return EmailAlerter(
        host=parts.hostname,
        port=_port(url, parts) or (465 if use_ssl else 25),
        sender=sender,
        recipients=recipients,
        shown=redact_url(url),
        user=user,
        password=password,
        starttls=starttls,
        use_ssl=use_ssl,
        ca_file=q.get("ca_file") or None,
    )


def _pagerduty(url: str, parts: urllib.parse.SplitResult) -> PagerDutyAlerter:
    # The routing key is the URL's authority: urlsplit lower-cases nothing in netloc.
    key = urllib.parse.unquote(parts.netloc)
    if not key or parts.path not in {"", "/"}:
        raise _bad(url, "expected pagerduty://ROUTING_KEY (the Events API v2 integration key)")
    q = _query(url, parts.query, {"severity", "source", "component", "endpoint"})
    severity = q.get("severity", "error")
    if severity not in PAGERDUTY_SEVERITIES:
        raise _bad(
            url, f"severity={severity!r}: expected one of {', '.join(sorted(PAGERDUTY_SEVERITIES))}"
        )
    endpoint = q.get("endpoint", PAGERDUTY_ENDPOINT)
    if urllib.parse.urlsplit(endpoint).scheme not in {"http", "https"}:
        raise _bad(url, f"endpoint={endpoint!r}: expected an http:// or https:// URL")
    return PagerDutyAlerter(
        routing_key=key,
        endpoint=endpoint,
        shown=redact_url(url),
        severity=severity,
        source=q.get("source") or socket.gethostname(),
        component=q.get("component") or None,
    )


def build_alerter(url: str) -> Alerter:
    """The alerter ``url`` names (see the module docstring for the schemes).

    Raises :class:`~sluice.errors.ConfigError` naming the URL (secrets masked)
    when the scheme is unknown or the URL lacks what its scheme needs.
    """
    raw = url.strip()
    if "://" not in raw:
        raise _bad(url, f"not an alerter URL: expected one of {_schemes()}")
    parts = urllib.parse.urlsplit(raw)
    scheme = parts.scheme.lower()
    shown = redact_url(raw)
    if scheme == "stdout":
        if parts.netloc or parts.path or parts.query:
            raise _bad(url, "stdout:// takes nothing after the scheme")
        return StdoutAlerter()
    if scheme == "pagerduty":
        return _pagerduty(raw, parts)
    if scheme == "email":
        return _email(raw, parts)
    if scheme in {"slack", "slack+http", "webhook", "webhook+http", "http", "https"}:
        if not parts.hostname:
            raise _bad(url, f"no host: expected {scheme}://host/path")
        _port(raw, parts)
        wire = "http" if scheme in {"http", "slack+http", "webhook+http"} else "https"
        authorization = None
        if parts.username is not None:
            # urllib does not send URL credentials: move them to a Basic header.
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            authorization = f"Basic {token}"
            parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
        endpoint = urllib.parse.urlunsplit(parts._replace(scheme=wire))
        if scheme.startswith("slack") or (scheme == "https" and parts.hostname == SLACK_HOST):
            return SlackAlerter(endpoint, shown)
        return WebhookAlerter(endpoint, shown, authorization)
    raise _bad(url, f"unknown alerter scheme {scheme + '://'!r}: expected one of {_schemes()}")


@dataclass(frozen=True, slots=True)
class Alerters:
    """Several alerters as one: :meth:`notify` tells each in turn and never raises."""

    members: tuple[tuple[str, Alerter], ...] = ()
    """``(redacted URL, alerter)`` pairs, in the order the URLs were given."""

    def __len__(self) -> int:
        return len(self.members)

    @property
    def urls(self) -> list[str]:
        """The alerters' URLs, secrets masked (for ``flow status`` and logs)."""
        return [shown for shown, _ in self.members]

    def notify(self, event: AlertEvent) -> None:
        """Deliver ``event`` to every alerter. One that raises is logged (a
        warning naming its redacted URL) and the next still runs; nothing
        propagates, so an alert never fails or stops a run."""
        for shown, alerter in self.members:
            try:
                alerter.notify(event)
            except Exception as exc:
                log.warning(
                    "alerter %s could not deliver the %s alert of job %s: %s",
                    shown,
                    event.kind,
                    event.job,
                    redact_text(f"{type(exc).__name__}: {exc}"),
                )


def build_alerters(urls: Sequence[str]) -> Alerters:
    """One :class:`Alerters` for the repeated ``--alerter`` values.

    Every URL is checked; the problems of all the bad ones come in one
    :class:`~sluice.errors.ConfigError`.
    """
    members: list[tuple[str, Alerter]] = []
    problems: list[ConfigProblem] = []
    for url in urls:
        try:
            members.append((redact_url(url.strip()), build_alerter(url)))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return Alerters(tuple(members))
