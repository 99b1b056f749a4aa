"""jsonl, npy, Parquet/Arrow and the sktime/aeon ``.ts`` and Monash ``.tsf`` text formats."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing.formats import FileContext, _Out, parse_dataframe
from preprocessing.formats_table import IngestError

SEQUENCE_KEYS = ("sequence", "target", "values", "series")


def _floats(items, out: _Out, name: str) -> np.ndarray | None:
    """Numbers (None/'?'/'NaN' = missing) as float64, or a ``non_numeric`` report."""
    try:
        return np.array([np.nan if v is None or v == "?" else v for v in items], dtype=np.float64)
    except (ValueError, TypeError):
        bad = next((v for v in items if not _is_number(v)), None)
        out.bad(name, "non_numeric", f"{out.ctx.source}: series {name!r} holds a non-numeric value {str(bad)[:40]!r}",
                len(items))
        return None


def _is_number(v) -> bool:
    if v is None or v == "?":
        return True
    try:
        float(v)
        return not isinstance(v, (bool, list, dict))
    except (TypeError, ValueError):
        return False


def parse_jsonl(data: bytes, ctx: FileContext, fail_fast: bool = False) -> pa.Table:
    """One JSON object per line with a ``sequence`` (or target/values) list; optional ``id``/``item_id``."""
    out = _Out(ctx, fail_fast=fail_fast)
    lines = data.decode("utf-8", errors="replace").splitlines()
    if not any(l.strip() for l in lines):
        raise IngestError("empty_file", f"{ctx.source}: empty file (no records)")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        name = str(i)
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            out.bad(name, "bad_record", f"{ctx.source}: line {i + 1} is not valid JSON ({e.msg})", 0)
            continue
        seq = None
        if isinstance(rec, dict):
            name = str(rec.get("item_id", rec.get("id", i)))
            seq = next((rec[k] for k in SEQUENCE_KEYS if k in rec), None)
        elif isinstance(rec, list):
            seq = rec
        if not isinstance(seq, list):
            out.bad(name, "bad_record", f"{ctx.source}: line {i + 1} has no 'sequence' list", 0)
            continue
        vals = _floats(seq, out, name)
        if vals is not None:
            out.series(name, vals)
    return out.table()


def parse_npy(data: bytes, ctx: FileContext, fail_fast: bool = False) -> pa.Table:
    """A 1-D array is one series; a 2-D array holds one series per ROW (NaN = missing)."""
    out = _Out(ctx, fail_fast=fail_fast)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise IngestError("unparseable", f"{ctx.source}: not a readable .npy array ({e})") from None
    if arr.dtype.kind not in "fiub":
        raise IngestError("non_numeric", f"{ctx.source}: .npy dtype {arr.dtype} is not numeric")
    if arr.ndim == 1:
        out.series("0", arr)
    elif arr.ndim == 2:
        for i in range(arr.shape[0]):
            out.series(str(i), arr[i])
    else:
        raise IngestError("unparseable", f"{ctx.source}: .npy array has {arr.ndim} dimensions (1 or 2 supported)")
    return out.table()


def parse_arrow_table(table: pa.Table, ctx: FileContext, fail_fast: bool = False) -> pa.Table:
    """A list column (sequence/target/values) means one series per row; otherwise columns."""
    list_cols = [f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]
    if not list_cols:
        return parse_dataframe(table.to_pandas(), ctx, fail_fast)
    col = next((c for c in SEQUENCE_KEYS if c in list_cols), list_cols[0])
    out = _Out(ctx, fail_fast=fail_fast)
    id_col = next((c for c in ("item_id", "id", "series", "name") if c in table.column_names and c != col), None)
    ids = table.column(id_col).to_pylist() if id_col else list(range(table.num_rows))
    values = table.column(col).combine_chunks()
    if not pa.types.is_floating(values.type.value_type) and not pa.types.is_integer(values.type.value_type):
        raise IngestError("non_numeric", f"{ctx.source}: column {col!r} holds {values.type.value_type}, not numbers")
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    offs = values.offsets.to_numpy()
    offs = offs - offs[0]
    for i, name in enumerate(ids):
        out.series(str(name), flat[offs[i]:offs[i + 1]])
    return out.table()


def parse_parquet(data: bytes, ctx: FileContext, fail_fast: bool = False) -> pa.Table:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestError("unparseable", f"{ctx.source}: not a readable Parquet file ({e})") from None
    return parse_arrow_table(table, ctx, fail_fast)


def parse_arrow_ipc(data: bytes, ctx: FileContext, fail_fast: bool = False) -> pa.Table:
    try:
        try:
            table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestError("unparseable", f"{ctx.source}: not a readable Arrow IPC file ({e})") from None
    return parse_arrow_table(table, ctx, fail_fast)


def _header_and_body(text: str, source: str) -> tuple[dict[str, str], list[str], list[str]]:
    """('@key value' header, attribute names, data lines) of a .ts/.tsf file."""
    header: dict[str, str] = {}
    attrs: list[str] = []
    body: list[str] = []
    in_data = False
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if in_data:
            body.append(s)
            continue
        if s.startswith("@"):
            parts = s[1:].split(None, 1)
            key = parts[0].lower()
            if key == "data":
                in_data = True
            elif key == "attribute":
                attrs.append(parts[1].split()[0] if len(parts) > 1 else "")
            else:
                header[key] = parts[1].strip() if len(parts) > 1 else ""
    if not in_data:
        raise IngestError("unparseable", f"{source}: no '@data' line (not a .ts/.tsf file)")
    if not body:
        raise IngestError("empty_file", f"{source}: '@data' section is empty")
    return header, attrs, body


def parse_ts(data: bytes, ctx: FileContext, fail_fast: bool = False) -> pa.Table:
    """sktime/aeon ``.ts``: one case per line, dimensions separated by ':', then the label/target
    (when ``@classLabel true`` or ``@targetLabel true``), which is not a series and is dropped."""
    out = _Out(ctx, fail_fast=fail_fast)
    header, _, body = _header_and_body(data.decode("utf-8", errors="replace"), ctx.source)
    labelled = header.get("classlabel", "false").split()[0].lower() == "true" or \
        header.get("targetlabel", "false").split()[0].lower() == "true"
    timestamps = header.get("timestamps", "false").lower() == "true"
    if timestamps:
        raise IngestError("unsupported", f"{ctx.source}: .ts files with @timeStamps true are not supported")
    for i, line in enumerate(body):
        dims = line.split(":")
        if labelled:
            dims = dims[:-1]
        for d, dim in enumerate(dims):
            name = str(i) if len(dims) == 1 else f"{i}/dim{d}"
            vals = _floats([v.strip() for v in dim.split(",") if v.strip() != ""], out, name)
            if vals is not None:
                out.series(name, vals)
    if labelled:
        out.note("*", "skipped_column", f"{ctx.source}: class/target label after ':' skipped (not a series)")
    return out.table()


def parse_tsf(data: bytes, ctx: FileContext, fail_fast: bool = False) -> pa.Table:
    """Monash ``.tsf``: '@attribute' lines, then ``attr1:attr2:...:v1,v2,...`` per series;
    the first attribute names the series; '?' is a missing value."""
    out = _Out(ctx, fail_fast=fail_fast)
    header, attrs, body = _header_and_body(data.decode("utf-8", errors="replace"), ctx.source)
    for i, line in enumerate(body):
        parts = line.split(":")
        if len(parts) < len(attrs) + 1:
            out.bad(str(i), "bad_record", f"{ctx.source}: data line {i + 1} has {len(parts) - 1} attributes, "
                                          f"header declares {len(attrs)}", 0)
            continue
        name = parts[0] if attrs else str(i)
        values = ":".join(parts[len(attrs):])
        vals = _floats([v.strip() for v in values.split(",") if v.strip() != ""], out, name)
        if vals is not None:
            out.series(name, vals)
    return out.table()
