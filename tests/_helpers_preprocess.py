"""Builders of series-format Arrow tables (preprocessing/series.py) for the preprocessing tests."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from preprocessing.series import SERIES_SCHEMA


def series_table(rows: list[dict]) -> pa.Table:
    """Rows with domain, dataset, series, values (+ optional quarantine_reason/claimed_points)."""
    cols = {f.name: [] for f in SERIES_SCHEMA}
    for r in rows:
        values = np.asarray(r.get("values", []), dtype=np.float32)
        cols["domain"].append(r["domain"])
        cols["dataset"].append(r["dataset"])
        cols["series"].append(r["series"])
        cols["source"].append(r.get("source", f"/data/{r['domain']}/{r['dataset']}.csv"))
        cols["values"].append(values)
        cols["quarantine_reason"].append(r.get("quarantine_reason", ""))
        cols["quarantine_message"].append(r.get("quarantine_message", ""))
        cols["claimed_points"].append(int(r.get("claimed_points", len(values))))
    arrays = [pa.array(cols[f.name], f.type) if f.name != "values" else
              pa.array([v.tolist() for v in cols["values"]], f.type) for f in SERIES_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SERIES_SCHEMA)


def synthetic_rows(seed: int = 0, n_series: int = 60) -> list[dict]:
    """A messy mini corpus over three domains: noise, NaN gaps, zero stretches, flat series,
    an exact duplicate pair and one quarantined input."""
    rng = np.random.default_rng(seed)
    rows = []
    domains = ["energy", "web", "nature"]
    for i in range(n_series):
        n = int(np.clip(rng.lognormal(7.3, 1.0), 100, 20000))
        x = (rng.normal(0, 1, n).cumsum() + rng.normal(50, 10)).astype(np.float32)
        kind = i % 6
        if kind == 1:
            x[n // 3: n // 3 + 5] = np.nan
        elif kind == 2:
            x[n // 2: n // 2 + 300] = 0.0
        elif kind == 3 and i % 12 == 3:
            x[:] = 4.0
        d = domains[i % 3]
        rows.append({"domain": d, "dataset": f"{d}_set{i % 2}", "series": f"s{i}", "values": x})
    rows.append({"domain": "web", "dataset": "web_copy", "series": "dup_of_s0", "values": rows[0]["values"].copy()})
    rows.append({"domain": "energy", "dataset": "broken", "series": "file", "values": [],
                 "quarantine_reason": "bad_meta", "quarantine_message": "/data/broken/meta.json: offsets overlap",
                 "claimed_points": 1234})
    return rows
