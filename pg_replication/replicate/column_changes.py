"""A segment's changes kept as decoded columns, in stream order, folded per key in compiled code.

The compiled decoder (source/_rowdecode.c) appends each Insert/Update/Delete of a relation to
Arrow string columns without a Python object per change or value; the fold (one row per key: the
last change wins) picks each key's last row with a hash table in C, and Arrow takes those rows.
The staged result has exactly the shape ``staging.segment_table`` gives a folded
``changes.Segment``, so every warehouse and the change log take it unchanged.

What the decoder does not take (an unchanged TOAST value, which needs earlier changes of the
batch to fill it, or a malformed message, which the careful decoder names) turns the segment
into a ``changes.Segment`` (``to_segment``) and goes on in Python.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

import pyarrow as pa

from pg_replication.replicate.changes import Segment, TableStats, Upsert
from pg_replication.source._rowdecode import RowColumns, arrays_to_json, strings_to_arrow
from pg_replication.warehouse import staging

Convert = Callable[[str], str]


class ColumnSegment:
    """Changes to one table under one column set, decoded into columns (see module docstring)."""

    has_unknowns = False  # an unchanged TOAST value sends the segment to Python (to_segment)

    def __init__(
        self,
        columns: tuple[str, ...],
        key_positions: tuple[int, ...],
        keep: tuple[int, ...],
        source_width: int,
        converters: tuple[tuple[int, Convert], ...],
        origin: object = None,
    ) -> None:
        self.columns, self.key_positions = columns, key_positions
        self.origin = origin  # what the changes were decoded under (the drain's relation plan)
        self.truncated = False
        self.converters = converters
        self.decoded = RowColumns(keep, key_positions, source_width)
        self.add = self.decoded.add  # data -> 1 insert, 2 update, 3 delete, < 0: not taken

    @property
    def rows(self) -> RowColumns:
        return self.decoded

    def count_into(self, stats: TableStats) -> None:
        """Add the changes decoded here to ``stats`` (once: when the segment is done)."""
        stats.inserted += self.decoded.inserted
        stats.updated += self.decoded.updated
        stats.deleted += self.decoded.deleted

    def truncate(self) -> None:
        self.decoded.clear()
        self.truncated = True

    def _arrays(self) -> tuple[list[pa.Array], list[pa.Array]]:
        """Columns and fill keys as Arrow strings in the staged form (``TypeMapping.from_text``)."""
        convert = dict(self.converters)
        columns = [_convert(_array(b), convert.get(i)) for i, b in enumerate(self.decoded.columns)]
        fills = [_convert(_array(b), convert.get(p)) for p, b in zip(self.key_positions, self.decoded.fills)]
        return columns, fills

    def to_segment(self) -> Segment:
        """The same changes folded in Python, to go on with changes the decoder does not take."""
        segment = Segment(self.columns, self.key_positions, self.truncated)
        arrays, fill_arrays = self._arrays()
        columns = [a.to_pylist() for a in arrays]
        fills = [a.to_pylist() for a in fill_arrays]
        for n, op in enumerate(self.decoded.ops):
            values = [c[n] for c in columns]
            key = segment.key(values)
            segment.rows[key] = None if op == "D" else Upsert(values, set(), tuple(f[n] for f in fills))
        return segment

    def table(self, key_width: int) -> pa.Table:
        """The staged form (staging.py), folded per key: the last change of each key wins."""
        columns, fills = self._arrays()
        ops = self.decoded.ops
        rows = len(ops)
        offset = 1 if self.truncated else 0  # a TRUNCATE row goes first, as _seq 0
        names = [staging.SEQ, staging.OP, staging.UNKNOWN]
        arrays = [
            _int64(range(offset, offset + rows)),
            _array((None, array("i", range(rows + 1)).tobytes(), ops.encode(), 0)),
            pa.nulls(rows, pa.string()),
        ]
        names += [staging.fill_column(i) for i in range(len(fills))] + [staging.value_column(i) for i in range(len(columns))]
        raw = pa.Table.from_arrays(arrays + fills + columns, names=names)
        winners = self.decoded.last_per_key()  # the fold, in C: each key's last row, in order
        folded = raw.take(pa.Array.from_buffers(pa.int64(), len(winners) // 8, [None, pa.py_buffer(winners)]))
        if self.truncated:
            first = [pa.nulls(1, field.type) for field in raw.schema]
            first[0], first[1] = _int64([0]), _array((None, array("i", [0, 1]).tobytes(), b"T", 0))
            folded = pa.concat_tables([pa.Table.from_arrays(first, schema=raw.schema), folded])
        return folded


def staged_table(segment: Segment | ColumnSegment, key_width: int) -> pa.Table:
    """The staged form of either kind of segment (staging.py)."""
    if isinstance(segment, ColumnSegment):
        return segment.table(key_width)
    return staging.segment_table(segment, key_width)


def _array(buffers: tuple) -> pa.Array:
    """An Arrow string array from the decoder's (validity, offsets, data, nulls)."""
    valid, offsets, data, nulls = buffers
    rows = len(offsets) // 4 - 1
    return pa.Array.from_buffers(
        pa.string(), rows, [None if valid is None else pa.py_buffer(valid), pa.py_buffer(offsets), pa.py_buffer(data)], nulls
    )


def _int64(values) -> pa.Array:
    # Not pa.array(): building from Python objects makes pyarrow import pandas (~0.5 s per process).
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(array("q", values).tobytes())])


def _convert(values: pa.Array, convert: Convert | None) -> pa.Array:
    if convert is None:
        return values
    kind = getattr(convert, "element_kind", None)
    if kind is not None and values.offset == 0:  # arrays: the common literals converted in C
        valid, offsets, data = values.buffers()
        return _array(arrays_to_json(len(values), valid, offsets, data if data is not None else b"", kind, convert))
    return _array(strings_to_arrow([None if v is None else convert(v) for v in values.to_pylist()]))
