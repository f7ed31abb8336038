"""The Dagster assets and their checks: thin layers over the core packages."""
