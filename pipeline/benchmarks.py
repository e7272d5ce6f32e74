"""Readers for the shared benchmark data (`evaluation.data_dir`, normally ../shared/data)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.errors import UserError


def read_texts(path: str | Path, column: str = "text", limit: int | None = None) -> list[str]:
    """Non-empty texts of one column of a csv/jsonl/parquet file, in file order."""
    path = Path(path)
    readers = {".csv": pd.read_csv, ".parquet": pd.read_parquet,
               ".jsonl": lambda p: pd.read_json(p, lines=True), ".json": pd.read_json}
    if path.suffix not in readers:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use csv, jsonl, json or parquet")
    if not path.is_file():
        raise UserError(f"{path}: not found; fix: set evaluation.data_dir to the shared data folder")
    frame = readers[path.suffix](path)
    if column not in frame.columns:
        raise UserError(f"{path}: no column {column!r} (columns: {', '.join(map(str, frame.columns))})")
    texts = [t for t in frame[column].tolist() if isinstance(t, str) and t.strip()]
    return texts[:limit] if limit else texts


def unseen_rows(path: str | Path, tokenizer, max_tokens: int, min_tokens: int,
                limit: int | None) -> list[list[int]]:
    """Token rows of text the model never saw (`evaluation.unseen_path`, held-out Pile text by
    default): the forgetting thresholds' yardstick.

    Rows are cut to `max_tokens` (the request length) and rows shorter than `min_tokens`
    (prefix + suffix) are skipped, so they look like requests.
    """
    rows = []
    for text in read_texts(path):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) >= min_tokens:
            rows.append(ids)
        if limit and len(rows) >= limit:
            break
    return rows
