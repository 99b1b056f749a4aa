"""Curation report: ``report.json`` (machine-readable) and a self-contained ``report.html``
(plots embedded as base64 PNG, matplotlib Agg; no external assets).

``report.json`` top level: ``points_in``, ``points_kept``, ``points_dropped`` (reason -> points),
``series_in``, ``series_kept``, ``series_dropped`` (reason -> series), ``points_repeated``,
``packing_efficiency`` (per split), ``mixture_weights``, ``provenance`` (points and series per
provenance kind: real vs each generator, ``PreprocessConfig.provenance``), ``domains`` and ``datasets`` blocks
(the same counters plus length histograms and value statistics), ``quarantine`` (inputs that
could not be read, with reasons), ``shards``, ``warnings`` (one line each: a domain of which
nothing was kept, a series the robust bound cut points from).
"""
from __future__ import annotations

import base64
import fnmatch
import html
import io
from typing import Any

from preprocessing.accounting import HIST_BINS, Accounting, DatasetTally
from preprocessing.config import PreprocessConfig

SECTIONS = ("summary", "warnings", "drops", "domains", "datasets", "lengths", "values", "packing", "mixture",
            "quarantine")


def _counts(t: DatasetTally) -> dict[str, Any]:
    d = t.to_dict()
    return {k: d[k] for k in ("series_in", "series_kept", "series_dropped", "points_in", "points_kept",
                              "points_dropped", "points_repeated", "points_val", "series_val")}


def _reasons(counts: dict[str, int], limit: int = 3) -> str:
    items = sorted(((n, r) for r, n in counts.items() if n), key=lambda nr: (-nr[0], nr[1]))
    return ", ".join(f"{r} {n:,}" for n, r in items[:limit]) + (", ..." if len(items) > limit else "")


def build_warnings(acc: Accounting) -> list[str]:
    """One line per thing a user must not miss although the run succeeded: a domain of which
    nothing was kept (its data is absent from the shards), then each series the robust bound
    cut points from (``clean.outlier_limit``)."""
    lines = []
    for domain in acc.domains():
        t = acc.totals(domain)
        if t.series_in and not t.series_kept:
            what = (f"all {t.points_in:,} points of {t.series_in:,} series dropped ({_reasons(t.points_dropped)})"
                    if t.points_in else f"all {t.series_in:,} series dropped ({_reasons(t.series_dropped)})")
            lines.append(f"domain {domain}: {what}; nothing of it is in the shards")
    for o in sorted(acc.outliers, key=lambda o: o["series"]):
        lines.append(f"series {o['series']}: {o['points']:,} point(s) beyond the robust bound dropped as outlier "
                     f"(|x - {o['center']:.6g}| > {o['bound']:.3g}; most extreme {o['extreme']:.3g})")
    return lines


REAL = "real"


def provenance_kind(dataset_key: str, rules: dict[str, str]) -> str:
    """The provenance kind of a ``domain/dataset``: the first glob of ``rules`` it matches, else real."""
    for pattern, kind in rules.items():
        if fnmatch.fnmatch(dataset_key, pattern):
            return kind
    return REAL


def provenance_counts(acc: Accounting, rules: dict[str, str]) -> dict[str, dict[str, int]]:
    """Points and series in, kept and held out to val/, per provenance kind (real, and each
    generator named in ``PreprocessConfig.provenance``): the data mixture a sweep reports."""
    out: dict[str, dict[str, int]] = {}
    for key, t in sorted(acc.datasets.items()):
        c = _counts(t)
        row = out.setdefault(provenance_kind(key, rules), {k: 0 for k in (
            "points_in", "points_kept", "points_val", "series_in", "series_kept", "series_val")})
        for k in row:
            row[k] += int(c[k])
    return out


def build_report(acc: Accounting, config: PreprocessConfig, efficiency: dict[str, float],
                 shards: dict[str, list[dict[str, Any]]], mixture: dict[str, float]) -> dict[str, Any]:
    total = acc.totals()
    rep: dict[str, Any] = dict(_counts(total))
    rep["totals"] = _counts(total)
    rep["domains"] = {d: acc.totals(d).to_dict() for d in acc.domains()}
    rep["datasets"] = {k: t.to_dict() for k, t in sorted(acc.datasets.items())}
    rep["domain_counts"] = {d: _counts(acc.totals(d)) for d in acc.domains()}
    rep["dataset_counts"] = {k: _counts(t) for k, t in sorted(acc.datasets.items())}
    rep["packing_efficiency"] = efficiency
    rep["window_length"] = config.pack.window_length
    rep["mixture_weights"] = mixture
    rep["provenance"] = provenance_counts(acc, config.provenance)
    rep["provenance_rules"] = dict(config.provenance)
    rep["quarantine"] = sorted(acc.quarantine, key=lambda q: (q["source"], q["series"]))
    rep["warnings"] = build_warnings(acc)
    rep["shards"] = {s: {"files": len(v), "rows": sum(x["rows"] for x in v), "points": sum(x["points"] for x in v)}
                     for s, v in shards.items()}
    rep["length_hist_log2"] = total.length_hist
    rep["run_length_hist_log2"] = total.run_length_hist
    rep["values"] = total.value_stats()
    return rep


# ------------------------------------------------------------------------------------- HTML


def preload() -> None:
    """Import the plotting stack ahead of :func:`render_html` (e.g. in a background thread)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except Exception:  # noqa: BLE001 - render_html reports the real error later
        pass


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    title = fig.axes[0].get_title() if fig.axes else "plot"
    plt.close(fig)
    return (f'<img alt="{html.escape(title or "plot")}" src="data:image/png;base64,'
            + base64.b64encode(buf.getvalue()).decode() + '"/>')


def _si_formatter():
    """Axis labels as 400k / 1.2M instead of 400000 or a 1e6 offset above the axis."""
    from matplotlib.ticker import FuncFormatter

    def fmt(v: float, _pos: int) -> str:
        for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= scale:
                return f"{v / scale:.3g}{suffix}"
        return f"{v:.3g}"

    return FuncFormatter(fmt)


def _plots(rep: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    # kept vs dropped points per domain, stacked by reason
    domains = list(rep["domain_counts"])
    reasons = sorted({r for d in domains for r in rep["domain_counts"][d]["points_dropped"]})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 + 0.75 * len(domains)), 3.8))
    kept = [rep["domain_counts"][d]["points_kept"] for d in domains]
    ax.bar(domains, kept, label="kept", color="#2a7")
    bottom = kept[:]
    for r in reasons:
        vals = [rep["domain_counts"][d]["points_dropped"].get(r, 0) for d in domains]
        ax.bar(domains, vals, bottom=bottom, label=f"dropped: {r}")
        bottom = [a + b for a, b in zip(bottom, vals)]
    # headroom above the tallest bar, so that no bar ends on the frame
    ax.set_ylim(0, 1.08 * max(bottom + [1]))
    ax.yaxis.set_major_formatter(_si_formatter())
    ax.set_ylabel("points")
    ax.set_title("points kept / dropped per domain")
    # beside the plot, never over a bar
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.tick_params(axis="x", rotation=30 if len(domains) > 4 else 0, labelsize=8)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right" if len(domains) > 4 else "center")
    out["drops"] = _png(fig)

    fig, ax = plt.subplots(figsize=(8, 3))
    xs = [2**b for b in range(HIST_BINS)]
    for name, key in (("raw series", "length_hist_log2"), ("kept runs", "run_length_hist_log2")):
        hist = rep[key]
        last = max([i for i, v in enumerate(hist) if v] or [0]) + 1
        ax.step(xs[:last], hist[:last], where="post", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("length (points, log2 bins)")
    ax.set_ylabel("count")
    ax.set_title("length histograms")
    ax.legend()
    out["lengths"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 2.5))
    eff = rep["packing_efficiency"]
    ax.barh(list(eff), [100 * v for v in eff.values()], color="#47a")
    ax.axvline(98, color="r", ls="--", label="98% target")
    ax.set_xlim(0, 100)
    ax.set_xlabel("packing efficiency (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    out["packing"] = _png(fig)
    return out


class Keyed:
    """A table cell whose text is a headline number of report.json, marked ``data-key`` so that
    a reader (or a test) can find it on the page."""

    def __init__(self, key: str, value: Any) -> None:
        self.key, self.value = key, value


def _cell(c: Any) -> str:
    if isinstance(c, Keyed):
        return f'<td data-key="{html.escape(c.key)}">{html.escape(_fmt(c.value))}</td>'
    return f"<td>{html.escape(_fmt(c))}</td>"


def _table(headers: list[str], rows: list[list[Any]], limit: int | None = None, what: str = "rows") -> str:
    """An HTML table; beyond ``limit`` rows only the first ``limit`` show and the rest fold
    into a collapsed block, so a corpus of thousands of sources keeps a readable page."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)

    def render(part: list[list[Any]]) -> str:
        body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in part)
        return f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'

    if limit is None or len(rows) <= limit:
        return render(rows)
    return (render(rows[:limit]) + f"<details><summary>{len(rows) - limit:,} more {html.escape(what)} "
            f"(all {len(rows):,} in report.json)</summary>{render(rows[limit:])}</details>")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) or "-"
    return "-" if v is None else str(v)


# Rows shown before a long table or list folds (per dataset, value statistics, quarantine; warnings).
TABLE_ROWS_SHOWN = 40
WARNINGS_SHOWN = 10


def render_html(rep: dict[str, Any]) -> str:
    plots = _plots(rep)
    sec: dict[str, str] = {}
    points_dropped, series_dropped = sum(rep["points_dropped"].values()), sum(rep["series_dropped"].values())
    sec["summary"] = _table(["", "in", "kept", "dropped", "repeated (mixture)"], [
        ["points", Keyed("points_in", rep["points_in"]), Keyed("points_kept", rep["points_kept"]),
         Keyed("points_dropped", points_dropped), Keyed("points_repeated", rep["points_repeated"])],
        ["series", Keyed("series_in", rep["series_in"]), Keyed("series_kept", rep["series_kept"]),
         Keyed("series_dropped", series_dropped), "-"],
    ]) + _table(["domains", "datasets", "train rows", "val rows", "train packing efficiency", "warnings",
                 "quarantined inputs"], [[
        Keyed("domains", len(rep["domain_counts"])), Keyed("datasets", len(rep["dataset_counts"])),
        Keyed("rows.train", rep["shards"].get("train", {}).get("rows", 0)),
        Keyed("rows.val", rep["shards"].get("val", {}).get("rows", 0)),
        Keyed("packing_efficiency.train", rep["packing_efficiency"].get("train", 1.0)),
        Keyed("warnings", len(rep.get("warnings", []))), Keyed("quarantine", len(rep["quarantine"]))]])
    warnings = rep.get("warnings", [])
    if warnings:
        items = [f"<li>{html.escape(w)}</li>" for w in warnings]
        sec["warnings"] = "<ul>" + "".join(items[:WARNINGS_SHOWN]) + "</ul>" + (
            f"<details><summary>{len(items) - WARNINGS_SHOWN:,} more warnings (all in report.json)</summary>"
            f"<ul>{''.join(items[WARNINGS_SHOWN:])}</ul></details>" if len(items) > WARNINGS_SHOWN else "")
    else:
        sec["warnings"] = "<p>no warnings</p>"
    sec["drops"] = _table(["reason", "points", "series"], [
        [r, rep["points_dropped"].get(r, 0), rep["series_dropped"].get(r, 0)]
        for r in sorted(set(rep["points_dropped"]) | set(rep["series_dropped"]))]) + plots["drops"]
    sec["domains"] = _table(["domain", "series in", "series kept", "points in", "points kept", "dropped (points)"], [
        [d, c["series_in"], c["series_kept"], c["points_in"], c["points_kept"], c["points_dropped"]]
        for d, c in rep["domain_counts"].items()])
    # the largest sources first: with thousands of them, those are the ones a reader checks
    by_size = sorted(rep["dataset_counts"], key=lambda k: (-rep["dataset_counts"][k]["points_in"], k))
    sec["datasets"] = _table(["dataset", "series in", "series kept", "points in", "points kept", "dropped (points)", "dropped (series)"], [
        [k, c["series_in"], c["series_kept"], c["points_in"], c["points_kept"], c["points_dropped"], c["series_dropped"]]
        for k, c in ((k, rep["dataset_counts"][k]) for k in by_size)], TABLE_ROWS_SHOWN, "datasets")
    sec["lengths"] = plots["lengths"]
    sec["values"] = _table(["dataset", "count", "mean", "std", "min", "max"], [
        [k, v["values"]["count"], v["values"]["mean"], v["values"]["std"], v["values"]["min"], v["values"]["max"]]
        for k, v in ((k, rep["datasets"][k]) for k in by_size)], TABLE_ROWS_SHOWN, "datasets")
    sec["packing"] = _table(["split", "efficiency", "rows", "points", "files"], [
        [s, rep["packing_efficiency"].get(s, 1.0), v["rows"], v["points"], v["files"]] for s, v in rep["shards"].items()
    ]) + f"<p>window length {rep['window_length']} (+1 point per row)</p>" + plots["packing"]
    provenance = rep.get("provenance") or {}
    kept_total = sum(c["points_kept"] for c in provenance.values()) or 1
    sec["mixture"] = (_table(["domain", "weight"], [[d, w] for d, w in rep["mixture_weights"].items()])
                      + "<h3>Provenance: real vs generated</h3>"
                      + _table(["kind", "series kept", "points kept", "of which val/", "share of kept points"],
                               [[k, c["series_kept"], Keyed(f"provenance.{k}.points_kept", c["points_kept"]),
                                 c["points_val"], f"{c['points_kept'] / kept_total:.1%}"] for k, c in provenance.items()]))
    sec["quarantine"] = _table(["source", "dataset", "reason", "claimed points", "message"], [
        [q["source"], f"{q['domain']}/{q['dataset']}", q["reason"], q["claimed_points"], q["message"]] for q in rep["quarantine"]
    ], TABLE_ROWS_SHOWN, "quarantined inputs") if rep["quarantine"] else "<p>no quarantined inputs</p>"
    titles = {"summary": "Summary", "warnings": "Warnings", "drops": "Dropped by rule", "domains": "Per domain", "datasets": "Per dataset",
              "lengths": "Length histograms", "values": "Value statistics (raw units)", "packing": "Packing",
              "mixture": "Mixture weights", "quarantine": "Quarantined inputs"}
    body = "\n".join(f'<section id="{k}"><h2>{titles[k]}</h2>{sec[k]}</section>' for k in SECTIONS)
    # Long names (sources, messages) wrap instead of widening the page; wide tables scroll in their box.
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;text-align:right;overflow-wrap:anywhere}"
             "th{background:#eee}td:first-child{text-align:left;max-width:32em}img{max-width:100%}"
             ".wrap{overflow-x:auto;max-width:100%}details{margin:.3em 0 1em}summary{cursor:pointer;font-size:13px}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Time-MoE preprocessing report</title>"
            f"<style>{style}</style></head><body><h1>Time-MoE preprocessing report</h1>\n{body}\n</body></html>\n")
