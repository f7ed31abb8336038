"""The miniworld's resources: where it is generated, its data sources, its world."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from recap_dagster.evaluation.world import World
from recap_dagster.miniworld.generate import MiniworldPaths
from recap_dagster.resources.data import DataSourcesResource
from recap_dagster.resources.world import WorldResource


class MiniworldWorldResource(WorldResource):
    """The miniworld: its eval prompts, its shape evaluator, its caption grader."""

    def get(self) -> World:
        from recap_dagster.miniworld.world import MiniworldWorld

        return MiniworldWorld()


class MiniworldResource(dg.ConfigurableResource):
    """Where the miniworld is generated."""

    root: str = Field(description="Folder the miniworld generator writes (cached by config).")


def miniworld_sources(miniworld_dir: str, shards_root: str | None = None) -> DataSourcesResource:
    """The data sources laid out as the miniworld generator writes them."""
    paths = MiniworldPaths.under(miniworld_dir)
    return DataSourcesResource(
        shards_root=shards_root or paths.corpus,
        human_captions_path=paths.human_captions,
        human_captions_heldout_path=paths.human_captions_heldout,
        tokenizer_path=paths.tokenizer,
        eval_prompts_path=paths.eval_prompts,
        validation_prompts_path=paths.validation_prompts,
    )
