"""A Confluent schema registry client (also Apicurio's Confluent-compatible API).

Contracts:

* **One fetch per schema id per process.** Schemas are immutable once they
  have an id, so :meth:`RegistryClient.schema` caches every id it fetched,
  for the life of the process (shared by every decoder that names the same
  registry URL and user), and asks the registry only for an id it has not
  seen.
* **Registry down → wait, never skip.** A connection error or a 5xx answer
  is retried with backoff (0.5 s doubling to 30 s) inside the call, so the
  batch being decoded is held, and nothing after it is read or committed
  meanwhile. After :data:`GIVE_UP_S` (below Kafka's 300 s
  ``max.poll.interval.ms``, after which the consumer would leave its group)
  the call raises :class:`~sluice.errors.TransientError`; the run stops with
  nothing committed and ``--restart-on-error`` starts it again.
* A 404 for an id is not an outage: :class:`UnknownSchema` (a bad message,
  handled by ``on_error``).
* The basic-auth password is sent in the ``Authorization`` header only; it
  is never in a URL, a message or a repr.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from sluice.errors import ConnectorError, TransientError

log = logging.getLogger(__name__)

FIRST_WAIT_S = 0.5  # first wait after the registry failed to answer
MAX_WAIT_S = 30.0  # waits double up to this
GIVE_UP_S = 240.0  # then raise: the Kafka consumer leaves its group after 300 s without a poll
TIMEOUT_S = 10.0  # one HTTP request


@dataclass(frozen=True)
class RegistrySettings:
    """Where the registry is and how to log in (the password never shows)."""

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class RegisteredSchema:
    """A schema as the registry holds it."""

    id: int
    text: str
    schema_type: str  # AVRO, PROTOBUF or JSON
    references: tuple[tuple[str, str, int], ...] = ()  # (name, subject, version)


class UnknownSchema(ConnectorError):
    """The registry has no schema with that id (or subject / version)."""


class RegistryClient:
    """Fetches schemas by id (cached), looks up and registers schemas by subject."""

    def __init__(self, settings: RegistrySettings) -> None:
        import httpx

        self.settings = settings
        auth = (
            httpx.BasicAuth(settings.user, settings.password or "")
            if settings.user is not None
            else None
        )
        self._http = httpx.Client(
            base_url=settings.url.rstrip("/"),
            auth=auth,
            timeout=TIMEOUT_S,
            headers={"Accept": "application/vnd.schemaregistry.v1+json, application/json"},
        )
        self._by_id: dict[int, RegisteredSchema] = {}
        self._by_guid: dict[str, RegisteredSchema] = {}
        self._by_version: dict[tuple[str, int], RegisteredSchema] = {}
        self._lock = threading.Lock()
        self.fetches = 0  # schemas fetched from the registry by this client

    def __repr__(self) -> str:
        return f"RegistryClient({self.settings.url!r})"

    def close(self) -> None:
        """Close the HTTP connections (the cache is kept)."""
        self._http.close()

    # -- reading -------------------------------------------------------------

    def schema(self, schema_id: int) -> RegisteredSchema:
        """The schema with ``schema_id``: from the cache, else fetched once.

        Raises :class:`UnknownSchema` (404) or :class:`TransientError` (the
        registry did not answer for :data:`GIVE_UP_S`).
        """
        with self._lock:
            known = self._by_id.get(schema_id)
            if known is not None:
                return known
            # format=serialized: a Confluent registry then returns Protobuf
            # schemas as a base64 FileDescriptorProto, which needs no .proto
            # parser (Avro and JSON ignore it).
            body = self._request(
                "GET", f"/schemas/ids/{schema_id}", params={"format": "serialized"}
            )
            self.fetches += 1
            got = _parse(schema_id, body)
            self._by_id[schema_id] = got
            return got

    def by_guid(self, guid: str) -> RegisteredSchema:
        """The schema with ``guid`` (the header form of a schema id), fetched once."""
        with self._lock:
            known = self._by_guid.get(guid)
            if known is not None:
                return known
            body = self._request("GET", f"/schemas/guids/{guid}", params={"format": "serialized"})
            self.fetches += 1
            got = _parse(int(body.get("id") or -1), body)
            self._by_guid[guid] = got
            return got

    def version(self, subject: str, version: int) -> RegisteredSchema:
        """The schema of ``subject`` at ``version`` (references of Protobuf schemas)."""
        with self._lock:
            known = self._by_version.get((subject, version))
            if known is not None:
                return known
            body = self._request(
                "GET",
                f"/subjects/{quote(subject, safe='')}/versions/{version}",
                params={"format": "serialized"},
            )
            got = _parse(int(body["id"]), body)
            self._by_version[(subject, version)] = got
            self._by_id.setdefault(got.id, got)
            return got

    # -- writing (the Kafka target) ---------------------------------------------

    def register(self, subject: str, text: str, schema_type: str) -> int:
        """Register ``text`` under ``subject`` (idempotent); its id."""
        body = self._request(
            "POST",
            f"/subjects/{quote(subject, safe='')}/versions",
            content={"schema": text, "schemaType": schema_type},
        )
        return int(body["id"])

    def lookup(self, subject: str, text: str, schema_type: str) -> int:
        """The id of ``text`` registered under ``subject``; :class:`UnknownSchema` if it is not."""
        body = self._request(
            "POST",
            f"/subjects/{quote(subject, safe='')}",
            content={"schema": text, "schemaType": schema_type},
        )
        return int(body["id"])

    # -- HTTP --------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        content: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        import httpx

        wait = FIRST_WAIT_S
        started = time.monotonic()
        while True:
            try:
                response = self._http.request(
                    method,
                    path,
                    params=params,
                    content=None if content is None else json.dumps(content).encode(),
                    headers=None
                    if content is None
                    else {"Content-Type": "application/vnd.schemaregistry.v1+json"},
                )
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 500:
                    return self._answer(method, path, response)
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            if time.monotonic() - started >= GIVE_UP_S:
                raise TransientError(
                    f"schema registry {self.settings.url}: {method} {path}: {problem} "
                    f"(retried for {GIVE_UP_S:.0f} s)"
                )
            log.warning(
                "schema registry %s: %s %s failed, retrying in %.1fs: %s",
                self.settings.url,
                method,
                path,
                wait,
                problem,
            )
            time.sleep(wait * random.uniform(0.8, 1.2))
            wait = min(wait * 2, MAX_WAIT_S)

    def _answer(self, method: str, path: str, response: Any) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {}
        message = body.get("message", response.text[:200]) if isinstance(body, dict) else ""
        if response.status_code == 404:
            raise UnknownSchema(f"schema registry {self.settings.url}: {path}: {message}")
        if response.status_code in (401, 403):
            raise ConnectorError(
                f"schema registry {self.settings.url}: not authorised "
                f"(schema_registry_basic_auth_user / _password): {message}"
            )
        if response.status_code >= 400:
            raise ConnectorError(
                f"schema registry {self.settings.url}: {method} {path}: "
                f"HTTP {response.status_code}: {message}"
            )
        if not isinstance(body, dict):
            raise ConnectorError(f"schema registry {self.settings.url}: {path}: not a JSON object")
        return body


def _parse(schema_id: int, body: dict[str, Any]) -> RegisteredSchema:
    refs = tuple(
        (str(r["name"]), str(r["subject"]), int(r["version"])) for r in body.get("references") or ()
    )
    return RegisteredSchema(
        schema_id, str(body["schema"]), str(body.get("schemaType") or "AVRO"), refs
    )


_clients: dict[tuple[str, str | None], RegistryClient] = {}
_clients_lock = threading.Lock()


def client_for(settings: RegistrySettings) -> RegistryClient:
    """The process-wide client (and cache) of one registry and user."""
    key = (settings.url.rstrip("/"), settings.user)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = RegistryClient(settings)
        return client
