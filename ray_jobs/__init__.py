"""Ray job entrypoints: `python -m ray_jobs.<stage> CONFIG`, one per stage plus `run`."""
