"""Scaling-law experiments for Time-MoE: sparse vs dense twins, FLOPs vs loss.

- ``grid``:   model sizes from (layers, hidden) knobs, dense twins with equal active params,
              budgets in points seen, trial specs with a config hash
- ``sweep``:  runs the grid as Ray tasks, one MLflow child run per trial, skip/resume by hash
- ``offline``: the same plan on air-gapped GPU nodes (no Ray, no MLflow): shards train in-process,
              records to JSON lines, imported later as FINISHED child runs
- ``fit``:    robust fits (Huber on log residuals, multi-start L-BFGS, bootstrap): L(C),
              L(N, D), N*(C), sparse-vs-dense compute multiplier, extrapolation error
- ``report``: MLflow <-> trial records, plots, table, JSON

See docs/scaling.md. Nothing is imported here so that ``fit`` stays usable without torch.
"""
