"""Atomic file writes and content digests: what makes a run directory safe to kill.

Every file is written to a temporary sibling, fsynced and renamed over its target, so
a process killed mid-write leaves the previous version, never half a file. A rename replaces
a symbolic link planted at the target instead of writing through it, and what lands is
readable by its owner alone. The few files written in place (logs) are opened with
`open_private`, which refuses a link.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from pipeline.errors import UserError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, nothing between."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (file or folder) that replaces `path` on success.

    For writers that want a filename (parquet, save_pretrained, faiss): write to the
    yielded path; it is renamed over `path` only if the block finishes without error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)) / path.name
    try:
        yield tmp
        _seal_tree(tmp)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_parquet(frame, path: str | os.PathLike) -> None:
    """A pandas frame as a parquet file, atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of one file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (relative names + contents), streamed."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def file_records(path: Path) -> dict[str, list]:
    """{relative name: [size, sha256]} of a file or of every file under a folder."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(f.relative_to(path)) if path.is_dir() else ".": [f.stat().st_size, sha256_file(f)] for f in files}


def check_records(
    path: Path, records: dict[str, list], hash_files: bool = True, ignore: set[str] = frozenset()
) -> str | None:
    """What differs between `path` and its recorded files (None = all match).

    `hash_files=False` checks names and sizes only (checkpoints of hundreds of GB are
    hashed once when written, not on every look).
    """
    if not path.exists():
        return "missing"
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    found = {str(f.relative_to(path)) if path.is_dir() else ".": f for f in files}
    found = {name: f for name, f in found.items() if name not in ignore}
    if set(found) != set(records):
        extra, gone = sorted(set(found) - set(records)), sorted(set(records) - set(found))
        return f"files differ (missing {gone[:3]}, unexpected {extra[:3]})"
    for name, (size, sha) in records.items():
        if found[name].stat().st_size != size:
            return f"{name}: size {found[name].stat().st_size} != {size} recorded"
        if hash_files and sha256_file(found[name]) != sha:
            return f"{name}: content differs from the sha256 recorded"
    return None


def open_private(path: str | os.PathLike, append: bool = False) -> BinaryIO:
    """A file written in place (a log), never through a symbolic link planted at its name: a
    link is refused, O_NOFOLLOW closes the race, and a new file is created 0600. Without
    `append` the old file is replaced (unlinked, then created exclusively)."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(
            f"{path} is a symbolic link, and a run directory holds none (it would be written through); "
            "fix: remove it, and check who else can write to the run directory"
        )
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    if append:
        flags |= os.O_APPEND
    else:
        path.unlink(missing_ok=True)
        flags |= os.O_EXCL
    try:
        return os.fdopen(os.open(path, flags, 0o600), "ab" if append else "wb")
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EEXIST):
            raise UserError(
                f"{path} was replaced while it was opened (a symbolic link or another file appeared); "
                "fix: check who else can write to the run directory"
            ) from None
        raise


def _seal_tree(path: Path) -> None:
    """fsync every file of a finished temporary and make it its owner's alone (0600 / 0700)."""
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if item.is_symlink():
            continue
        item.chmod(0o700 if item.is_dir() else 0o600)
        if item.is_file():
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
