"""``pipeline.train.loop.BatchStream``: the read-ahead thread hides the start-up of the next
epoch's reader behind the steps on the current one, keeps the data position exact, opens no
epoch that the run will not read, and still names an empty train split."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from pipeline.train.data import DataPosition
from pipeline.train.loop import BatchStream


class SlowStartEpochs:
    """Epochs of ``n`` numbered batches whose first batch takes ``startup_s`` (a new reader)."""

    def __init__(self, n: int, startup_s: float) -> None:
        self.n, self.startup_s, self.opened = n, startup_s, []

    def train_epoch(self, epoch: int, skip: int):
        self.opened.append((epoch, skip, threading.current_thread() is threading.main_thread()))

        def gen():
            time.sleep(self.startup_s)
            for i in range(skip, self.n):
                yield {"x": torch.tensor([epoch * 100 + i])}
        return gen()


def _drain(stream: BatchStream, count: int, step_s: float) -> tuple[list[int], list[float], list[DataPosition]]:
    values, waits, positions = [], [], []
    for _ in range(count):
        values.append(int(stream.next()["x"]))
        waits.append(stream.take_wait())
        positions.append(DataPosition(**vars(stream.pos)))
        time.sleep(step_s)  # the step's own work, during which the thread reads ahead
    return values, waits, positions


def test_next_epoch_start_up_overlaps_the_steps_and_the_position_is_exact():
    rt = SlowStartEpochs(n=6, startup_s=0.3)
    stream = BatchStream(rt, DataPosition(0, 2), torch.device("cpu"), lookahead=8, limit=12)
    values, waits, positions = _drain(stream, 12, step_s=0.1)
    assert values == [2, 3, 4, 5, 100, 101, 102, 103, 104, 105, 200, 201]  # resumed at batch 2 of epoch 0
    assert [(p.epoch, p.batches) for p in positions][3:5] == [(0, 6), (1, 1)]
    assert positions[-1] == DataPosition(2, 2)
    # epoch 0's start-up is paid once; later epochs start while earlier batches are being stepped on
    assert max(waits[1:]) < 0.1, waits
    assert [(e, s) for e, s, _ in rt.opened] == [(0, 2), (1, 0), (2, 0)]  # no epoch 3: the run ends in epoch 2
    assert not any(main for _, _, main in rt.opened)  # opened by the read-ahead thread


def test_without_lookahead_the_step_pays_each_start_up():
    rt = SlowStartEpochs(n=3, startup_s=0.2)
    stream = BatchStream(rt, DataPosition(0, 0), torch.device("cpu"), lookahead=0, limit=6)
    values, waits, _ = _drain(stream, 6, step_s=0.0)
    assert values == [0, 1, 2, 100, 101, 102]
    assert waits[3] >= 0.2 and all(main for _, _, main in rt.opened)
    with pytest.raises(RuntimeError, match="more batches than the run needs"):
        stream.next()


@pytest.mark.parametrize("lookahead", [0, 4])
def test_an_epoch_without_a_batch_is_named(lookahead):
    stream = BatchStream(SlowStartEpochs(n=0, startup_s=0.0), DataPosition(0, 0), torch.device("cpu"), lookahead, limit=3)
    with pytest.raises(RuntimeError, match="fewer windows than micro_batch_size x workers"):
        stream.next()
