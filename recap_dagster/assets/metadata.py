"""Helpers that turn plain results into Dagster metadata values."""

from __future__ import annotations

import hashlib

import dagster as dg
import pyarrow as pa

_TYPE_NAMES = {
    pa.string(): "string",
    pa.large_string(): "string",
    pa.binary(): "bytes",
    pa.int64(): "int",
    pa.int32(): "int",
    pa.float64(): "float",
    pa.float32(): "float",
    pa.bool_(): "bool",
}


def column_schema(schema: pa.Schema, descriptions: dict[str, str] | None = None) -> dg.TableSchema:
    descriptions = descriptions or {}
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=f.name,
                type=_TYPE_NAMES.get(f.type, str(f.type)),
                description=descriptions.get(f.name),
            )
            for f in schema
        ]
    )


def sample_table(table: pa.Table, columns: list[str], rows: int = 8) -> dg.MetadataValue:
    """A small table of the first ``rows`` rows, text columns shortened for display."""
    head = table.select(columns).slice(0, rows).to_pylist()
    records = [
        dg.TableRecord({k: (v if not isinstance(v, str) else v[:200]) for k, v in row.items()})
        for row in head
    ]
    schema = dg.TableSchema(columns=[dg.TableColumn(name=c, type="string") for c in columns])
    return dg.MetadataValue.table(records=records, schema=schema)


def table_fingerprint(table: pa.Table) -> str:
    """A content hash of a table, used as its data version."""
    digest = hashlib.sha256()
    for batch in table.to_batches():
        for column in batch.columns:
            for buffer in column.buffers():
                if buffer is not None:
                    digest.update(buffer)
    return digest.hexdigest()[:16]
