"""Default locations, overridable by environment variables (never by code edits).

``RECAP_WORKDIR`` (default ``./.recap``) holds the generated miniworld, the storage root
and the local Dagster home. ``RECAP_STORAGE_ROOT`` and ``RECAP_SHARDS_ROOT`` point storage
and the LAION source elsewhere, e.g. at ``s3://`` prefixes. ``RECAP_SENSOR_INTERVAL_SECONDS``
sets the sensors' minimum interval. ``RECAP_TRAINING_SEEDS`` lists the training seeds every
caption variant is fine-tuned and evaluated with (the seed dimension of their partitions).
"""

from __future__ import annotations

import os
from pathlib import Path


def workdir() -> Path:
    return Path(os.environ.get("RECAP_WORKDIR", ".recap")).expanduser().resolve()


def miniworld_dir() -> Path:
    return Path(os.environ.get("RECAP_MINIWORLD_DIR", workdir() / "miniworld"))


def models_dir() -> Path:
    """Where the miniworld's base models are built (cached)."""
    return Path(os.environ.get("RECAP_MODELS_DIR", workdir() / "models"))


def storage_root() -> str:
    return os.environ.get("RECAP_STORAGE_ROOT", str(workdir() / "storage"))


def shards_root() -> str:
    return os.environ.get("RECAP_SHARDS_ROOT", str(miniworld_dir() / "laion"))


def run_config_path() -> str:
    """The deployment's run-config file (Dagster's ``ops:`` shape): the asset config
    defaults the launchpad shows and every run uses (empty: the paper's recipes)."""
    return os.environ.get("RECAP_RUN_CONFIG", "")


def sensor_interval(default: int) -> int:
    """A sensor's minimum seconds between ticks: ``RECAP_SENSOR_INTERVAL_SECONDS`` for every
    sensor of the project when set (tests shorten them; a deployment over a huge bucket may
    lengthen them), else the sensor's own ``default``."""
    return int(os.environ.get("RECAP_SENSOR_INTERVAL_SECONDS", default))


def training_seeds() -> list[int]:
    """The training seeds of the fine-tunes: ``RECAP_TRAINING_SEEDS`` ("0,1,2" by default;
    a comparison's intervals need at least two)."""
    text = os.environ.get("RECAP_TRAINING_SEEDS", "0,1,2")
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(
            f"RECAP_TRAINING_SEEDS must be integers separated by commas: {text!r}"
        ) from error
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"RECAP_TRAINING_SEEDS needs distinct seeds: {text!r}")
    return seeds


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME", workdir() / "dagster_home"))


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def ensure_dagster_home() -> Path:
    """Point DAGSTER_HOME at a folder holding the project's dagster.yaml (local instance)."""
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    instance_yaml = home / "dagster.yaml"
    source = PROJECT_ROOT / "dagster.yaml"
    if not instance_yaml.exists() and source.exists():
        instance_yaml.write_text(source.read_text())
    os.environ["DAGSTER_HOME"] = str(home)
    return home
