"""Ray job entrypoint: the audit stage (earlier stages first when needed). See ray_jobs/job.py for the arguments."""

import sys

from ray_jobs.job import main

if __name__ == "__main__":
    sys.exit(main("audit"))
