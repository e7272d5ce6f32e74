"""icu: Iterative Contrastive Unlearning (arXiv:2407.20271) as a restartable pipeline.

Stages: ingest -> retrieve -> unlearn -> evaluate -> audit -> export, each reading only earlier
stages' outputs from the run directory (see `pipeline.store`).
"""

__version__ = "0.1.0"
