"""Resume reads DeepSpeed's pickled checkpoint files with ``weights_only=True``: the files this
pipeline writes load, a crafted file that would run code on unpickling is refused before it runs."""
from __future__ import annotations

import os

import pytest
import torch

from pipeline.train.checkpoint import UntrustedCheckpointError, safe_torch_load


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_deepspeed_objects_load_and_code_does_not_run(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = tmp_path / "optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                         "fp32": [torch.arange(4.0)]}, "ds_version": "0.19.8"}, good)
    state = safe_torch_load(good, "cpu")
    assert state["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum.gradients
    assert torch.equal(state["optimizer_state_dict"]["fp32"][0], torch.arange(4.0))

    marker = tmp_path / "code-ran"
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _RunsCode(str(marker))}, evil)
    with pytest.raises(UntrustedCheckpointError, match=f"{evil}: refused to load"):
        safe_torch_load(evil, "cpu")
    assert not marker.exists()
