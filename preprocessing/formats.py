"""Tabular raw files (CSV/TSV, optionally gzip; Parquet/Arrow) into SERIES_SCHEMA tables.

Layout inference (each rule can be overridden per source in the catalog, preprocessing/catalog.py):

- ``columns``: one series per numeric column; a time column (by name, or the first text column
  that parses as dates) anywhere or none. Rows are sorted by time, duplicate timestamps keep the
  FIRST row (the dropped points are reported as a ``duplicate_timestamps`` row), and missing rows
  of a regular grid (fixed step, or calendar months/quarters/years) become NaN points.
- ``long``: an id column with repeated values next to a time column (id, time, value...).
- ``rows``: one series per row (M4 style: a unique id column then a run of numbered columns
  V2..Vn / W0..W51); trailing empty cells are padding, not gaps; other columns are skipped.
- ``calendar``: one row per year with 12 month columns, melted to one monthly series.

Columns that are not series are skipped and REPORTED as zero-point rows with reason
``skipped_column`` (message says why: index, label, categorical, derived, empty, calendar part).
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from preprocessing.formats_table import IngestError, concat, quarantine_table, series_table_from_list

TIME_NAMES = {"time", "date", "datetime", "timestamp", "ds", "dteday", "period", "month", "year", "week",
              "quarter", "hr", "hour", "day", "minute", "dt", "date_time", "time_idx", "t", "step"}
# calendar parts that only make sense next to another time column (never series on their own)
CALENDAR_PARTS = {"year", "yr", "quarter", "month", "mnth", "week", "weekday", "day", "hr", "hour", "minute",
                  "season", "holiday", "workingday", "dow"}
LABEL_NAMES = {"label", "labels", "class", "target_label", "is_anomaly", "anomaly", "flag", "outlier"}
INDEX_NAMES = {"", "index", "instant", "unnamed: 0", "id", "idx"}
FULL_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
               "september", "october", "november", "december"]
MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]


@dataclass
class TableOverrides:
    """Per-source choices from the catalog; None means infer."""

    layout: str = "auto"                     # auto | columns | long | rows | calendar
    time_column: str | list[str] | None = None
    columns: list[str] | None = None         # the series columns (value columns for long)
    skip_columns: list[str] = field(default_factory=list)
    id_column: str | None = None             # long / rows layouts
    header: bool = True
    delimiter: str | None = None
    decimal: str = "."                       # "," for files written with decimal commas (1,5)


@dataclass
class FileContext:
    domain: str
    dataset: str
    source: str
    overrides: TableOverrides = field(default_factory=TableOverrides)


@dataclass
class _Out:
    """Accumulates good series and reported rows for one file."""

    ctx: FileContext
    names: list[str] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    notes: list[tuple] = field(default_factory=list)
    fail_fast: bool = False

    def series(self, name: str, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if len(values) == 0:
            return self.bad(name, "empty_series", f"{self.ctx.source}: series {name!r} has no points", 0)
        if np.isinf(values).any():
            i = int(np.flatnonzero(np.isinf(values))[0])
            return self.bad(name, "non_finite", f"{self.ctx.source}: series {name!r} holds an infinite value at "
                                                f"position {i}", len(values))
        if np.isnan(values).all():
            return self.bad(name, "all_missing", f"{self.ctx.source}: series {name!r} has only missing values",
                            len(values))
        if (np.abs(values[~np.isnan(values)]) > np.finfo(np.float32).max).any():
            return self.bad(name, "non_finite", f"{self.ctx.source}: series {name!r} overflows float32", len(values))
        self.names.append(name)
        self.arrays.append(values.astype(np.float32))

    def bad(self, name: str, reason: str, message: str, claimed: int) -> None:
        if self.fail_fast:
            raise IngestError(reason, message, claimed)
        self.note(name, reason, message, claimed)

    def note(self, name: str, reason: str, message: str, claimed: int = 0) -> None:
        self.notes.append((self.ctx.domain, self.ctx.dataset, name, self.ctx.source, reason, message, int(claimed)))

    def skip(self, col: str, why: str) -> None:
        self.note(str(col), "skipped_column", f"{self.ctx.source}: column {col!r} skipped ({why})")

    def table(self) -> pa.Table:
        good = series_table_from_list(self.ctx.domain, self.ctx.dataset, self.names, self.ctx.source, self.arrays)
        return concat([good, quarantine_table(self.notes)]) if self.notes else good


# ------------------------------------------------------------------------------ reading text


_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xef\xbb\xbf", "utf-8"),
         (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def text_encoding(data: bytes, source: str) -> tuple[str, int]:
    """``(encoding, length of its byte-order mark)`` of a text file: the mark (UTF-8, UTF-16,
    UTF-32) if there is one, else UTF-16 when every other byte of the head is NUL (ASCII text
    saved as UTF-16 without a mark), else UTF-8. Other NUL bytes: IngestError naming the file."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return encoding, len(bom)
    head = data[:4096]
    if b"\x00" not in head:
        return "utf-8", 0
    even, odd = head[0::2], head[1::2]
    if odd and odd.count(0) >= 0.9 * len(odd) and even.count(0) <= 0.1 * len(even):
        return "utf-16-le", 0
    if even and even.count(0) >= 0.9 * len(even) and odd.count(0) <= 0.1 * len(odd):
        return "utf-16-be", 0
    raise IngestError("unparseable", f"{source}: holds NUL bytes: binary data or a text encoding other than "
                                     f"UTF-8/UTF-16/UTF-32; save it as UTF-8 text")


def decode_text(data: bytes, source: str) -> str:
    """``data`` as text in the encoding :func:`text_encoding` finds. UTF-8 stays lenient
    (invalid bytes become U+FFFD: digits are ASCII, only names can hold such bytes); a UTF-16/32
    file that does not decode is an IngestError naming the file and the encoding."""
    encoding, skip = text_encoding(data, source)
    if encoding == "utf-8":
        return data[skip:].decode("utf-8", errors="replace")
    try:
        return data[skip:].decode(encoding)
    except UnicodeDecodeError as e:
        raise IngestError("unparseable", f"{source}: not valid {encoding.upper()} text ({e.reason} at byte "
                                         f"{e.start + skip}); save it as UTF-8 text") from None


# a number written with a decimal comma: 1,5  -0,25  3,0e-4 (no thousands separators)
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+(?:[eE][+-]?\d+)?$")


def _decimal_commas_to_points(df: pd.DataFrame) -> pd.DataFrame:
    """Cells that are numbers with a decimal comma get a decimal point; other cells stay as
    they are (a cell like 1.234,5 with a thousands separator then reads as non-numeric, and is
    reported, rather than as a wrong number)."""
    for j in range(df.shape[1]):
        col = df.iloc[:, j].astype(str)
        stripped = col.str.strip()
        match = stripped.str.fullmatch(_DECIMAL_COMMA.pattern)
        if match.any():
            df.iloc[:, j] = col.where(~match, stripped.str.replace(",", ".", regex=False))
    return df


def read_csv_bytes(data: bytes, source: str, ov: TableOverrides) -> pd.DataFrame:
    """Parse CSV/TSV text (any line endings, quoted fields; UTF-8, or UTF-16/32 with or without a
    byte-order mark) into a DataFrame of raw cells. ``ov.decimal == ","`` reads decimal commas."""
    text = decode_text(data, source)
    if not text.strip():
        raise IngestError("empty_file", f"{source}: empty file (no rows)")
    head = text[:65536].lstrip("\ufeff").splitlines()  # sniff on the head only (files can be large)
    first = head[0] if head else ""
    sep = ov.delimiter or ("\t" if source.rstrip(".gz").endswith((".tsv", ".tab")) or first.count("\t") > first.count(",")
                           else (";" if first.count(";") > first.count(",") else ","))
    if ov.decimal not in (".", ","):
        raise IngestError("bad_override", f"{source}: decimal must be '.' or ',', got {ov.decimal!r}")
    if ov.decimal == "," and sep == ",":
        raise IngestError("bad_override", f"{source}: decimal ',' needs another column delimiter, but the delimiter "
                                          f"is ','; set delimiter (e.g. ';') in the catalog entry too")
    try:
        # universal newlines via StringIO(newline=None): CR-only (old Mac) files read as lines too
        df = pd.read_csv(io.StringIO(text, newline=None), sep=sep, header=0 if ov.header else None,
                         dtype=str, keep_default_na=False, skipinitialspace=True, engine="c")
    except pd.errors.EmptyDataError:
        raise IngestError("empty_file", f"{source}: empty file (no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise IngestError("unparseable", f"{source}: cannot parse as delimited text ({str(e).splitlines()[0]})") from None
    if not ov.header:
        df.columns = [str(c) for c in df.columns]
    df.columns = [str(c).strip().lstrip("\ufeff") for c in df.columns]
    if len(df) == 0:
        raise IngestError("empty_file", f"{source}: header only, no data rows")
    return _decimal_commas_to_points(df) if ov.decimal == "," else df


_MISSING = {"", "na", "nan", "null", "none", "nil", "?", "n/a", "#n/a", "-"}


def _numeric(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values with NaN for empty cells, boolean mask of non-empty cells that are not numbers)."""
    if col.dtype.kind in "fiub":
        return col.to_numpy(np.float64), np.zeros(len(col), bool)
    s = col.astype(str).str.strip()
    empty = s.str.lower().isin(_MISSING)
    vals = pd.to_numeric(s.where(~empty), errors="coerce").to_numpy(np.float64)
    return vals, np.isnan(vals) & ~empty.to_numpy()


def _parse_time(col: pd.Series) -> np.ndarray | None:
    """A sortable float key per row (ns for dates, the number for numeric times), None if unparseable."""
    if col.dtype.kind in "fiu":
        return col.to_numpy(np.float64)
    if col.dtype.kind == "M":
        return col.dt.tz_localize(None).to_numpy("datetime64[ns]").astype(np.int64).astype(np.float64) \
            if getattr(col.dt, "tz", None) is not None else col.to_numpy("datetime64[ns]").astype(np.int64).astype(np.float64)
    s = col.astype(str).str.strip()
    num = pd.to_numeric(s, errors="coerce")
    if num.notna().all():
        v = num.to_numpy(np.float64)
        # integer YYYYMMDD dates (co2): keep as calendar dates so gaps are seen in days
        if (v >= 1e7).all() and (v < 1e8).all() and (v == np.round(v)).all():
            t = pd.to_datetime(s, format="%Y%m%d", errors="coerce")
            if t.notna().all():
                return t.to_numpy("datetime64[ns]").astype(np.int64).astype(np.float64)
        return v
    q = s.str.extract(r"^(\d{4})\s*[- ]?Q([1-4])$")
    if q.notna().all().all():  # '1970 Q1'
        return (q[0].astype(int) * 4 + q[1].astype(int) - 1).to_numpy(np.float64) * 1.0
    try:
        t = pd.to_datetime(s, errors="coerce", format="mixed", utc=True)
    except (ValueError, TypeError):
        return None
    if t.isna().mean() > 0.05:
        return None
    return t.dt.tz_localize(None).to_numpy("datetime64[ns]").astype(np.int64).astype(np.float64)


def _looks_like_time(name: str, col: pd.Series) -> bool:
    if col.dtype.kind == "M":  # typed timestamps (Parquet/Arrow)
        return True
    if col.dtype.kind in "fiu":
        return False
    s = col.astype(str).str.strip().head(50)
    if pd.to_numeric(s, errors="coerce").notna().all():
        return False
    if s.str.match(r"^\d{4}\s*[- ]?Q[1-4]$").all():
        return True
    if not s.str.contains(r"\d").all() or s.str.len().max() > 40:
        return False
    try:
        return pd.to_datetime(s, errors="coerce", format="mixed").notna().mean() >= 0.9
    except (ValueError, TypeError):
        return False


def _grid_positions(key: np.ndarray, is_datetime: bool) -> np.ndarray | None:
    """Integer positions on a regular grid for sorted unique time keys, or None if irregular."""
    if len(key) < 3:
        return None
    if is_datetime:
        t = pd.to_datetime(key.astype(np.int64))
        d = np.diff(key) / 86400e9
        if ((d >= 28) & (d <= 31)).mean() > 0.5 and (d >= 28).all():
            months = (t.year * 12 + t.month).to_numpy()
            return months - months[0] if (np.diff(months) >= 1).all() else None
        if ((d >= 89) & (d <= 92)).mean() > 0.5 and (d >= 89).all():
            qs = (t.year * 4 + (t.month - 1) // 3).to_numpy()
            return qs - qs[0] if (np.diff(qs) >= 1).all() else None
        if ((d >= 365) & (d <= 366)).mean() > 0.5 and (d >= 365).all():
            ys = t.year.to_numpy()
            return ys - ys[0] if (np.diff(ys) >= 1).all() else None
    diffs = np.diff(key)
    step = np.median(diffs)
    if step <= 0:
        return None
    k = diffs / step
    if not np.allclose(k, np.round(k), atol=1e-6) or (np.round(k) < 1).any():
        return None
    return np.concatenate([[0], np.cumsum(np.round(k).astype(np.int64))])


def _sort_dedupe_fill(frame_vals: np.ndarray, key: np.ndarray | None, is_datetime: bool | None,
                      out: _Out, label: str) -> tuple[np.ndarray, int, int]:
    """Sort rows by time, keep the first of duplicate timestamps, and put NaN in grid gaps.
    Returns (values rows x k, duplicates dropped, gap points added)."""
    if key is None:
        return frame_vals, 0, 0
    order = np.argsort(key, kind="stable")
    key, frame_vals = key[order], frame_vals[order]
    keep = np.concatenate([[True], np.diff(key) != 0])
    dropped = int((~keep).sum())
    key, frame_vals = key[keep], frame_vals[keep]
    fill = is_datetime is not None  # None: a composite (date, hour) key, ranks only
    pos = _grid_positions(key, bool(is_datetime)) if fill else None
    added = 0
    # fill only sparse gaps: a business-day or irregular grid would otherwise turn into mostly NaN
    if fill and pos is not None and len(key) < pos[-1] + 1 <= 1.25 * len(key):
        filled = np.full((int(pos[-1]) + 1, frame_vals.shape[1]), np.nan)
        filled[pos] = frame_vals
        added = len(filled) - len(frame_vals)
        frame_vals = filled
    return frame_vals, dropped, added


# ------------------------------------------------------------------------------ inference


def _classify_columns(df: pd.DataFrame, out: _Out, exclude: set[str]) -> dict[str, np.ndarray]:
    """Numeric series columns -> values; everything else is skipped and reported."""
    ov = out.ctx.overrides
    series: dict[str, np.ndarray] = {}
    wanted = set(ov.columns) if ov.columns else None
    for j, name in enumerate(df.columns):
        if name in exclude:
            continue
        col = df.iloc[:, j]
        low = name.lower()
        if name in ov.skip_columns:
            out.skip(name, "catalog skip_columns")
            continue
        if wanted is not None and name not in wanted:
            out.skip(name, "not in the catalog's columns")
            continue
        vals, bad = _numeric(col)
        nonempty = int((~np.isnan(vals)).sum() + bad.sum())
        if nonempty == 0:
            if low.startswith("unnamed") or wanted is None and low == "":
                out.skip(name, "empty unnamed column")
            else:
                out.bad(name, "all_missing", f"{out.ctx.source}: column {name!r} has only missing values", len(vals))
            continue
        if bad.any() and _decimal_comma_hint(col, bad, name, nonempty, out):
            continue
        if wanted is None:
            if bad.sum() > 0.5 * nonempty:
                out.skip(name, "categorical (non-numeric) column")
                continue
            if low in LABEL_NAMES or low.endswith("_label"):
                out.skip(name, "label column")
                continue
            finite = vals[~np.isnan(vals)]
            if low in INDEX_NAMES or low.startswith("unnamed"):
                # a running row number (1..n); tolerate a corrupt cell or two in it
                if len(finite) > 1 and (np.diff(finite) == 1).mean() >= 0.99:
                    out.skip(name, "row index")
                    continue
            if low in CALENDAR_PARTS:
                out.skip(name, "calendar part")
                continue
            if len(finite) > 10 and set(np.unique(finite).tolist()) == {0.0, 1.0} and low not in ("value", "y"):
                out.skip(name, "binary indicator (label)")
                continue
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            out.bad(name, "non_numeric", f"{out.ctx.source}: column {name!r} row {i + 1} holds a non-numeric "
                                         f"cell {str(col.iloc[i])[:40]!r}", nonempty)
            continue
        series[name] = vals
    return series


def _decimal_comma_hint(col: pd.Series, bad: np.ndarray, name: str, nonempty: int, out: _Out) -> bool:
    """Report a column whose non-numeric cells are (>= 90%) numbers written with a decimal
    comma, naming the setting that reads them; True when reported."""
    if out.ctx.overrides.decimal != "." or col.dtype.kind != "O":
        return False
    cells = col[bad].astype(str).str.strip()
    looks = cells.str.fullmatch(_DECIMAL_COMMA.pattern)
    if looks.mean() < 0.9:
        return False
    file_name = out.ctx.source.rstrip("/").rsplit("/", 1)[-1]
    out.bad(name, "decimal_comma", f"{out.ctx.source}: column {name!r} holds numbers with a decimal comma "
                                   f"({cells[looks].iloc[0]!r}); to read them, give a catalog (--catalog FILE) with "
                                   f"sources: [{{match: \"*/{file_name}\", decimal: \",\"}}]", nonempty)
    return True


def _time_columns(df: pd.DataFrame, ov: TableOverrides) -> list[str]:
    if ov.time_column:
        cols = [ov.time_column] if isinstance(ov.time_column, str) else list(ov.time_column)
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise IngestError("bad_override", f"time column(s) {missing} not found (columns: {list(df.columns)[:20]})")
        return cols
    named = [c for c in df.columns if c.lower() in TIME_NAMES]
    if named:
        # a date column plus its finer parts (dteday+hr, year+quarter): sort by all of them
        return named
    for c in df.columns:
        if _looks_like_time(c, df[c]):
            return [c]
    return []


def _month_columns(df: pd.DataFrame) -> list[str] | None:
    found = {}
    for c in df.columns:
        low = c.lower().strip()
        for i, m in enumerate(MONTHS):
            if low == m or low == FULL_MONTHS[i]:
                found[i] = c
    return [found[i] for i in range(12)] if len(found) == 12 else None


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _numbered_group(cols: list[str]) -> list[str]:
    """The longest run of columns prefix+consecutive integers (V2..V961, W0..W51)."""
    best: list[str] = []
    run: list[str] = []
    prev = None
    for c in cols:
        m = _NUMBERED.match(c)
        cur = (m.group(1), int(m.group(2))) if m else None
        if cur and prev and cur[0] == prev[0] and cur[1] == prev[1] + 1:
            run.append(c)
        else:
            run = [c] if cur else []
        prev = cur
        if len(run) > len(best):
            best = list(run)
    return best


def _key_for(df: pd.DataFrame, tcols: list[str], out: _Out) -> tuple[np.ndarray | None, bool | None]:
    if not tcols:
        return None, False
    keys = []
    is_dt = False
    for c in tcols:
        k = _parse_time(df[c])
        if k is None:
            out.note(c, "skipped_column", f"{out.ctx.source}: time column {c!r} could not be parsed; kept file order")
            return None, False
        is_dt = is_dt or not pd.api.types.is_numeric_dtype(df[c]) and np.nanmax(np.abs(k)) > 1e15
        keys.append(k)
    if len(keys) == 1:
        return keys[0], is_dt
    # lexicographic composite key (date, hour) / (year, quarter): rank each part
    key = np.zeros(len(df))
    for k in keys:
        r = pd.Series(k).rank(method="dense").to_numpy()
        key = key * (r.max() + 1) + r
    return key, None


def parse_dataframe(df: pd.DataFrame, ctx: FileContext, fail_fast: bool = False) -> pa.Table:
    """Infer the layout of ``df`` (raw string cells or typed) and emit its series rows."""
    out = _Out(ctx, fail_fast=fail_fast)
    ov = ctx.overrides
    df = df.copy()
    df.columns = [str(c) for c in df.columns]
    layout = ov.layout
    tcols = _time_columns(df, ov)
    months = _month_columns(df)
    first = df.columns[0]
    numbered = _numbered_group(list(df.columns))
    if layout == "auto":
        if months:
            layout = "calendar"
        elif (ov.id_column or len(numbered) >= 8) and not _numeric(df[ov.id_column or first])[0].size == 0 \
                and _numeric(df[ov.id_column or first])[1].all() and df[ov.id_column or first].is_unique:
            layout = "rows"
        else:
            id_cands = [c for c in df.columns if c not in tcols and not pd.api.types.is_numeric_dtype(df[c])
                        and _numeric(df[c])[1].all() and 1 < df[c].nunique() < len(df) / 2]
            layout = "long" if (ov.id_column or (tcols and id_cands)) else "columns"
    if layout == "calendar":
        return _calendar(df, months, tcols, out)
    if layout == "rows":
        return _rows(df, ov.id_column or first, numbered, out)
    if layout == "long":
        idc = ov.id_column or [c for c in df.columns if c not in tcols and not pd.api.types.is_numeric_dtype(df[c])
                               and _numeric(df[c])[1].all() and 1 < df[c].nunique() < len(df) / 2][0]
        return _long(df, idc, tcols, out)
    if layout != "columns":
        raise IngestError("bad_override", f"{ctx.source}: unknown layout {layout!r}")
    key, is_dt = _key_for(df, tcols, out)
    for c in tcols:
        out.skip(c, "time column")
    series = _classify_columns(df, out, set(tcols))
    if not series:
        if not out.notes or all(n[4] == "skipped_column" for n in out.notes):
            out.bad("*", "no_series", f"{ctx.source}: no numeric series column found (columns: "
                                      f"{list(df.columns)[:20]})", 0)
        return out.table()
    names = list(series)
    mat = np.stack([series[n] for n in names], axis=1)
    mat, dropped, added = _sort_dedupe_fill(mat, key, is_dt, out, "")
    if dropped:
        out.note("*", "duplicate_timestamps", f"{ctx.source}: {dropped} rows with a repeated timestamp dropped "
                                              f"(first kept) in each of {len(names)} series", dropped * len(names))
    for j, n in enumerate(names):
        out.series(n, mat[:, j])
    return out.table()


def _calendar(df: pd.DataFrame, months: list[str], tcols: list[str], out: _Out) -> pa.Table:
    year = [c for c in tcols if c not in months]
    order = np.argsort(_numeric(df[year[0]])[0], kind="stable") if year else np.arange(len(df))
    for c in df.columns:
        if c not in months:
            out.skip(c, "calendar year column" if c in year else "not a month column")
    mat = np.stack([_numeric(df[m])[0] for m in months], axis=1)[order]
    vals = mat.ravel()
    last = np.flatnonzero(~np.isnan(vals))
    vals = vals[: last[-1] + 1] if len(last) else vals
    out.series("monthly", vals)
    return out.table()


def _rows(df: pd.DataFrame, idc: str, numbered: list[str], out: _Out) -> pa.Table:
    cols = [c for c in (out.ctx.overrides.columns or numbered or list(df.columns)) if c != idc]
    out.skip(idc, "series id column")
    for c in df.columns:
        if c != idc and c not in cols:
            out.skip(c, "not part of the numbered value columns (derived)")
    # one vectorised conversion of the whole block (thousands of columns in M4 files)
    flat_vals, flat_bad = _numeric(pd.Series(df[cols].to_numpy().ravel()))
    mat = flat_vals.reshape(len(df), len(cols))
    bad = flat_bad.reshape(len(df), len(cols))
    ids = df[idc].astype(str).str.strip().tolist()
    for i, name in enumerate(ids):
        if bad[i].any():
            j = int(np.flatnonzero(bad[i])[0])
            out.bad(name, "non_numeric", f"{out.ctx.source}: row {name!r} column {cols[j]!r} holds a non-numeric "
                                         f"cell {str(df[cols[j]].iloc[i])[:40]!r}", int((~np.isnan(mat[i])).sum()))
            continue
        row = mat[i]
        present = np.flatnonzero(~np.isnan(row))
        out.series(name, row[: present[-1] + 1] if len(present) else row)  # trailing cells are padding
    return out.table()


def _long(df: pd.DataFrame, idc: str, tcols: list[str], out: _Out) -> pa.Table:
    out.skip(idc, "series id column")
    for c in tcols:
        out.skip(c, "time column")
    series = _classify_columns(df, out, set(tcols) | {idc})
    ids = df[idc].astype(str).str.strip().to_numpy()
    key_all, is_dt = _key_for(df, tcols, out)
    names = list(series)
    mat_all = np.stack([series[n] for n in names], axis=1) if names else np.zeros((len(df), 0))
    for g in pd.unique(ids):
        rows = np.flatnonzero(ids == g)
        mat, dropped, _ = _sort_dedupe_fill(mat_all[rows], None if key_all is None else key_all[rows], is_dt, out, g)
        if dropped:
            out.note(g, "duplicate_timestamps", f"{out.ctx.source}: series {g!r}: {dropped} rows with a repeated "
                                                f"timestamp dropped (first kept)", dropped * len(names))
        for j, n in enumerate(names):
            out.series(f"{g}/{n}" if len(names) > 1 else g, mat[:, j])
    return out.table()


def parse_csv(data: bytes, ctx: FileContext, fail_fast: bool = False) -> pa.Table:
    return parse_dataframe(read_csv_bytes(data, ctx.source, ctx.overrides), ctx, fail_fast)
