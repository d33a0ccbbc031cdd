"""Ragged rows of numbers as flat NumPy arrays, and their Arrow list columns (the one owner of both).

A ragged batch of R rows is `(values, starts)`: `values` (N,) or (N, K) holds every row's entries back to back
and `starts` (R+1,) int64 says where each row begins (row r is `values[starts[r]:starts[r+1]]`). Shards store
such rows as Arrow `list<T>` columns ((N,) values) or `list<list<T>>` columns ((N, K) values: K entries per
token, e.g. the cached teacher top-K). Everything here is vectorized: no Python loop over numbers, only over rows
where a row must become an object of its own.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import pyarrow as pa


class RaggedError(ValueError):
    """A column whose rows cannot be read as asked (e.g. top-k lists of different K inside one row); `.row` is
    the 0-based row of the column. Callers turn it into an error that names their file and row."""

    def __init__(self, message: str, row: int):
        super().__init__(message)
        self.row = row


def starts_of(lengths) -> np.ndarray:
    """(R+1,) int64 row starts from (R,) row lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    return starts


def flatten(rows: Sequence[Any], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """(values (N,), starts (R+1,)) of rows given as lists or 1-D arrays (any mix)."""
    starts = starts_of(np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)))
    if not len(rows):
        return np.zeros(0, dtype=dtype), starts
    if all(isinstance(row, np.ndarray) for row in rows):
        return np.concatenate(rows).astype(dtype, copy=False), starts
    if all(isinstance(row, list) for row in rows):
        return np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=int(starts[-1])), starts
    return np.concatenate([np.asarray(row, dtype=dtype).reshape(-1) for row in rows]), starts


def take(values: np.ndarray, starts: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows `rows` (R',) of a ragged batch, as a new ragged batch (in the order given)."""
    if rows.size == starts.size - 1 and np.array_equal(rows, np.arange(rows.size)):
        return values, starts
    counts = np.diff(starts)[rows]  # (R',)
    new_starts = starts_of(counts)
    index = np.repeat(starts[:-1][rows] - new_starts[:-1], counts) + np.arange(new_starts[-1], dtype=np.int64)
    return values[index], new_starts


def append_tail(values: np.ndarray, starts: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row followed by `tail` (E,): the new ragged batch."""
    count, size = starts.size - 1, tail.size
    if size == 0:
        return values, starts
    out = np.insert(values, np.repeat(starts[1:], size), np.tile(tail.astype(values.dtype), count))
    return out, starts + size * np.arange(count + 1, dtype=np.int64)


def row_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(R,) int64 sum of each row (empty rows give 0)."""
    cumulative = np.zeros(values.size + 1, dtype=np.int64)
    np.cumsum(values, out=cumulative[1:])
    return cumulative[starts[1:]] - cumulative[starts[:-1]]


def row_of(starts: np.ndarray) -> np.ndarray:
    """(N,) row index of every entry."""
    return np.repeat(np.arange(starts.size - 1), np.diff(starts))


def split(values: np.ndarray, starts: np.ndarray) -> list[np.ndarray]:
    """One view per row."""
    bounds = starts.tolist()
    return [values[bounds[r] : bounds[r + 1]] for r in range(len(bounds) - 1)]


# --------------------------------------------------------------------------------------------------------------
# Arrow list columns
# --------------------------------------------------------------------------------------------------------------


def _leaf(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    return pa.array(np.ascontiguousarray(values).reshape(-1).astype(type_.to_pandas_dtype(), copy=False), type=type_)


def to_arrow(values: np.ndarray, starts: np.ndarray, type_: pa.DataType, mask: np.ndarray | None = None) -> pa.Array:
    """A `list<T>` column from (N,) values, or a `list<list<T>>` column from (N, K) values; mask (R,) bool marks
    null rows (their rows must be empty)."""
    offsets = pa.array(starts.astype(np.int32))
    item = type_.value_type
    if pa.types.is_list(item):  # (N, K): K entries per token
        width = values.shape[1] if values.ndim == 2 else 0
        inner_offsets = pa.array((np.arange(values.shape[0] + 1, dtype=np.int64) * width).astype(np.int32))
        child: pa.Array = pa.ListArray.from_arrays(inner_offsets, _leaf(values, item.value_type), type=item)
    else:
        child = _leaf(values, item)
    return pa.ListArray.from_arrays(offsets, child, type=type_, mask=None if mask is None else pa.array(mask))


def rows_to_arrow(rows: Sequence[np.ndarray | None], type_: pa.DataType) -> pa.Array:
    """A list column from one array per row: (n_r,) for `list<T>`, (n_r, K) for `list<list<T>>`; None = null."""
    nested = pa.types.is_list(type_.value_type)
    present = [row for row in rows if row is not None]
    mask = np.fromiter((row is None for row in rows), dtype=bool, count=len(rows))
    starts = starts_of([0 if row is None else len(row) for row in rows])
    if not present:
        values = np.zeros((0, 0) if nested else 0)
    elif nested:
        width = {row.shape[1] for row in present if row.ndim == 2 and len(row)}
        if len(width) > 1:
            raise ValueError(f"rows_to_arrow: rows with different K {sorted(width)} cannot share one (N, K) array.")
        k = width.pop() if width else 0
        values = np.concatenate([np.asarray(row).reshape(len(row), k) for row in present])
    else:
        values = np.concatenate(present)
    return to_arrow(values, starts, type_, mask if mask.any() else None)


def table_from_rows(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """A table with exactly `schema` from row dicts (list columns as arrays or lists), built column by column."""
    columns = []
    for field in schema:
        values = [row[field.name] for row in rows]
        if pa.types.is_list(field.type):
            nested = pa.types.is_list(field.type.value_type)
            arrays = [None if v is None else (v if isinstance(v, np.ndarray) else
                                              np.asarray(v, dtype=np.float64 if nested else None))
                      for v in values]
            columns.append(rows_to_arrow(arrays, field.type))
        else:
            columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _combined(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def from_arrow(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values (N,), starts (R+1,)) of a `list<T>` column; null rows are empty."""
    array = _combined(column)
    lengths = array.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return array.flatten().to_numpy(zero_copy_only=False), starts_of(lengths)


def arrow_rows(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray | None]:
    """One NumPy array per row (zero-copy views where Arrow allows): (n_r,) for `list<T>`, (n_r, K) for
    `list<list<T>>` (every token of a row must have the same K, else RaggedError); None for a null row."""
    array = _combined(column)
    outer = array.offsets.to_numpy()
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    child = array.values
    if not pa.types.is_list(child.type):
        values = child.to_numpy(zero_copy_only=False)
        return [values[outer[i] : outer[i + 1]] if valid[i] else None for i in range(len(array))]
    inner = child.offsets.to_numpy()
    leaves = child.values.to_numpy(zero_copy_only=False)
    widths = np.diff(inner)  # (N,) entries per token
    if widths.size and (widths == widths[0]).all():  # one K for the whole column: one reshape, views per row
        k = int(widths[0])
        tokens = leaves[inner[0] : inner[0] + widths.size * k].reshape(widths.size, k)  # (N, K)
        return [tokens[outer[i] : outer[i + 1]] if valid[i] else None for i in range(len(array))]
    rows: list[np.ndarray | None] = []
    for i in range(len(array)):
        if not valid[i]:
            rows.append(None)
            continue
        start, stop = outer[i], outer[i + 1]
        lengths = widths[start:stop]
        k = int(lengths[0]) if len(lengths) else 0
        if len(lengths) and not np.all(lengths == k):
            raise RaggedError(f"row {i} has lists of different lengths ({sorted(set(lengths.tolist()))[:5]}) where "
                              f"every token needs the same K", row=i)
        rows.append(leaves[inner[start] : inner[stop]].reshape(len(lengths), k))
    return rows
