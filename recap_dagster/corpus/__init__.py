"""The corpus: img2dataset shards (listing, reading, decoding, the torch dataset), shard
groups, discovery of new shards, and the human-caption file. Plain Python, no Dagster."""
