"""The erasure ledger: every request ever erased, across runs (pipeline/method.md, "Continual erasure").

    <ledger>/entries.jsonl   one JSON line per run, appended once its hand-off is verified
    <ledger>/head.json       how many entries there are and the last one's hash

An entry names the run, the model it started from and the hand-off it produced (folder digests,
`atomic.file_digest`), the inputs every later run must share (the first run's forgetting
thresholds, its unseen and strangers files, the receipt key's id) and, per request erased in the
run, its id, keyed content hash, token ids and receipt row. Each entry holds the previous one's
hash and its own (sha256 of its canonical JSON), so an edited entry breaks the chain and a removed
last entry disagrees with the head: either is refused in one line naming the entry.

A chained run (`ledger.path` set) starts from the latest hand-off, carries every earlier request
(checked at every unlearning check, audited, on the receipt) and appends its own entry at export.
The folder holds request token ids: it is its owner's alone, like a run directory.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from pipeline.atomic import atomic_write_json, atomic_write_text, file_digest
from pipeline.errors import UserError
from pipeline.store import claim

ENTRIES, HEAD = "entries.jsonl", "head.json"


def entry_hash(entry: dict[str, Any]) -> str:
    """sha256 of an entry's canonical JSON, its own `hash` left out."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Ledger:
    folder: Path
    entries: tuple[dict[str, Any], ...]

    @classmethod
    def open(cls, folder: str | Path) -> Ledger:
        """The ledger at `folder`, every link verified (an absent or empty folder: no entries yet)."""
        folder = Path(folder)
        path = folder / ENTRIES
        if not (folder / HEAD).exists():
            if path.exists():
                raise _refused(folder, f"{HEAD} is missing")
            return cls(folder, ())
        claim(folder)
        head = _read_head(folder)  # before the entries: an append in between can only make the head lag
        lines = path.read_bytes().split(b"\n") if path.exists() else [b""]
        if lines[-1]:
            raise _refused(folder, f"entry {len(lines) - 1} is cut short (no line end)")
        entries: list[dict] = []
        for seq, line in enumerate(lines[:-1]):
            try:
                entry = json.loads(line)
            except ValueError:
                raise _refused(folder, f"entry {seq} is not valid JSON") from None
            prev = entries[-1]["hash"] if entries else None
            if not isinstance(entry, dict) or entry.get("seq") != seq or entry.get("prev") != prev:
                raise _refused(folder, f"entry {seq} does not follow entry {seq - 1}")
            if entry.get("hash") != entry_hash(entry):
                raise _refused(folder, f"entry {seq} was changed after it was written (its hash does not match)")
            entries.append(entry)
        ledger = cls(folder, tuple(entries))
        ledger._check_head(*head)
        return ledger

    def _check_head(self, count: int, last: str | None) -> None:
        """The head names the last entry, or the one before it: an append writes the entries, then the
        head, so a reader between the two (or an append that stopped there) sees the head one behind."""
        if count == len(self.entries) and last == self.head:
            return
        if count == len(self.entries) - 1 and last == (self.entries[count - 1]["hash"] if count else None):
            return
        raise _refused(
            self.folder,
            f"it holds {len(self.entries)} entries but its head records {count} ending in {str(last)[:12]} "
            f"(entries were removed or the head was replaced; the entry after {min(count, len(self.entries)) - 1})",
        )

    @property
    def head(self) -> str | None:
        return self.entries[-1]["hash"] if self.entries else None

    def entry_of(self, run: Path) -> dict[str, Any] | None:
        """The entry `run` appended, if any."""
        return next((e for e in self.entries if e["run"] == str(Path(run).resolve())), None)

    def before(self, run: Path) -> Ledger:
        """The ledger as `run` found it when it started: without its own entry and any after it."""
        mine = self.entry_of(run)
        return Ledger(self.folder, self.entries[: mine["seq"]]) if mine else self

    def expect(self, head: str | None) -> None:
        """Refused unless the ledger still ends at `head` (the one a run started from)."""
        if self.head == head:
            return
        if not self.entries:
            raise UserError(
                f"ledger {self.folder}: it is empty, but this run started from one with entries (was it moved or "
                "replaced?); fix: restore the ledger, or set ledger.path to where it is now"
            )
        raise UserError(
            f"ledger {self.folder}: entry {len(self.entries) - 1} was appended by run {self.entries[-1]['run_name']} "
            "after this run started from the ledger; fix: start a new run from the ledger's latest hand-off"
        )

    def erased(self) -> list[dict[str, Any]]:
        """Every request erased so far, in ledger order, each with `erased_in` (its entry's seq)."""
        return [dict(r, erased_in=e["seq"]) for e in self.entries for r in e["requests"]]

    def append(self, entry: dict[str, Any], after: str | None) -> dict[str, Any]:
        """Add `entry` (seq, prev and hash are set here) if the ledger still ends at `after`, the head
        the run started from; under the ledger's lock, so two runs cannot both extend one head."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        claim(self.folder)
        with FileLock(str(self.folder / ".lock")):
            if not (self.folder / HEAD).exists():
                atomic_write_json(self.folder / HEAD, {"entries": 0, "hash": None})
            now = Ledger.open(self.folder)
            now.expect(after)
            entry = json.loads(json.dumps(dict(entry, seq=len(now.entries), prev=after), default=str))
            entry["hash"] = entry_hash(entry)
            body = b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in (*now.entries, entry))
            atomic_write_text(self.folder / ENTRIES, body.decode())
            atomic_write_json(self.folder / HEAD, {"entries": entry["seq"] + 1, "hash": entry["hash"]})
        return entry


def lines(ledger: Ledger) -> list[str]:
    """`icu ledger PATH`: the verified chain, one line per run (ids and digests only, never text)."""
    runs = f"{len(ledger.entries)} run" + "s" * (len(ledger.entries) != 1)
    out = [f"ledger {ledger.folder.resolve()}: {runs}, every link verified"]
    for e in ledger.entries:
        statuses = [r["receipt"].get("status") for r in e["requests"]]
        out.append(
            f"  {e['seq']:>3}  {e['finished']}  {e['run_name']:<16} {len(statuses)} erased "
            f"({statuses.count('forgotten')} forgotten)  from {e['started_from']['digest'][:12]} "
            f"-> hand-off {e['handoff']['digest'][:12]} {e['handoff']['path']}"
        )
    out.append(f"  {len(ledger.erased())} requests erased in all")
    return out


def _read_head(folder: Path) -> tuple[int, str | None]:
    try:
        head = json.loads((folder / HEAD).read_text())
        return int(head["entries"]), head["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        raise _refused(folder, f"{HEAD} is unreadable") from None


def _refused(folder: Path, what: str) -> UserError:
    return UserError(
        f"ledger {folder}: {what}; it is append-only and hash-chained, so it was edited or truncated; fix: restore "
        "it from a backup (nothing is run from a ledger that does not verify)"
    )


def run_chain(store) -> dict[str, Any]:
    """The chain ingest wrote for a run (`start`; empty without a ledger)."""
    path = store.artefact("chain")
    return json.loads(path.read_text()) if path.exists() else {}


def first_original(chain: dict[str, Any], verify: bool = True) -> Path | None:
    """A chained run's first original model (the ledger's first run started from it), or None when
    this run starts from it. The terms that hold retained text hold it where the first original had
    it, and the evaluation measures drift against it (pipeline/method.md, "Continual erasure"), so
    it is refused when gone or changed (`verify`: the workers rely on the unlearn stage's check)."""
    first = chain.get("first_original")
    if not first or first["digest"] == chain["started_from"]["digest"]:
        return None
    path = Path(first["path"])
    if verify and (not path.is_dir() or file_digest(path) != first["digest"]):
        raise UserError(
            f"the ledger's first original model {path} is gone or changed since the first run; chained runs hold "
            "retained text to it and measure drift against it; fix: restore that folder (its digest is in the ledger)"
        )
    return path


def start(cfg, key_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The chain a run starts from (written by ingest as `chain`: the ledger's head, the first run's
    original model, thresholds and pinned inputs) and every request the ledger holds. Refused in one
    line when the run's model is not the ledger's latest hand-off, or its receipt key, unseen or
    strangers file is not the first run's (thresholds and the strangers' band must not drift)."""
    ledger = Ledger.open(cfg.ledger.path).before(cfg.run_dir)
    model = {"path": str(cfg.model_dir), "digest": file_digest(cfg.model_dir)}
    pinned = pinned_inputs(cfg, key_id)
    if not ledger.entries:
        return dict(head=None, entries=0, started_from=model, first_original=model, pinned=pinned, thresholds=None), []
    first, last = ledger.entries[0], ledger.entries[-1]
    if model["digest"] != last["handoff"]["digest"]:
        raise UserError(
            f"model.name: {cfg.model_dir} is not the ledger's latest hand-off ({last['handoff']['path']}, from run "
            f"{last['run_name']}, entry {last['seq']}); fix: set model.name to that folder (unchanged since its "
            "export), or use another ledger.path"
        )
    for name, value in pinned.items():
        if value != first["pinned"][name]:
            raise UserError(
                f"{PINNED[name]} differs from the ledger's first run ({first['run_name']}): every chained run "
                f"measures forgetting on the same inputs; fix: use the first run's {PINNED[name]}"
            )
    chain = dict(
        head=ledger.head,
        entries=len(ledger.entries),
        started_from=model,
        first_original=first["started_from"],
        pinned=pinned,
        thresholds=first["thresholds"],
    )
    return chain, ledger.erased()


PINNED = {
    "key_id": "the receipt key (ICU_RECEIPT_KEY / ICU_RECEIPT_KEY_FILE)",
    "unseen": "evaluation.unseen_path",
    "strangers": "unlearning.check.strangers_path",
}


def pinned_inputs(cfg, key_id: str) -> dict[str, str | None]:
    strangers = cfg.unlearning.check.strangers_path
    return {
        "key_id": key_id,
        "unseen": file_digest(cfg.evaluation.unseen_path) if cfg.evaluation.unseen_path else None,
        "strangers": file_digest(strangers) if strangers else None,
    }


def ready(cfg, chain: dict[str, Any]) -> None:
    """Before export writes a hand-off: refused when the ledger moved on since the run started, or when
    a later run already chains from this run's recorded hand-off (a rerun export would replace it)."""
    ledger = Ledger.open(cfg.ledger.path)
    mine = ledger.entry_of(cfg.run_dir)
    if mine is None:
        ledger.expect(chain["head"])
    elif mine["seq"] != len(ledger.entries) - 1:
        raise UserError(
            f"export refused: this run's hand-off is ledger entry {mine['seq']}, and later runs chain from it; fix: "
            f"restore {mine['handoff']['path']} as it was exported (its digest is in the ledger), or erase these "
            "requests in a new run from the ledger's latest hand-off"
        )


def refuse_restart(cfg) -> None:
    """`--restart-from` on a run the ledger records would replace the hand-off the ledger names."""
    mine = Ledger.open(cfg.ledger.path).entry_of(cfg.run_dir)
    if mine is not None:
        raise UserError(
            f"--restart-from: run {cfg.storage.name} is ledger entry {mine['seq']}; its hand-off is evidence later "
            "runs start from and must not be replaced; fix: make the change in a new run (another storage.name) from "
            "the ledger's latest hand-off"
        )


def record(cfg, chain: dict[str, Any], handoff: Path, requests: list[dict], thresholds: dict) -> dict[str, Any]:
    """Append the run's entry (`requests`: the ones this run erased) after the head it started from.
    A rerun export of a run already in the ledger changes nothing when its hand-off is the one recorded,
    and is refused when it is not: an entry is never rewritten."""
    run, digest = str(cfg.run_dir.resolve()), file_digest(handoff)
    ledger = Ledger.open(cfg.ledger.path)
    mine = ledger.entry_of(cfg.run_dir)
    if mine is not None:
        if mine["handoff"]["digest"] == digest:
            return mine
        raise UserError(
            f"ledger {ledger.folder}: this run already added entry {mine['seq']} with another hand-off; the ledger "
            "is append-only; fix: erase these requests in a new run from the ledger's latest hand-off"
        )
    entry = dict(
        run=run,
        run_name=cfg.storage.name,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        started_from=chain["started_from"],
        handoff={"path": str(handoff.resolve()), "digest": digest},
        pinned=chain["pinned"],
        thresholds=chain["thresholds"] or thresholds,
        requests=requests,
    )
    return ledger.append(entry, after=chain["head"])
