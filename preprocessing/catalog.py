"""The source catalog: per-source overrides of what the readers infer (docs/ingest.md).

YAML::

    sources:
      - match: "*/sales/uci_sales_*"          # fnmatch glob on the file URL/path (or a dataset folder)
        domain: sales                          # else: the parent folder name
        dataset: uci_weekly                    # else: the file stem / folder name
        layout: rows                           # auto | columns | long | rows | calendar | time300b
        id_column: Product_Code
        columns: [W0, W1, W2]                  # the series (value) columns
        time_column: date                      # or a list: [dteday, hr]
        skip_columns: [MIN, MAX]
        header: true
        delimiter: ";"
        decimal: ","                           # numbers written 1,5 (needs a delimiter other than ",")

The first matching entry wins.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields

import yaml

from preprocessing.formats import TableOverrides

LAYOUTS = {"auto", "columns", "long", "rows", "calendar", "time300b"}


@dataclass
class SourceEntry:
    match: str
    domain: str | None = None
    dataset: str | None = None
    layout: str = "auto"
    id_column: str | None = None
    columns: list[str] | None = None
    time_column: str | list[str] | None = None
    skip_columns: list[str] = field(default_factory=list)
    header: bool = True
    delimiter: str | None = None
    decimal: str = "."

    def overrides(self) -> TableOverrides:
        return TableOverrides(layout="auto" if self.layout == "time300b" else self.layout,
                              time_column=self.time_column, columns=self.columns,
                              skip_columns=list(self.skip_columns), id_column=self.id_column,
                              header=self.header, delimiter=self.delimiter, decimal=self.decimal)


@dataclass
class SourceCatalog:
    sources: list[SourceEntry] = field(default_factory=list)

    def lookup(self, url: str) -> SourceEntry | None:
        for s in self.sources:
            if fnmatch.fnmatch(url, s.match) or fnmatch.fnmatch(url.rsplit("/", 1)[-1], s.match):
                return s
        return None


def parse_catalog(data: dict, where: str = "catalog") -> SourceCatalog:
    if not isinstance(data, dict) or not isinstance(data.get("sources", []), list):
        raise ValueError(f"{where}: expected a mapping with a 'sources' list")
    known = {f.name for f in fields(SourceEntry)}
    entries = []
    for i, raw in enumerate(data.get("sources", [])):
        if not isinstance(raw, dict) or "match" not in raw:
            raise ValueError(f"{where}: sources[{i}] needs a 'match' glob")
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{where}: sources[{i}] has unknown keys {sorted(unknown)} (known: {sorted(known)})")
        e = SourceEntry(**raw)
        if e.layout not in LAYOUTS:
            raise ValueError(f"{where}: sources[{i}] layout {e.layout!r} not in {sorted(LAYOUTS)}")
        if e.decimal not in (".", ","):
            raise ValueError(f"{where}: sources[{i}] decimal must be '.' or ',', got {e.decimal!r}")
        entries.append(e)
    return SourceCatalog(entries)


def load_catalog(path: str) -> SourceCatalog:
    """Load a catalog YAML from a local path or s3:// URL."""
    from preprocessing import storage

    return parse_catalog(yaml.safe_load(storage.read_bytes(path, decompress=False)) or {}, path)
