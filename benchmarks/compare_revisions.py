"""One table from several ``train_step.py`` JSON files of the same call (one per revision):
points/s, MFU and peak memory per (preset, windows), and each row against the first file's.

    python3 benchmarks/compare_revisions.py OUT/train_step_rev_*.json [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def comparison_rows(files: list[Path]) -> list[dict]:
    """Rows ``{preset, windows, revision, variant, points_per_s, mfu, peak_mem_gb, x_first}``;
    ``x_first`` divides by the first file's row of the same (preset, windows)."""
    rows, first = [], {}
    for f in files:
        revision = f.stem.removeprefix("train_step_rev_")
        for r in json.loads(f.read_text())["rows"]:
            key = (r["preset"], r["windows"])
            first.setdefault(key, r["points_per_s"])
            rows.append({"preset": r["preset"], "windows": r["windows"], "revision": revision, "variant": r["variant"],
                         "points_per_s": r["points_per_s"], "mfu": r["mfu"], "peak_mem_gb": r["peak_mem_gb"],
                         "x_first": r["points_per_s"] / first[key]})
    return sorted(rows, key=lambda r: (r["preset"], r["windows"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = comparison_rows([f for f in args.files if f.exists()])
    print(f"{'preset':<14} {'win':>4} {'revision':<24} {'variant':<10} {'points/s':>10} {'MFU':>6} {'peak GB':>8} {'x first':>8}")
    for r in rows:
        print(f"{r['preset']:<14} {r['windows']:>4} {r['revision']:<24} {r['variant']:<10} {r['points_per_s']:>10,.0f} "
              f"{r['mfu']:>6.1%} {r['peak_mem_gb']:>8.1f} {r['x_first']:>8.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
