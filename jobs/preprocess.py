"""Preprocess raw time series into packed training shards (clean, normalise, pack, write).

Local (starts a local Ray instance unless RAY_ADDRESS is set)::

    python -m jobs.preprocess --input /data/time300b --output /data/prepared --window-length 4096

On a cluster::

    ray job submit --working-dir . -- python -m jobs.preprocess \\
        --input s3://bucket/time300b --output s3://bucket/prepared --config configs/preprocess.yaml

Flags override the YAML config; the resolved config is printed at start. The logic lives in
``preprocessing.job.run_preprocess``.

Exit codes: 0 published; 2 a user error, printed as ONE line on stderr without a traceback (bad
flags or config, an output that would destroy or re-read data, nothing to publish, a bad input
under ``--fail-fast``); anything else is a bug and keeps its traceback. ``--debug`` shows the
traceback of user errors too.
"""
from __future__ import annotations

import argparse
import logging
import sys

import yaml

from pipeline.console import configure_output
from preprocessing.config import PreprocessConfig, load_config, validate
from preprocessing.errors import user_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.preprocess", description=__doc__.split("\n")[0])
    p.add_argument("--input", action="append", default=[], help="input path or URL (repeatable)")
    p.add_argument("--output", help="output folder or s3:// prefix")
    p.add_argument("--config", help="YAML config (see preprocessing/config.py)")
    p.add_argument("--catalog", help="catalog YAML for the readers")
    p.add_argument("--window-length", type=int, help="packed window length (rows hold N+1 points)")
    p.add_argument("--seed", type=int)
    p.add_argument("--fail-fast", action="store_true", help="raise on the first unreadable input")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> PreprocessConfig:
    config = load_config(args.config) if args.config else PreprocessConfig()
    if args.input:
        config.inputs = list(args.input)
    if args.output:
        config.output = args.output
    if args.catalog:
        config.catalog = args.catalog
    if args.window_length is not None:
        config.pack.window_length = args.window_length
    if args.seed is not None:
        config.seed = args.seed
    if args.fail_fast:
        config.fail_fast = True
    validate(config)
    return config


def fail(message: object) -> int:
    print(f"jobs.preprocess: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    configure_output()  # no progress-bar redraws or colour codes in a log file
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(args)
    except (ValueError, OSError, yaml.YAMLError) as e:  # the flags or the config file
        if args.debug:
            raise
        return fail(e)
    print("resolved config:\n" + config.to_yaml(), flush=True)
    from preprocessing.job import run_preprocess

    try:
        result = run_preprocess(config)
    except Exception as e:  # noqa: BLE001 - user errors become one line, everything else is re-raised
        cause = user_error(e)
        if cause is None or args.debug:
            raise
        return fail(cause)
    r = result.report
    print(f"points in {r['points_in']:,} kept {r['points_kept']:,} dropped {sum(r['points_dropped'].values()):,}; "
          f"series in {r['series_in']:,} kept {r['series_kept']:,}; train packing efficiency {result.efficiency:.4f}; "
          f"{result.manifest['rows']} rows; {len(r['warnings'])} warning(s); {result.seconds:.1f}s -> {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
