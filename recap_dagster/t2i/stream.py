"""Training data for the text-to-image trainer, streamed from the latent cache.

The global sample order is a pure function of ``(seed, epoch)`` and does not depend on how
many processes or DataLoader workers read it:

- each epoch permutes the shards, then mixes them a window of ``window_shards`` at a time:
  the window's cached latents are joined by key with the shards' caption tables (rows
  whose caption status is not ok are left out) and permuted;
- the sequence is cut into global micro-batches of ``micro_batch_size x world_size``
  samples; DataLoader worker ``w`` of every process builds the micro-batches ``c`` with
  ``c % workers == w`` (the DataLoader reads its workers round-robin, so they come out in
  order) and process ``r`` takes the ``r``-th slice of each: disjoint samples, and the same
  global batch as one process with a ``world_size`` times larger micro-batch;
- every random draw of a sample (its caption, prompt dropout, noise, timestep) is seeded
  by ``(seed, epoch, shard, key)``.

The data position ``(epoch, window, offset)`` after each micro-batch travels with it, and a
stream started at a saved position yields exactly what an uninterrupted one would have.
Only one window of shards is open at a time, whatever the number of shards: its latent
files are memory-mapped, so workers read just the rows they use and share the page cache;
the window's keys and caption tables are the only per-window copies. From an ``s3://``
root the files are read through a machine-local cache (:mod:`.machine_cache`): one
download per machine under a file lock, the next window fetched by a background thread
while the current one is read, and each copy deleted by the last reader on the machine to
leave it, so the local disk holds the current and next windows only. Only the posterior
``mean`` is fetched (and read) unless the spec's ``read_std`` is set; ``std`` is then zero.

Why not a streaming library: webdataset and HF datasets' iterable datasets split by shard
(or by sample index modulo the world size) and resume only approximately once a shuffle
buffer is involved; mosaicml-streaming and litdata resume exactly, but only over their own
pre-written formats, which would mean writing every caption variant's (latent, caption)
pairs again per captioner version instead of joining the shared cache with the recaptions
at read time. The I/O itself is pyarrow (captions), safetensors (latents) and fsspec.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from recap_dagster.storage.root import Storage
from recap_dagster.t2i.latents import LATENTS_DIR, OpenLatentShard, latent_file
from recap_dagster.t2i.machine_cache import MachineCache, Reader

#: The machine-local cache of remote latent files (default: ``<tempdir>/recap-latents``).
CACHE_DIR_ENV = "RECAP_LATENT_CACHE_DIR"


@dataclass(frozen=True)
class CaptionSource:
    """Per-shard parquet tables of captions: ``<root>/<prefix...>/<shard>.parquet``.

    Each draw picks one of ``columns`` uniformly (RECAP Mix: short and long). Rows whose
    ``status_column`` is not ``ok_status`` are left out.
    """

    root: str
    prefix: tuple[str, ...] = ()
    columns: tuple[str, ...] = ("caption",)
    key_column: str = "key"
    status_column: str = "status"
    ok_status: str = "ok"

    def read(self, shard: str) -> dict[str, tuple[str, ...]]:
        table = Storage(self.root).read_parquet(
            *self.prefix,
            f"{shard}.parquet",
            columns=[self.key_column, self.status_column, *self.columns],
        )
        out = {}
        for row in table.to_pylist():
            if row[self.status_column] == self.ok_status:
                out[row[self.key_column]] = tuple(row[c] or "" for c in self.columns)
        return out


@dataclass(frozen=True)
class StreamSpec:
    """What a training stream reads and how it draws (JSON-able: the trainer's job file)."""

    latents_root: str
    vae_version: str
    shards: tuple[str, ...]
    captions: CaptionSource
    seed: int = 0
    prompt_dropout: float = 0.0
    window_shards: int = 4
    num_train_timesteps: int = 1000
    noise_offset: float = 0.0
    # The posterior std is only used when sampling latents: without it a remote file's
    # fetch is the header and ``mean`` alone (half the bytes).
    read_std: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StreamSpec:
        captions = dict(data["captions"])
        captions["prefix"] = tuple(captions["prefix"])
        captions["columns"] = tuple(captions["columns"])
        return cls(
            **{**data, "shards": tuple(data["shards"]), "captions": CaptionSource(**captions)}
        )


@dataclass
class DataPosition:
    """Where the global sample sequence stands: ``offset`` samples into ``window`` of
    ``epoch``."""

    epoch: int = 0
    window: int = 0
    offset: int = 0

    def as_list(self) -> list[int]:
        return [self.epoch, self.window, self.offset]


def _seed(*parts: object) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def select_caption(captions: tuple[str, ...], rng: random.Random, dropout: float) -> str:
    """One draw: the empty prompt with probability ``dropout``, else a uniform caption."""
    if rng.random() < dropout:
        return ""
    return captions[rng.randrange(len(captions))]


@dataclass
class _Window:
    shards: list[str]
    samples: list[tuple[int, int, tuple[str, ...]]] = field(default_factory=list)
    files: list[OpenLatentShard] = field(default_factory=list)


class LatentStream(torch.utils.data.IterableDataset):
    """Endless micro-batches of this process's share of the global sample sequence.

    Each item is a dict of tensors for ``micro_batch_size`` samples (``mean``, ``std``,
    ``eps``, ``noise``, ``timesteps``, ``input_ids``) plus ``position``: the data position
    after this global micro-batch, and ``truncated``: how many of its prompts were longer
    than the tokenizer's context and lost their tail. Use with ``DataLoader(batch_size=None)``.
    ``std`` is zero unless the spec's ``read_std`` (``eps`` is drawn either way, so that
    the later draws of a sample do not depend on it).
    """

    def __init__(
        self,
        spec: StreamSpec,
        tokenizer,
        *,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start: DataPosition | None = None,
    ) -> None:
        super().__init__()
        if not spec.shards:
            raise ValueError("no shards to train on")
        self.spec = spec
        self.tokenizer = tokenizer
        self.micro = micro_batch_size
        self.rank = rank
        self.world = world_size
        self.start = start or DataPosition()

    # -- the global sequence -----------------------------------------------------------
    def _windows(self, epoch: int) -> list[list[str]]:
        order = list(self.spec.shards)
        random.Random(_seed(self.spec.seed, "shards", epoch)).shuffle(order)
        size = max(1, self.spec.window_shards)
        return [order[i : i + size] for i in range(0, len(order), size)]

    def _cache_dir(self) -> str:
        """This latent root's folder in the machine-local cache."""
        base = os.environ.get(CACHE_DIR_ENV) or os.path.join(tempfile.gettempdir(), "recap-latents")
        digest = hashlib.blake2b(self.spec.latents_root.encode(), digest_size=8).hexdigest()
        return os.path.join(base, digest)

    def _machine_cache(self, workers: int, worker: int) -> MachineCache | None:
        """This reader's view of the machine-local cache; None for a local root (its files
        are read in place). The readers on the machine are every DataLoader worker of every
        local process (torchrun's ``LOCAL_WORLD_SIZE``)."""
        store = Storage(self.spec.latents_root)
        if store.local:
            return None
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank % local_world)))
        slots = tuple(f"{r}.{w}" for r in range(local_world) for w in range(workers))
        # One run's readers all derive the same session; another run (other captions,
        # seed or start) keeps its own counts in the same ledgers.
        run = json.dumps([self.spec.to_dict(), self.start.as_list(), self.world, slots])
        session = hashlib.blake2b(run.encode(), digest_size=8).hexdigest()
        reader = Reader(session, f"{local_rank}.{worker}", slots)
        parts = (LATENTS_DIR, self.spec.vae_version)
        cache_dir = self._cache_dir()
        return MachineCache(store, parts, cache_dir, reader, mean_only=not self.spec.read_std)

    def _load(self, shards: list[str], paths: list[str], epoch: int, window: int) -> _Window:
        """The window's latent files, opened memory-mapped (not read), and its samples."""
        loaded = _Window(shards)
        for s, (shard, path) in enumerate(zip(shards, paths, strict=True)):
            latents = OpenLatentShard(path, read_std=self.spec.read_std)
            captions = self.spec.captions.read(shard)
            loaded.files.append(latents)
            for row, key in enumerate(latents.keys):
                if key in captions:
                    loaded.samples.append((s, row, captions[key]))
        random.Random(_seed(self.spec.seed, "window", epoch, window)).shuffle(loaded.samples)
        return loaded

    @staticmethod
    def _hold(cache: MachineCache, epoch: int, window: int, shards: list[str]) -> list[str]:
        """The local copies of a window's files, held (all or none) for this visit."""
        visit, paths = f"{epoch}.{window}", []
        try:
            for shard in shards:
                paths.append(cache.acquire(latent_file(shard), visit))
        except BaseException:
            for shard in shards[: len(paths)]:
                cache.release(latent_file(shard), visit)
            raise
        return paths

    @staticmethod
    def _release(cache: MachineCache, epoch: int, window: int, shards: list[str]) -> None:
        for shard in shards:
            cache.release(latent_file(shard), f"{epoch}.{window}")

    def _sequence(
        self, cache: MachineCache | None = None
    ) -> Iterator[tuple[_Window, int, int, DataPosition]]:
        """(window, epoch, index in window, position after it) from ``self.start`` on.

        With a machine cache, each window's copies are held while it is read and the next
        window's are fetched meanwhile by one background thread; whatever is held is
        released when the iteration ends, however it ends."""
        store = Storage(self.spec.latents_root)
        pool = ThreadPoolExecutor(1, thread_name_prefix="latent-prefetch") if cache else None
        # (epoch, window) -> its shards and the future of their held local copies
        held: dict[tuple[int, int], tuple[list[str], Future[list[str]]]] = {}

        def hold(epoch: int, window: int, shards: list[str]) -> None:
            if (epoch, window) not in held:
                future = pool.submit(self._hold, cache, epoch, window, shards)
                held[epoch, window] = (shards, future)

        epoch, window, offset = self.start.epoch, self.start.window, self.start.offset
        empty_epochs = 0
        try:
            while True:
                # Once per epoch: the order is a shuffle of the whole shard list.
                windows = self._windows(epoch)
                for w in range(window, len(windows)):
                    if pool is None:
                        parts = (LATENTS_DIR, self.spec.vae_version)
                        paths = [store.uri(*parts, latent_file(s)) for s in windows[w]]
                    else:
                        hold(epoch, w, windows[w])
                        paths = held[epoch, w][1].result()
                        if w + 1 < len(windows):
                            hold(epoch, w + 1, windows[w + 1])
                        else:  # the next epoch's first window
                            hold(epoch + 1, 0, self._windows(epoch + 1)[0])
                    loaded = self._load(windows[w], paths, epoch, w)
                    for i in range(offset, len(loaded.samples)):
                        empty_epochs = 0
                        yield loaded, epoch, i, DataPosition(epoch, w, i + 1)
                    offset = 0
                    if cache is not None:
                        held.pop((epoch, w))
                        self._release(cache, epoch, w, windows[w])
                epoch, window = epoch + 1, 0
                empty_epochs += 1
                if empty_epochs > 1:
                    raise ValueError("no usable training samples: no cached latent has a caption")
        finally:
            if cache is not None and pool is not None:
                for (e, w), (shards, future) in held.items():
                    with contextlib.suppress(Exception):
                        future.result()  # a failed fetch holds nothing
                        self._release(cache, e, w, shards)
                pool.shutdown()

    # -- one sample's draws ------------------------------------------------------------
    def _sample(self, loaded: _Window, epoch: int, index: int) -> dict:
        s, row, captions = loaded.samples[index]
        shard, key = loaded.shards[s], loaded.files[s].keys[row]
        seed = _seed(self.spec.seed, epoch, shard, key)
        text = select_caption(captions, random.Random(seed), self.spec.prompt_dropout)
        gen = torch.Generator().manual_seed(seed)
        mean, std = loaded.files[s].row(row)
        noise = torch.randn(mean.shape, generator=gen)
        if self.spec.noise_offset:
            shape = (mean.shape[0], 1, 1)
            noise = noise + self.spec.noise_offset * torch.randn(shape, generator=gen)
        return {
            "mean": mean,
            "std": std,
            "eps": torch.randn(mean.shape, generator=gen),
            "noise": noise,
            "timesteps": torch.randint(0, self.spec.num_train_timesteps, (), generator=gen),
            "text": text,
            "key": f"{shard}/{key}",
        }

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        cache = self._machine_cache(workers, worker)
        if cache is not None:
            cache.collect_garbage()  # copies left by a killed run
        global_micro = self.micro * self.world
        mine = range(self.rank * self.micro, (self.rank + 1) * self.micro)
        chunk, filled, picked = 0, 0, []
        for loaded, epoch, index, position in self._sequence(cache):
            if chunk % workers == worker and filled in mine:
                picked.append(self._sample(loaded, epoch, index))
            filled += 1
            if filled == global_micro:
                if chunk % workers == worker:
                    yield self._collate(picked, position)
                chunk, filled, picked = chunk + 1, 0, []

    def _collate(self, samples: list[dict], position: DataPosition) -> dict:
        texts = [s["text"] for s in samples]
        limit = self.tokenizer.model_max_length
        ids = self.tokenizer(
            texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt"
        ).input_ids
        # Recaptions arrive trimmed to the context; anything still cut here is counted and
        # reported by the trainer, never lost silently.
        lengths = [len(row) for row in self.tokenizer(texts, truncation=False).input_ids]
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("mean", "std", "eps", "noise")}
        batch["timesteps"] = torch.stack([s["timesteps"] for s in samples])
        batch["input_ids"] = ids
        batch["truncated"] = torch.tensor(sum(n > limit for n in lengths))
        batch["keys"] = [s["key"] for s in samples]
        batch["position"] = torch.tensor(position.as_list())
        return batch
