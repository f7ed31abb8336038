"""The miniworld's profiles: run-config files (``profiles/<name>.yaml``, Dagster's ``ops:``
shape) that set what its tiny models need instead of the paper's recipes. The main job
points ``RECAP_RUN_CONFIG`` at one, so the launchpad's defaults are what it runs."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

PROFILES_DIR = Path(__file__).parent / "profiles"
PROFILES = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
#: Ops whose config holds the training seed (``--seed``): the captioner's fine-tune. The
#: text-to-image fine-tunes take theirs from their partitions (RECAP_TRAINING_SEEDS).
SEEDED_OPS = ("captioner_checkpoint",)

SettingsT = TypeVar("SettingsT")


def profile_run_config(profile: str, seed: int = 0) -> dict[str, Any]:
    """The profile's run config with ``seed`` as the captioner fine-tune's training seed."""
    data = _profile(profile)
    data.pop("main_job", None)  # the main job's own plan, not run config
    ops = data.setdefault("ops", {})
    for op in SEEDED_OPS:
        ops.setdefault(op, {}).setdefault("config", {})["seed"] = seed
    return data


def _profile(profile: str) -> dict[str, Any]:
    """A profile's file; ``extends: <profile>`` takes that profile's ops (the same
    recipes) and ``main_job`` and replaces only the keys this file names (each op's
    settings, each ``main_job`` entry)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")
    data = yaml.safe_load((PROFILES_DIR / f"{profile}.yaml").read_text()) or {}
    parent = data.pop("extends", None)
    if parent is None:
        return data
    merged = _profile(parent)
    for op, entry in data.get("ops", {}).items():
        config = merged.setdefault("ops", {}).setdefault(op, {}).setdefault("config", {})
        config.update(entry.get("config", {}))
    merged["main_job"] = {**merged.get("main_job", {}), **data.get("main_job", {})}
    return merged


def profile_seeds(profile: str) -> dict[str, list[int]]:
    """The training seeds the main job fine-tunes each caption variant with under
    ``profile`` (its ``main_job: seeds:``); RECAP_TRAINING_SEEDS is their union."""
    seeds = _profile(profile).get("main_job", {}).get("seeds")
    if not seeds:
        raise ValueError(f"profile {profile!r} names no main_job seeds")
    return {variant: [int(s) for s in values] for variant, values in seeds.items()}


def profile_side_by_side(profile: str) -> int:
    """How many pooled steps (fine-tunes, evaluations) the main job runs at once on a CPU
    machine under ``profile`` (its ``main_job: side_by_side``, default 1): the gpu pool's
    slots, each step with an equal share of the cores."""
    slots = int(_profile(profile).get("main_job", {}).get("side_by_side", 1))
    if slots < 1:
        raise ValueError(f"profile {profile!r}: main_job side_by_side must be 1 or more: {slots}")
    return slots


def op_settings(settings: type[SettingsT], profile: str, op: str) -> SettingsT:
    """The settings dataclass an op runs with under ``profile`` (for benchmarks and tests
    that call the core directly)."""
    config = profile_run_config(profile)["ops"].get(op, {}).get("config", {})
    names = {f.name for f in fields(settings)}  # type: ignore[arg-type]
    return settings(**{k: v for k, v in config.items() if k in names})
