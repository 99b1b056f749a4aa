"""Where and how a trained model runs for inference: device, dtype and batch size, and the one
function that loads a model for every stage that forecasts (``jobs.evaluate``, the registry's
promotion gate, the pyfunc model, ``jobs.pipeline``, the sweeps).

Options (the CLIs' ``--device`` / ``--dtype`` / ``--batch-size``):
- ``device``: ``auto`` = the first CUDA device when one is visible, else the CPU; ``cpu``;
  ``cuda``; ``cuda:N``. Inside a Ray GPU actor the one GPU Ray assigned is ``cuda:0``.
- ``dtype``: ``auto`` = bf16 on a CUDA device that supports it, else fp32; ``fp32``, ``bf16``,
  ``fp16``. The weights are cast; RMSNorm statistics and the router softmax stay in fp32 inside
  the model.
- ``batch_size``: windows per ``generate`` call. ``None``: 256 on the CPU (the batch earlier CPU
  results were computed with, so they reproduce exactly); on a GPU, sized from the free memory
  by a probe forward at the actual context and horizon. A batch that runs out of GPU memory is
  halved with a warning and retried, so a protocol run never dies on a too-large batch.
- ``compile``: ``on`` = the prefill of every decoder layer compiled with static shapes
  (``pipeline.parallel.parallelize.compile_for_inference``) for full batches, so one graph serves a
  whole (context, horizon) pair and a short last batch runs eager; the same forecasts to float
  rounding, a few seconds of compilation per shape. ``auto`` (default) = on for a CUDA device in bf16/fp16,
  where it is 1.4-1.7x faster (docs/evaluation.md), off on the CPU and in fp32, whose results then
  reproduce earlier eager runs exactly; ``off``.

Bad options raise :class:`InferenceOptionError`, a ``ValueError`` whose message names the option;
the CLIs print it as one line.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from model import TimeMoeModel
from pipeline.parallel.parallelize import compile_for_inference

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_ENV, DTYPE_ENV, COMPILE_ENV = "TIMEMOE_DEVICE", "TIMEMOE_DTYPE", "TIMEMOE_COMPILE"  # read by the pyfunc model
CPU_BATCH = 256
GPU_BATCH_MAX = 1024  # larger batches gave no more windows/s (docs/benchmarks.md)
PROBE_BATCH = 8
MEMORY_HEADROOM = 0.8  # of the free memory: the allocator fragments, other work may start


class InferenceOptionError(ValueError):
    """A bad ``--device`` / ``--dtype`` / ``--batch-size`` / ``--compile``; the message names the option."""


COMPILE_MODES = ("auto", "on", "off")


def compile_mode(value: Any) -> str:
    """``auto``/``on``/``off`` from a flag, a config value (booleans allowed) or an environment
    variable (``1``/``true``/``yes`` mean on, ``0``/``false``/``no`` off)."""
    if value is None or value == "":
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    text = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}.get(text, text)
    if text not in COMPILE_MODES:
        raise InferenceOptionError(f"--compile {value!r}: unknown; use {', '.join(COMPILE_MODES)}")
    return text


@dataclass
class InferenceOptions:
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int | None = None
    compile: str | bool = "auto"  # normalised to auto/on/off

    def __post_init__(self) -> None:
        self.compile = compile_mode(self.compile)

    @classmethod
    def from_env(cls, model_config: dict[str, Any] | None = None) -> "InferenceOptions":
        """The pyfunc's options: ``model_config`` keys ``device``/``dtype``/``batch_size``, else
        ``$TIMEMOE_DEVICE`` / ``$TIMEMOE_DTYPE``, else ``auto``."""
        mc = dict(model_config or {})
        bs = mc.get("batch_size")
        return cls(device=str(mc.get("device") or os.environ.get(DEVICE_ENV) or "auto"),
                   dtype=str(mc.get("dtype") or os.environ.get(DTYPE_ENV) or "auto"),
                   batch_size=None if bs in (None, "", "auto") else int(bs),
                   compile=mc.get("compile", os.environ.get(COMPILE_ENV)))


def add_cli_options(parser: Any, from_config: bool = False) -> None:
    """``--device``, ``--dtype`` and ``--batch-size`` for a job's argparse parser; with
    ``from_config`` the defaults are None, so that a job can tell unset flags from its config's."""
    auto = None if from_config else "auto"
    parser.add_argument("--device", default=auto, help="auto (first CUDA GPU, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default=auto, help="auto (bf16 on a GPU, fp32 on CPU), fp32, bf16, fp16")
    parser.add_argument("--batch-size", default=None, help="windows per forecast batch (default: 256 on CPU, "
                        "from free GPU memory on a GPU)")
    parser.add_argument("--compile", nargs="?", const="on", default=None if from_config else "auto",
                        help="auto (default: on for a GPU in bf16/fp16, off on CPU), on, off: the model's prefill "
                             "compiled for static shapes (faster on a GPU after a few seconds of compilation per "
                             "context length); a bare --compile means on")


def options_from_args(args: Any) -> InferenceOptions:
    """Validated options from a parser that had :func:`add_cli_options` (raises on bad values)."""
    bs = args.batch_size
    if bs is not None and str(bs).lower() != "auto":
        try:
            bs = int(bs)
        except ValueError:
            raise InferenceOptionError(f"--batch-size {bs!r}: not an integer") from None
        if bs < 1:
            raise InferenceOptionError(f"--batch-size {bs}: must be >= 1")
    else:
        bs = None
    opts = InferenceOptions(device=str(args.device or "auto"), dtype=str(args.dtype or "auto"), batch_size=bs,
                            compile=getattr(args, "compile", None))
    resolve(opts)  # fail at start, not after training
    return opts


def resolve_device(spec: str) -> torch.device:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InferenceOptionError(f"--device {spec}: no CUDA GPU is visible to this process "
                                       "(torch.cuda.is_available() is False); use --device cpu or auto")
        index = 0
        if spec != "cuda":
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise InferenceOptionError(f"--device {spec}: expected cuda:N with an integer N") from None
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise InferenceOptionError(f"--device {spec}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
        return torch.device(f"cuda:{index}")
    raise InferenceOptionError(f"--device {spec!r}: unknown; use auto, cpu, cuda or cuda:N")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise InferenceOptionError(f"--dtype {spec!r}: unknown; use auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def resolve(opts: InferenceOptions) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(opts.device)
    return device, resolve_dtype(opts.dtype, device)


def resolve_compile(opts: InferenceOptions, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the prefill is compiled: ``auto`` = on a CUDA device in bf16/fp16 (module doc)."""
    return opts.compile == "on" or (opts.compile == "auto" and device.type == "cuda"
                                    and dtype in (torch.bfloat16, torch.float16))


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class ModelForecaster:
    """A ``TimeMoeModel`` on a device, in a dtype, with a batch size: the ``Forecaster`` that the
    evaluation protocol, the registry's gate and the pyfunc call (``forecast(series, horizon)``)."""

    def __init__(self, model: TimeMoeModel, options: InferenceOptions | None = None, name: str = "timemoe") -> None:
        self.options = options or InferenceOptions()
        self.device, self.dtype = resolve(self.options)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.compiled = resolve_compile(self.options, self.device, self.dtype)
        if self.compiled:
            compile_for_inference(self.model)
        self.name = name
        self._batch_cache: dict[tuple[int, int], int] = {}
        self._warned: set[int] = set()

    @property
    def max_context(self) -> int:
        """The longest context the model sees whole."""
        return int(self.model.config.max_position_embeddings)

    # ------------------------------------------------------------------ batch size
    def batch_size_for(self, context: int, horizon: int) -> int:
        """Windows per batch at this context length and horizon (module doc)."""
        key = (int(context), int(horizon))
        if key in self._batch_cache:  # lowered after an out-of-memory error, or probed
            return self._batch_cache[key]
        if self.options.batch_size is not None:
            return self.options.batch_size
        if self.device.type != "cuda":
            return CPU_BATCH
        if key not in self._batch_cache:
            self._batch_cache[key] = self._probe_batch(*key)
        return self._batch_cache[key]

    def _probe_batch(self, context: int, horizon: int) -> int:
        """Peak memory of a small batch at this shape, scaled to the free memory."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(PROBE_BATCH, context, generator=gen).cumsum(1)
        probe = (probe - probe.mean(1, keepdim=True)) / probe.std(1, keepdim=True)
        # eager: no graph compiled for the probe's shape, and eager's peak is the larger, so the batch errs small
        with self._stance(full_batch=False):
            self.model.generate(probe.to(self.device), horizon)
        torch.cuda.synchronize(self.device)
        per_window = max(1, (torch.cuda.max_memory_allocated(self.device) - base)) / PROBE_BATCH
        free, _ = torch.cuda.mem_get_info(self.device)
        fits = int(MEMORY_HEADROOM * free / per_window)
        # a power of two: fewer distinct shapes (compiled graphs, allocator blocks)
        batch = 1 << max(0, fits.bit_length() - 1)
        return int(max(1, min(GPU_BATCH_MAX, batch)))

    # ------------------------------------------------------------------ forecasting
    def forecast(self, series: np.ndarray | Sequence[np.ndarray], horizon: int) -> np.ndarray:
        if isinstance(series, np.ndarray) and series.ndim == 1:
            series = series[None]
        n = len(series)
        if n == 0:
            return np.zeros((0, horizon))
        longest = max(len(s) for s in series)
        context = min(longest, self.model.config.max_position_embeddings)
        batch = self.batch_size_for(context, horizon)
        out, start = [], 0
        while start < n:
            chunk = series[start : start + batch]
            try:
                # on the CPU the model's own default sub-batch, which earlier CPU results used
                inner = batch if self.device.type == "cuda" or self.compiled else 64
                with self._stance(len(chunk) == batch):
                    out.append(self.model.forecast(chunk, horizon, batch_size=inner))
                start += len(chunk)
                continue
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not _is_oom(err) or batch == 1:
                    raise
            # outside the handler, so the error's frames (and the activations they hold) are freed
            batch = max(1, batch // 2)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._batch_cache[(context, horizon)] = batch
            if batch not in self._warned:
                self._warned.add(batch)
                print(f"[inference] warning: out of memory on {self.device} at context {context}, "
                      f"horizon {horizon}; batch size lowered to {batch}", file=sys.stderr, flush=True)
        return np.concatenate(out)

    def _stance(self, full_batch: bool):
        """Compiled graphs for full batches only: a short batch (the last of a protocol item; the
        probe) runs eager rather than compiling a graph for its shape or being padded to the full
        batch, which at a coarse stride would multiply the work."""
        if not self.compiled or full_batch:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("force_eager")

    def describe(self) -> dict[str, Any]:
        """What produced the results (stated beside them; not part of the protocol key)."""
        d: dict[str, Any] = {"device": str(self.device), "dtype": dtype_name(self.dtype),
                             "batch_size": self.options.batch_size or ("auto" if self.device.type == "cuda" else CPU_BATCH)}
        d["compiled"] = self.compiled
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
        return d


# ---------------------------------------------------------------------------------- loading
def is_model_uri(spec: str) -> bool:
    return spec.startswith(("models:/", "runs:/"))


def load_checkpoint(spec: str, tracking_uri: str | None = None) -> tuple[TimeMoeModel, str]:
    """A ``TimeMoeModel`` (fp32, CPU) from a ``save_pretrained`` directory or an MLflow
    ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` / ``runs:/ID/PATH`` URI of a model that the
    registry logged (its ``checkpoint`` artifact). Returns (model, name)."""
    if is_model_uri(spec):
        return _load_logged(spec, tracking_uri), spec
    path = Path(spec)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{spec}: not a models:/ or runs:/ URI, nor a checkpoint directory with config.json")
    return TimeMoeModel.from_pretrained(str(path)), path.name


def _load_logged(uri: str, tracking_uri: str | None) -> TimeMoeModel:
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        meta = local / "MLmodel"
        flavor = mlflow.models.Model.load(str(meta)).flavors.get("python_function", {}) if meta.exists() else {}
        relative = flavor.get("artifacts", {}).get("checkpoint", {}).get("path")
        ckpt = local / relative if relative else None
        if ckpt is None or not (ckpt / "config.json").exists():
            raise FileNotFoundError(f"{uri}: not a model logged by pipeline.evaluation.registry (no 'checkpoint' artifact "
                                    f"with config.json in its MLmodel)")
        return TimeMoeModel.from_pretrained(str(ckpt))


def max_context_of(spec: str) -> int | None:
    """The longest context of the checkpoint folder ``spec`` (read from its config.json), or None
    for an MLflow URI (checked where the model is loaded)."""
    path = Path(spec) / "config.json"
    if is_model_uri(spec) or not path.exists():
        return None
    from model import TimeMoeConfig

    return int(TimeMoeConfig.from_json(path).max_position_embeddings)


def load_forecaster(spec: str, options: InferenceOptions | None = None,
                    tracking_uri: str | None = None) -> ModelForecaster:
    """The one loading function: checkpoint directory or MLflow URI -> a ready ``ModelForecaster``."""
    model, name = load_checkpoint(spec, tracking_uri)
    return ModelForecaster(model, options, name=name)


def forecast(model: str | TimeMoeModel, series: np.ndarray | Sequence[np.ndarray], horizon: int,
             device: str = "auto", dtype: str = "auto", batch_size: int | None = None,
             tracking_uri: str | None = None, compile: str | bool = "auto") -> np.ndarray:
    """One call from a checkpoint (or a loaded model) to forecasts ``[B, horizon]`` in the
    series' units, on the chosen device (the model's ``forecast`` contract: any lengths, NaNs)."""
    opts = InferenceOptions(device=device, dtype=dtype, batch_size=batch_size, compile=compile)
    fc = load_forecaster(model, opts, tracking_uri) if isinstance(model, str) else ModelForecaster(model, opts)
    return fc.forecast(series, horizon)

