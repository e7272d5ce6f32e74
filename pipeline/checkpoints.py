"""The unlearning checkpoints folder: which tags are complete, and which still verify.

    unlearn/checkpoints/
      fingerprint          the unlearn key the checkpoints belong to (a mismatch starts over)
      epoch-N/             DeepSpeed's sharded engine state of every rank, rng-rank*.pt,
                           loop_state.json, and files.json: every file's size and sha256,
                           hashed once when the tag was written; its presence marks the tag complete
      final/               the engine after the last check (what consolidation reads)

Resuming takes the newest complete tag whose files still match files.json and says in one
line when it had to fall back to an older one.

Anyone who can write the run directory can also rewrite files.json, so hashes do not stop a
crafted pickle. DeepSpeed loads its checkpoints with `torch.load(weights_only=False)`;
`weights_only()` forces every `torch.load` of the process to the weights-only unpickler,
which builds tensors, containers and the two DeepSpeed objects a ZeRO-3 checkpoint holds
(`SAFE_GLOBALS`), and refuses anything else (a pickle that would run code) in one line.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Iterator

from pipeline.atomic import atomic_write_json, check_records, file_records
from pipeline.errors import UserError

log = logging.getLogger("icu.checkpoints")
RECORDS = "files.json"
# What a ZeRO-3 checkpoint's optimizer states hold besides tensors and containers.
SAFE_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler")


def seal(folder: Path, tag: str, records: dict[str, list]) -> None:
    """Record every file of a fully written tag (`records`: each file's [size, sha256], the ranks'
    `hash_share`s together); from now on it counts as complete."""
    atomic_write_json(folder / tag / RECORDS, records)


def hash_share(folder: Path, tag: str, rank: int, world: int) -> dict[str, list]:
    """[size, sha256] of rank `rank`'s share of a tag's files, dealt largest first so the ranks'
    shares weigh alike (one core hashes a 1.6 GB tag in 3.5 s)."""
    path = folder / tag
    files = sorted(
        (f for f in path.rglob("*") if f.is_file() and f.name != RECORDS), key=lambda f: (-f.stat().st_size, str(f))
    )
    return {str(f.relative_to(path)): file_records(f)["."] for f in files[rank::world]}


def complete_tags(folder: Path) -> list[str]:
    """Sealed epoch tags, newest first."""
    tags = [p.name for p in folder.glob("epoch-*") if (p / RECORDS).is_file()]
    return sorted(tags, key=_epoch, reverse=True)


def _epoch(tag: str) -> int:
    return int(tag.split("-")[1])


def problem(folder: Path, tag: str) -> str | None:
    """None when the tag's files match what was recorded when it was written."""
    try:
        records = json.loads((folder / tag / RECORDS).read_text())
    except (OSError, ValueError):
        return f"{RECORDS} unreadable"
    return check_records(folder / tag, records, hash_files=True, ignore={RECORDS})


def latest_verified(folder: Path) -> str | None:
    """The newest complete tag whose files verify; older ones are tried when it does not."""
    for tag in complete_tags(folder):
        broken = problem(folder, tag)
        if broken is None:
            return tag
        log.warning("unlearn: checkpoint %s is damaged (%s); falling back to the previous complete one", tag, broken)
    return None


def prune(folder: Path, keep: int, current: str) -> None:
    tags = sorted((p.name for p in folder.glob("epoch-*") if p.is_dir()), key=_epoch)
    for old in tags[:-keep]:
        if old != current:
            shutil.rmtree(folder / old, ignore_errors=True)


@contextlib.contextmanager
def weights_only(what: str) -> Iterator[None]:
    """Every torch.load in the block unpickles weights only; a refused pickle is one UserError
    naming `what` (the checkpoint) and the fix."""
    import torch

    torch.serialization.add_safe_globals(
        [getattr(importlib.import_module(name.rpartition(".")[0]), name.rpartition(".")[2]) for name in SAFE_GLOBALS]
    )
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    except pickle.UnpicklingError as exc:
        refused = next(
            (line.strip().rstrip(".") for line in str(exc).splitlines() if "GLOBAL" in line),
            "an object that is not a tensor",
        )
        raise UserError(
            f"{what}: refused to load a checkpoint file that holds more than weights ({refused}); "
            "it may have been tampered with; fix: delete that checkpoint folder and rerun "
            "(icu run CONFIG --restart-from unlearn)"
        ) from None
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


@contextlib.contextmanager
def fp32_partitions(folder: Path, tag: str) -> Iterator[dict]:
    """Name -> lazy tensor of checkpoint `tag`'s fp32 weights (weights-only, offline, one process).

    Nothing is gathered until a tensor's `.contiguous()` is called: DeepSpeed memory-maps every
    rank's optimizer file and joins a weight's partitions on demand. The mappings close when the
    block ends, so the pages one block read leave the process with it. DeepSpeed's own progress
    lines (prints and a tqdm bar per call) are kept out of the log.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with (
        weights_only(f"checkpoint {folder / tag}"),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag, lazy_mode=True)
    try:
        yield lazy
    finally:
        lazy.clear()
        gc.collect()
