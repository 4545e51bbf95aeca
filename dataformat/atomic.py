"""Writes that a killed process can never leave half done: readers see the old file or the new one.

The bytes go to a hidden temporary file with a unique name in the target's directory (so two writers of
the same target never share one, and the rename stays on one filesystem), are fsynced, and the file is
renamed over the target; the directory is then fsynced so the rename itself survives a power loss.
Temporary names start with '.' and end in '.tmp', which every reader skips and `remove_stale_temporaries`
deletes when a run restarts.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from dataformat.schema import select_columns

Writer = Callable[[IO[bytes]], Any]


def temporary_path(path: Path) -> Path:
    """A fresh hidden name next to `path` (unique per call)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write(path: str | Path, content: bytes | str | Writer) -> Path:
    """Replace `path` with `content` (bytes, text as UTF-8, or a function writing to a binary handle)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    # O_EXCL: the name is ours alone; mode 0o666 lets the umask decide permissions, like open() would.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """`data` as JSON (non-JSON values such as paths written with str())."""
    return atomic_write(path, json.dumps(data, indent=indent, default=str))


def write_parquet_atomic(rows: list[dict[str, Any]], schema: pa.Schema, path: str | Path) -> Path:
    """Rows (extra keys ignored, missing ones null) as a Parquet file with exactly `schema`."""
    table = pa.Table.from_pylist([select_columns(row, schema) for row in rows], schema=schema)
    return atomic_write(path, lambda handle: pq.write_table(table, handle))


def read_parquet_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a Parquet file or of a directory of parts (hidden and temporary files skipped); [] if absent."""
    path = Path(path)
    if not path.exists():
        return []
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
        rows: list[dict[str, Any]] = []
        for file in files:
            rows.extend(pq.read_table(file).to_pylist())
        return rows
    return pq.read_table(path).to_pylist()


def parquet_dataset(path: str | Path, schema: pa.Schema | None = None) -> ds.Dataset:
    """A Parquet file or a directory of parts as one pyarrow dataset, safe to open while a run writes it.

    Every part is renamed into place complete (`write_parquet_atomic`), and the hidden temporaries of writes in
    progress are skipped ('.' and '_' prefixes), so a reader at any moment sees whole parts only: the rows
    committed so far. `schema` unifies parts and gives an empty or absent directory its columns.
    """
    path = Path(path)
    if not path.exists():
        if schema is None:
            raise FileNotFoundError(f"{path} does not exist")
        return ds.dataset(pa.table({name: pa.array([], type=schema.field(name).type) for name in schema.names}))
    return ds.dataset(path, format="parquet", schema=schema, ignore_prefixes=[".", "_"])


def remove_stale_temporaries(root: str | Path) -> None:
    """Delete what killed writers left under `root`: temporary files and hidden staging/retired directories."""
    for path in Path(root).rglob(".*"):
        if path.name.endswith(".tmp") and path.is_file():
            path.unlink(missing_ok=True)
        elif ("-staging-" in path.name or "-retired-" in path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
