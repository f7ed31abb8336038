"""Shards as a torch ``IterableDataset``: DataLoader workers read and decode the records
while the model works (recaptioning, the latent cache)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch.utils.data
from PIL import Image

from recap_dagster.corpus.decoding import DEFAULT_MAX_PIXELS
from recap_dagster.corpus.reading import LaionRecord, Select, iter_shard_selected

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

    def __iter__(self) -> Iterator[LaionRecord]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if workers == 1:
            plan: list[tuple[str, Select | None]] = [(key, None) for key in self.keys]
        elif len(self.keys) >= workers:
            plan = [(key, None) for key in self.keys[worker::workers]]
        else:

            def mine(index: int) -> bool:
                return index % workers == worker

            plan = [(key, mine) for key in self.keys]
        for key, select in plan:
            for record in iter_shard_selected(
                self.root_url, key, max_pixels=self.max_pixels, select=select
            ):
                if self.transform is not None and record.image is not None:
                    record = dataclasses.replace(record, image=self.transform(record.image))
                yield record


def collate_records(batch: list[LaionRecord]) -> list[LaionRecord]:
    """DataLoader collate_fn: keep the batch as a list of records (PIL images stay PIL)."""
    return list(batch)
