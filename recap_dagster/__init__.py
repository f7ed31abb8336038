"""RECAP as Dagster assets: core packages by stage (``corpus``, ``captioner``, ``t2i``,
``evaluation``, ``storage``, ``training``) that never import Dagster, and the Dagster layer
(``assets``, ``resources``, ``orchestration``, the ``definitions`` composition roots)."""

import logging

# bitsandbytes (the trainer's adamw_8bit) warns at import, on CPUs with AVX512-BF16, that
# its optional 4-bit matmul kernel is missing; diffusers imports it in every process and
# nothing here uses 4-bit matmuls, so the line is noise in every log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
