"""Feather shards of aligned face chips: the schema, an atomic writer and a validating reader.

One row per kept face. Columns:

| column | type | meaning |
|---|---|---|
| ``image`` | binary | JPEG bytes of the aligned chip (see ``c3ae.faces``) |
| ``age`` | float32 | years; NaN when the dataset has none |
| ``gender`` | int8 | 1 male, 0 female, -1 unknown |
| ``boxes`` | fixed list of 12 float32 | C3AE's outer, middle, inner (x1, y1, x2, y2) in chip pixels |
| ``single_box`` | fixed list of 4 float32 | the single crop's box in chip pixels |
| ``landmarks`` | fixed list of 10 float32 | 5 (x, y) landmarks in chip pixels |
| ``detector_score`` | float32 | the detector's confidence |
| ``faces_found`` | int16 | faces the detector found in the photo (the most confident is kept) |
| ``source`` | string | dataset name |
| ``path`` | string | the photo's path |
| ``identity`` | string (nullable) | person id, where the dataset has one |
| ``label`` | string (nullable) | class name for folder-per-class datasets |
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from c3ae.errors import C3AEError, UsageError
from c3ae.files import atomic_path

MAX_ROWS_PER_SHARD = 5000

SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("age", pa.float32()),
        ("gender", pa.int8()),
        ("boxes", pa.list_(pa.float32(), 12)),
        ("single_box", pa.list_(pa.float32(), 4)),
        ("landmarks", pa.list_(pa.float32(), 10)),
        ("detector_score", pa.float32()),
        ("faces_found", pa.int16()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("identity", pa.string()),
        ("label", pa.string()),
    ]
)
COLUMNS = tuple(SCHEMA.names)


class ShardError(C3AEError, ValueError):
    """An unreadable, corrupt or schema-incompatible shard."""


def rows_to_table(rows: Sequence[dict]) -> pa.Table:
    """Build a table in :data:`SCHEMA` from dicts with those keys (arrays are flattened)."""
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise UsageError(f"Shard rows lack the columns {missing}.")
    columns = {}
    for name in COLUMNS:
        values = [row[name] for row in rows]
        if name in ("boxes", "single_box", "landmarks"):
            values = [np.asarray(v, dtype=np.float32).reshape(-1).tolist() for v in values]
        elif name == "age":
            values = [float("nan") if v is None else float(v) for v in values]
        columns[name] = pa.array(values, type=SCHEMA.field(name).type)
    return pa.table(columns, schema=SCHEMA)


def write_shard(path: str | Path, rows: Sequence[dict]) -> int:
    """Write ``rows`` to ``path`` atomically (temporary name, fsync, rename); returns the row count."""
    path = Path(path)
    if len(rows) > MAX_ROWS_PER_SHARD:
        raise UsageError(f"A shard holds at most {MAX_ROWS_PER_SHARD} rows, got {len(rows)}.")
    table = rows_to_table(rows) if rows else SCHEMA.empty_table()
    with atomic_path(path, fsync=True) as temporary:
        feather.write_feather(table, temporary, compression="zstd")
    return table.num_rows


def read_shard(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a shard, checking that it is a readable Feather file with the expected columns."""
    path = Path(path)
    try:
        table = feather.read_table(path, columns=list(columns) if columns else None, memory_map=False)
    except (OSError, pa.ArrowInvalid) as error:
        raise ShardError(f"{path}: unreadable or corrupt Feather shard ({error}).") from error
    expected = list(columns) if columns else list(COLUMNS)
    missing = [c for c in expected if c not in table.column_names]
    if missing:
        raise ShardError(f"{path}: shard lacks the columns {missing}.")
    return table


def fixed_list_to_numpy(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A fixed-size list column as an (N, width) float32 array."""
    flat = (
        pa.concat_arrays([chunk.flatten() for chunk in column.chunks]) if column.num_chunks else pa.array([])
    )
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)
