"""One offline HTML page for a pretraining run, from MLflow alone.

    python -m jobs.report --run-id RUN_ID [--tracking-uri URI] [--out DIR]

    ray job submit --working-dir . -- python -m jobs.report --run-id RUN_ID --tracking-uri http://mlflow:5000

Writes ``DIR/run_report.html`` (config, data mixture, loss and throughput curves, expert load,
the zero-shot table beside the baselines, registry state; pictures embedded, opens without a
network) and ``DIR/run_report.json`` (its numbers). The logic is ``pipeline.reports.run_report``.
"""
from __future__ import annotations

import argparse
import os
import sys

from pipeline.console import configure_output
from pipeline.reports.run_report import build_run_report


def main(argv: list[str] | None = None) -> int:
    configure_output()  # no progress-bar redraws or colour codes in a log file
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n")[0])
    p.add_argument("--run-id", required=True, help="MLflow run id of the pretraining run")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--out", default="run_report", help="output folder (default: ./run_report)")
    args = p.parse_args(argv)
    try:
        report = build_run_report(args.run_id, args.out, tracking_uri=args.tracking_uri)
    except Exception as e:  # noqa: BLE001 - an unknown run or an unreachable server: one line
        from typed_config import redact_secrets

        print(f"jobs.report: {redact_secrets(' '.join(str(e).split()))}", file=sys.stderr)
        return 2
    print(f"run report: {report.html.resolve()} (numbers in {report.json.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
