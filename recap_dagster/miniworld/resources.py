"""The miniworld as the ``world`` resource."""

from __future__ import annotations

from recap_dagster.resources.world import WorldResource
from recap_dagster.world import World


class MiniworldWorldResource(WorldResource):
    """The miniworld: its eval prompts, its shape evaluator, its caption grader."""

    def get(self) -> World:
        from recap_dagster.miniworld.world import MiniworldWorld

        return MiniworldWorld()
