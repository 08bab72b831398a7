"""A small Confluent-REST-compatible schema registry, for the tests.

No registry server installs on the machines sluice is tested on (Karapace is
not on the package index; Confluent's and Apicurio's come from Maven), so
``scripts/services.sh`` starts this one (``python -m tests.registry_server
--port 8081``). It implements what sluice and confluent-kafka's
``SchemaRegistryClient`` / serializers use, with the Confluent API's JSON
shapes and error codes:

* ``POST /subjects/{s}/versions`` register (same schema again: same id),
  ``POST /subjects/{s}`` look a schema up, ``GET /subjects``,
  ``GET /subjects/{s}/versions``, ``GET /subjects/{s}/versions/{v|latest}``,
  ``DELETE /subjects/{s}``;
* ``GET /schemas/ids/{id}`` and ``GET /schemas/guids/{guid}`` (``format`` is accepted and ignored: Protobuf
  schemas are returned as they were registered, which for confluent-kafka's
  Python serializer is the base64 ``FileDescriptorProto``),
  ``GET /schemas/ids/{id}/versions``, ``GET /schemas/types``;
* ``GET|PUT /config`` and ``/config/{s}``, ``POST
  /compatibility/subjects/{s}/versions/{v|latest}``. Compatibility: ``NONE``
  or ``BACKWARD`` (the default); BACKWARD is checked for Avro records (a
  field added without a default, or a field whose type changed, is
  incompatible) and accepted for the other types.

Ours, for tests: ``GET /_stats`` returns ``{"fetches": {id: count}}`` (how
often each schema id was fetched by id); ``POST /_outage?down=true`` makes
every other request answer 503 until ``POST /_outage?down=false`` (a
registry that is down, with its schemas kept); and basic auth is required when
``--user`` / ``--password`` are given. Everything is kept in memory.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


class Registry:
    """Subjects, versions and schema ids, guarded by one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.schemas: list[dict[str, Any]] = []  # id - 1 -> {schema, schemaType, references}
        self.subjects: dict[str, list[int]] = {}  # subject -> ids by version - 1
        self.config: dict[str, str] = {}
        self.default_level = "BACKWARD"
        self.fetches: dict[int, int] = {}

    @staticmethod
    def canonical(body: dict[str, Any]) -> dict[str, Any]:
        kind = body.get("schemaType") or "AVRO"
        text = body["schema"]
        if kind in ("AVRO", "JSON"):
            try:
                text = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
            except ValueError as exc:
                raise ApiError(422, 42201, f"Invalid schema: {exc}") from exc
        return {"schema": text, "schemaType": kind, "references": body.get("references") or []}

    def id_of(self, schema: dict[str, Any]) -> int | None:
        for i, known in enumerate(self.schemas):
            if known == schema:
                return i + 1
        return None

    def level(self, subject: str) -> str:
        return self.config.get(subject, self.default_level)

    def compatible(self, subject: str, schema: dict[str, Any]) -> bool:
        ids = self.subjects.get(subject)
        if not ids or self.level(subject) == "NONE" or schema["schemaType"] != "AVRO":
            return True
        old = self.schemas[ids[-1] - 1]
        if old["schemaType"] != "AVRO":
            return False
        return _avro_backward(json.loads(schema["schema"]), json.loads(old["schema"]))


def _avro_backward(new: Any, old: Any) -> bool:
    """Whether a reader with ``new`` reads data written with ``old`` (records only)."""
    if not (isinstance(new, dict) and new.get("type") == "record"):
        return True
    if not (isinstance(old, dict) and old.get("type") == "record"):
        return False
    old_fields = {f["name"]: f for f in old["fields"]}
    for field in new["fields"]:
        before = old_fields.get(field["name"])
        if before is None:
            if "default" not in field:
                return False
        elif json.dumps(before["type"], sort_keys=True) != json.dumps(
            field["type"], sort_keys=True
        ):
            if isinstance(field["type"], dict) and field["type"].get("type") == "record":
                if not _avro_backward(field["type"], before["type"]):
                    return False
            else:
                return False
    return True


class ApiError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


REGISTRY = Registry()
AUTH: str | None = None  # the expected Authorization header, when auth is on
OUTAGE = threading.Event()  # set: answer 503 to everything but /_outage


class Handler(BaseHTTPRequestHandler):
    server_version = "sluice-test-registry/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise ApiError(422, 42201, f"invalid JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise ApiError(422, 42201, "expected a JSON object")
        return body

    def _handle(self, method: str) -> None:
        try:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
            test_only = bool(parts) and parts[0].startswith("_")  # no auth on the tests' endpoints
            if AUTH is not None and not test_only and self.headers.get("Authorization") != AUTH:
                raise ApiError(401, 40101, "Unauthorized")
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if parts == ["_outage"] and method == "POST":
                if query.get("down") == "true":
                    OUTAGE.set()
                else:
                    OUTAGE.clear()
                self._send(200, {"down": OUTAGE.is_set()})
                return
            if OUTAGE.is_set():
                raise ApiError(503, 50003, "the test registry is in an outage")
            with REGISTRY.lock:
                status, body = route(
                    method, parts, query, self._body if method in ("POST", "PUT") else None
                )
            self._send(status, body)
        except ApiError as exc:
            self._send(exc.status, {"error_code": exc.code, "message": exc.message})
        except Exception as exc:  # a bug here must show in the client, not hang it
            self._send(500, {"error_code": 50001, "message": f"{type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


def _guid(schema_id: int) -> str:
    """The schema's GUID (Confluent's id for the ``__value_schema_id`` header)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sluice-test-registry/{schema_id}"))


def _version(subject: str, version: str) -> tuple[int, int]:
    ids = REGISTRY.subjects.get(subject)
    if not ids:
        raise ApiError(404, 40401, f"Subject '{subject}' not found.")
    if version in ("latest", "-1"):
        return len(ids), ids[-1]
    if not re.fullmatch(r"\d+", version) or not 1 <= int(version) <= len(ids):
        raise ApiError(404, 40402, f"Version {version} not found.")
    return int(version), ids[int(version) - 1]


def _registered(subject: str, version: int, schema_id: int) -> dict[str, Any]:
    schema = REGISTRY.schemas[schema_id - 1]
    out = {
        "subject": subject,
        "version": version,
        "id": schema_id,
        "guid": _guid(schema_id),
        "schema": schema["schema"],
    }
    if schema["schemaType"] != "AVRO":
        out["schemaType"] = schema["schemaType"]
    if schema["references"]:
        out["references"] = schema["references"]
    return out


def route(method: str, parts: list[str], query: dict[str, str], body: Any) -> tuple[int, Any]:
    r = REGISTRY
    match (method, parts):
        case ("GET", ["_stats"]):
            return 200, {"fetches": {str(k): v for k, v in r.fetches.items()}}
        case ("GET", ["schemas", "types"]):
            return 200, ["AVRO", "PROTOBUF", "JSON"]
        case ("GET", ["schemas", "ids", sid, *rest]):
            if not sid.isdigit() or not 1 <= int(sid) <= len(r.schemas):
                raise ApiError(404, 40403, f"Schema {sid} not found")
            schema = r.schemas[int(sid) - 1]
            if rest == ["versions"]:
                return 200, [
                    {"subject": s, "version": i + 1}
                    for s, ids in r.subjects.items()
                    for i, x in enumerate(ids)
                    if x == int(sid)
                ]
            r.fetches[int(sid)] = r.fetches.get(int(sid), 0) + 1
            out = {"schema": schema["schema"]}
            if schema["schemaType"] != "AVRO":
                out["schemaType"] = schema["schemaType"]
            if schema["references"]:
                out["references"] = schema["references"]
            return 200, out
        case ("GET", ["schemas", "guids", guid]):
            sid = next((i + 1 for i in range(len(r.schemas)) if _guid(i + 1) == guid), None)
            if sid is None:
                raise ApiError(404, 40403, f"Schema {guid} not found")
            return route("GET", ["schemas", "ids", str(sid)], query, body)
        case ("GET", ["subjects"]):
            return 200, sorted(r.subjects)
        case ("GET", ["subjects", subject, "versions"]):
            _version(subject, "latest")
            return 200, list(range(1, len(r.subjects[subject]) + 1))
        case ("GET", ["subjects", subject, "versions", version]):
            v, sid = _version(subject, version)
            return 200, _registered(subject, v, sid)
        case ("GET", ["subjects", subject, "versions", version, "schema"]):
            _v, sid = _version(subject, version)
            return 200, json.loads(r.schemas[sid - 1]["schema"])
        case ("POST", ["subjects", subject, "versions"]):
            schema = Registry.canonical(body())
            ids = r.subjects.get(subject, [])
            known = r.id_of(schema)
            if known is not None and known in ids:
                return 200, {"id": known, "guid": _guid(known)}
            if not r.compatible(subject, schema):
                raise ApiError(
                    409, 409, "Schema being registered is incompatible with an earlier schema"
                )
            if known is None:
                r.schemas.append(schema)
                known = len(r.schemas)
            r.subjects.setdefault(subject, []).append(known)
            return 200, {"id": known, "guid": _guid(known)}
        case ("POST", ["subjects", subject]):
            schema = Registry.canonical(body())
            ids = r.subjects.get(subject)
            if not ids:
                raise ApiError(404, 40401, f"Subject '{subject}' not found.")
            sid = r.id_of(schema)
            if sid is None or sid not in ids:
                raise ApiError(404, 40403, "Schema not found")
            return 200, _registered(subject, ids.index(sid) + 1, sid)
        case ("DELETE", ["subjects", subject]):
            _version(subject, "latest")
            ids = r.subjects.pop(subject)
            return 200, list(range(1, len(ids) + 1))
        case ("POST", ["compatibility", "subjects", subject, "versions", version]):
            schema = Registry.canonical(body())
            if subject in r.subjects:
                _version(subject, version)
            return 200, {"is_compatible": r.compatible(subject, schema)}
        case ("GET", ["config"]):
            return 200, {"compatibilityLevel": r.default_level}
        case ("PUT", ["config"]):
            r.default_level = _level(body())
            return 200, {"compatibility": r.default_level}
        case ("GET", ["config", subject]):
            if subject not in r.config:
                if query.get("defaultToGlobal") == "true":
                    return 200, {"compatibilityLevel": r.default_level}
                raise ApiError(
                    404,
                    40408,
                    f"Subject '{subject}' does not have subject-level compatibility configured",
                )
            return 200, {"compatibilityLevel": r.config[subject]}
        case ("PUT", ["config", subject]):
            r.config[subject] = _level(body())
            return 200, {"compatibility": r.config[subject]}
    raise ApiError(404, 404, f"no route for {method} /{'/'.join(parts)}")


def _level(body: dict[str, Any]) -> str:
    level = str(body.get("compatibility", "")).upper()
    if level not in ("NONE", "BACKWARD"):
        raise ApiError(422, 42203, f"compatibility {level!r} is not supported by the test registry")
    return level


def main() -> None:
    global AUTH  # noqa: PLW0603 - set once, before the server starts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--user")
    parser.add_argument("--password")
    args = parser.parse_args()
    if args.user:
        token = base64.b64encode(f"{args.user}:{args.password or ''}".encode()).decode()
        AUTH = f"Basic {token}"
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
