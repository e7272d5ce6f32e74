"""Ray job entrypoint: the whole pipeline, skipping completed stages. See ray_jobs/job.py for the arguments."""

import sys

from ray_jobs.job import main

if __name__ == "__main__":
    sys.exit(main("run"))
