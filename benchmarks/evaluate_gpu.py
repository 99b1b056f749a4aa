"""Zero-shot protocol inference speed on one GPU: ``TimeMoeModel.generate`` at the paper's four
(context, horizon) pairs, our eager and compiled paths beside the released Time-MoE code.

Rows (random seeded weights: speed only; inputs are z-scored random walks, never zeros), in
order of importance so that ``--budget-s`` cuts the least important ones:
1. per sparse preset, bf16: our ``compiled``, ``eager`` and ``before`` (generate as it was
   before the preallocated cache: a ``torch.cat`` of the whole cache per layer and step, a dense
   decode mask, RoPE per forward; the baseline on the same card) at every pair at the first
   batch size; after the first preset the end-to-end check; then the released code
2. ``compiled-decode`` (decode steps compiled with dynamic shapes too) and
   ``compiled-decode-auto`` (decode steps compiled static first, the cache's fill level made
   symbolic on the first recompile: ``compile_for_inference(decode="automatic")``)
3. fp32, 4. the dense twins, 5. the other batch sizes. After the first preset, causal SDPA
alone per kernel (flash, memory-efficient, cuDNN) at the prefill shapes and at one decode step
(the step's queries against a cache slice, bottom-right causal) (CUDA only).
A row that runs out of memory is recorded as "oom" and retried at half the batch. A row whose
predicted time (its FLOPs at the rate measured for its kind so far, plus the longest compile
seen) would end past the budget is skipped, so the run ends near ``--budget-s``.

Per row: windows/s (CUDA-event timed median over ``--repeats`` calls after the warm-up),
inference MFU (``model.flops.generate_flops_per_window`` x windows/s / 989e12, also for fp32),
peak memory of the row alone (weights + activations + cache) and the first call's extra time
(the compile, for compiled variants). Outputs of every variant are compared with the first one
measured at the same shape, and the released model runs OUR weights (converted by
``model.checkpoint.to_published``), so its forecasts are compared too.

The full stride-1 protocol estimate per (code, preset, dtype, variant) is the sum over pairs of
windows(pair) / best windows/s(pair); window counts come from ``--benchmarks`` files where
present, else from the paper's split sizes. The end-to-end check runs the users' ``ModelForecaster`` through
``pipeline.evaluation.protocol.evaluate_dataset`` on one real dataset at one pair and compares its
windows/s with the generate-only rate the estimate uses.

    python benchmarks/evaluate_gpu.py --json results.json --budget-s 400 \\
        --reference-dir .reference --benchmarks .reference/benchmarks

``--reference-dir`` is made by ``benchmarks/released_timemoe.sh`` (the released model files and
the wheels of transformers 4.40.1 they need, installed into /tmp/refsite at run time). Without
it the released code's earlier numbers are printed, marked as not re-measured. CPU smoke test:
``--presets tiny --pairs 512/96 --batches 8 --device cpu``. Needs torch, numpy, pandas and pyyaml.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.released_code import build_released, import_released  # noqa: E402
from model import TimeMoeConfig, TimeMoeModel, horizon_schedule  # noqa: E402
from model.attention import apply_rope, rope_cos_sin  # noqa: E402
from model.flops import H100_BF16_PEAK_FLOPS, generate_flops_per_window  # noqa: E402
from pipeline.scaling_laws.grid import GridConfig, model_config  # noqa: E402

try:  # without it only the compiled rows fail, with this message
    from pipeline.parallel.parallelize import compile_for_inference  # noqa: E402
except ImportError as _err:
    def compile_for_inference(model, decode="eager", _why=f"pipeline.parallel.parallelize: {_err}"):
        raise RuntimeError(_why)

PAPER_PAIRS = ((512, 96), (1024, 192), (2048, 336), (3072, 720))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("compiled", "eager", "before", "compiled-decode", "compiled-decode-auto")
# the paper's files: rows x channels (the ETT borders are fixed, weather's test split is 20%)
PAPER_SPLITS = {"ETTh1": (14400, 7), "ETTh2": (14400, 7), "ETTm1": (57600, 7), "ETTm2": (57600, 7),
                "weather": (52696, 21)}
# measured earlier on one H100, bf16, random weights (docs/benchmarks.md); printed when the
# released code cannot run here
QUOTED = {
    "released timemoe-50m bf16 (largest batch that fit)": {"512/96": 680, "1024/192": 263, "2048/336": 66, "3072/720": 25},
    "ours-before timemoe-50m bf16 b256": {"512/96": 1754, "1024/192": 830, "2048/336": 312, "3072/720": 150},
    "ours-before timemoe-200m bf16 b256 (3072/720 at b128)": {"512/96": 853, "1024/192": 404, "2048/336": 157, "3072/720": 77},
}


# ------------------------------------------------------------------------------ the baseline
@torch.no_grad()
def generate_before(model: TimeMoeModel, x_BT: torch.Tensor, horizon: int) -> torch.Tensor:
    """``generate`` as it was before the preallocated cache, kept here as the measured baseline
    (one-series rows): every layer's cache grows by ``torch.cat`` at every step (a copy of the
    whole cache), decode steps attend through a dense ``[L, S]`` causal mask, RoPE is computed
    per forward from position ids."""
    dec, dev = model.model, x_BT.device
    B = x_BT.shape[0]
    caches: list = [None] * len(dec.layers)
    new_x, seen, outs = x_BT.to(model.heads.weight.dtype), 0, []
    for h in horizon_schedule(horizon, model.config.horizon_lengths):
        n = new_x.shape[1]
        hid = dec.embed_layer(new_x)
        a0 = dec.layers[0].self_attn
        assert a0.n_kv == a0.n_heads, "the baseline has no GQA"
        cos, sin = rope_cos_sin(torch.arange(seen, seen + n, device=dev).expand(B, n), a0.head_dim, a0.rope_theta, hid.dtype)
        for i, layer in enumerate(dec.layers):
            a = layer.self_attn
            q, k, v = a.qkv_proj(layer.input_layernorm(hid)).chunk(3, dim=-1)
            q, k, v = (t.view(B, n, a.n_heads, a.head_dim).transpose(1, 2) for t in (q, k, v))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if caches[i] is not None:
                k, v = torch.cat([caches[i][0], k], dim=2), torch.cat([caches[i][1], v], dim=2)
            caches[i] = (k, v)
            S = k.shape[2]
            if S == n:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                mask = torch.ones(n, S, dtype=torch.bool, device=dev).tril(S - n)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])
            hid = hid + a.o_proj(out.transpose(1, 2).reshape(B, n, -1))
            f = layer.ffn_layer(layer.post_attention_layernorm(hid))
            hid = hid + (f[0] if isinstance(f, tuple) else f)
        seen += n
        new_x = model.head(dec.norm(hid)[:, -1], h)
        outs.append(new_x)
    return torch.cat(outs, dim=1)[:, :horizon]


# ------------------------------------------------------------------------------ protocol size
def protocol_windows(pairs, benchmarks_dir: str | None) -> dict:
    """Stride-1 test windows per pair over the five datasets (released code's count: the very
    last window skipped), from the files where given, else from the paper's split sizes."""
    try:
        from pipeline.evaluation.benchmark_data import load_benchmark, split_borders
        from pipeline.evaluation.protocol import window_starts
    except ImportError:  # the same rules written out: ETT borders fixed, else a 20% test split
        load_benchmark = None

        def split_borders(name, rows):
            month = 30 * 24 * (4 if "ettm" in name.lower() else 1)
            test = (16 * month, 20 * month) if "ett" in name.lower() else (rows - int(0.2 * rows), rows)
            return argparse.Namespace(test=test)

        def window_starts(test, horizon):
            return range(max(test[1] - test[0] - horizon, 0))

    per_dataset, totals = {}, {f"{T}/{H}": 0 for T, H in pairs}
    for name in PAPER_SPLITS:  # pipeline.evaluation.benchmark_data.DEFAULT_DATASETS
        rows, channels = PAPER_SPLITS[name]
        source = "paper split sizes"
        if benchmarks_dir and load_benchmark is not None:
            try:
                ds = load_benchmark(benchmarks_dir, name)
                rows, channels, source = ds.num_rows, ds.values_TC.shape[1], str(ds.path)
            except FileNotFoundError:
                pass
        test = split_borders(name, rows).test
        counts = {f"{T}/{H}": int(len(window_starts(test, H)) * channels) for T, H in pairs}
        per_dataset[name] = dict(rows=rows, channels=channels, test=list(test), source=source, windows=counts)
        for k, n in counts.items():
            totals[k] += n
    return dict(per_dataset=per_dataset, per_pair=totals, total=sum(totals.values()))


def protocol_estimates(rows: list[dict], windows: dict) -> list[dict]:
    """Per (code, preset, dtype, variant): sum over pairs of windows / best measured windows/s."""
    best: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("kind") != "generate" or r.get("status") != "ok":
            continue
        key = (r["impl"], r["preset"], r["dtype"], r["variant"])
        pair = f"{r['context']}/{r['horizon']}"
        cur = best.setdefault(key, {}).get(pair)
        if cur is None or r["windows_per_s"] > cur["windows_per_s"]:
            best[key][pair] = r
    out = []
    for (impl, preset, dtype, variant), by_pair in best.items():
        per_pair, seconds, compile_s = {}, 0.0, 0.0
        for pair, r in by_pair.items():
            n = windows["per_pair"].get(pair)
            if n is None:
                continue
            s = n / r["windows_per_s"]
            per_pair[pair] = dict(windows=n, windows_per_s=r["windows_per_s"], batch=r["batch"], seconds=s,
                                  mfu=r["mfu"], peak_row_gib=r.get("peak_row_gib"))
            if "floor_share" in r.get("breakdown", {}):
                per_pair[pair].update(floor_share=r["breakdown"]["floor_share"], floor_seconds=s * r["breakdown"]["floor_share"])
            seconds += s
            compile_s += r.get("compile_s") or 0.0
        complete = len(per_pair) == len(windows["per_pair"])
        est = dict(impl=impl, preset=preset, dtype=dtype, variant=variant, per_pair=per_pair, complete=complete,
                   seconds=seconds, minutes=seconds / 60, compile_s=compile_s, minutes_with_compile=(seconds + compile_s) / 60)
        if complete and all("floor_seconds" in c for c in per_pair.values()):  # --breakdown: GEMM + attention only
            est["floor_minutes"] = sum(c["floor_seconds"] for c in per_pair.values()) / 60
        out.append(est)
    return out


# ------------------------------------------------------------------------------ measuring
def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def random_walks(batch: int, length: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, length, generator=g, device=device).cumsum(1)
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.t0 = time.perf_counter()
        self.models: dict[tuple, torch.nn.Module] = {}
        self.outputs: dict[tuple, tuple[str, torch.Tensor]] = {}
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.released = None  # classes, or the reason they could not be imported
        self.windows = protocol_windows([p for p in args.pairs], args.benchmarks)
        self.meta = dict(device=torch.cuda.get_device_name(self.dev) if self.cuda else platform.processor() or "cpu",
                         torch=torch.__version__, python=platform.python_version(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         argv=sys.argv, peak_flops=H100_BF16_PEAK_FLOPS, tf32=torch.backends.cuda.matmul.allow_tf32,
                         budget_s=args.budget_s)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    # ------------------------------------------------------------------ models
    def ours(self, preset: str, dtype: str, variant: str) -> TimeMoeModel:
        kind = "eager" if variant in ("eager", "before") else variant
        key = ("ours", preset, dtype, kind)
        if key not in self.models:
            torch.manual_seed(self.args.seed)
            with torch.device(self.dev):
                m = TimeMoeModel(model_shape(preset)).to(DTYPES[dtype]).eval()
            if kind == "compiled":
                compile_for_inference(m)
            elif kind == "compiled-decode":
                compile_for_inference(m, decode="dynamic")
            elif kind == "compiled-decode-auto":
                compile_for_inference(m, decode="automatic")
            self.models[key] = m
        return self.models[key]

    def released_model(self, preset: str, dtype: str):
        key = ("released", preset, dtype, "eager")
        if key not in self.models:
            self.models[key] = build_released(self.released, self.ours(preset, dtype, "eager"), DTYPES[dtype], self.dev)
        return self.models[key]

    def drop_unneeded(self, remaining: list[dict]) -> None:
        keep = set()
        for s in remaining:
            if s["kind"] in ("generate", "e2e"):
                kind = "eager" if s["variant"] in ("eager", "before") else s["variant"]
                keep.add(("ours", s["preset"], s["dtype"], kind))
                if s.get("impl") == "released":
                    keep.add(("ours", s["preset"], s["dtype"], "eager"))
                    keep.add(("released", s["preset"], s["dtype"], "eager"))
        for key in [k for k in self.models if k not in keep]:
            del self.models[key]
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ rows
    def predict_s(self, spec: dict) -> float:
        """Rough seconds a row will take, from the FLOP rate of measured rows of its kind
        (0 when nothing comparable ran yet)."""
        if spec["kind"] == "sdpa":
            return 2.0
        ok = [r for r in self.rows if r.get("kind") == "generate" and r.get("status") == "ok"]
        if spec["kind"] == "e2e":
            same = [r for r in ok if (r["impl"], r["preset"], r["dtype"], r["variant"]) ==
                    ("ours", spec["preset"], spec["dtype"], spec["variant"])]
            n = self.windows["per_dataset"].get(spec["dataset"], {}).get("windows", {}).get(f"{spec['context']}/{spec['horizon']}")
            return 1.5 * n / max(r["windows_per_s"] for r in same) if same and n else 0.0
        like = [r for r in ok if (r["impl"], r["dtype"], r["variant"]) == (spec["impl"], spec["dtype"], spec["variant"])]
        like = like or [r for r in ok if (r["impl"], r["dtype"]) == (spec["impl"], spec["dtype"])]
        if not like:
            return 0.0
        rate = min(r["flops_per_window"] * r["windows_per_s"] for r in like)  # FLOP/s, the slowest seen
        flops = generate_flops_per_window(model_shape(spec["preset"]), spec["context"], spec["horizon"])
        calls = (2 if spec["variant"].startswith("compiled") else 1) + self.args.repeats
        compile_s = max([r.get("compile_s") or 0.0 for r in ok] + [0.0]) if spec["variant"].startswith("compiled") else 0.0
        return calls * spec["batch"] * flops / rate + compile_s

    def time_calls(self, fn, warmup: int, repeats: int):
        t = time.perf_counter()
        out = fn()
        self.sync()
        first_s = time.perf_counter() - t
        for _ in range(warmup - 1):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return out, first_s, sorted(times)

    def generate_row(self, spec: dict) -> dict:
        impl, preset, dtype, variant = spec["impl"], spec["preset"], spec["dtype"], spec["variant"]
        T, H, B = spec["context"], spec["horizon"], spec["batch"]
        cfg = model_shape(preset)
        if impl == "released":
            model = self.released_model(preset, dtype)
            fn_of = lambda x: (lambda: model.generate(x.clone(), max_new_tokens=H)[:, T:])  # noqa: E731
            warmup, repeats = 1, max(2, self.args.repeats - 1)
        else:
            model = self.ours(preset, dtype, variant)
            if variant == "before":
                fn_of = lambda x: (lambda: generate_before(model, x, H))  # noqa: E731
            else:
                fn_of = lambda x: (lambda: model.generate(x, H))  # noqa: E731
            warmup = 2 if variant.startswith("compiled") else 1
            repeats = self.args.repeats
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        x = random_walks(B, T, self.dev, seed=T * 7919 + B).to(DTYPES[dtype])
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.dev)
            resident = torch.cuda.memory_allocated(self.dev)
        out, first_s, times = self.time_calls(fn_of(x), warmup, repeats)
        median = times[len(times) // 2]
        wps = B / median
        flops = generate_flops_per_window(cfg, T, H)
        row = dict(spec, status="ok", windows_per_s=wps, batch_s_median=median, batch_s_all=times,
                   first_call_s=first_s, compile_s=max(0.0, first_s - median) if variant.startswith("compiled") else None,
                   flops_per_window=flops, mfu=flops * wps / H100_BF16_PEAK_FLOPS, weights_gib=weights / 2**30)
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.dev)
            row.update(peak_alloc_gib=peak / 2**30, peak_row_gib=(peak - resident + weights) / 2**30)
        key = (preset, dtype, T, H, B)
        out = out.float().cpu()
        if key in self.outputs:
            ref_name, ref = self.outputs[key]
            row.update(diff_vs=ref_name, max_abs_diff=float((out - ref).abs().max()), mean_abs_diff=float((out - ref).abs().mean()))
        else:
            self.outputs[key] = (f"{impl} {variant}", out)
        if not torch.isfinite(out).all():
            row["warning"] = "non-finite forecasts"
        if self.args.breakdown and impl == "ours":
            row["breakdown"] = self.breakdown(model, x, H, median)
        return row

    def breakdown(self, model, x_BT: torch.Tensor, horizon: int, generate_s: float) -> dict:
        """Where one ``generate`` call's time goes: the prefill alone (``generate`` of one point,
        the rest is the decode steps), and the device kernels by family. ``floor_share`` = GEMM +
        attention kernel time over the wall time: the share left if every other op (norms, RoPE,
        activations, routing, copies) and every gap between kernels cost nothing."""
        from pipeline.train.profiling import profile_calls

        _, _, times = self.time_calls(lambda: model.generate(x_BT, 1), 2, self.args.repeats)
        prefill_s = times[len(times) // 2]
        out = dict(prefill_s=prefill_s, prefill_share=prefill_s / generate_s)
        prof = profile_calls(lambda: model.generate(x_BT, horizon), 1, self.cuda)
        out["profile"] = {k: prof[k] for k in ("wall_ms_per_step", "busy_share", "kernel_ms_per_step", "top_kernels_ms_per_step")
                          if k in prof}
        kernel_ms = prof.get("kernel_ms_per_step", {})
        if kernel_ms:
            out["floor_share"] = (kernel_ms.get("gemm", 0.0) + kernel_ms.get("attention", 0.0)) / prof["wall_ms_per_step"]
        return out

    def e2e_row(self, spec: dict) -> dict:
        """The users' path on one real dataset at one pair: ``ModelForecaster`` (what
        ``jobs.evaluate`` runs: compiled full batches, an eager short last batch) through the
        evaluation harness, its compilation done beforehand on one full batch."""
        from pipeline.evaluation.benchmark_data import load_benchmark
        from pipeline.evaluation.inference import InferenceOptions, ModelForecaster
        from pipeline.evaluation.protocol import EvalConfig, evaluate_dataset

        B, T, H = spec["batch"], spec["context"], spec["horizon"]
        torch.manual_seed(self.args.seed)
        options = InferenceOptions(device=str(self.dev), dtype=spec["dtype"], batch_size=B,
                                   compile="on" if spec["variant"] == "compiled" else "off")
        fc = ModelForecaster(TimeMoeModel(model_shape(spec["preset"])), options,
                             name=f"{spec['preset']} {spec['dtype']} {spec['variant']}")
        fc.forecast(random_walks(B, T, self.dev, seed=1).cpu().numpy(), H)
        ds = load_benchmark(self.args.benchmarks, spec["dataset"])
        cfg = EvalConfig(datasets=[ds.name], horizons=[H], context=T, batch_size=B, progress=False)
        r = evaluate_dataset(fc, ds, H, cfg)
        wps = r.windows / r.seconds
        gen = [x for x in self.rows if x.get("kind") == "generate" and x.get("status") == "ok" and x["impl"] == "ours"
               and (x["preset"], x["dtype"], x["variant"], x["context"], x["horizon"], x["batch"])
               == (spec["preset"], spec["dtype"], spec["variant"], T, H, B)]
        row = dict(spec, status="ok", windows=r.windows, seconds=r.seconds, windows_per_s=wps, mse=r.mse, mae=r.mae)
        if gen:
            row.update(generate_windows_per_s=gen[0]["windows_per_s"], ratio_to_generate=wps / gen[0]["windows_per_s"],
                       protocol_windows_this_dataset=self.windows["per_dataset"].get(ds.name, {}).get("windows", {}).get(f"{T}/{H}"))
        return row

    def attention_rows(self, spec: dict) -> dict:
        """SDPA alone per kernel: causal at the prefill shape (the attention part of the prefill),
        and one decode step in the middle of the horizon: the step's new queries against the
        keys so far, read from a cache buffer of the generation's final length as ``generate``
        does, with the bottom-right causal mask (``model.attention.Attention.attend_cached``)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        B, hd, T = spec["batch"], spec["head_dim"], spec["context"]
        q, k, v = (torch.randn(B, 12, T, hd, device=self.dev, dtype=torch.bfloat16) for _ in range(3))
        steps = horizon_schedule(spec["horizon"], TimeMoeConfig().horizon_lengths)
        Lq, S_max = steps[0], T + sum(steps[:-1])
        S = T + Lq * max(len(steps) // 2, 1)
        cache_k, cache_v = (torch.randn(B, 12, S_max, hd, device=self.dev, dtype=torch.bfloat16) for _ in range(2))
        q_step = torch.randn(B, 12, Lq, hd, device=self.dev, dtype=torch.bfloat16)
        calls = {
            "prefill": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 4 * B * 12 * hd * T * (T + 1) / 2),
            "decode": (lambda: F.scaled_dot_product_attention(q_step, cache_k[:, :, :S], cache_v[:, :, :S],
                                                              attn_mask=causal_lower_right(Lq, S)),
                       4 * B * 12 * hd * Lq * (S - Lq / 2)),
        }
        res: dict[str, dict] = {}
        for part, (fn, flops) in calls.items():
            for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
                key = name if part == "prefill" else f"decode {name}"
                try:
                    with sdpa_kernel(getattr(SDPBackend, name)):
                        _, _, times = self.time_calls(fn, 2, 5)
                    res[key] = dict(ms=1e3 * times[len(times) // 2], tflops=flops / times[len(times) // 2] / 1e12)
                except Exception as e:  # a kernel that does not take this shape or mask
                    res[key] = dict(error=f"{type(e).__name__}: {e}"[:200])
        return dict(spec, status="ok", decode_queries=Lq, decode_keys=S, kernels=res)

    def run_spec(self, spec: dict) -> dict:
        try:
            if spec["kind"] == "generate":
                if spec["impl"] == "released" and not isinstance(self.released, tuple):
                    return dict(spec, status="error", error=f"released code unavailable: {self.released}")
                return self.generate_row(spec)
            if spec["kind"] == "e2e":
                return self.e2e_row(spec)
            return self.attention_rows(spec)
        except Exception as e:
            status = "oom" if is_oom(e) else "error"
            msg = f"{type(e).__name__}: {e}"
            return dict(spec, status=status, error=msg[:300] if status == "oom" else msg[:2000],
                        traceback=None if status == "oom" else traceback.format_exc()[-3000:])
        finally:
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ output
    def write(self) -> None:
        if not self.args.json:
            return
        doc = dict(meta=self.meta, rows=self.rows, skipped=self.skipped, protocol_windows=self.windows,
                   protocol_estimate=protocol_estimates(self.rows, self.windows), quoted_not_remeasured=QUOTED,
                   released=self.released[2] if isinstance(self.released, tuple) else self.released,
                   same_inference_as=SAME_INFERENCE_AS,
                   elapsed_s=self.elapsed())
        path = Path(self.args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, path)


def describe(r: dict) -> str:
    if r["kind"] == "generate":
        head = f"{r['impl']:8s} {r['preset']:13s} {r['dtype']:4s} {r['variant']:15s} {r['context']:>4d}/{r['horizon']:<3d} b{r['batch']:<5d}"
        if r["status"] != "ok":
            return f"{head} {r['status'].upper()} {r.get('error', '')[:150]}"
        mem = f" peak {r['peak_row_gib']:5.1f} GiB" if "peak_row_gib" in r else ""
        comp = f" compile {r['compile_s']:5.1f}s" if r.get("compile_s") is not None else f" first {r['first_call_s']:5.1f}s"
        diff = f" diff {r['max_abs_diff']:.2e} vs {r['diff_vs']}" if "max_abs_diff" in r else ""
        return f"{head} {r['windows_per_s']:9,.0f} win/s  MFU {100 * r['mfu']:5.1f}%{mem}{comp}{diff}"
    if r["kind"] == "e2e":
        if r["status"] != "ok":
            return f"e2e {r.get('dataset')} {r['status'].upper()} {r.get('error', '')[:300]}"
        ratio = f" = {r['ratio_to_generate']:.2f} x generate-only" if "ratio_to_generate" in r else ""
        return (f"e2e      {r['preset']:13s} {r['dtype']:4s} {r['variant']:15s} {r['context']:>4d}/{r['horizon']:<3d} b{r['batch']:<5d}"
                f" {r['dataset']}: {r['windows']} windows in {r['seconds']:.1f}s = {r['windows_per_s']:,.0f} win/s{ratio}")
    if r["status"] != "ok":
        return f"sdpa {r['status']} {r.get('error', '')[:200]}"
    def kernels(decode: bool) -> str:
        return "  ".join(f"{k.split()[-1].split('_')[0].lower()} "
                         + (f"{v['ms']:.2f} ms {v['tflops']:.0f} TF/s" if "ms" in v else "n/a")
                         for k, v in r["kernels"].items() if k.startswith("decode ") == decode)

    line = f"sdpa     hd {r['head_dim']} b{r['batch']} T {r['context']}: {kernels(False)}"
    if "decode_queries" in r:
        line += f"\n         decode {r['decode_queries']} queries x {r['decode_keys']} keys: {kernels(True)}"
    return line


# Model shapes by name: the presets, plus every (family, size) of a sweep grid given with --grid,
# named "<family>-<size>" (e.g. "sparse_per_layer-s4"), so each family's inference cost is measured
# on the shape its trials trained. Families that differ only in how they were trained (the aux
# loss: TimeMoeConfig.same_forward) run the same forward: only the first is measured, the others
# name it in SAME_INFERENCE_AS.
GRID_SHAPES: dict[str, TimeMoeConfig] = {}
SAME_INFERENCE_AS: dict[str, str] = {}


def add_grid_shapes(config_yaml: str) -> list[str]:
    """Register the ``grid:`` section's shapes of a sweep YAML; returns the names to measure (one
    per distinct inference shape)."""
    grid = GridConfig.from_dict(yaml.safe_load(Path(config_yaml).read_text()).get("grid") or {}, config_yaml)
    measured: list[str] = []
    for family in grid.families:
        for size in grid.sizes:
            name = f"{family}-{size.name}"
            GRID_SHAPES[name] = model_config(grid, size, family)
            twin = next((m for m in measured if GRID_SHAPES[m].same_forward(GRID_SHAPES[name])), None)
            if twin is None:
                measured.append(name)
            else:
                SAME_INFERENCE_AS[name] = twin
    return measured


def model_shape(name: str) -> TimeMoeConfig:
    return GRID_SHAPES[name] if name in GRID_SHAPES else TimeMoeConfig.preset(name)


# ------------------------------------------------------------------------------ the plan
def build_plan(args) -> list[dict]:
    """Rows in order of importance (module docstring)."""
    main, extra_batches = args.batches[0], args.batches[1:]
    sparse = [p for p in args.presets if not model_shape(p).use_dense]
    dense = [p for p in args.presets if model_shape(p).use_dense]
    dtypes = sorted(args.dtypes, key=lambda d: d != "bf16")  # bf16 first
    main_v = [v for v in ("compiled", "eager") if v in args.variants]
    before = ["before"] if "before" in args.variants else []  # the same-machine baseline: cheap, early
    extra_v = [v for v in ("compiled-decode", "compiled-decode-auto") if v in args.variants]
    first_dtype = dtypes[0]

    def gen(preset, dtype, variant, T, H, B, tier, impl="ours"):
        return dict(kind="generate", impl=impl, preset=preset, dtype=dtype, variant=variant, context=T, horizon=H,
                    batch=B, tier=tier)

    plan = []
    for i, p in enumerate(sparse):
        plan += [gen(p, first_dtype, v, T, H, main, 1) for T, H in args.pairs for v in main_v + before]
        if i == 0 and args.e2e and args.benchmarks and main_v:
            name, pair = args.e2e
            plan.append(dict(kind="e2e", impl="ours", preset=p, dtype=first_dtype, variant=main_v[0], dataset=name,
                             context=pair[0], horizon=pair[1], batch=main, tier=1))
        if i == 0 and args.device.startswith("cuda") and args.attention_kernels:
            for hd, B in ((32, main), (64, max(main // 2, 1))):  # the 50M and 200M head dims
                plan += [dict(kind="sdpa", head_dim=hd, batch=B, context=T, horizon=H, tier=1) for T, H in args.pairs]
        if args.reference_dir and "bf16" in args.dtypes:
            plan += [gen(p, "bf16", "eager", T, H, main, 1, impl="released") for T, H in args.pairs]
    plan += [gen(p, first_dtype, v, T, H, main, 2) for p in sparse for T, H in args.pairs for v in extra_v]
    plan += [gen(p, d, v, T, H, main, 3) for d in dtypes[1:] for p in sparse for T, H in args.pairs for v in main_v]
    plan += [gen(p, d, v, T, H, main, 4) for d in dtypes for p in dense for T, H in args.pairs for v in main_v]
    plan += [gen(p, first_dtype, v, T, H, b, 5) for b in extra_batches for p in sparse for T, H in args.pairs for v in main_v]
    return plan


def parse_pair(s: str) -> tuple[int, int]:
    T, H = s.split("/")
    return int(T), int(H)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=None,
                    help="default: timemoe-50m timemoe-200m dense-50m dense-200m (none with --grid)")
    ap.add_argument("--grid", default=None, help="a sweep YAML: also measure its (family, size) shapes, named "
                    "<family>-<size>; with --presets left out, only those")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--variants", nargs="+", default=["compiled", "eager"], choices=list(VARIANTS))
    ap.add_argument("--pairs", nargs="+", type=parse_pair, default=list(PAPER_PAIRS), help="context/horizon, e.g. 512/96")
    ap.add_argument("--batches", nargs="+", type=int, default=[256, 512, 1024, 128],
                    help="the first is measured everywhere, the others last")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    ap.add_argument("--reference-dir", default=None, help="folder made by benchmarks/released_timemoe.sh")
    ap.add_argument("--benchmarks", default=None, help="benchmark CSV folder: window counts and the end-to-end check")
    ap.add_argument("--e2e", default="ETTh1:512/96", help="DATASET:CONTEXT/HORIZON for the end-to-end check, or none")
    ap.add_argument("--no-attention-kernels", dest="attention_kernels", action="store_false")
    ap.add_argument("--json", default=None, help="results, rewritten after every row")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test")
    ap.add_argument("--breakdown", action="store_true", help="per row of ours: the prefill's share of the time and a "
                    "profile of one call (kernel time by family, the GEMM + attention floor)")
    args = ap.parse_args(argv)
    grid_shapes = add_grid_shapes(args.grid) if args.grid else []
    args.presets = (args.presets or ([] if grid_shapes else ["timemoe-50m", "timemoe-200m", "dense-50m", "dense-200m"])
                    ) + grid_shapes
    args.e2e = None if args.e2e in (None, "", "none") else (args.e2e.split(":")[0], parse_pair(args.e2e.split(":")[1]))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("evaluate_gpu.py needs a CUDA GPU (or --device cpu for a smoke test)")

    bench = Bench(args)
    for name, twin in SAME_INFERENCE_AS.items():
        print(f"{name}: the same forward as {twin} (they differ only in training), measured once as {twin}")
    print(f"device {bench.meta['device']}, torch {torch.__version__}; protocol windows per pair "
          f"{bench.windows['per_pair']} (total {bench.windows['total']:,})", flush=True)
    if args.reference_dir:
        try:
            bench.released = import_released(Path(args.reference_dir).resolve())
            print(f"released Time-MoE code from {args.reference_dir}, transformers {bench.released[2]}", flush=True)
        except Exception as e:
            bench.released = f"{type(e).__name__}: {e}"[:500]
            print(f"released code cannot run: {bench.released}", flush=True)
    plan = build_plan(args)
    bench.write()
    shown_errors: set[str] = set()
    while plan:
        spec = plan.pop(0)
        if args.budget_s is not None:
            predicted = bench.predict_s(spec)
            if bench.elapsed() + predicted > args.budget_s:
                bench.skipped.append(dict(spec, predicted_s=round(predicted, 1)))
                continue
        bench.drop_unneeded([spec] + plan)
        row = bench.run_spec(spec)
        row["at_s"] = round(bench.elapsed(), 1)
        bench.rows.append(row)
        print(f"[{row['at_s']:6.0f}s] {describe(row)}", flush=True)
        if row["status"] == "error" and row.get("traceback") and row["error"][:120] not in shown_errors:
            shown_errors.add(row["error"][:120])  # each distinct failure's traceback once (all are in the JSON)
            print(row["traceback"], flush=True)
        if row["status"] == "oom" and spec["kind"] == "generate" and spec["batch"] // 2 >= 8 and spec["tier"] <= 4:
            plan.insert(0, dict(spec, batch=spec["batch"] // 2))  # every pair gets a number
        bench.write()

    print_summary(bench)
    bench.write()
    return 0


def print_summary(bench: Bench) -> None:
    print(f"\n{'code':8s} {'preset':13s} {'dtype':5s} {'variant':15s} " + " ".join(f"{k:>17s}" for k in bench.windows["per_pair"])
          + f" {'protocol min':>12s} {'+compile':>9s}")
    for e in protocol_estimates(bench.rows, bench.windows):
        cells = []
        for k in bench.windows["per_pair"]:
            c = e["per_pair"].get(k)
            cells.append(f"{c['windows_per_s']:8,.0f} b{c['batch']:<4d}{100 * c['mfu']:3.0f}%" if c else f"{'-':>17s}")
        total = f"{e['minutes']:12.1f}" if e["complete"] else f"{'(partial)':>12s}"
        floor = f"  floor {e['floor_minutes']:.1f} min" if "floor_minutes" in e else ""
        print(f"{e['impl']:8s} {e['preset']:13s} {e['dtype']:5s} {e['variant']:15s} " + " ".join(cells)
              + f" {total} {e['minutes_with_compile'] - e['minutes']:8.1f}m{floor}")
    broken = [r for r in bench.rows if r.get("breakdown")]
    if broken:
        print("\nwhere the time goes (one call; kernel ms by family; floor = GEMM + attention kernels / wall):")
        for r in broken:
            b = r["breakdown"]
            fam = "  ".join(f"{k} {v:.0f}" for k, v in b["profile"].get("kernel_ms_per_step", {}).items())
            floor = f"  floor {100 * b['floor_share']:.0f}%" if "floor_share" in b else ""
            print(f"  {r['preset']:13s} {r['variant']:15s} {r['context']}/{r['horizon']} b{r['batch']}: prefill "
                  f"{100 * b['prefill_share']:.0f}% of {1e3 * r['batch_s_median']:.0f} ms; busy "
                  f"{100 * b['profile'].get('busy_share', 0):.0f}%; {fam}{floor}")
    if not isinstance(bench.released, tuple):
        print("\nreleased Time-MoE code NOT re-measured here; earlier numbers (windows/s):")
        for name, v in QUOTED.items():
            print(f"  {name}: {v}")
    if bench.skipped:
        print(f"\n{len(bench.skipped)} row(s) not started (budget {bench.args.budget_s}s)")


if __name__ == "__main__":
    sys.exit(main())
