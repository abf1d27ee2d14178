"""Rows of a data file in the formats the ecosystem writes, with one-line errors and bounds.

=====================================  =================================================
``.jsonl``                             one JSON object per line (``PATH:LINE`` errors)
``.json``                              JSON lines as above, or one array of objects
                                       (``[{...}, ...]``, at most 64 MB)
``.csv`` / ``.tsv``                    a header row naming the columns; CSV quoting as
                                       ``datasets``/pandas write it, TSV unquoted (GLUE)
``.parquet``                           read through pyarrow, only the columns asked for,
                                       a row group (those columns) at most 1 GB unpacked
a folder                               written by ``datasets``' ``Dataset.save_to_disk``
                                       (``load_from_disk``; memory-mapped Arrow)
=====================================  =================================================

Every format keeps the bounds of :mod:`darkknowledge.jsonl`: a line or a value longer
than 16 MB, bytes that are not UTF-8 and JSON nested deeper than 64 levels are refused
with the file and its line (text formats) or row (Parquet, Arrow).

:func:`iter_rows` yields ``(where, row)``: ``where`` is ``PATH:LINE`` or ``PATH: row N``
(1-based), for the caller's own one-line errors about a row.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import DKError
from .jsonl import MAX_JSON_DEPTH, MAX_LINE_BYTES, iter_lines, iter_objects, loads

MAX_JSON_ARRAY_BYTES = 64 << 20  # a .json file holding one array (JSON lines: per line)
MAX_ROW_GROUP_BYTES = 1 << 30  # one Parquet row group, the columns read, unpacked
MAX_STATE_BYTES = 1 << 20  # a save_to_disk folder's state.json / dataset_info.json
BATCH_ROWS = 1024  # Arrow rows turned into Python at a time

FORMATS = ".jsonl, .json, .csv, .tsv, .parquet or a folder written by datasets' save_to_disk"

# select(columns, where) -> the columns to read (a format with a header or a schema calls
# it once, before any row, so a missing column is one line naming the file)
Select = Callable[[list[str], str], list[str]]


def iter_rows(path: str | Path, select: Select | None = None) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for every row of ``path`` (see the module's table)."""
    path = Path(path)
    if path.is_dir():
        yield from _saved_dataset(path, select)
        return
    if not path.is_file():
        raise DKError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        yield from _delimited(path, select, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        for n, obj in iter_objects(path):
            yield f"{path}:{n}", obj
    elif suffix == ".json":
        yield from _json(path)
    elif suffix == ".parquet":
        yield from _parquet(path, select)
    else:
        raise DKError(f"{path}: unknown data format (expected {FORMATS})")


def label_names(path: str | Path, column: str) -> list[str] | None:
    """Class names of ``column`` where the file records them (a ``datasets`` ClassLabel
    in a saved dataset or in a Parquet file ``datasets`` wrote), else None."""
    path = Path(path)
    try:
        if path.is_dir():
            features = _load_saved(path).features
        elif path.suffix.lower() == ".parquet":
            import datasets
            import pyarrow.parquet as pq

            features = datasets.Features.from_arrow_schema(pq.read_schema(path))
        else:
            return None
    except DKError:
        raise
    except Exception:
        return None
    names = getattr(features.get(column), "names", None)
    return [str(n) for n in names] if isinstance(names, list) else None


# ---------------------------------------------------------------- text formats


def _delimited(path: Path, select: Select | None, delimiter: str) -> Iterator[tuple[str, dict]]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(
        (line for _, line in iter_lines(path)), delimiter=delimiter, quoting=quoting
    )
    try:
        header = next(reader, None)
        if not header:
            raise DKError(f"{path}: empty file (expected a header row)")
        if len(set(header)) != len(header):
            raise DKError(f"{path}:1: a column is named twice ({', '.join(header)})")
        keep = select(header, str(path)) if select else header
        for row in reader:
            n = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise DKError(f"{path}:{n}: {len(row)} columns, the header has {len(header)}")
            rec = dict(zip(header, row, strict=True))
            yield f"{path}:{n}", {k: rec[k] for k in keep}
    except csv.Error as e:
        raise DKError(f"{path}:{reader.line_num}: not a {kind} row ({e})") from None


def _json(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as e:
        raise DKError(f"{path}: cannot read ({e.strerror or e})") from None
    if not head.startswith(b"["):  # JSON lines
        for n, obj in iter_objects(path):
            yield f"{path}:{n}", obj
        return
    if path.stat().st_size > MAX_JSON_ARRAY_BYTES:
        raise DKError(
            f"{path}: a JSON array larger than {MAX_JSON_ARRAY_BYTES >> 20} MB; "
            "write JSON lines (.jsonl) instead"
        )
    rows = loads(path.read_bytes(), str(path), MAX_JSON_DEPTH + 1)
    if not isinstance(rows, list):
        raise DKError(f"{path}: expected JSON lines or one array of objects")
    for i, obj in enumerate(rows, 1):
        if not isinstance(obj, dict):
            raise DKError(f"{path}: row {i}: expected a JSON object")
        yield f"{path}: row {i}", obj


# ---------------------------------------------------------------- Arrow formats


def _parquet(path: Path, select: Select | None) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        cols = _columns(list(schema.names), select, path, schema)
        meta = pf.metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            size = sum(
                rg.column(i).total_uncompressed_size
                for i in range(rg.num_columns)
                if rg.column(i).path_in_schema.split(".")[0] in cols
            )
            if size > MAX_ROW_GROUP_BYTES:
                raise DKError(
                    f"{path}: row group {g} holds {size >> 20} MB of the columns read, more "
                    f"than {MAX_ROW_GROUP_BYTES >> 30} GB; write smaller row groups"
                )
        batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=cols)
        yield from _arrow_rows(path, batches)
    except DKError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DKError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None


def _load_saved(path: Path):
    """A folder written by ``Dataset.save_to_disk``, checked before ``datasets`` opens it:
    its state names Arrow files inside the folder only."""
    import json

    if (path / "dataset_dict.json").is_file():
        splits = _small_json(path / "dataset_dict.json").get("splits")
        names = ", ".join(str(s) for s in splits) if isinstance(splits, list) else "?"
        raise DKError(
            f"{path}: a DatasetDict folder (splits: {names}); name one split's folder, "
            f"e.g. {path / 'train'}"
        )
    state_file = path / "state.json"
    if not state_file.is_file():
        raise DKError(
            f"{path}: a folder, but not one written by datasets' save_to_disk (no "
            f"state.json); data files are {FORMATS}"
        )
    state = _small_json(state_file)
    files = state.get("_data_files")
    if not isinstance(files, list) or not files:
        raise DKError(f"{state_file}: no '_data_files' list")
    for f in files:
        name = f.get("filename") if isinstance(f, dict) else None
        if (
            not isinstance(name, str)
            or not name
            or "/" in name
            or "\\" in name
            or name in (".", "..")
            or not (path / name).is_file()
        ):
            raise DKError(f"{state_file}: '_data_files' names {json.dumps(name)}, not a file here")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DKError(f"{path}: not a readable saved dataset ({_first_line(e)})") from None
    if not isinstance(ds, datasets.Dataset):
        raise DKError(f"{path}: expected one Dataset, found a {type(ds).__name__}")
    return ds


def _saved_dataset(path: Path, select: Select | None) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa

    ds = _load_saved(path)
    table = ds.data.table
    if ds._indices is not None:  # a select()/shuffle() saved without flatten_indices()
        ds = ds.flatten_indices()
        table = ds.data.table
    cols = _columns(list(table.column_names), select, path, table.schema)
    try:
        yield from _arrow_rows(path, table.select(cols).to_batches(max_chunksize=BATCH_ROWS))
    except DKError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DKError(f"{path}: not a readable saved dataset ({_first_line(e)})") from None


def _columns(names: list[str], select: Select | None, path: Path, schema) -> list[str]:
    import pyarrow as pa

    cols = select(names, str(path)) if select else names
    for c in cols:
        t = schema.field(c).type
        if pa.types.is_nested(t) or pa.types.is_dictionary(t):
            raise DKError(f"{path}: column {c!r} holds {t}, not text or numbers")
    return cols


def _arrow_rows(path: Path, batches) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.compute as pc

    n = 0
    for batch in batches:
        for name, col in zip(batch.schema.names, batch.columns, strict=True):
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                lengths = pc.binary_length(col)
                too_long = pc.greater(lengths, MAX_LINE_BYTES)
                if pc.any(too_long).as_py():
                    i = pc.index(too_long, True).as_py()
                    raise DKError(
                        f"{path}: row {n + i + 1}: {name!r} longer than {MAX_LINE_BYTES >> 20} MB"
                    )
        try:
            rows = batch.to_pylist()
        except (UnicodeDecodeError, pa.ArrowException) as e:
            raise DKError(
                f"{path}: rows {n + 1}..{n + len(batch)}: unreadable ({_first_line(e)})"
            ) from None
        for row in rows:
            n += 1
            yield f"{path}: row {n}", row


def _small_json(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise DKError(f"{path}: larger than {MAX_STATE_BYTES >> 20} MB")
        obj = loads(path.read_bytes(), str(path))
    except OSError as e:
        raise DKError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(obj, dict):
        raise DKError(f"{path}: expected a JSON object")
    return obj


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def pick(columns: list[str], where: str, wanted: list[str], optional: tuple[str, ...] = ()):
    """A :data:`Select` helper: ``wanted`` must be columns (one line naming the first
    missing one), ``optional`` are read when present."""
    for w in wanted:
        if w not in columns:
            raise DKError(f"{where}: no column {w!r} (columns: {', '.join(columns)})")
    return [*wanted, *(o for o in optional if o in columns and o not in wanted)]
