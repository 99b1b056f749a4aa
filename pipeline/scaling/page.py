"""``scaling_report.html``: the scaling report as one self-contained page (plots embedded,
works offline and as an MLflow artifact), written next to ``scaling_fits.json``.

Headline numbers carry ``data-key`` = their dotted path in ``scaling_fits.json`` (a list's
path stands for its length), so a reader can trace each one to the JSON.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import html_page as H
from pipeline.scaling import report as R


def _estimate(fits: dict[str, Any], path: str) -> H.Keyed | str:
    node: Any = fits
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return "-"
        node = node[part]
    if isinstance(node, str):  # JSON keeps inf / nan as strings
        return H.Keyed(path, node, node)
    return H.Keyed(path, node)


def _headline(records: list[R.TrialRecord], fits: dict[str, Any]) -> str:
    items: list[tuple[str, Any]] = [("trials", H.Keyed("trials", len(records))), ("fitted metric", fits["metric"])]
    for fam in sorted(fits["families"]):
        items.append((f"{fam} trials", H.Keyed(f"families.{fam}.n_trials", fits["families"][fam]["n_trials"])))
        items.append((f"{fam}: alpha of L(C)", _estimate(fits, f"families.{fam}.power_law.alpha.estimate")))
        items.append((f"{fam}: E of L(C)", _estimate(fits, f"families.{fam}.power_law.E.estimate")))
        ex = fits["families"][fam].get("extrapolation")
        if ex:
            err = ex["relative_error"]
            items.append((f"{fam}: extrapolation error at the largest C",
                          H.Keyed(f"families.{fam}.extrapolation.relative_error", err, f"{100 * err:+.2f}%")))
    mult = fits.get("multiplier")
    if mult:
        h = mult["headline"]
        items.append((f"dense FLOPs / sparse FLOPs at equal {fits['metric']} (C = {mult['compute'][-1]:.3g})",
                      _estimate(fits, "multiplier.headline.estimate")))
        items.append(("  90% interval", f"{H.fmt(h['low'])} - {H.fmt(h['high'])}"))
    return H.key_values(items)


def write_page(records: list[R.TrialRecord], fits: dict[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/scaling_report.html`` from the records, the public fits (as in
    ``scaling_fits.json``) and the PNGs already written in ``out_dir``."""
    out_dir = Path(out_dir)
    metric = fits["metric"]
    pictures = []
    for name, caption in (("loss_vs_flops.png", f"{metric} against training FLOPs, fitted L(C) with its 90% band"),
                          ("isoflop.png", "fitted L(N, D) along iso-FLOP lines; * = compute-optimal N*(C)")):
        if (out_dir / name).exists():
            pictures.append(f"<p class='muted'>{H.esc(caption)}</p>" + H.image(out_dir / name, caption))
    for other in R.FIT_METRICS:
        png = out_dir / f"{other}_vs_flops.png"
        if other != metric and png.exists():
            pictures.append(f"<p class='muted'>{H.esc(other)} against training FLOPs</p>" + H.image(png, other))
    mult = fits.get("multiplier")
    mult_html = ""
    if mult:
        mult_html = H.table(["sparse compute C", "dense / sparse FLOPs", "90% low", "90% high"], [
            [f"{c:.3g}", m["estimate"], m["low"], m["high"]] for c, m in zip(mult["compute"], mult["per_compute"])])
    header = [h for h, _, _ in R.TABLE_COLUMNS]
    sections = [
        ("headline", "Headline", _headline(records, fits)),
        ("plots", "Loss against compute", "".join(pictures)),
        ("fits", "Fits (90% bootstrap intervals)", H.table(R.FIT_HEADER, R._fit_rows(fits)) + mult_html),
        ("trials", "Trials", H.table(header, R._table_rows(records))),
    ]
    path = out_dir / "scaling_report.html"
    path.write_text(H.page(f"Scaling report ({metric})", sections,
                           "sparse vs dense Time-MoE trials; all numbers also in scaling_fits.json"))
    return path
