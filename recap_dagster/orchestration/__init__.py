"""The Dagster layer beside the assets and resources: partitions, sensors and schedules, the
gpu pool watchdog, step retries, Kubernetes tags, the checks runner and the UI launcher."""
