"""Evaluation: the paper's zero-shot protocol (``protocol``) on the benchmark files
(``benchmark_data``) against baselines (``baselines``); where and how a model forecasts
(``inference``: device, dtype, batch, loading); the protocol spread over GPU workers
(``workers``); the MLflow model registry, its pyfunc and the evaluation-gated promotion
(``registry``)."""
