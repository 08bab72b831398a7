"""The window aggregates: one class per aggregate kind.

An aggregate says, for its slice of the open-window state (one row per open
(window, group)):

* which columns a batch row contributes as a single-row partial state
  (:meth:`Aggregate.items`) and which state columns it keeps
  (:meth:`Aggregate.state_columns`);
* how partial states merge in one hash aggregation
  (:meth:`Aggregate.merge_functions`), or, for ``first`` / ``last``, which
  item they take (:meth:`Aggregate.pick`);
* how the state becomes its output column (:meth:`Aggregate.finalise`).

``count_distinct`` cannot live in a fixed-width column: its
:class:`SideAggregate` subclasses keep *side state* beside the table, keyed by
the (window, group) id, which they fold, evict and snapshot themselves.

Every method is vectorised over Arrow / numpy but the HLL sketch updates and
estimates (see :class:`ApproxCountDistinct`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluice.config.spec import Aggregation
from sluice.engine.stages.window.columns import I64, ID, SKETCH, VAL, concat_cast, int64_bits, to_np
from sluice.engine.stages.window.snapshot import expect
from sluice.errors import MissingDependencyError, StageError

Column = Callable[[str], Any]
"""A batch column by name, restricted to the accepted rows (taken once per name)."""

HLL_LG_K = 12  # 4096 registers: relative standard error ≈ 1.04 / 64 ≈ 1.6 %, ≤ 4 KiB a group


class Aggregate:
    """One configured aggregation, compiled; a plain fixed-width partial state.

    ``index`` is its position in the configuration, which names its state
    columns (``__a<index>``), so two aggregations never share one.
    """

    fn: ClassVar[str]
    """The ``agg`` name in the configuration."""
    ordered: ClassVar[bool] = False
    """Needs the first / last event time and arrival order of every state row."""
    needs_column: ClassVar[bool] = True

    def __init__(self, index: int, spec: Aggregation) -> None:
        if self.needs_column and spec.column is None:
            raise StageError(f"window: aggregation '{spec.as_}' ({spec.agg}) needs a column")
        self.index = index
        self.name = spec.as_
        self.column = spec.column

    @classmethod
    def compile(cls, index: int, spec: Aggregation) -> Aggregate:
        """The aggregate for ``spec``; a kind with modes picks its class here."""
        return cls(index, spec)

    @property
    def acc(self) -> str:
        """The state column holding the partial aggregate."""
        return f"__a{self.index}"

    @property
    def input(self) -> str:
        """The input column (only aggregates with ``needs_column``)."""
        assert self.column is not None  # __init__ requires it
        return self.column

    def describe(self) -> str:
        """What the state means, for a snapshot's configuration check."""
        return f"{self.fn}({self.column or ''})"

    def require(self) -> None:
        """Raise :class:`MissingDependencyError` when an optional package is missing."""

    def check(self, vt: pa.DataType) -> None:
        """Raise :class:`StageError` when the input column type ``vt`` does not fit."""

    def state_columns(self) -> list[str]:
        """The state columns, in state order."""
        return [self.acc]

    def items(self, column: Column, m: int) -> dict[str, Any]:
        """The state columns of ``m`` accepted rows, each row its own partial state."""
        return {self.acc: column(self.input)}

    def merge_functions(self) -> list[tuple[str, str]]:
        """``(state column, Arrow hash aggregate)`` pairs that merge partial states."""
        return []

    def pick(self, items: pa.Table, first: pa.Array, last: pa.Array) -> dict[str, Any]:
        """State columns merged by taking one item per group (``ordered`` only):
        ``first`` / ``last`` index the item with the smallest / largest (event
        time, arrival)."""
        return {}

    def finalise(self, rows: pa.Table, side: Any) -> Any:
        """The output column of state ``rows``; ``side`` is the side state, if any."""
        return rows[self.acc]


class _Summed(Aggregate):
    """A count: an int64 per row, merged by summing."""

    def merge_functions(self) -> list[tuple[str, str]]:
        return [(self.acc, "sum")]


class Count(_Summed):
    """``count``: rows."""

    fn = "count"
    needs_column = False

    def items(self, column: Column, m: int) -> dict[str, Any]:
        return {self.acc: pa.array(np.ones(m, dtype=np.int64))}


class CountCol(_Summed):
    """``count_col``: non-null values."""

    fn = "count_col"

    def items(self, column: Column, m: int) -> dict[str, Any]:
        return {self.acc: pc.is_valid(column(self.input)).cast(pa.int64())}


def _summable(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t))


def sum_type(t: pa.DataType) -> pa.DataType:
    """The type a ``sum`` of ``t`` is computed and output in."""
    if pa.types.is_unsigned_integer(t):
        return pa.uint64()
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    return t  # decimal: Arrow sums decimals in their own type


class Sum(Aggregate):
    """``sum``: nulls skipped, null when every value is (Arrow's ``sum``)."""

    fn = "sum"

    def check(self, vt: pa.DataType) -> None:
        if not _summable(vt):
            raise StageError(f"window: {self.fn} '{self.name}': column '{self.column}' is {vt}")

    def items(self, column: Column, m: int) -> dict[str, Any]:
        v = column(self.input)
        return {self.acc: v.cast(sum_type(v.type))}

    def merge_functions(self) -> list[tuple[str, str]]:
        return [(self.acc, "sum")]


class Avg(Sum):
    """``avg``: a sum and a non-null count, divided once at emission."""

    fn = "avg"

    @property
    def acc_n(self) -> str:
        """The non-null count beside the sum."""
        return f"__a{self.index}n"

    def state_columns(self) -> list[str]:
        return [self.acc, self.acc_n]

    def items(self, column: Column, m: int) -> dict[str, Any]:
        v = column(self.input)
        # integers: an exact integer sum, divided once at emission
        t = sum_type(v.type) if pa.types.is_integer(v.type) else pa.float64()
        return {self.acc: v.cast(t), self.acc_n: pc.is_valid(v).cast(pa.int64())}

    def merge_functions(self) -> list[tuple[str, str]]:
        return [(self.acc, "sum"), (self.acc_n, "sum")]

    def finalise(self, rows: pa.Table, side: Any) -> Any:
        total = rows[self.acc].cast(pa.float64())
        count = rows[self.acc_n]
        return pc.if_else(
            pc.greater(count, 0),
            pc.divide(total, pc.max_element_wise(count, 1).cast(pa.float64())),
            pa.scalar(None, pa.float64()),
        )


class Min(Aggregate):
    """``min``: the input type, nulls skipped."""

    fn = "min"

    def merge_functions(self) -> list[tuple[str, str]]:
        return [(self.acc, self.fn)]


class Max(Min):
    """``max``: the input type, nulls skipped."""

    fn = "max"


class First(Aggregate):
    """``first``: the value (null or not) with the smallest event time, the
    earliest-arriving on a tie."""

    fn = "first"
    ordered = True

    def pick(self, items: pa.Table, first: pa.Array, last: pa.Array) -> dict[str, Any]:
        return {self.acc: items[self.acc].take(first)}


class Last(Aggregate):
    """``last``: the value (null or not) with the largest event time, the
    latest-arriving on a tie."""

    fn = "last"
    ordered = True

    def pick(self, items: pa.Table, first: pa.Array, last: pa.Array) -> dict[str, Any]:
        return {self.acc: items[self.acc].take(last)}


# -- count_distinct: side state -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fold:
    """One batch's accepted rows, as the side state sees them."""

    ids: I64
    """The id of every merged state row, in state order."""
    row_ids: I64
    """The id of the state row each accepted row was merged into."""
    values: pa.ChunkedArray
    """The aggregate's input value of each accepted row."""
    remap: dict[int, int]
    """Old id → the id it was merged into (sessions bridged into one)."""
    describe: Callable[[int], str]
    """The group and window of merged state row ``j``, for an error."""


S = TypeVar("S")


class SideAggregate(Aggregate, ABC, Generic[S]):
    """An aggregate whose state ``S`` lives beside the state table, by id.

    Side aggregates are folded and snapshotted in (``rank``, index) order: the
    pure folds (rank 0, may raise) before the in-place ones (rank 1, never
    raise), so a failed batch leaves every side state as it was; and snapshot
    format 1 lists the pieces in that order.
    """

    rank: ClassVar[int]
    prefix: ClassVar[str]
    mode: ClassVar[str]

    def __init__(self, index: int, spec: Aggregation) -> None:
        super().__init__(index, spec)
        self.cap = spec.max_distinct_values_per_group or 0

    @property
    def beside(self) -> str:
        """The items column carrying the input values beside the partial states."""
        return f"__x{self.index}"

    @property
    def piece(self) -> str:
        """The snapshot piece holding this aggregate's side state."""
        return f"{self.prefix}{self.index}"

    def describe(self) -> str:
        return f"{self.fn} {self.mode}({self.column or ''})"

    @abstractmethod
    def empty(self) -> S:
        """The side state of a stage that has folded nothing."""

    @abstractmethod
    def fold(self, side: S, step: Fold) -> tuple[S, pa.Array | None]:
        """``side`` with ``step`` folded in, and the new ``acc`` column, if the
        aggregate keeps one. Rank 0: ``side`` untouched, may raise
        :class:`StageError`; rank 1: updated in place, never raises."""

    @abstractmethod
    def evict(self, side: S, ids: I64) -> S:
        """``side`` without the state of ``ids``."""

    @abstractmethod
    def subset(self, side: S, ids: I64) -> S:
        """A new side state holding only the state of ``ids``; ``side`` stays as
        it is, and folding into the subset never changes it."""

    @abstractmethod
    def to_table(self, side: S) -> pa.Table | None:
        """``side`` as a snapshot piece; ``None``: no piece."""

    @abstractmethod
    def from_table(self, table: pa.Table) -> S:
        """A snapshot piece back as side state; ValueError when it does not fit."""


class CountDistinct(Aggregate):
    """``count_distinct``: by ``mode``, :class:`ExactCountDistinct` or
    :class:`ApproxCountDistinct` (the default)."""

    fn = "count_distinct"

    @classmethod
    def compile(cls, index: int, spec: Aggregation) -> Aggregate:
        if spec.mode == "exact":
            return ExactCountDistinct(index, spec)
        return ApproxCountDistinct(index, spec)


def remap_ids(side: pa.Table, remap: dict[int, int]) -> pa.Table:
    """``side`` with its ``__id`` column renumbered by ``remap``."""
    old = pa.array(list(remap), pa.int64())
    new = pa.array(list(remap.values()), pa.int64())
    where = pc.index_in(side[ID], old)
    ids = pc.coalesce(pc.take(new, where), side[ID])
    return side.set_column(side.schema.get_field_index(ID), ID, ids)


class ExactCountDistinct(SideAggregate[pa.Table | None]):
    """Exact ``count_distinct``: the distinct (id, value) pairs, at most
    ``max_distinct_values_per_group`` a group (exceeding it fails the batch);
    the state column holds the count."""

    fn = "count_distinct"
    mode = "exact"
    rank = 0
    prefix = "distinct"

    def __init__(self, index: int, spec: Aggregation) -> None:
        super().__init__(index, spec)
        if self.cap <= 0:
            raise StageError(
                f"window: aggregation '{self.name}': exact count_distinct needs max_distinct_values_per_group"
            )

    def items(self, column: Column, m: int) -> dict[str, Any]:
        return {self.acc: pa.array(np.zeros(m, dtype=np.int64))}

    def merge_functions(self) -> list[tuple[str, str]]:
        return [(self.acc, "sum")]

    def empty(self) -> pa.Table | None:
        return None

    def fold(self, side: pa.Table | None, step: Fold) -> tuple[pa.Table | None, pa.Array | None]:
        if side is not None and step.remap:
            side = remap_ids(side, step.remap)
        values = step.values
        if side is None and len(values) == 0:  # nothing yet: keep the type unfixed
            return None, pa.array(np.zeros(len(step.ids), np.int64))
        fresh = pa.table({ID: pa.array(step.row_ids), VAL: values}).filter(pc.is_valid(values))
        if side is not None and side.num_rows:
            what = f"count_distinct '{self.name}': the column type changed"
            fresh = concat_cast(side, fresh, what)
        side = fresh.group_by([ID, VAL]).aggregate([])
        per = side.group_by(ID).aggregate([(VAL, "count")])
        counts = np.zeros(len(step.ids), np.int64)
        where = to_np(pc.index_in(per[ID], pa.array(step.ids)))
        counts[where] = to_np(per[f"{VAL}_count"])
        over = np.flatnonzero(counts > self.cap)
        if len(over):
            j = int(over[0])
            raise StageError(
                f"window: count_distinct '{self.name}' exceeds max_distinct_values_per_group={self.cap} "
                f"({int(counts[j])} values) for group {step.describe(j)}"
            )
        return side.select([ID, VAL]), pa.array(counts)

    def evict(self, side: pa.Table | None, ids: I64) -> pa.Table | None:
        if side is None:
            return None
        return side.filter(pc.invert(pc.is_in(side[ID], pa.array(ids))))

    def subset(self, side: pa.Table | None, ids: I64) -> pa.Table | None:
        if side is None:
            return None
        return side.filter(pc.is_in(side[ID], pa.array(ids)))

    def to_table(self, side: pa.Table | None) -> pa.Table | None:
        return side

    def from_table(self, table: pa.Table) -> pa.Table | None:
        return expect(table, self.name, [ID, VAL], [ID])


def hll_values(values: pa.Array) -> list[Any] | None:
    """Values as the Python ints / floats / strs the sketch takes; ``None``: unsupported."""
    t = values.type
    if (
        pa.types.is_integer(t)
        or pa.types.is_boolean(t)
        or (pa.types.is_temporal(t) and not pa.types.is_interval(t))
    ):
        return list(int64_bits(values).tolist())
    if pa.types.is_floating(t):
        return list(values.cast(pa.float64()).to_numpy(zero_copy_only=False).tolist())
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return list(values.to_pylist())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return [b.hex() for b in values.to_pylist()]
    if pa.types.is_decimal(t):
        return list(values.cast(pa.string()).to_pylist())
    return None


class ApproxCountDistinct(SideAggregate[dict[int, Any]]):
    """Approximate ``count_distinct``: an HLL sketch per group (``lg_k`` 12).

    The ``datasketches`` HLL sketch has no bulk update in Python, so each
    batch's *distinct* (group, value) pairs are fed to it one call each
    (≈0.1 µs a value), and each emitted group's estimate is one call.
    """

    fn = "count_distinct"
    mode = "approximate"
    rank = 1
    prefix = "hll"

    def require(self) -> None:
        try:
            import datasketches  # noqa: F401
        except ImportError as exc:
            raise MissingDependencyError(
                "approximate count_distinct needs the datasketches package: "
                "pip install 'sluice[sketches]'"
            ) from exc

    def check(self, vt: pa.DataType) -> None:
        if hll_values(pa.array([], vt)) is None:
            raise StageError(
                f"window: count_distinct '{self.name}': column '{self.column}' of type {vt} cannot be sketched"
            )

    def state_columns(self) -> list[str]:
        return []

    def items(self, column: Column, m: int) -> dict[str, Any]:
        return {}

    def finalise(self, rows: pa.Table, side: dict[int, Any]) -> Any:
        est = [
            0 if (s := side.get(gid)) is None else round(s.get_estimate())
            for gid in to_np(rows[ID]).tolist()
        ]
        return pa.array(est, pa.int64())

    def empty(self) -> dict[int, Any]:
        return {}

    def fold(self, side: dict[int, Any], step: Fold) -> tuple[dict[int, Any], pa.Array | None]:
        import datasketches as ds

        for old, new in step.remap.items():
            src = side.pop(old, None)
            if src is None:
                continue
            dst = side.get(new)
            if dst is None:
                side[new] = src
                continue
            union = ds.hll_union(HLL_LG_K)
            union.update(dst)
            union.update(src)
            side[new] = union.get_result(ds.HLL_8)
        values = step.values
        pairs = pa.table({ID: pa.array(step.row_ids), VAL: values}).filter(pc.is_valid(values))
        if pairs.num_rows == 0:
            return side, None
        # One thread: the pairs come out in first-seen order, so the sketches see the
        # same updates in the same order on every run (the HIP estimate depends on it).
        pairs = pairs.group_by([ID, VAL], use_threads=False).aggregate([])
        pyvals = hll_values(pairs[VAL].combine_chunks())
        assert pyvals is not None  # checked per schema in check()
        sketch = None
        current = -1
        for gid, v in zip(to_np(pairs[ID]).tolist(), pyvals, strict=True):
            if gid != current:
                current = gid
                sketch = side.get(gid)
                if sketch is None:
                    sketch = side[gid] = ds.hll_sketch(HLL_LG_K, ds.HLL_8)
            sketch.update(v)  # type: ignore[union-attr]  # set on the first pair of each id
        return side, None

    def evict(self, side: dict[int, Any], ids: I64) -> dict[int, Any]:
        for gid in ids.tolist():
            side.pop(gid, None)
        return side

    def subset(self, side: dict[int, Any], ids: I64) -> dict[int, Any]:
        # a new dict of the same sketches: a fold replaces sketches, never updates
        # one it did not create, as long as no values are folded (only unions)
        return {gid: side[gid] for gid in ids.tolist() if gid in side}

    def to_table(self, side: dict[int, Any]) -> pa.Table | None:
        # Vectorised but for one serialize_compact call per sketch; by id, so
        # equal states give equal snapshots.
        ids = np.fromiter(side, np.int64, len(side))
        blobs = pa.array([s.serialize_compact() for s in side.values()], pa.large_binary())
        order = np.argsort(ids, kind="stable")
        return pa.table({ID: pa.array(ids[order]), SKETCH: blobs.take(pa.array(order))})

    def from_table(self, table: pa.Table) -> dict[int, Any]:
        import datasketches as ds

        table = expect(table, self.name, [ID, SKETCH], [ID])
        side: dict[int, Any] = {}
        for gid, raw in zip(to_np(table[ID]).tolist(), table[SKETCH].to_pylist(), strict=True):
            sketch = ds.hll_sketch.deserialize(raw)
            if sketch.lg_config_k != HLL_LG_K:
                raise ValueError(f"'{self.name}' has a sketch of lg_k {sketch.lg_config_k}")
            side[gid] = sketch
        return side


AGGREGATES: dict[str, type[Aggregate]] = {
    cls.fn: cls for cls in (Count, CountCol, Sum, Avg, Min, Max, First, Last, CountDistinct)
}
"""The aggregate kinds by their configuration ``agg`` name."""


def compile_aggregates(specs: list[Aggregation]) -> list[Aggregate]:
    """The configured aggregations, compiled; :class:`StageError` for an unknown
    kind, a missing column or a missing cap."""
    out = []
    for i, spec in enumerate(specs):
        cls = AGGREGATES.get(spec.agg)
        if cls is None:
            raise StageError(f"window: aggregation '{spec.as_}': unknown agg '{spec.agg}'")
        out.append(cls.compile(i, spec))
    return out
