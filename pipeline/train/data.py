"""Packed shards -> training batches, two ways with one output and one notion of position.

- ``loader: ray``: the driver builds Ray Datasets over ``train/`` and ``val/``
  (:func:`ray_datasets`); Ray Train splits them across workers; each worker turns its shard
  into torch batches with ``iter_torch_batches`` and prefetching (:func:`ray_batches`).
  Order is made deterministic (``preserve_order``, no locality hints) so a resumed run sees
  the same batches: the split hands each block to the worker with the fewest rows so far.
- ``loader: plain``: every worker reads the shards itself with pyarrow (:class:`PlainReader`);
  used under ``torchrun`` without Ray, and as the reference order in tests.

Position = (epoch, batches consumed in that epoch). On resume the first ``batches`` batches of
the epoch are skipped (read and dropped), which is exact because the order is deterministic.

Legend: B windows per micro-batch, L = window length, W = L + 1 points stored per row.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.console import progress_bars
from preprocessing.schema import MANIFEST_FILE, TRAIN_DIR, VAL_DIR, decode_batch, list_shards, split_windows
from preprocessing.storage import resolve_filesystem

COLUMNS = ["values", "segment_ids", "loss_mask"]


@dataclass
class DataPosition:
    epoch: int = 0
    batches: int = 0  # micro-batches this worker consumed in ``epoch``


def shard_files(data_path: str, split: str) -> list[str]:
    """The shard URLs of ``split`` in the order the packed run's manifest lists them (the manifest
    is written last, so a half-written run is never read); the training split must not be empty."""
    files = list_shards(data_path, split)
    if not files and split == TRAIN_DIR:
        raise FileNotFoundError(f"{data_path}/{MANIFEST_FILE} lists no training shards")
    return files


def to_torch_batch(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Shard rows (numpy or Arrow columns) -> model inputs, all ``[B, L]`` tensors."""
    arrays = split_windows(**decode_batch(batch))
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


# ---------------------------------------------------------------------------- Ray Data


def ray_datasets(data_path: str) -> dict[str, Any]:
    """``{"train": Dataset, "val": Dataset}`` (val omitted when there is no val/ split)."""
    import ray.data

    out = {}
    for split in (TRAIN_DIR, VAL_DIR):
        files = shard_files(data_path, split)
        if files:
            # File order is the shard order; one read task per file keeps blocks deterministic.
            # select_columns is the projection Ray Data 2.60 pushes into the read (``columns=``
            # is deprecated there).
            out[split] = ray.data.read_parquet(files, shuffle=None).select_columns(COLUMNS)
            # Live bars only on a terminal: redrawn into a file they were most of a job's log.
            out[split].context.enable_progress_bars = progress_bars()
    return out


def ray_data_config() -> Any:
    """Deterministic splitting: order preserved, no locality-driven block assignment."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(execution_options=ExecutionOptions(preserve_order=True), enable_shard_locality=False)


def _arrow_collate() -> Any:
    """``iter_torch_batches``'s collate step as the class Ray asks for (a plain function is
    deprecated since Ray 2.47): the batch stays an Arrow table, decoded by the same
    ``to_torch_batch`` as the plain reader's batches, without a detour through numpy."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class ShardRowsToTorch(ArrowBatchCollateFn):
        def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
            return to_torch_batch({c: batch.column(c) for c in COLUMNS})

    return ShardRowsToTorch()


def ray_batches(shard: Any, micro_batch_size: int, prefetch_batches: int) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of this worker's Ray Data shard as torch batches (incomplete tail dropped so
    every worker takes the same number of steps)."""
    return iter(
        shard.iter_torch_batches(
            batch_size=micro_batch_size,
            prefetch_batches=prefetch_batches,
            drop_last=True,
            collate_fn=_arrow_collate(),
        )
    )


# ---------------------------------------------------------------------------- plain reader


class PlainReader:
    """Deterministic per-worker reader: epoch ``e`` visits the shards in a permutation seeded
    by ``(seed, e)``; consecutive groups of ``world * B`` rows form one step, rank r takes rows
    ``[r*B, (r+1)*B)`` of each group."""

    def __init__(self, files: list[str], micro_batch_size: int, rank: int, world: int, seed: int, shuffle: bool = True):
        if not files:
            raise FileNotFoundError("PlainReader got no shard files")
        self.files, self.b, self.rank, self.world = files, micro_batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle

    def _file_order(self, epoch: int) -> list[str]:
        if not self.shuffle:
            return list(self.files)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
        return [self.files[i] for i in perm]

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict[str, Any]]:
        group = self.b * self.world
        pending: list[pa.Table] = []
        n_pending, index = 0, 0
        for shard in self._file_order(epoch):
            fs, path = resolve_filesystem(shard)
            with fs.open_input_file(path) as f:
                pending.append(pq.read_table(f, columns=COLUMNS))
            n_pending += pending[-1].num_rows
            if n_pending < group:
                continue
            table = pa.concat_tables(pending)
            start = 0
            while table.num_rows - start >= group:
                if index >= skip_batches:
                    rows = table.slice(start + self.rank * self.b, self.b)
                    yield {c: rows.column(c) for c in COLUMNS}
                index += 1
                start += group
            pending = [table.slice(start)]
            n_pending = pending[0].num_rows


def prefetched(make: Callable[[], Iterator[Any]], depth: int) -> Iterator[Any]:
    """Run an iterator (reading + decoding) in a background thread, ``depth`` items ahead."""
    if depth <= 0:
        yield from make()
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for item in make():
                q.put(item)
        except BaseException as err:  # surfaced in the consumer
            q.put(err)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def plain_batches(reader: PlainReader, epoch: int, skip: int, prefetch_batches: int) -> Iterator[dict[str, torch.Tensor]]:
    return prefetched(lambda: (to_torch_batch(b) for b in reader.epoch(epoch, skip)), prefetch_batches)
