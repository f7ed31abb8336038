"""Dagster config classes derived from the trainers' settings dataclasses.

Each trainer's settings are defined once, as a dataclass of the plain-Python core (with a
description per field); the asset's ``dg.Config`` is made from it mechanically, so the
launchpad shows every setting with the same name, type, default and description.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, fields

import dagster as dg
import pydantic
from pydantic import Field


def config_from_settings(
    settings: type, name: str, doc: str, *, exclude: tuple[str, ...] = (), **extra: typing.Any
) -> type[dg.Config]:
    """A ``dg.Config`` with the fields of the dataclass ``settings`` (but ``exclude``: the
    ones a resource decides) plus ``extra`` (``name=(type, Field(...))``)."""
    hints = typing.get_type_hints(settings)
    definitions: dict[str, typing.Any] = {
        f.name: (hints[f.name], Field(default=f.default, description=f.metadata["description"]))
        for f in fields(settings)
        if f.name not in exclude and f.default is not MISSING
    }
    model = pydantic.create_model(name, __base__=dg.Config, **definitions, **extra)
    model.__doc__ = doc
    return model


def settings_from_config(settings: type, config: dg.Config, **overrides: typing.Any):
    """The ``settings`` dataclass of an asset's config (its derived fields) and ``overrides``."""
    names = {f.name for f in fields(settings)}
    values = {k: v for k, v in config.model_dump().items() if k in names}
    return settings(**{**values, **overrides})
