"""RECAP as Dagster assets: core packages by stage (``corpus``, ``captioner``, ``t2i``,
``evaluation``, ``storage``, ``training``) that never import Dagster, and the Dagster layer
(``assets``, ``resources``, ``orchestration``, the ``definitions`` composition roots)."""
