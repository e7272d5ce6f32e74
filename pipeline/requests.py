"""Ingest: every erasure request row ends in accepted.parquet or rejected.parquet.

Rows are streamed (bounded memory for any request count). csv and jsonl are parsed
row by row with the standard library, because Arrow-based readers abort a whole file
on one undecodable byte and we must reject that row alone; parquet files and saved
datasets are read with `datasets`. Request text is never logged: logs carry counts,
ids and content hashes only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RequestsConfig
from pipeline.errors import UserError
from pipeline.store import atomic_path

log = logging.getLogger("icu.ingest")

ACCEPTED_SCHEMA = pa.schema([
    ("id", pa.string()), ("content_hash", pa.string()), ("source_row", pa.int64()), ("text", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("n_tokens", pa.int32()), ("truncated", pa.bool_()),
])
REJECTED_SCHEMA = pa.schema([
    ("source_row", pa.int64()), ("id", pa.string()), ("content_hash", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()),
])
REASONS = {
    "undecodable": "the row is not valid UTF-8",
    "malformed_row": "the row could not be parsed (wrong field count or invalid JSON)",
    "missing_text": "the row has no text field",
    "not_text": "the text field is not a string",
    "empty": "the text is empty",
    "whitespace": "the text is only whitespace",
    "missing_id": "the id field is empty",
    "too_short": "fewer tokens than prefix_tokens + suffix_tokens",
    "too_long": "more tokens than allowed (requests.too_long: reject)",
    "duplicate": "same text (after normalisation) as an earlier accepted row",
    "duplicate_id": "same id as an earlier accepted row",
}
csv.field_size_limit(sys.maxsize)


@dataclass
class RawRow:
    """One input row before validation; `problem` is a reason key when parsing failed."""
    row: int
    text: object = None
    id: object = None
    problem: str | None = None
    detail: str = ""


def read_rows(cfg: RequestsConfig) -> Iterator[RawRow]:
    """Stream the request file's rows in order, numbering them from 0."""
    path, fmt = Path(cfg.path), detect_format(cfg)
    reader = {"csv": _read_csv, "jsonl": _read_jsonl, "json": _read_json,
              "parquet": _read_datasets, "dataset": _read_datasets}[fmt]
    rows = reader(path, cfg)
    for row in rows:
        if cfg.limit is not None and row.row >= cfg.limit:
            return
        yield row


def detect_format(cfg: RequestsConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    path = Path(cfg.path)
    if path.is_dir():
        return "dataset"
    suffix = path.suffix.lower()
    formats = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
               ".parquet": "parquet", ".pq": "parquet"}
    if suffix not in formats:
        raise UserError(f"requests.format: cannot tell the format of {path.name} from its suffix; fix: set "
                        "requests.format to jsonl, json, csv, parquet or dataset")
    return formats[suffix]


def _read_csv(path: Path, cfg: RequestsConfig) -> Iterator[RawRow]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise UserError(f"requests.path: {path} is empty; fix: provide a CSV with a header row")
        text_at = _column_index(header, cfg.text_column, "requests.text_column", path)
        id_at = _column_index(header, cfg.id_column, "requests.id_column", path) if cfg.id_column else None
        index = 0
        for fields in reader:
            if not fields:
                continue  # a blank line is not a row in CSV
            if len(fields) != len(header):
                yield RawRow(index, problem="malformed_row",
                             detail=f"{len(fields)} fields, header has {len(header)}")
            else:
                yield _decoded(RawRow(index, fields[text_at], fields[id_at] if id_at is not None else None))
            index += 1


def _read_jsonl(path: Path, cfg: RequestsConfig) -> Iterator[RawRow]:
    seen_text_key = False
    index = -1
    with open(path, "rb") as fh:
        for index, line in enumerate(l for l in fh if l.strip()):
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield RawRow(index, problem="undecodable")
                continue
            except json.JSONDecodeError as exc:
                yield RawRow(index, problem="malformed_row", detail=f"invalid JSON: {exc.msg}")
                continue
            seen_text_key |= isinstance(obj, dict) and cfg.text_column in obj
            yield _from_object(index, obj, cfg)
    if index >= 0 and not seen_text_key:
        raise UserError(f"requests.text_column: no row of {path} has a '{cfg.text_column}' field; fix: set "
                        "requests.text_column to the field that holds the text")


def _read_json(path: Path, cfg: RequestsConfig) -> Iterator[RawRow]:
    """A .json file: a JSON array of objects, or JSON lines."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _read_jsonl(path, cfg)
        return
    try:
        items = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"requests.path: {path} is not a valid JSON array ({exc}); fix: repair it or use "
                        "JSON lines, where one bad row is rejected on its own") from None
    if items and not any(isinstance(o, dict) and cfg.text_column in o for o in items):
        raise UserError(f"requests.text_column: no object in {path} has a '{cfg.text_column}' field; fix: "
                        "set requests.text_column")
    for index, obj in enumerate(items):
        yield _from_object(index, obj, cfg)


def _read_datasets(path: Path, cfg: RequestsConfig) -> Iterator[RawRow]:
    import datasets

    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                raise UserError(f"requests.path: {path} holds several splits ({', '.join(ds)}); fix: point "
                                "it at one split's folder")
        else:
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except (FileNotFoundError, ValueError, OSError, pa.ArrowInvalid) as exc:
        raise UserError(f"requests.path: cannot read {path} ({str(exc).splitlines()[0][:200]}); fix: "
                        "provide a parquet file or a folder written by Dataset.save_to_disk") from None
    _column_index(ds.column_names, cfg.text_column, "requests.text_column", path)
    if cfg.id_column:
        _column_index(ds.column_names, cfg.id_column, "requests.id_column", path)
    columns = [cfg.text_column] + ([cfg.id_column] if cfg.id_column else [])
    for index, record in enumerate(ds.select_columns(columns)):
        yield _decoded(RawRow(index, record[cfg.text_column], record[cfg.id_column] if cfg.id_column else None))


def _from_object(index: int, obj: object, cfg: RequestsConfig) -> RawRow:
    if not isinstance(obj, dict):
        return RawRow(index, problem="malformed_row", detail="not a JSON object")
    if cfg.text_column not in obj:
        return RawRow(index, problem="missing_text")
    return _decoded(RawRow(index, obj[cfg.text_column], obj.get(cfg.id_column) if cfg.id_column else None))


def _decoded(row: RawRow) -> RawRow:
    """Flag bytes that are not UTF-8 (surrogate escapes, raw bytes, lone surrogates)."""
    for value in (row.text, row.id):
        if isinstance(value, bytes):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return RawRow(row.row, problem="undecodable")
        elif isinstance(value, str) and _has_surrogates(value):
            return RawRow(row.row, problem="undecodable")
    if isinstance(row.text, bytes):
        row.text = row.text.decode("utf-8")
    if isinstance(row.id, bytes):
        row.id = row.id.decode("utf-8")
    return row


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _column_index(columns: list[str], name: str, key: str, path: Path) -> int:
    if name not in columns:
        shown = ", ".join(map(str, columns[:20]))
        raise UserError(f"{key}: column '{name}' not found in {path.name} (columns: {shown}); fix: set {key} "
                        "to one of them")
    return list(columns).index(name)


def normalise(text: str) -> str:
    """The form duplicates are judged on: NFKC, whitespace runs collapsed, trimmed."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


def content_hash(text: str) -> str:
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


class Ingestor:
    """Validates rows in order and routes each to accepted or rejected (see REASONS)."""

    def __init__(self, cfg: RequestsConfig, tokenizer, max_len: int):
        self.cfg, self.tok, self.max_len = cfg, tokenizer, max_len
        self.min_len = cfg.prefix_tokens + cfg.suffix_tokens
        self.seen_hashes: dict[str, str] = {}
        self.seen_ids: set[str] = set()

    def check(self, row: RawRow) -> tuple[dict | None, dict | None]:
        """(accepted record, None) or (None, rejected record)."""
        if row.problem:
            return None, self._reject(row, None, row.problem, row.detail)
        if row.text is None:
            return None, self._reject(row, None, "empty")
        if not isinstance(row.text, str):
            return None, self._reject(row, None, "not_text", type(row.text).__name__)
        if row.text == "":
            return None, self._reject(row, None, "empty")
        if not row.text.strip():
            return None, self._reject(row, None, "whitespace")
        user_id = None if row.id is None else str(row.id).strip()
        if self.cfg.id_column and not user_id:
            return None, self._reject(row, None, "missing_id")
        ids = self.tok(row.text, add_special_tokens=False)["input_ids"]
        text, truncated = row.text, False
        if len(ids) > self.max_len:
            if self.cfg.too_long == "reject":
                return None, self._reject(row, user_id, "too_long", f"{len(ids)} > {self.max_len} tokens")
            ids, truncated = ids[: self.max_len], True
            text = self.tok.decode(ids)
        digest = content_hash(text)
        if len(ids) < self.min_len:
            return None, self._reject(row, user_id, "too_short", f"{len(ids)} < {self.min_len} tokens",
                                      digest)
        if digest in self.seen_hashes:
            return None, self._reject(row, user_id, "duplicate", f"same as {self.seen_hashes[digest]}", digest)
        request_id = user_id or digest[:16]
        if request_id in self.seen_ids:
            return None, self._reject(row, user_id, "duplicate_id", "", digest)
        self.seen_hashes[digest] = request_id
        self.seen_ids.add(request_id)
        return dict(id=request_id, content_hash=digest, source_row=row.row, text=text, input_ids=ids,
                    n_tokens=len(ids), truncated=truncated), None

    @staticmethod
    def _reject(row: RawRow, user_id, reason: str, detail: str = "", digest: str | None = None) -> dict:
        return dict(source_row=row.row, id=user_id, content_hash=digest, reason=reason, detail=detail)


def ingest(cfg: RequestsConfig, tokenizer, max_len: int, out_dir: Path, chunk: int = 1000) -> dict:
    """Validate every row of the request file; write accepted/rejected parquet atomically.

    Returns counts: {"rows", "accepted", "rejected", "reasons": {reason: n}}.
    """
    from tqdm import tqdm

    ingestor = Ingestor(cfg, tokenizer, max_len)
    reasons: Counter = Counter()
    counts = Counter()
    with atomic_path(out_dir / "accepted.parquet") as acc_path, \
            atomic_path(out_dir / "rejected.parquet") as rej_path, \
            pq.ParquetWriter(acc_path, ACCEPTED_SCHEMA) as acc_writer, \
            pq.ParquetWriter(rej_path, REJECTED_SCHEMA) as rej_writer:
        accepted, rejected = [], []
        for row in tqdm(read_rows(cfg), desc="ingest", unit="row", mininterval=2, disable=None):
            good, bad = ingestor.check(row)
            counts["rows"] += 1
            if good:
                accepted.append(good)
            else:
                rejected.append(bad)
                reasons[bad["reason"]] += 1
            if len(accepted) >= chunk:
                _flush(acc_writer, ACCEPTED_SCHEMA, accepted)
            if len(rejected) >= chunk:
                _flush(rej_writer, REJECTED_SCHEMA, rejected)
        counts["accepted"] = ingestor_count = len(ingestor.seen_ids)
        _flush(acc_writer, ACCEPTED_SCHEMA, accepted)
        _flush(rej_writer, REJECTED_SCHEMA, rejected)
    counts["rejected"] = counts["rows"] - ingestor_count
    if counts["rows"] == 0:
        raise UserError(f"requests.path: {cfg.path} has no rows; fix: provide at least one erasure request")
    return {"rows": counts["rows"], "accepted": counts["accepted"], "rejected": counts["rejected"],
            "reasons": dict(sorted(reasons.items()))}


def _flush(writer: pq.ParquetWriter, schema: pa.Schema, records: list[dict]) -> None:
    if records:
        writer.write_table(pa.Table.from_pylist(records, schema=schema))
        records.clear()
