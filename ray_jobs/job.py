"""What every Ray job entrypoint does: run the `icu` command of its stage inside the job.

    ray job submit --working-dir . -- python -m ray_jobs.run CONFIG [--base-dir DIR] [--set k=v] [--restart-from S]
    ray job submit --working-dir . -- python -m ray_jobs.<stage> CONFIG ...

The job connects to the cluster it was submitted to (RAY_ADDRESS, set by Ray) and runs
the same driver as `icu`, so a resubmitted job skips finished stages and resumes the
interrupted one. `--working-dir .` uploads a copy of the project, and the job runs inside
that temporary copy: relative paths in the config (runs/, ../shared/data) would point into
it, and a run directory there would vanish with the job. `--base-dir DIR` makes relative
paths resolve against DIR instead (`--base-dir $PWD` on a single machine or a shared file
system); without it a relative run directory inside the copy is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline import cli
from pipeline.config import load_config
from pipeline.errors import UserError

RAY_PACKAGE_MARK = "_ray_pkg_"  # how Ray names an unpacked working_dir


def main(command: str, argv: list[str] | None = None) -> int:
    """Run `icu <command>` with this job's arguments; relative paths resolve against --base-dir."""
    parser = argparse.ArgumentParser(prog=f"python -m ray_jobs.{command}", add_help=False)
    parser.add_argument("--base-dir")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        rest = _rebase(command, rest, known.base_dir) if known.base_dir else rest
        _refuse_run_dir_in_package(command, rest)
    except UserError as exc:
        return exc.report()
    return cli.main([command, *rest])


def _rebase(command: str, rest: list[str], base_dir: str) -> list[str]:
    """Make the config path absolute (it lives in the uploaded copy), then move to base_dir."""
    base = Path(base_dir)
    if not base.is_dir():
        raise UserError(
            f"--base-dir: {base} is not a folder on this node; fix: pass a path the cluster "
            "can read (a shared file system), or use absolute paths in the config"
        )
    config = getattr(cli.build_parser().parse_args([command, *rest]), "config", None)
    if config is not None and Path(config).is_file():
        rest = list(rest)
        rest[rest.index(config)] = str(Path(config).resolve())
    os.chdir(base)
    return rest


def _refuse_run_dir_in_package(command: str, rest: list[str]) -> None:
    """A run directory (or an erasure ledger) inside Ray's temporary copy of the project would be lost
    when the job ends."""
    if RAY_PACKAGE_MARK not in os.getcwd():
        return
    args = cli.build_parser().parse_args([command, *rest])
    if getattr(args, "config", None) is None:
        return

    try:
        cfg = load_config(args.config, cli.parse_overrides(args.set))
    except UserError as exc:
        raise UserError(
            f"{exc} (in a Ray job without --base-dir, relative paths resolve inside its temporary "
            "copy of the project: add --base-dir $PWD after the config)"
        ) from None
    for key, path in (("storage.runs_dir", cfg.storage.runs_dir), ("ledger.path", cfg.ledger.path)):
        if path and Path(path).resolve().is_relative_to(Path.cwd().resolve()):
            raise UserError(
                f"{key}: {path} lies inside the job's temporary copy of the project and would be lost when "
                "the job ends; fix: add --base-dir $PWD after the config (relative paths then resolve where "
                f"you submitted from) or set {key} to an absolute path on storage the cluster shares"
            )
