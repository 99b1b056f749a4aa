"""Which quickstart recipe learns the embedded corpus's seasonality: the train loop's math in one
process (AdamW with the loop's groups, warm-up + cosine, clip 1.0, fp32; no Ray or DeepSpeed),
data from a packed output of the quickstart, then the zero-shot protocol on its held-out series at
contexts 256 and 512. One JSON line per run (docs/evaluation.md, "The quickstart's model").

    python -m jobs.pipeline --output-dir /tmp/qs train.max_steps=1        # packed data + held-out CSVs
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quickstart_probe.py --data /tmp/qs/run-*/packed \
        --bench /tmp/qs/heldout --steps 1200 --overrides '{"initializer_range": 0.1}'
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import TimeMoeModel  # noqa: E402
from pipeline import optim  # noqa: E402
from pipeline.config import ModelSection, OptimSection  # noqa: E402
from pipeline.evaluation.inference import InferenceOptions, ModelForecaster  # noqa: E402
from pipeline.evaluation.protocol import EvalConfig, evaluate  # noqa: E402
from pipeline.parallel.parallelize import model_config  # noqa: E402
from pipeline.train.data import PlainReader, list_shards, to_torch_batch  # noqa: E402

DATASETS = ["synth_seasonal", "synth_kernel", "synth_walk"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True, help="packed output (train/ + manifest.json)")
    p.add_argument("--bench", required=True, help="held-out benchmark CSVs")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--overrides", default="{}", help="model overrides as JSON")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--min-lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--save", default="", help="save the trained model here")
    a = p.parse_args()

    torch.manual_seed(1234)
    dev = torch.device(a.device)
    model = TimeMoeModel(model_config(ModelSection(preset=a.preset, overrides=json.loads(a.overrides)))).to(dev)
    ocfg = OptimSection(lr=a.lr, warmup_steps=a.warmup, min_lr_ratio=a.min_lr, weight_decay=a.wd)
    opt = optim.build_optimizer(optim.param_groups(model, a.wd), ocfg)
    sched = optim.build_scheduler(opt, ocfg, a.steps)
    reader = PlainReader(list_shards(a.data, "train"), a.batch, 0, 1, 1234)
    t0, step, epoch, losses = time.time(), 0, 0, []
    while step < a.steps:
        for raw in reader.epoch(epoch):
            b = {k: v.to(dev) for k, v in to_torch_batch(raw).items()}
            out = model(b["inputs"], segment_ids=b["segment_ids"], labels=b["labels"], loss_mask=b["loss_mask"])
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(out.loss))
            step += 1
            if step >= a.steps:
                break
        epoch += 1
    train_s = time.time() - t0
    model.eval().cpu()
    if a.save:
        model.save_pretrained(a.save)
    forecaster = ModelForecaster(model, InferenceOptions(device="cpu", dtype="fp32"))
    scores = {}
    for ctx in (256, 512):
        r = evaluate(forecaster, a.bench, EvalConfig(datasets=DATASETS, horizons=[96], context=ctx, stride=96,
                                                     progress=False), model_name="probe")
        scores[ctx] = {row.dataset: round(row.mse, 4) for row in r.rows} | {"avg": round(r.average_mse(), 4)}
    print(json.dumps({"preset": a.preset, "overrides": json.loads(a.overrides), "lr": a.lr, "steps": a.steps,
                      "batch": a.batch, "points": a.steps * a.batch * 256, "train_s": round(train_s, 1),
                      "loss_last20": round(float(np.mean(losses[-20:])), 4), "zero_shot_mse_by_context": scores}))


if __name__ == "__main__":
    main()
