"""The training corpus manifest: exactly which shards a fine-tune reads (no Dagster).

Between the shard groups (up to 5,850 for LAION-5B) and the trainer sits one small file:
the groups and shards to train on, the captioner and VAE that made their captions and
latents, and the groups left out. Its version is derived from every included group's
versions, so one unpartitioned step carries staleness from the groups to the trainer at
any corpus size (Dagster stops comparing versions across an edge of 100 or more upstream
partitions), and a training run reads a fixed shard list while new shards keep arriving.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from recap_dagster.corpus.shard_groups import group_of, shards_of_groups
from recap_dagster.storage.root import Storage
from recap_dagster.t2i.latents import LATENTS_DIR, latent_file

MANIFEST_PARTS = ("training_corpus", "manifest.json")
# Bump when a change here changes which shards a manifest lists for the same inputs.
CODE_VERSION = "1"


@dataclass(frozen=True)
class GroupVersions:
    """What one included group contributes: its recaptions' and latents' data versions."""

    recaptions: str
    latents: str


@dataclass
class CorpusManifest:
    version: str
    captioner_version: str
    vae_version: str
    groups: list[str]
    shards: list[str]
    excluded_groups: list[str] = field(default_factory=list)
    # Registered groups not (yet) recaptioned by this captioner or encoded by this VAE,
    # and shards of included groups that arrived after their group's last run.
    pending_groups: list[str] = field(default_factory=list)
    pending_shards: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> CorpusManifest:
        return cls(**json.loads(text))


def manifest_version(
    captioner_version: str,
    vae_version: str,
    groups: Mapping[str, GroupVersions],
    excluded_groups: Sequence[str],
) -> str:
    """A hash of everything the manifest's content depends on."""
    digest = hashlib.sha256(f"{CODE_VERSION} {captioner_version} {vae_version}".encode())
    for group in sorted(groups):
        versions = groups[group]
        digest.update(f"\n{group} {versions.recaptions} {versions.latents}".encode())
    digest.update(("\nexcluded " + " ".join(sorted(excluded_groups))).encode())
    return digest.hexdigest()[:16]


def build_manifest(
    storage: Storage,
    shards_root: str,
    *,
    captioner_version: str,
    vae_version: str,
    groups: Mapping[str, GroupVersions],
    recaptioned_dir: str,
    excluded_groups: Sequence[str] = (),
    pending_groups: Sequence[str] = (),
) -> CorpusManifest:
    """The manifest over ``groups``: their complete shards that have both recaptions and
    latents of ``vae_version`` (one listing of each folder). A shard still missing either
    (it joined the group after the group's last run) is listed as pending, not trained on."""
    if not groups:
        raise ValueError(
            "no shard group is ready to train on: recaption the groups with the current "
            "captioner and cache their latents first"
            + (f" ({len(pending_groups)} group(s) pending)" if pending_groups else "")
        )
    recaptioned = set(storage.listdir(recaptioned_dir))
    cached = set(storage.listdir(LATENTS_DIR, vae_version))
    shards, pending = [], []
    for shard in shards_of_groups(shards_root, groups):
        ready = f"{shard}.parquet" in recaptioned and latent_file(shard) in cached
        (shards if ready else pending).append(shard)
    empty = sorted(set(groups) - {group_of(shard) for shard in shards})
    if empty:
        raise ValueError(
            f"{len(empty)} group(s) recorded as recaptioned and encoded have no shard with "
            f"both outputs under {storage.uri()} (first: {empty[:5]}): were they deleted?"
        )
    return CorpusManifest(
        version=manifest_version(captioner_version, vae_version, groups, excluded_groups),
        captioner_version=captioner_version,
        vae_version=vae_version,
        groups=sorted(groups),
        shards=shards,
        excluded_groups=sorted(excluded_groups),
        pending_groups=sorted(pending_groups),
        pending_shards=pending,
    )


def write_manifest(storage: Storage, manifest: CorpusManifest) -> str:
    return storage.write_text(manifest.to_json(), *MANIFEST_PARTS)


def read_manifest(storage: Storage) -> CorpusManifest:
    if not storage.exists(*MANIFEST_PARTS):
        raise FileNotFoundError(
            f"no training corpus manifest at {storage.uri(*MANIFEST_PARTS)}: materialize "
            "training_corpus first"
        )
    return CorpusManifest.from_json(storage.read_text(*MANIFEST_PARTS))
