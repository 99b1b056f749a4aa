"""Unit tests of the training config, the LR schedule, AdamW groups and the DeepSpeed config."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig, load_config
from pipeline.parallel.deepspeed_config import deepspeed_config
from pipeline.parallel.optim import FiniteStepAdamW, build_optimizer, build_scheduler, lr_multiplier, param_groups


def reference_lr(step: int, peak: float, warmup: int, total: int, floor_ratio: float) -> float:
    """Slow, literal statement of the schedule: linear ramp to the peak, cosine to the floor."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / (total - warmup)
    t = min(t, 1.0)
    floor = peak * floor_ratio
    return floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2


def test_lr_schedule_matches_reference_through_deepspeed_style_stepping():
    cfg = TrainConfig().optim
    cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio = 1e-3, 10, 0.1
    total = 50
    opt = build_optimizer([{"params": [nn.Parameter(torch.zeros(2))], "weight_decay": 0.0}], cfg)
    sched = build_scheduler(opt, cfg, total)
    seen = []
    for step in range(total + 5):
        seen.append(opt.param_groups[0]["lr"])  # lr used by optimizer step `step`
        opt.step()
        sched.step()
    expected = [reference_lr(s, 1e-3, 10, total, 0.1) for s in range(total + 5)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[0] == pytest.approx(1e-4)  # warm-up starts above zero: step 1 already learns
    assert max(seen) == pytest.approx(1e-3)
    assert seen[-1] == pytest.approx(1e-4)  # the floor holds after max_steps


def test_lr_multiplier_without_warmup_starts_at_peak():
    assert lr_multiplier(0, 0, 100, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(50, 0, 100, 0.1) == pytest.approx(0.55)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)  # weight decays, bias does not
        self.norm = nn.LayerNorm(4)  # neither decays
        self.experts = nn.Parameter(torch.zeros(2, 4, 4))  # 3-D expert stack decays
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)


def test_no_decay_on_norms_and_biases():
    m = Tiny()
    groups = {g["name"]: g for g in param_groups(m, 0.1)}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["decay"]["params"]) == ids([m.proj.weight, m.experts])
    assert ids(groups["no_decay"]["params"]) == ids([m.proj.bias, m.norm.weight, m.norm.bias])
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    opt = build_optimizer(list(groups.values()), TrainConfig().optim)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 1e-3


def test_config_yaml_overrides_and_flat_params(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {max_steps: 7, global_batch_size: 16}\noptim: {betas: [0.8, 0.9]}\n")
    cfg = load_config(path, ["train.max_steps=20", "parallel.zero_stage=2", "model.overrides.num_experts=4"])
    assert cfg.train.max_steps == 20 and cfg.parallel.zero_stage == 2 and cfg.optim.betas == (0.8, 0.9)
    flat = cfg.flat()
    assert flat["train.max_steps"] == 20 and flat["model.overrides.num_experts"] == 4
    # Round trip through YAML keeps everything.
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(again).to_dict() == cfg.to_dict()
    # Step counts may change on resume; the model may not.
    assert load_config(again, ["train.max_steps=99"]).fingerprint() == cfg.fingerprint()
    assert load_config(again, ["optim.lr=0.5"]).fingerprint() != cfg.fingerprint()


@pytest.mark.parametrize("override, message, blamed", [
    # a typo in an override is the override's fault, not the file's
    ("train.max_stepz=3", "unknown key 'max_stepz' in section 'train' (did you mean 'max_steps'?)", "override"),
    ("train.max_steps=many", "train.max_steps: expected int, got 'many'", "override"),
    # cross-field rules name the file and the overrides that were applied
    ("parallel.zero_stage=5", "zero_stage must be 0..3", "both"),
    ("parallel.ep_size=2", "needs ZeRO stage 1 or 2", "both"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be >= 0", "both"),
])
def test_config_errors_name_their_source_and_reason(tmp_path, override, message, blamed):
    path = tmp_path / "bad.yaml"
    path.write_text("parallel: {zero_stage: 3}\n" if "ep_size" in override else "{}\n")
    with pytest.raises(ValueError) as err:
        load_config(path, [override])
    text = str(err.value)
    assert message in text
    assert f"override {override!r}" in text or blamed == "both"
    assert (str(path) in text) == (blamed == "both"), text


def test_deepspeed_config_batch_geometry_and_precision():
    cfg = TrainConfig()
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 64, 4
    accum = cfg.grad_accum_steps(world_size=4)
    assert accum == 4
    ds = deepspeed_config(cfg.parallel, cfg.train, cfg.optim, 4, accum, use_gpu=False)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is False  # auto = fp32 on CPU
    assert deepspeed_config(cfg.parallel, cfg.train, cfg.optim, 4, accum, use_gpu=True)["bf16"]["enabled"]
    with pytest.raises(ValueError, match="not a multiple"):
        cfg.grad_accum_steps(world_size=3)


def test_gpu_bf16_config_leaves_the_nonfinite_check_to_the_optimizer_and_hooks_to_several_workers():
    cfg = TrainConfig()
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 4
    one = deepspeed_config(cfg.parallel, cfg.train, cfg.optim, 1, 2, use_gpu=True)
    two = deepspeed_config(cfg.parallel, cfg.train, cfg.optim, 2, 1, use_gpu=True)
    cpu = deepspeed_config(cfg.parallel, cfg.train, cfg.optim, 1, 2, use_gpu=False)
    assert one["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert cpu["bf16"]["check_grad_overflow"] is True  # fp32 on CPU: DeepSpeed's own skip stays
    assert not one["zero_optimization"]["overlap_comm"] and not one["zero_optimization"]["contiguous_gradients"]
    assert two["zero_optimization"]["overlap_comm"] and two["zero_optimization"]["contiguous_gradients"]


def _reference_adamw_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int,
                          lr: float, betas: tuple[float, float], eps: float, wd: float) -> None:
    """AdamW as the paper writes it, one tensor, in place (decoupled decay before the update)."""
    p.mul_(1 - lr * wd)
    m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
    p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def test_finite_step_adamw_matches_adamw_and_skips_a_nonfinite_step_exactly():
    torch.manual_seed(0)
    cfg = TrainConfig().optim
    w = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = build_optimizer([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], cfg,
                          skip_nonfinite_on_device=True)
    assert isinstance(opt, FiniteStepAdamW) and opt.defaults["fused"]
    ref = {name: [t.detach().clone(), torch.zeros_like(t), torch.zeros_like(t), 0, wd]
           for name, t, wd in (("w", w, 0.1), ("b", b, 0.0))}
    grads = [torch.randn(5, 3, dtype=torch.float64) for _ in range(4)]
    for k, gw in enumerate(grads):
        if k == 2:
            gw = gw.clone()
            gw[1, 1] = float("nan")  # one bad value anywhere: the whole step is skipped
        w.grad, b.grad = gw, torch.full((3,), 0.5 * (k + 1), dtype=torch.float64)
        opt.step()
        if k == 2:
            assert opt.found_inf.item() == 1.0
            continue
        for name, g in (("w", gw), ("b", b.grad)):
            r = ref[name]
            r[3] += 1
            _reference_adamw_step(r[0], g, r[1], r[2], r[3], cfg.lr, tuple(cfg.betas), cfg.eps, r[4])
    torch.testing.assert_close(w.detach(), ref["w"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.detach(), ref["b"][0], rtol=1e-12, atol=1e-12)
    # the skipped step left the step count and the moments as after three real steps
    assert float(opt.state[w]["step"]) == 3.0
    torch.testing.assert_close(opt.state[w]["exp_avg"], ref["w"][1], rtol=1e-12, atol=1e-12)


def test_finite_step_adamw_skips_every_group_when_the_global_norm_is_not_finite():
    """DeepSpeed's way: one group at a time, finite groups' gradients zeroed by the clip when the
    global norm is NaN. No group may move, and a finite norm lets both step."""
    cfg = TrainConfig().optim
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = build_optimizer([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], cfg,
                          skip_nonfinite_on_device=True)
    norm = {"value": torch.tensor(1.0)}
    opt.global_grad_norm = lambda: norm["value"]

    def ds_style_step(ga, gb):
        a.grad, b.grad = ga, gb
        groups = opt.param_groups
        for g in groups:
            opt.param_groups = [g]
            opt.step()
        opt.param_groups = groups

    ds_style_step(torch.full((3,), 0.5), torch.full((2,), 0.5))  # a real step: both move
    before = a.detach().clone(), b.detach().clone(), opt.state[b]["exp_avg"].clone()
    assert not torch.equal(before[0], torch.ones(3)) and not torch.equal(before[1], torch.ones(2))
    norm["value"] = torch.tensor(float("nan"))
    ds_style_step(torch.tensor([0.0, float("nan"), 0.0]), torch.zeros(2))  # b's gradient zeroed by the clip
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    assert torch.equal(opt.state[b]["exp_avg"], before[2]) and float(opt.state[b]["step"]) == 1.0


def test_init_from_loads_checkpoint_weights_and_checks_the_shape(tmp_path):
    from model import TimeMoeConfig, TimeMoeModel
    from pipeline.config import ModelSection
    from pipeline.parallel.parallelize import build_model

    torch.manual_seed(5)
    saved = TimeMoeModel(TimeMoeConfig.preset("tiny"))
    saved.save_pretrained(tmp_path / "ckpt")
    fresh = build_model(ModelSection(preset="tiny"), seed=0)
    started = build_model(ModelSection(preset="tiny", init_from=str(tmp_path / "ckpt"),
                                       overrides={"router_aux_loss_scope": "per_layer", "attention_dropout": 0.1}), seed=0)
    assert started.config.router_aux_loss_scope == "per_layer"  # run-time fields come from the run
    assert started.config.attention_dropout == 0.1  # training-only fields too (TimeMoeConfig's list)
    for name, w in saved.state_dict().items():
        torch.testing.assert_close(started.state_dict()[name], w, msg=name)
    name = "model.layers.0.ffn_layer.router.weight"
    assert not torch.equal(fresh.state_dict()[name], saved.state_dict()[name])  # not vacuous
    with pytest.raises(ValueError, match=r"hidden_size=64.*differ from model.preset='tiny'.*hidden_size=32"):
        build_model(ModelSection(preset="tiny", init_from=str(tmp_path / "ckpt"), overrides={"hidden_size": 32}), seed=0)


def test_float_keys_accept_exponents_without_a_dot_and_reject_words(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; it used to reach torch.optim.AdamW as one
    cfg = load_config(None, ["optim.lr=1e-4", "optim.weight_decay=0"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 3e-4\n")
    assert load_config(tmp_path / "c.yaml").optim.lr == 3e-4
    with pytest.raises(ValueError, match="optim.lr: expected float, got 'fast'"):
        load_config(None, ["optim.lr=fast"])


def test_expert_imbalance_per_expert_and_per_ep_rank():
    from pipeline.train.loop import expert_imbalance

    # layer 0: all tokens on experts 0 and 1; layer 1: perfectly balanced (4 experts)
    counts = torch.tensor([[5, 5, 0, 0], [3, 3, 3, 3]])
    assert expert_imbalance(counts) == pytest.approx([2.0, 1.0])
    # ep = 2: experts {0,1} on rank 0 -> rank 0 does all of layer 0's expert work
    assert expert_imbalance(counts, experts_per_group=2) == pytest.approx([2.0, 1.0])
    # experts 0 and 2 hot: per expert still 2.0, but spread over the two EP ranks
    assert expert_imbalance(torch.tensor([[5, 0, 5, 0]]), experts_per_group=2) == pytest.approx([1.0])


def test_step_clock_eta_ignores_the_slow_first_steps():
    """A run whose first step compiles for 60 s and then steps at 0.5 s: the ETA after 5 steps is
    the steady pace times the steps left, not the mean since the start (~12.4 s per step)."""
    from pipeline.train.loop import StepClock, _fmt_eta

    clock = StepClock(window=20, start=0.0)
    assert _fmt_eta(clock.eta_s(100)) == "?"  # nothing measured yet
    t = 60.0
    clock.tick(t)
    for _ in range(4):
        t += 0.5
        clock.tick(t)
    assert clock.eta_s(195) == pytest.approx(0.5 * 195)
    assert _fmt_eta(clock.eta_s(195)) == "0:01:37"
    for _ in range(30):  # the pace changes (say, a slower data source): the window follows it
        t += 2.0
        clock.tick(t)
    assert clock.eta_s(10) == pytest.approx(20.0)


def test_step_clock_returns_the_time_between_step_ends():
    """The loop logs ``step_interval_s`` from ``tick``: the first interval counts from the clock's
    start (compilation included), the next ones from the previous step's end."""
    from pipeline.train.loop import StepClock

    clock = StepClock(window=20, start=10.0)
    assert clock.tick(70.0) == pytest.approx(60.0)
    assert clock.tick(70.25) == pytest.approx(0.25)
    assert clock.tick(71.0) == pytest.approx(0.75)


def test_step_line_pace_is_the_median_of_the_steps_since_the_last_line():
    """The step line's points/s, step time and time apart are medians over the steps since the
    previous line (one slow step does not move them; the final evaluation's entry is skipped)."""
    from pipeline.train.loop import pace_since

    history = [{"step": s, "points_per_s": 1000.0 * s, "step_time_s": 0.1, "step_interval_s": 0.1} for s in range(1, 6)]
    history += [{"step": s, "points_per_s": 500.0, "step_time_s": 0.2, "step_interval_s": 0.3} for s in range(6, 10)]
    history.append({"step": 10, "points_per_s": 1e9, "step_time_s": 5.0, "step_interval_s": 9.0})  # a checkpoint
    history.append({"step": 10, "eval_loss": 0.5})  # the final evaluation
    pts, step_s, apart_s = pace_since(history, since_step=5)
    assert (pts, step_s, apart_s) == (500.0, 0.2, 0.3)
    assert pace_since(history, since_step=0)[0] == 1500.0  # median of 500 x4, 1000..5000 and 1e9
    assert all(math.isnan(v) for v in pace_since(history, since_step=10))
