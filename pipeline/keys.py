"""The operator's receipt key: content hashes that only its holder can confirm.

A receipt ships with every hand-off, and a personal record is low-entropy (a name, a birthday,
an address): an unsalted hash of it lets anyone holding a candidate record learn that this
person asked to be erased. Every content hash (and every id derived from one) is therefore an
HMAC-SHA256 under a key the operator keeps outside the run directory and the hand-off:

- `ICU_RECEIPT_KEY`: the key itself (at least 32 characters), or
- `ICU_RECEIPT_KEY_FILE`: a file holding it, or by default
- `$XDG_CONFIG_HOME/icu/receipt.key` (`~/.config/icu/receipt.key`), generated with mode 0600
  on first use (the log says where).

A key file must be a regular file of this user that nobody else can read. `icu hash` prints a
text's keyed hash, so the holder can look a request up in a receipt.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import unicodedata
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger("icu.keys")
ENV_KEY, ENV_FILE = "ICU_RECEIPT_KEY", "ICU_RECEIPT_KEY_FILE"
MIN_CHARS = 32


def normalise(text: str) -> str:
    """The form duplicates are judged and hashes taken on: NFKC, whitespace runs collapsed, trimmed."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


def keyed_hash(key: bytes, text: str) -> str:
    """HMAC-SHA256 of the normalised text, hex."""
    return hmac.new(key, normalise(text).encode("utf-8"), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A name for the key that reveals nothing of it (which key a receipt was hashed with)."""
    return hmac.new(key, b"icu receipt key id", hashlib.sha256).hexdigest()[:16]


def default_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "icu" / "receipt.key"


def receipt_key(run_dir: str | os.PathLike | None = None) -> bytes:
    """The operator's key (see the module docstring); refused when it would travel with a run."""
    if os.environ.get(ENV_KEY):
        return _checked(os.environ[ENV_KEY], f"${ENV_KEY}")
    path = Path(os.environ.get(ENV_FILE) or default_path()).expanduser().absolute()
    if run_dir is not None and path.resolve().is_relative_to(Path(run_dir).resolve()):
        raise UserError(
            f"receipt key {path} lies inside the run directory, which others may be handed; fix: keep it "
            f"outside (${ENV_FILE}) and move it there"
        )
    if not os.path.lexists(path) and not os.environ.get(ENV_FILE):
        _generate(path)
    return _checked(_read_private(path), str(path))


def _generate(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    log.warning(
        "keys: generated a receipt key at %s: keep it, and keep it private; receipts' content hashes are "
        "keyed with it, and `icu hash` needs it to look a request up",
        path,
    )


def _read_private(path: Path) -> str:
    """A key file's text, refused unless it is a regular file of this user that others cannot read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise UserError(
            f"receipt key {path} (${ENV_FILE}) does not exist; fix: point ${ENV_FILE} at the key file, "
            f"or unset it to use {default_path()}"
        ) from None
    except OSError:
        raise UserError(
            f"receipt key {path}: not a regular file (a symbolic link?); fix: point ${ENV_FILE} at the key file itself"
        ) from None
    with os.fdopen(fd) as fh:
        st = os.fstat(fh.fileno())
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise UserError(
                f"receipt key {path} is readable or writable by others (mode {st.st_mode & 0o777:o}, "
                f"owner uid {st.st_uid}); fix: chown it to yourself and chmod 600 {path}"
            )
        return fh.read()


def _checked(value: str, where: str) -> bytes:
    value = value.strip()
    if len(value) < MIN_CHARS:
        raise UserError(
            f"receipt key in {where} is {len(value)} characters; fix: use at least {MIN_CHARS} random "
            "characters (e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return value.encode("utf-8")
