"""Pretrain Time-MoE on packed shards with Ray Train + DeepSpeed, tracked in MLflow.

Local (starts a local Ray instance unless RAY_ADDRESS is set)::

    python -m jobs.pretrain --config configs/tiny-cpu.yaml --data /data/packed train.max_steps=20
    python -m jobs.pretrain --config configs/tiny-cpu.yaml --data /data/packed --resume

On a cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.pretrain --config configs/timemoe-50m.yaml --data s3://bucket/packed

Without Ray (e.g. a GPU box): ``torchrun --nproc-per-node 8 -m pipeline.train.torchrun ...``.
"""
from __future__ import annotations

import argparse
import sys

import typed_config
from pipeline.config import load_config
from pipeline.console import configure_output


def main(argv: list[str] | None = None) -> int:
    configure_output()  # no progress-bar redraws or colour codes in a log file
    p = argparse.ArgumentParser(prog="python -m jobs.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file (see configs/)")
    p.add_argument("--data", default=None, help="packed-shard root, local path or s3:// URL")
    p.add_argument("--resume", action="store_true", help="continue the run in train.output_dir")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as err:  # the message names the file or the override and the field
        print(f"jobs.pretrain: {typed_config.redact_secrets(str(err))}", file=sys.stderr)
        return 2
    if not cfg.data.path:
        p.error("no data: pass --data or set data.path in the config")
    print("# resolved config\n" + cfg.to_yaml(), flush=True)

    from pipeline.train.ray_runtime import run_ray

    result = run_ray(cfg, resume=args.resume)
    if getattr(result, "error", None):
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    print(f"done: metrics {result.metrics}; checkpoint {result.checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
