"""The main job, end to end on one machine: corpus -> preprocessing (Ray Data) -> pretraining
(Ray Train + DeepSpeed, tracked in MLflow) -> zero-shot evaluation -> model registry.

    python -m jobs.pipeline                                   # ~3 min on 2 CPU cores
    python -m jobs.pipeline --benchmarks /data/benchmarks --output-dir outputs/qs train.max_steps=20
    python -m jobs.pipeline --input /data/time300b --scale 1 --output-dir outputs/mine
    python -m jobs.pipeline --resume outputs/quickstart/run-20261122-101500   # after a stop or crash

On a cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.pipeline

Without ``--input`` the embedded synthetic corpus is generated into ``RUN/corpus``. Stages hand
over through durable locations only (``RUN/packed/manifest.json``, ``RUN/train/final_model``, the
MLflow run id, ``RUN/eval/``, where RUN = ``OUTPUT/run-<timestamp>``). MLflow goes to ``$MLFLOW_TRACKING_URI`` or
``sqlite:///OUTPUT/mlflow.db``. Trailing ``key=value`` arguments override the training config.

``--resume RUN`` continues a stopped, killed or failed run in its own folder: preprocessing is
skipped when its manifest was published (a run publishes it last, so it is whole), training
restarts from its latest checkpoint (same MLflow run), and evaluation and registration run again.
Pass the same arguments as the first time (trailing overrides may change step counts, not the
model or the batch geometry: the checkpoint's config fingerprint is checked).
"""
from __future__ import annotations

import argparse
import sys

import typed_config
from pipeline.console import configure_output
from pipeline.evaluation.inference import add_cli_options
from pipeline.quickstart.stages import QuickstartRun, TrainingFailed, UserError

DEFAULT_CONFIG = "configs/quickstart.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="quickstart YAML (see configs/quickstart.yaml)")
    p.add_argument("--input", nargs="+", default=None, help="raw corpus folders/URLs (default: embedded synthetic)")
    p.add_argument("--benchmarks", default=None, help="benchmark CSV folder (default: held-out synthetic series)")
    p.add_argument("--datasets", nargs="+", default=None, help="benchmark datasets (default: all in the folder)")
    p.add_argument("--output-dir", default="outputs/quickstart")
    p.add_argument("--scale", type=float, default=None, help="size of the embedded corpus (1.0 = ~1.3M points)")
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="continue the run in this folder (OUTPUT/run-*): skip published stages, resume training")
    add_cli_options(p, from_config=True)  # evaluation and the promotion gate; default: the config's eval section
    p.add_argument("--eval-workers", default=None, help="evaluation on Ray actors, one GPU each: auto (default), N, or 0")
    p.add_argument("overrides", nargs="*", help="training config overrides, e.g. train.max_steps=20")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def main(argv: list[str] | None = None) -> int:
    configure_output()
    args = parse_args(argv)
    try:
        run = QuickstartRun.start(args)
        run.corpus()
        run.preprocess()
        run.pretrain()
        run.evaluate()
        run.register()
        run.finish()
    except UserError as err:
        print(f"jobs.pipeline: {typed_config.redact_secrets(str(err))}", file=sys.stderr, flush=True)
        return 2
    except TrainingFailed as err:
        print(str(err), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
