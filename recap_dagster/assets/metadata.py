"""Helpers that turn plain results into Dagster metadata values."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

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


#: Who answers for each group of assets (the asset page's owners): one entry per group.
OWNERS_BY_GROUP = {
    "inputs": ["team:recap-data"],
    "corpus": ["team:recap-data"],
    "captioner": ["team:recap-captioning"],
    "recaption": ["team:recap-captioning"],
    "text_to_image": ["team:recap-t2i"],
    "evaluation": ["team:recap-evaluation"],
    "miniworld": ["team:recap-data"],
}


def with_owners(spec: dg.AssetSpec) -> dg.AssetSpec:
    """``spec`` owned by its group's team (``OWNERS_BY_GROUP``)."""
    return spec.replace_attributes(owners=OWNERS_BY_GROUP.get(spec.group_name or "", []))


def with_code_reference(asset: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """``asset`` linked to the function that defines it (the UI's "Open in editor").
    Dagster's ``with_source_code_references`` names the file of the outermost wrapper
    (``retry_only_transient``'s); this follows ``functools.wraps`` to the asset's own."""
    fn = inspect.unwrap(getattr(asset.op.compute_fn, "decorated_fn", asset.op.compute_fn))
    reference = dg.LocalFileCodeReference(
        file_path=str(Path(inspect.getsourcefile(fn) or "").resolve()),
        line_number=inspect.getsourcelines(fn)[1],
    )
    references = dg.CodeReferencesMetadataValue(code_references=[reference])
    return dg.map_asset_specs(
        lambda spec: spec.replace_attributes(
            metadata={**spec.metadata, "dagster/code_references": references}
        ),
        [asset],
    )[0]


def _column_type(values: list[object]) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if present and all(isinstance(v, int | float) for v in present):
        return "float"
    return "string"


def typed_table(
    rows: list[dict[str, object]], descriptions: dict[str, str] | None = None
) -> dg.MetadataValue:
    """``rows`` (same keys in each) as a table whose columns are typed from their values
    (the UI sorts numbers as numbers); other values are shown as text."""
    descriptions = descriptions or {}
    names = list(rows[0]) if rows else []
    types = {name: _column_type([row.get(name) for row in rows]) for name in names}
    records = [
        dg.TableRecord(
            {
                name: row.get(name)
                if row.get(name) is None or types[name] != "string"
                else str(row[name])
                for name in names
            }
        )
        for row in rows
    ]
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn(name=name, type=types[name], description=descriptions.get(name))
            for name in names
        ]
    )
    return dg.MetadataValue.table(records=records, schema=schema)


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
