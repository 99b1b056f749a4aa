"""Point and series accounting: every input point and series is either kept or dropped for one
named reason, per dataset. The invariant

    points_in == points_kept + sum(points_dropped.values())     (and the same for series)

is checked at the end of EVERY run (:func:`check_invariant` raises); it is the job's proof that
no stage silently lost or duplicated data. Counters are plain dicts so that partial tallies from
Ray tasks merge by addition (order does not matter).

A series counts as kept when any of its points is kept; a fully dropped series is attributed to
the reason that removed most of its points (ties: the reason first in ``REASON_ORDER``).
Repeats added by mixture weights > 1 are NOT kept points; they are counted in ``points_repeated``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from preprocessing.formats_table import IngestError

# Power-of-two length histogram edges: bin b counts lengths in [2^b, 2^(b+1)); bin 0 also 0.
HIST_BINS = 41

REASON_ORDER = (
    "duplicate", "contamination", "min_length", "nonfinite", "outlier", "window_zeros", "window_diff1_zeros",
    "window_diff2_zeros", "partial_window", "short_run", "short_tail", "mixture_downsample",
)


def _reason_rank(reason: str) -> int:
    base = reason.split(":")[0]
    return REASON_ORDER.index(base) if base in REASON_ORDER else -1  # quarantine first


def length_bin(n: int) -> int:
    return min(HIST_BINS - 1, max(0, int(n).bit_length() - 1))


@dataclass
class DatasetTally:
    domain: str
    dataset: str
    series_in: int = 0
    points_in: int = 0
    series_kept: int = 0
    points_kept: int = 0
    points_repeated: int = 0
    points_val: int = 0
    series_val: int = 0
    points_dropped: dict[str, int] = field(default_factory=dict)
    series_dropped: dict[str, int] = field(default_factory=dict)
    length_hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)       # raw series
    run_length_hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)   # kept runs
    value_count: int = 0
    value_sum: float = 0.0
    value_sumsq: float = 0.0
    value_min: float = math.inf
    value_max: float = -math.inf

    def add_dropped_points(self, n_points: int, reason: str) -> None:
        """Points an input held that belong to no emitted series (e.g. rows with a repeated
        timestamp): counted in and dropped, with no series attached."""
        self.points_in += int(n_points)
        if n_points:
            self.points_dropped[reason] = self.points_dropped.get(reason, 0) + int(n_points)

    def add_series(self, n_points: int, dropped: dict[str, int], kept: int) -> None:
        """One input series: ``n_points`` in, ``kept`` kept, the rest by reason in ``dropped``."""
        self.series_in += 1
        self.points_in += n_points
        self.points_kept += kept
        for reason, pts in dropped.items():
            if pts:
                self.points_dropped[reason] = self.points_dropped.get(reason, 0) + int(pts)
        if kept > 0:
            self.series_kept += 1
        else:
            reasons = [(p, -_reason_rank(r), r) for r, p in dropped.items()]
            # a 0-point series: its named reason if any (e.g. quarantine:skipped_column), else "empty"
            reason = max(reasons)[2] if reasons else "empty"
            self.series_dropped[reason] = self.series_dropped.get(reason, 0) + 1
        self.length_hist[length_bin(n_points)] += 1

    def add_values(self, x: np.ndarray, finite: bool = False) -> None:
        """Raw-value statistics of a series (float32 sums: pairwise, accurate enough for a
        report; no float64 temporaries in the hot loop)."""
        if not finite and not np.isfinite(x).all():
            x = x[np.isfinite(x)]
        if len(x) == 0:
            return
        self.value_count += len(x)
        self.value_sum += float(x.sum(dtype=np.float64)) if len(x) < 4096 else float(x.sum())
        with np.errstate(over="ignore"):  # float32 overflow of huge values: redone in float64 below
            sq = float(np.dot(x, x))
        self.value_sumsq += sq if np.isfinite(sq) else float(np.square(x, dtype=np.float64).sum())
        self.value_min = min(self.value_min, float(x.min()))
        self.value_max = max(self.value_max, float(x.max()))

    def merge(self, other: "DatasetTally") -> None:
        for name in ("series_in", "points_in", "series_kept", "points_kept", "points_repeated",
                     "points_val", "series_val", "value_count", "value_sum", "value_sumsq"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.points_dropped, other.points_dropped), (self.series_dropped, other.series_dropped)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.length_hist = [a + b for a, b in zip(self.length_hist, other.length_hist)]
        self.run_length_hist = [a + b for a, b in zip(self.run_length_hist, other.run_length_hist)]
        self.value_min = min(self.value_min, other.value_min)
        self.value_max = max(self.value_max, other.value_max)

    def value_stats(self) -> dict[str, float | None]:
        if not self.value_count:
            return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
        mean = self.value_sum / self.value_count
        var = max(0.0, self.value_sumsq / self.value_count - mean * mean)
        return {"count": self.value_count, "mean": mean, "std": math.sqrt(var), "min": self.value_min, "max": self.value_max}

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain, "dataset": self.dataset,
            "series_in": self.series_in, "series_kept": self.series_kept,
            "series_dropped": dict(sorted(self.series_dropped.items())),
            "points_in": self.points_in, "points_kept": self.points_kept,
            "points_dropped": dict(sorted(self.points_dropped.items())),
            "points_repeated": self.points_repeated, "points_val": self.points_val, "series_val": self.series_val,
            "length_hist_log2": self.length_hist, "run_length_hist_log2": self.run_length_hist,
            "values": self.value_stats(),
        }


@dataclass
class Accounting:
    """Tallies keyed by ``domain/dataset`` plus the lists of quarantined inputs and of series
    the robust bound cut points from."""

    datasets: dict[str, DatasetTally] = field(default_factory=dict)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    # series the robust bound cut points from: series key, points, center, bound, extreme
    outliers: list[dict[str, Any]] = field(default_factory=list)

    def tally(self, domain: str, dataset: str) -> DatasetTally:
        key = f"{domain}/{dataset}"
        if key not in self.datasets:
            self.datasets[key] = DatasetTally(domain, dataset)
        return self.datasets[key]

    def merge(self, other: "Accounting") -> None:
        for key, t in other.datasets.items():
            if key in self.datasets:
                self.datasets[key].merge(t)
            else:
                self.datasets[key] = t
        self.quarantine.extend(other.quarantine)
        self.outliers.extend(other.outliers)

    def totals(self, domain: str | None = None) -> DatasetTally:
        total = DatasetTally(domain or "*", "*")
        for t in self.datasets.values():
            if domain is None or t.domain == domain:
                total.merge(t)
        return total

    def domains(self) -> list[str]:
        return sorted({t.domain for t in self.datasets.values()})


class AccountingError(RuntimeError):
    pass


def check_invariant(acc: Accounting) -> None:
    """Raise :class:`AccountingError` naming every dataset whose points or series do not add up."""
    problems = []
    for key, t in sorted(acc.datasets.items()):
        dp = sum(t.points_dropped.values())
        ds = sum(t.series_dropped.values())
        if t.points_in != t.points_kept + dp:
            problems.append(f"{key}: points_in {t.points_in} != kept {t.points_kept} + dropped {dp} ({t.points_dropped})")
        if t.series_in != t.series_kept + ds:
            problems.append(f"{key}: series_in {t.series_in} != kept {t.series_kept} + dropped {ds} ({t.series_dropped})")
    if problems:
        raise AccountingError("accounting invariant broken:\n  " + "\n  ".join(problems))


# reader notes that are not losses: a column that is not a series, rows with a repeated timestamp
INFORMATIONAL_QUARANTINE = ("skipped_column", "duplicate_timestamps")


def first_quarantine(records: Iterable[Mapping[str, Any]]) -> IngestError | None:
    """The first quarantined input among ``records`` (``reason``, ``message``, ``claimed_points``),
    reader notes left out, as the error ``fail_fast`` stops with; None if there is none."""
    for q in records:
        if q["reason"] and q["reason"] not in INFORMATIONAL_QUARANTINE:
            return IngestError(q["reason"], q["message"], q["claimed_points"])
    return None


def _top(counts: dict[str, int], limit: int = 4) -> str:
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{reason} {count:,}" for reason, count in items[:limit])
    return shown + (f", {len(items) - limit} more reasons" if len(items) > limit else "")


def empty_result_reason(acc: Accounting, val_rows: int = 0) -> str:
    """Why a run kept no training data, in one line with counts: every input missing or
    quarantined (by reason, plus the first message), every point dropped by a rule, or every
    kept point held out for validation."""
    total = acc.totals()
    problems = [q for q in acc.quarantine if q["reason"] not in INFORMATIONAL_QUARANTINE]
    by_reason: dict[str, int] = {}
    for q in problems:
        by_reason[q["reason"]] = by_reason.get(q["reason"], 0) + 1
    first = f"; first: {' '.join(str(problems[0]['message']).split())}" if problems else ""
    if total.series_in == len(problems) and problems:
        return f"every input is missing or quarantined ({len(problems)} quarantined: {_top(by_reason)}){first}"
    if total.series_in == 0:
        return "the inputs hold no series (only skipped columns)" if acc.quarantine else "the inputs hold no series"
    if total.points_kept == 0:
        dropped = {r: p for r, p in total.points_dropped.items() if p}
        also = f"; {len(problems)} input(s) quarantined ({_top(by_reason)}){first}" if problems else ""
        return (f"all {total.points_in:,} points of {total.series_in:,} series were dropped ({_top(dropped)})"
                f"{also}")
    if val_rows:
        return (f"all {total.points_kept:,} kept points went to the validation split ({val_rows} rows) "
                f"and none to training")
    return f"no training chunk was written ({total.points_kept:,} points kept; dropped: {_top(total.points_dropped)})"
