"""Typed connections: named, reusable connector settings for Python pipelines.

A connection is a connector ``kind`` plus the keys its ``[source]`` /
``[target]`` / lookup tables take (``bootstrap_servers``, ``url``, ``path``,
``format``, credentials). A pipeline built in Python
(:func:`sluice.run_streaming_pipeline`) or a TOML file
(``connection = "warehouse"`` in a ``[source]`` / ``[target]`` /
``[state_store]`` / lookup table) names one; its keys are copied into that
table, and keys written there win.

Keys are checked when the connection is made: an unknown key raises
:class:`~sluice.errors.ConfigError` naming the nearest valid one; values are
checked where the connection is used, by the same validator as a TOML file.
``repr`` never shows a secret.

A name resolves through this chain, highest priority first (as the user
guide's, with ``SLUICE`` for ``EMATIX_FLOW``):

1. ``SLUICE_DSN_<NAME>`` (upper case; ``-`` and ``.`` as ``_``): a URL, its
   scheme names the kind (``postgres://``, ``mysql://``, ``sqlite://``,
   ``duckdb://``, ``kafka://host:port,...``, ``amqp://``);
2. ``SLUICE_DSN`` for the name ``default``;
3. a connection registered in this process (:func:`register_connection`,
   :func:`connection`);
4. ``[connections.<name>]`` in ``./.sluice.toml``;
5. ``[connections.<name>]`` in ``~/.sluice/connections.toml``.

A file entry is a table with ``kind`` (or only a ``url`` whose scheme names
it) and the connection's keys; ``${VAR}`` is interpolated where the
connection is used.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from sluice.config.redact import redact_value
from sluice.config.validate import nearest
from sluice.errors import ConfigError, ConfigProblem

#: Connection kinds that are not connectors: their keys feed other tables.
SCHEMA_REGISTRY = "schema_registry"
_REGISTRY_KEYS = ("url", "basic_auth_user", "basic_auth_password")

#: URL schemes that name a kind (``SLUICE_DSN_*`` and url-only file entries).
_SCHEMES = {
    "postgres": "postgres",
    "postgresql": "postgres",
    "mysql": "mysql",
    "mariadb": "mysql",
    "sqlite": "sqlite",
    "duckdb": "duckdb",
    "kafka": "kafka",
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "http": SCHEMA_REGISTRY,
    "https": SCHEMA_REGISTRY,
}

#: Where connection files are looked for (``./.sluice.toml``, ``~/.sluice/connections.toml``).
LOCAL_FILE = ".sluice.toml"
USER_FILE = Path("~/.sluice/connections.toml")


def kinds() -> dict[str, set[str]]:
    """Every connection kind -> the keys its tables take (every role)."""
    from sluice.connectors import registry

    out: dict[str, set[str]] = {SCHEMA_REGISTRY: set(_REGISTRY_KEYS)}
    for role in ("source", "target", "lookup"):
        for spec in registry.specs(role):
            kind = str(spec.__struct_config__.tag)
            out.setdefault(kind, set()).update(
                f.encode_name for f in _fields(spec) if f.encode_name != "kind"
            )
    from sluice.config.spec import PostgresStateStore

    out.setdefault("postgres", set()).update(f.encode_name for f in _fields(PostgresStateStore))
    out["postgres"].discard("kind")
    return out


def _fields(spec: type[Any]) -> Iterable[Any]:
    import msgspec

    return msgspec.structs.fields(spec)


class Connection:
    """A named connection of one ``kind``; see the module docstring.

    ``Connection(name, kind="postgres", url=...)``, or a typed subclass
    (``PostgresConnection(name="warehouse", url=...)``) whose kind is fixed.
    """

    KIND: ClassVar[str | None] = None

    def __init__(self, name: str | None = None, *, kind: str | None = None, **keys: Any) -> None:
        fixed = type(self).KIND
        if fixed is not None and kind is not None and kind != fixed:
            raise _error(f"{type(self).__name__}({name!r})", "kind", f"is {fixed!r}, got {kind!r}")
        chosen = fixed or kind
        label = f"{type(self).__name__}({name!r})" if name else type(self).__name__
        known = kinds()
        if chosen is None:
            raise _error(label, "kind", "missing: which connector this connection is for")
        if chosen not in known:
            hint = nearest(chosen, known)
            raise _error(
                label,
                "kind",
                f"unknown kind {chosen!r}" + (f"; did you mean {hint!r}?" if hint else ""),
            )
        problems = []
        for key in keys:
            if key not in known[chosen] and not (chosen == "kafka" and key == "schema_registry"):
                hint = nearest(key, known[chosen])
                problems.append(
                    ConfigProblem(
                        label,
                        key,
                        f"unknown key for a {chosen} connection"
                        + (f"; did you mean {hint!r}?" if hint else ""),
                    )
                )
        if problems:
            raise ConfigError(problems)
        self.name = name
        self.kind: str = chosen
        self.keys: dict[str, Any] = dict(keys)

    def table(self) -> dict[str, Any]:
        """The TOML table this connection stands for: ``kind`` and its keys."""
        return {"kind": self.kind, **self.keys}

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={redact_value(k, v)!r}" for k, v in self.keys.items())
        head = f"name={self.name!r}, " if self.name else ""
        kind = "" if type(self).KIND else f"kind={self.kind!r}, "
        return f"{type(self).__name__}({head}{kind}{shown})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Connection) and (self.name, self.kind, self.keys) == (
            other.name,
            other.kind,
            other.keys,
        )

    def __hash__(self) -> int:
        return hash((self.name, self.kind))


def _typed(class_name: str, kind: str) -> type[Connection]:
    doc = f"A ``kind = {kind!r}`` connection; see :class:`Connection`."
    return type(class_name, (Connection,), {"KIND": kind, "__doc__": doc})


PostgresConnection = _typed("PostgresConnection", "postgres")
MySQLConnection = _typed("MySQLConnection", "mysql")
SQLiteConnection = _typed("SQLiteConnection", "sqlite")
DuckDBConnection = _typed("DuckDBConnection", "duckdb")
KafkaConnection = _typed("KafkaConnection", "kafka")
RabbitMQConnection = _typed("RabbitMQConnection", "rabbitmq")
PubSubConnection = _typed("PubSubConnection", "pubsub")
KinesisConnection = _typed("KinesisConnection", "kinesis")
SchemaRegistryConnection = _typed("SchemaRegistryConnection", SCHEMA_REGISTRY)
DeltaLocalConnection = _typed("DeltaLocalConnection", "delta_local")
DeltaS3Connection = _typed("DeltaS3Connection", "delta_s3")
ObjectStoreLocalConnection = _typed("ObjectStoreLocalConnection", "object_store_local")
ObjectStoreS3Connection = _typed("ObjectStoreS3Connection", "object_store_s3")

_registered: dict[str, Connection] = {}


def register_connection(conn: Connection) -> Connection:
    """Make ``conn`` resolvable by its name in this process; returns it."""
    if not conn.name:
        raise _error(repr(conn), "name", "missing: a registered connection needs a name")
    _registered[conn.name] = conn
    return conn


def unregister_connection(name: str) -> None:
    """Forget a registered connection (tests)."""
    _registered.pop(name, None)


C = TypeVar("C")


def connection(cls: type[C]) -> Connection:
    """Class decorator: the class body's attributes are the connection's keys
    (``kind`` among them), the class name its name. Registers it and returns
    the connection in place of the class."""
    keys = {k: v for k, v in vars(cls).items() if not k.startswith("__")}
    kind = keys.pop("kind", None)
    return register_connection(Connection(cls.__name__, kind=kind, **keys))


def resolve(
    name: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    home: Path | None = None,
) -> Connection:
    """The connection ``name`` stands for (see the chain in the module docstring).

    Raises :class:`ConfigError` when nothing defines it.
    """
    env = os.environ if env is None else env
    var = "SLUICE_DSN_" + name.upper().replace("-", "_").replace(".", "_")
    url = env.get(var) or (env.get("SLUICE_DSN") if name == "default" else None)
    if url:
        return Connection(name, **_from_url(url, var))
    if name in _registered:
        return _registered[name]
    files = [
        (cwd or Path.cwd()) / LOCAL_FILE,
        (home / ".sluice" / "connections.toml") if home else USER_FILE.expanduser(),
    ]
    for path in files:
        entry = _file_entry(path, name)
        if entry is not None:
            kind = entry.pop("kind", None)
            if kind is None and isinstance(entry.get("url"), str):
                kind = _from_url(entry["url"], f"{path}: connections.{name}")["kind"]
            return Connection(name, kind=kind, **entry)
    known = sorted({*_registered, *(n for p in files for n in _file_names(p))})
    hint = nearest(name, known)
    raise _error(
        "connections",
        name,
        f"unknown connection {name!r}: not in ${var}, registered in this process, "
        f"./{LOCAL_FILE} or ~/.sluice/connections.toml"
        + (f"; did you mean {hint!r}?" if hint else ""),
    )


def _from_url(url: str, where: str) -> dict[str, Any]:
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""
    kind = _SCHEMES.get(scheme)
    if kind is None:
        raise _error(where, "url", "expected a URL whose scheme names a kind (postgres://, ...)")
    if kind == "kafka":
        return {"kind": kind, "bootstrap_servers": url.split("://", 1)[1].rstrip("/")}
    if kind in {"sqlite", "duckdb"}:
        return {"kind": kind, "path": url.split("://", 1)[1]}
    return {"kind": kind, "url": url}


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise _error(str(path), "", f"cannot read connections: {exc}") from None
    conns = data.get("connections", {})
    return conns if isinstance(conns, dict) else {}


def _file_entry(path: Path, name: str) -> dict[str, Any] | None:
    entry = _read(path).get(name)
    return dict(entry) if isinstance(entry, dict) else None


def _file_names(path: Path) -> list[str]:
    return list(_read(path))


def _error(where: str, key: str, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(where, key, message)])


def expand(
    table: Mapping[str, Any],
    at: str,
    lookup: Callable[[str], Connection] = resolve,
    only: Collection[str] | None = None,
) -> dict[str, Any]:
    """``table`` with its ``connection = "name"`` replaced by that
    connection's keys (keys written in ``table`` win; ``only``: just these of
    the connection's keys). Raises :class:`ConfigError` for an unknown name."""
    out = dict(table)
    name = out.pop("connection", None)
    if name is None:
        return out
    try:
        conn = name if isinstance(name, Connection) else lookup(str(name))
    except ConfigError as exc:
        raise ConfigError(
            [ConfigProblem("", f"{at}.connection", exc.problems[0].message)]
        ) from None
    if conn.kind == SCHEMA_REGISTRY:
        raise _error(at, "connection", "a schema_registry connection is not a connector")
    mine = {k: v for k, v in conn.keys.items() if only is None or k in only}
    merged = {"kind": conn.kind, **mine, **out}
    if "kind" in out and out["kind"] != conn.kind:
        raise _error(
            at,
            "kind",
            f"is {out['kind']!r} but connection {conn.name!r} is a {conn.kind} connection",
        )
    return _registry_keys(merged, at, lookup)


def _registry_keys(
    table: dict[str, Any], at: str, lookup: Callable[[str], Connection]
) -> dict[str, Any]:
    """``schema_registry = "name"`` (or a connection) -> ``schema_registry_url`` and its auth."""
    ref = table.pop("schema_registry", None)
    if ref is None:
        return table
    conn = ref if isinstance(ref, Connection) else lookup(str(ref))
    if conn.kind != SCHEMA_REGISTRY:
        raise _error(at, "schema_registry", f"connection {conn.name!r} is a {conn.kind} connection")
    for key in _REGISTRY_KEYS:
        if key in conn.keys:
            table.setdefault(f"schema_registry_{key}", conn.keys[key])
    return table
