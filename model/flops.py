"""Parameter counts, training and inference FLOPs: the ONE place every later part takes FLOPs from.

Training FLOPs per point (token), forward + backward, as in the Time-MoE spec (section 7) and
nanoGPT/PaLM:

- every weight matrix W [m, n] touched by a token costs 2mn FLOPs forward (multiply + add) and
  4mn backward (grad of the input and of the weight): 6 FLOPs per ACTIVE parameter. Active =
  all parameters minus the routed experts a token does not visit (E - k per MoE layer). The
  output heads are all computed in training, so they count.
- attention scores and the weighted sum of values have no parameters. Per layer, query t
  costs ``2 * t * D`` (q k^T) + ``2 * t * D`` (p v) forward. Counted over the full L x L
  window (as PaLM/nanoGPT do, ignoring the causal half) that is ``4 * L * D`` forward per
  point; backward is twice that, so ``12 * L * D``. With the causal half skipped by the kernel
  it is ``6 * L * D``, the term the spec uses: ``6 * layers * L * D``.

So ``flops_per_point = 6 * N_active + 6 * num_layers * L * D`` and
``MFU = flops_per_point * points_per_second / peak_flops`` (peak 989e12 = H100 dense bf16),
which keeps our MFU comparable with the spec's published figures.

Inference (``generate``, forward only, KV cache) is counted per window in
:func:`generate_flops_per_window`; inference MFU = ``flops_per_window * windows/s / peak``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import TimeMoeConfig

H100_BF16_PEAK_FLOPS = 989e12
# dense bf16 tensor-core peak per GPU, by a substring of torch.cuda.get_device_name(): the MFU
# denominator (the H200 has the H100's compute, with more and faster memory)
PEAK_BF16_FLOPS = {"H100": H100_BF16_PEAK_FLOPS, "H200": H100_BF16_PEAK_FLOPS, "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name``, None for a GPU not in the table."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int


def count_parameters(config: TimeMoeConfig) -> ParamCounts:
    """Count on the meta device (nothing is allocated, so the 2.4B preset costs nothing)."""
    from model.modeling import TimeMoeModel

    with torch.device("meta"):
        model = TimeMoeModel(config)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    if not config.use_dense:
        per_expert = 3 * config.hidden_size * config.expert_intermediate_size
        inactive = config.num_hidden_layers * (config.num_experts - config.num_experts_per_tok) * per_expert
    return ParamCounts(total=total, active=total - inactive)


def training_flops_per_point(config: TimeMoeConfig, window_length: int) -> float:
    """Forward + backward FLOPs per input point: ``6 * N_active + 6 * layers * L * D``."""
    n_active = count_parameters(config).active
    return float(6 * n_active + 6 * config.num_hidden_layers * window_length * config.hidden_size)


def generate_flops_per_window(config: TimeMoeConfig, context: int, horizon: int) -> float:
    """Forward FLOPs of one ``TimeMoeModel.generate`` call for one window, with the KV cache.

    The greedy schedule ``s_1..s_n = horizon_schedule(horizon)`` makes n forwards: the prefill of
    the ``context`` points, then step j > 1 feeds the ``s_{j-1}`` values the previous step
    predicted (the last step's values are never fed). A forward of ``m`` new tokens after ``c``
    cached ones costs

        2 * N_body * m                        (every weight a token visits: 2 FLOPs/parameter)
      + 4 * layers * D * (m*c + m*(m+1)/2)    (q k^T and p v, 2 FLOPs each per query-key pair and
                                               hidden unit; query i sees the c cached keys and
                                               the new ones up to itself: causal, not m x (c+m))

    where ``N_body`` = active parameters minus the output heads (k of E routed experts, the
    shared expert, router, norms, biases, embedding). In every forward the last layer computes
    keys and values for all ``m`` new positions but everything else (query, attention, output
    projection, FFN) for the last position only (``TimeMoeDecoder``): its other active
    parameters, and the final norm's, are visited by one token, and its one query sees the
    ``c + m`` keys. The heads run
    once per step on the last position only, one head of width s_j: ``2 * D * s_j``.
    Elementwise work (norms, RoPE, softmax, SwiGLU products) is not counted, as usual for MFU."""
    from model.forecast import horizon_schedule

    D, NL = config.hidden_size, config.num_hidden_layers
    n_body = count_parameters(config).active - D * config.input_size * sum(config.horizon_lengths)
    layer_active, layer_kv = _layer_parameters(config)
    steps = horizon_schedule(horizon, config.horizon_lengths)
    flops, cached = 0.0, 0
    for new in [context] + steps[:-1]:
        flops += 2 * n_body * new + 4 * NL * D * (new * cached + new * (new + 1) / 2)
        if NL:  # the last layer (and final norm): one position past its keys/values
            flops -= (2 * (layer_active - layer_kv + D) * (new - 1)
                      + 4 * D * (new * cached + new * (new + 1) / 2 - (cached + new)))
        cached += new
    return float(flops + sum(2 * D * config.input_size * s for s in steps))


def _layer_parameters(config: TimeMoeConfig) -> tuple[int, int]:
    """One decoder layer's active parameters, and those of its key/value projections."""
    from model.modeling import DecoderLayer

    with torch.device("meta"):
        layer = DecoderLayer(config)
    inactive = 0
    if not config.use_dense:
        inactive = (config.num_experts - config.num_experts_per_tok) * 3 * config.hidden_size * config.expert_intermediate_size
    kv_rows = 2 * config.num_key_value_heads * config.head_dim
    return sum(p.numel() for p in layer.parameters()) - inactive, kv_rows * (config.hidden_size + 1)


def mfu(points_per_second: float, config: TimeMoeConfig, window_length: int, peak_flops: float = H100_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilisation (0..1) of a training run at ``points_per_second``."""
    return training_flops_per_point(config, window_length) * points_per_second / peak_flops
