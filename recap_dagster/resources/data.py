"""Input data locations: the LAION shard source and the human-caption set."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from recap_dagster.corpus.decoding import DEFAULT_MAX_PIXELS


class DataSourcesResource(dg.ConfigurableResource):
    """Where the inputs live (local paths or, for shards, ``s3://`` prefixes)."""

    shards_root: str = Field(
        description="Folder or s3:// prefix holding img2dataset shards (NNNNN.tar/.parquet).",
    )
    human_captions_path: str = Field(
        description="JSONL file of human captions (key, image, short, long), images beside it.",
    )
    human_captions_heldout_path: str = Field(
        default="",
        description="Optional held-out human captions (same format) for judging the "
        "captioner before and after fine-tuning: as references (BLEU, ROUGE-L, chrF; CLIP "
        "score with models.clip) always, graded by the world where rows carry ground truth.",
    )
    eval_prompts_path: str = Field(
        default="",
        description="JSONL of held-out test prompts with ground truth (GenEval-like): what "
        "the report is on. Never tune on them.",
    )
    validation_prompts_path: str = Field(
        default="",
        description="JSONL of validation prompts (same format, disjoint from the test "
        "prompts): what settings are tuned on (metric_reports with prompt_set validation); "
        "empty: none.",
    )
    tokenizer_path: str = Field(
        description="Directory of the CLIP tokenizer used for the 77-token caption limit.",
    )
    min_human_captions: int = Field(
        default=100, description="The human-caption set must have at least this many rows."
    )
    max_image_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        description="Images with more pixels than this are rejected (decompression bombs).",
    )
