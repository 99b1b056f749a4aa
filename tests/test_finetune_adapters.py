"""Fine-tuning methods applied from outside: LoRA starts at the pretrained model, its forward
equals the model with merged weights W + (alpha/r) B A computed independently, only the intended
weights train, and the merged model exports in the published layout."""
from __future__ import annotations

import copy

import pytest
import torch

from model import TimeMoeConfig, TimeMoeModel
from pipeline.config import FinetuneSection
from pipeline.train.adapters import apply_finetune_method, merge_lora, merged_state_dict


def _model(preset: str = "tiny", seed: int = 0) -> TimeMoeModel:
    torch.manual_seed(seed)
    return TimeMoeModel(TimeMoeConfig.preset(preset)).eval()


def _inputs(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 48, generator=g).cumsum(1) / 5


def test_lora_starts_exactly_at_the_pretrained_model():
    base, lora = _model(), _model()
    apply_finetune_method(lora, FinetuneSection(method="lora", lora_rank=4))
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(lora(x).predictions[1], base(x).predictions[1], rtol=0, atol=0)


def test_lora_forward_equals_independently_merged_weights():
    """Perturb every B, then build the reference by adding scale * B @ A to a copy of the plain
    model's weights by name (no parametrization involved)."""
    base, lora = _model(), _model()
    section = FinetuneSection(method="lora", lora_rank=3, lora_alpha=6.0)
    apply_finetune_method(lora, section)
    deltas = {}
    with torch.no_grad():
        for name, module in lora.named_modules():
            if torch.nn.utils.parametrize.is_parametrized(module):
                for pname, plist in module.parametrizations.items():
                    d = plist[0]
                    d.B.normal_(0, 0.05)
                    deltas[f"{name}.{pname}"] = (section.lora_alpha / section.lora_rank) * (d.B @ d.A)
    assert any(".experts." in k for k in deltas) and any("qkv_proj" in k for k in deltas)
    assert any("shared_expert" in k for k in deltas)
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for key, delta in deltas.items():
            dict(ref.named_parameters())[key].add_(delta)
    x = _inputs(2)
    with torch.no_grad():
        for h, pred in lora(x).predictions.items():
            torch.testing.assert_close(pred, ref(x).predictions[h], rtol=1e-5, atol=1e-6)
    # merged: a plain model (published layout) with the same forward
    merged = merge_lora(lora)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x).predictions[1], ref(x).predictions[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["full", "linear_probe", "lora"])
def test_only_the_intended_weights_train(method):
    model = _model()
    total = sum(p.numel() for p in model.parameters())
    counts = apply_finetune_method(model, FinetuneSection(method=method, lora_rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if method == "full":
        assert counts == {"trainable": total, "frozen": 0}
    elif method == "linear_probe":
        assert trainable == {"heads.weight"} and counts["trainable"] == model.heads.weight.numel()
    else:
        assert "heads.weight" in trainable
        assert all(n == "heads.weight" or n.endswith((".A", ".B")) for n in trainable), trainable
        assert not any(n.endswith(".original") for n in trainable)
        assert counts["trainable"] < 0.2 * counts["frozen"]
    # one optimizer step changes exactly the trainable weights
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = _inputs(3)
    model.train()
    model(x[:, :-1], labels=x[:, 1:]).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    if method == "lora":  # B starts at zero: the first step moves B (and heads), not A
        assert changed and changed <= trainable
    else:
        assert changed == trainable


def test_bad_method_and_rank_are_refused():
    with pytest.raises(ValueError, match="finetune.method 'adapters'"):
        apply_finetune_method(_model(), FinetuneSection(method="adapters"))
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        apply_finetune_method(_model(), FinetuneSection(method="lora", lora_rank=0))


def test_merged_state_dict_is_the_merged_model_under_plain_keys():
    """What the export saves from a LoRA run's (gathered) state dict equals merging the modules."""
    lora = _model()
    section = FinetuneSection(method="lora", lora_rank=2, lora_alpha=4.0)
    apply_finetune_method(lora, section)
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    state = merged_state_dict({k: v.clone() for k, v in lora.state_dict().items()}, section)
    merged = merge_lora(lora).state_dict()
    assert set(state) == set(merged)
    for k in merged:
        torch.testing.assert_close(state[k], merged[k], rtol=1e-6, atol=1e-7, msg=k)
