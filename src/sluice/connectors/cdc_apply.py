"""What every CDC target shares: the change table, schema evolution, counts.

A CDC target receives the change table of
:mod:`sluice.formats.cdc` (one row per change event, in read
order) and applies it in one transaction of its system. Every target follows
the same rules:

* **Idempotency gate.** Per (pipeline, table, key) the target keeps the
  version of the last change it applied: ``(ts_ms, seq, hash)`` — the change
  time, the message's offset, a fingerprint of op + image. An event is
  *newer*, and applied, when its ``ts_ms`` is greater; or equal with a
  greater offset and another content (a second change within the same
  millisecond: a transaction that inserts then updates a row; Maxwell's ``ts``
  is in seconds). Everything else — a redelivered message (same offset), a
  re-published copy (same time, same content), an older event re-sent — is
  *idempotent-skipped*. Deletes keep their version too, so an old create
  re-sent after a delete does not bring the row back.
* **Newest per key.** Within a batch only the newest accepted event of each
  key is written (time, then offset, then read order); the others are counted
  as applied, as if each had been applied in turn.
* **Schema evolution** (``schema_evolution``) for keys of an upsert image that
  the table lacks: ``skip`` ignores them (warned once per column), ``fail``
  fails the batch before anything of it is written, naming the columns,
  ``add_columns`` adds them as nullable columns typed from their values.
* **Row images are merged**: an update sets the columns present in the image
  and keeps the others; the ``soft_delete_column`` is set at a soft delete
  and cleared when the key is written again.

Counts (``sluice_cdc_*_total``) are added once the target committed.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from sluice.config.spec import CdcSpec
from sluice.engine import metrics as m
from sluice.errors import ConnectorError
from sluice.formats import cdc as env
from sluice.formats.jsontext import to_json_text

log = logging.getLogger(__name__)

#: Name of the gate table a SQL target keeps beside the mirror table.
GATE_TABLE = "_sluice_cdc_gate"
#: Version of a key never seen: lower than any event's.
NEVER = -(2**63)

_image_keys = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode


@dataclass
class Applied:
    """What one batch did to one target (counted after its commit)."""

    creates: int = 0
    updates: int = 0
    deletes: int = 0
    idempotent_skipped: int = 0

    def add_ops(self, counts: dict[str, int], total: int) -> None:
        """Accepted events by op letter; the rest of ``total`` were gated out."""
        self.creates += counts.get("c", 0) + counts.get("r", 0)
        self.updates += counts.get("u", 0)
        self.deletes += counts.get("d", 0)
        self.idempotent_skipped += total - sum(counts.values())

    def record(self, pipeline: str) -> None:
        """Add these counts to the pipeline's metrics."""
        for counter, value in (
            (m.CDC_CREATES, self.creates),
            (m.CDC_UPDATES, self.updates),
            (m.CDC_DELETES, self.deletes),
            (m.CDC_IDEMPOTENT_SKIPPED, self.idempotent_skipped),
        ):
            if value:
                counter.labels(pipeline).inc(value)


def changes_of(data: pa.Table, decoder: env.EnvelopeDecoder, target_id: str) -> pa.Table:
    """The change table in ``data``.

    The Kafka source decodes envelopes itself (bad ones follow ``on_error``
    there). A source that hands over decoded rows instead (files) gives the
    envelopes as columns: they are written back to JSON (vectorised) and
    decoded here; a bad envelope then fails the batch.
    """
    if env.KEY in data.column_names:
        return data.select(env.CHANGE_SCHEMA.names)
    rows = pa.StructArray.from_arrays(
        [c.combine_chunks() for c in data.columns], names=data.column_names
    )
    decoded = decoder.decode(to_json_text(rows).cast(pa.binary()).to_pylist())
    if decoded.bad:
        index, why = decoded.bad[0]
        raise ConnectorError(
            f"{target_id}: row {index} of the batch is not a change event: {why} "
            f"({len(decoded.bad)} bad row(s))"
        )
    return decoded.table


def upserts(changes: pa.Table) -> pa.Array:
    """The images of the create / update / read events."""
    images = changes[env.IMAGE].combine_chunks()
    return images.filter(pc.not_equal(changes[env.OP].combine_chunks(), "d"))


def image_columns(images: pa.Array) -> list[str]:
    """Every key of the JSON object ``images``, in first-seen order.

    msgspec reads each image's keys without parsing the values (``Raw``);
    the union is one ``dict.fromkeys`` over the chained keys, in C.
    """
    parsed = map(_image_keys, images.to_pylist())
    return list(dict.fromkeys(itertools.chain.from_iterable(parsed)))


class Evolution:
    """Applies ``schema_evolution`` to the columns of the upsert images."""

    def __init__(self, spec: CdcSpec, target_id: str, *, casefold: bool = False) -> None:
        self.policy = spec.schema_evolution
        self.target_id = target_id
        self.casefold = casefold
        self._warned: set[str] = set()

    def columns(self, changes: pa.Table) -> tuple[list[str], pa.Array]:
        """Every key of the batch's upsert images (first-seen order), and the images."""
        images = upserts(changes)
        return image_columns(images), images

    def check(
        self, changes: pa.Table, table_columns: Collection[str]
    ) -> tuple[list[str], dict[str, pa.DataType]]:
        """The image columns the table has, and the ones to add (``add_columns``).

        ``skip`` warns once per unknown column; ``fail`` raises
        :class:`ConnectorError` naming them (nothing of the batch is written
        yet: the caller checks before touching the table).
        """
        names, images = self.columns(changes)
        fold = _folder(self.casefold)
        known = {fold(c) for c in table_columns}
        present = [n for n in names if fold(n) in known]
        unknown = [n for n in names if fold(n) not in known]
        if not unknown:
            return present, {}
        if self.policy == "fail":
            raise ConnectorError(
                f"{self.target_id}: column(s) {', '.join(repr(c) for c in unknown)} of the "
                'change events are not in the table (schema_evolution = "fail"); the batch '
                "was rolled back: add the column(s) to the table, or set schema_evolution "
                'to "skip" or "add_columns"'
            )
        if self.policy == "skip":
            for name in unknown:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning(
                        "%s: ignoring column %r of the change events: the table has no such "
                        'column (schema_evolution = "skip")',
                        self.target_id,
                        name,
                    )
            return present, {}
        return present, infer_types(images, unknown)


def _same(name: str) -> str:
    return name


def _folder(casefold: bool) -> Callable[[str], str]:
    """How column names compare: as they are, or case-insensitively (MySQL)."""
    return str.lower if casefold else _same


def table_types(changes: pa.Table) -> dict[str, pa.DataType]:
    """The columns of a table created for ``changes``: every key of their images,
    in first-seen order, typed from the JSON values (:func:`infer_types`)."""
    images = changes[env.IMAGE].combine_chunks()
    return infer_types(images, image_columns(images))


def infer_types(images: pa.Array, names: list[str]) -> dict[str, pa.DataType]:
    """Arrow types for ``names`` from their values in ``images`` (pyarrow's JSON
    inference: int64, double, bool, string, timestamp, list, struct); a column
    that is null everywhere becomes string."""
    wanted = set(names)
    lines: dict[str, list[bytes]] = {n: [] for n in names}
    for keys in map(_image_keys, images.to_pylist()):  # only in a batch that adds columns
        for name in wanted.intersection(keys):
            raw = keys[name]
            if bytes(raw) != b"null":
                lines[name].append(b'{"v":' + bytes(raw) + b"}")
    types: dict[str, pa.DataType] = {}
    for name in names:
        t: pa.DataType = pa.string()
        if lines[name]:
            try:
                t = pajson.read_json(io.BytesIO(b"\n".join(lines[name]))).schema.field("v").type
            except pa.ArrowInvalid:
                t = pa.string()  # mixed JSON types: keep the text
        types[name] = pa.string() if pa.types.is_null(t) else t
    return types


def key_columns(
    target_id: str,
    declared: list[str],
    reflected: list[str],
    columns: Collection[str] | None,
    key_column: str | None,
    *,
    casefold: bool = False,
) -> list[str]:
    """The primary key CDC matches rows on, checked against the table's columns.

    ``declared`` ([target.table] primary_key) wins over ``reflected``; with
    neither, and ``key_field`` naming a column (``after.id``), that column.
    A key column the table lacks raises :class:`ConnectorError` naming it.
    """
    key = declared or reflected or ([key_column] if key_column else [])
    if not key:
        raise ConnectorError(
            f"{target_id}: [transform.cdc] needs the table's primary key: the table has "
            "none; set [target.table] primary_key"
        )
    if columns is not None:
        fold = _folder(casefold)
        have = {fold(c) for c in columns}
        missing = [k for k in key if fold(k) not in have]
        if missing:
            raise ConnectorError(
                f"{target_id}: primary key column(s) {', '.join(repr(k) for k in missing)} "
                f"are not columns of the table (it has {', '.join(sorted(columns))})"
            )
    return key
