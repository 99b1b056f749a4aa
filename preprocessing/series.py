"""The series-batch format: the contract between the readers (ingest) and the
cleaning/packing stages.

Readers emit Arrow tables (Ray Data blocks) with one row per raw series, in raw units
(a Time-300B sequence stored normalised is mapped back with ``x * std + mean``):

=============  ========================  ===================================================
column         Arrow type                meaning
=============  ========================  ===================================================
domain         string                    Time-300B domain (energy, finance, ..., or a user's)
dataset        string                    source dataset name (folder or file stem)
series         string                    series key unique inside the dataset
source         string                    file (or URL) it was read from, for error messages
values         large_list<float32>       the points in time order; NaN marks a missing value
=============  ========================  ===================================================

Inputs that cannot be read are not raised by default (``fail_fast`` raises) but emitted as
QUARANTINE rows in the same table, so that every input is counted and the rows flow through the
same Ray Data pipeline: ``quarantine_reason`` is a short snake_case reason (empty for good rows),
``quarantine_message`` names the file and what is wrong, ``values`` is empty, and
``claimed_points`` is the number of points the input claimed to hold when that is known (e.g.
from meta.json; 0 otherwise). Good rows have ``claimed_points == len(values)``.
"""
from __future__ import annotations

import pyarrow as pa

SERIES_SCHEMA = pa.schema(
    [
        pa.field("domain", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("series", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("values", pa.large_list(pa.float32()), nullable=False),
        pa.field("quarantine_reason", pa.string(), nullable=False),
        pa.field("quarantine_message", pa.string(), nullable=False),
        pa.field("claimed_points", pa.int64(), nullable=False),
    ]
)
