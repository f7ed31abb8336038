"""Dagster config classes: derived from the core's settings, defaulted from one run config.

Each trainer's settings are defined once, as a dataclass of the plain-Python core (with a
description per field); the asset's ``dg.Config`` is made from it mechanically, so the
launchpad shows every setting with the same name, type, default and description.

Defaults are the paper's recipes. A deployment (the miniworld's profiles, a team's
cluster) replaces them with a run-config file in Dagster's own shape
(``ops: {asset: {config: {...}}}``) named by ``RECAP_RUN_CONFIG``: the launchpad then
shows those values as the defaults, and a run launched without config (the UI's
Materialize button, a backfill, a sensor's request) uses exactly them.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import MISSING, fields

import dagster as dg
import pydantic
import yaml
from pydantic import Field

from recap_dagster import settings

ConfigT = typing.TypeVar("ConfigT", bound=type[dg.Config])


@functools.cache
def _run_config_file(path: str) -> dict:
    with open(path) as file:
        data = yaml.safe_load(file) or {}
    if not isinstance(data, dict) or set(data) - {"ops"}:
        raise ValueError(f"{path}: a run-config file holds only 'ops: {{asset: {{config: ...}}}}'")
    return data


def run_config_defaults(op: str) -> dict[str, typing.Any]:
    """The config values the deployment's run-config file sets for ``op`` (empty: none)."""
    path = settings.run_config_path()
    if not path:
        return {}
    return dict(_run_config_file(path).get("ops", {}).get(op, {}).get("config", {}))


def with_run_defaults(config: ConfigT, op: str) -> ConfigT:
    """``config`` with the defaults of ``op`` from the run-config file (same fields)."""
    values = run_config_defaults(op)
    unknown = set(values) - set(config.model_fields)
    if unknown:
        raise ValueError(
            f"{settings.run_config_path()}: {op} has no setting {sorted(unknown)}; "
            f"its settings are {sorted(config.model_fields)}"
        )
    overrides: dict[str, typing.Any] = {
        name: (field.annotation, Field(default=values[name], description=field.description))
        for name, field in config.model_fields.items()
        if name in values
    }
    model = pydantic.create_model(config.__name__.lstrip("_"), __base__=config, **overrides)
    model.__doc__ = config.__doc__
    return typing.cast(ConfigT, model)


def config_from_settings(
    settings_class: type,
    name: str,
    doc: str,
    *,
    op: str,
    exclude: tuple[str, ...] = (),
    **extra: typing.Any,
) -> type[dg.Config]:
    """A ``dg.Config`` with the fields of the dataclass ``settings_class`` (but ``exclude``:
    the ones a resource decides) plus ``extra`` (``name=(type, Field(...))``), defaulted
    from the run-config file's entry for ``op``."""
    hints = typing.get_type_hints(settings_class)
    definitions: dict[str, typing.Any] = {
        f.name: (hints[f.name], Field(default=f.default, description=f.metadata["description"]))
        for f in fields(settings_class)
        if f.name not in exclude and f.default is not MISSING
    }
    model = pydantic.create_model(name, __base__=dg.Config, **definitions, **extra)
    model.__doc__ = doc
    return with_run_defaults(model, op)


def settings_from_config(settings_class: type, config: dg.Config, **overrides: typing.Any):
    """The ``settings_class`` dataclass of an asset's config (its derived fields) and
    ``overrides``."""
    names = {f.name for f in fields(settings_class)}
    values = {k: v for k, v in config.model_dump().items() if k in names}
    return settings_class(**{**values, **overrides})
