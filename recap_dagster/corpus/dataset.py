"""Shards as a torch ``IterableDataset``: DataLoader workers read and decode the records
while the model works (recaptioning, the latent cache)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, TypeVar

import torch.utils.data
from PIL import Image

from recap_dagster.corpus.decoding import DEFAULT_MAX_PIXELS
from recap_dagster.corpus.reading import LaionRecord, Select, iter_shard_selected
from recap_dagster.training.per_device import dataloader_worker_init

#: What a consumer makes of one ShardBatch (captioned rows, encoded latents).
Part = TypeVar("Part")

# --------------------------------------------------------------------------------- torch


class ShardDataset(torch.utils.data.IterableDataset):
    """Records of several shards, for a DataLoader that decodes in worker processes.

    Workers split by shard when there are at least as many shards as workers; otherwise each
    worker reads every shard but builds and decodes only records ``i`` with
    ``i % num_workers == worker_id``. ``transform`` is applied to decoded images.
    Use ``collate_fn=collate_records``.
    """

    def __init__(
        self,
        root_url: str,
        keys: Iterable[str],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        super().__init__()
        self.root_url = root_url
        self.keys = list(keys)
        self.max_pixels = max_pixels
        self.transform = transform

    def _plan(self) -> tuple[list[tuple[str, Select | None]], int]:
        """This worker's (shard, record filter) pairs, and how many workers read each shard."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if workers == 1:
            return [(key, None) for key in self.keys], 1
        if len(self.keys) >= workers:
            return [(key, None) for key in self.keys[worker::workers]], 1

        def mine(index: int) -> bool:
            return index % workers == worker

        return [(key, mine) for key in self.keys], workers

    def _records(self, key: str, select: Select | None) -> Iterator[LaionRecord]:
        for record in iter_shard_selected(
            self.root_url, key, max_pixels=self.max_pixels, select=select
        ):
            if self.transform is not None and record.image is not None:
                record = dataclasses.replace(record, image=self.transform(record.image))
            yield record

    def __iter__(self) -> Iterator[LaionRecord]:
        plan, _ = self._plan()
        for key, select in plan:
            yield from self._records(key, select)


@dataclasses.dataclass
class ShardBatch:
    """Records of one shard. A shard is complete once ``readers`` batches marked ``last``
    have come (one per worker that read it)."""

    shard: str
    records: list[LaionRecord]
    last: bool
    readers: int


class ShardBatches(ShardDataset):
    """A :class:`ShardDataset` that yields :class:`ShardBatch` es of up to ``batch_size``
    records, never two shards in one, so a consumer can write each shard as soon as it is
    complete. One DataLoader (``batch_size=None``) serves a whole shard group: its workers
    start once and each reads only its own shards (or, with fewer shards than workers, its
    own records of every shard)."""

    def __init__(self, root_url: str, keys: Iterable[str], batch_size: int, **kwargs: Any):
        super().__init__(root_url, keys, **kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[ShardBatch]:  # type: ignore[override]
        plan, readers = self._plan()
        for key, select in plan:
            batch: list[LaionRecord] = []
            for record in self._records(key, select):
                batch.append(record)
                if len(batch) == self.batch_size:
                    yield ShardBatch(key, batch, last=False, readers=readers)
                    batch = []
            yield ShardBatch(key, batch, last=True, readers=readers)  # may be empty


def collate_records(batch: list[LaionRecord]) -> list[LaionRecord]:
    """DataLoader collate_fn: keep the batch as a list of records (PIL images stay PIL)."""
    return list(batch)


def shard_batch_loader(
    dataset: ShardBatches,
    collate_fn: Callable[[ShardBatch], Any],
    num_workers: int,
    *,
    pin_memory: bool,
) -> torch.utils.data.DataLoader:
    """The one DataLoader of a shard group: ``collate_fn`` turns each :class:`ShardBatch`
    into model inputs in the workers, which prefetch while the model runs and die with the
    process they feed."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        collate_fn=collate_fn,
        num_workers=num_workers,
        worker_init_fn=partial(dataloader_worker_init, parent=os.getpid()),
        prefetch_factor=2 if num_workers > 0 else None,
        pin_memory=pin_memory,
    )


def completed_shards(parts: Iterable[tuple[ShardBatch, Part]]) -> Iterator[tuple[str, list[Part]]]:
    """``(shard, its parts in arrival order)`` as each shard completes: once every worker
    that read it has sent its last batch. Holds only the parts of shards in progress."""
    pending: dict[str, list[Part]] = {}
    readers_done: dict[str, int] = {}
    for batch, part in parts:
        pending.setdefault(batch.shard, []).append(part)
        if not batch.last:
            continue
        readers_done[batch.shard] = readers_done.get(batch.shard, 0) + 1
        if readers_done[batch.shard] == batch.readers:
            del readers_done[batch.shard]
            yield batch.shard, pending.pop(batch.shard)
