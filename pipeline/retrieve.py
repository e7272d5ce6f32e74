"""The retrieve stage: retain pool -> token chunks -> embeddings -> each request's neighbours.

Layout under runs/<name>/retrieval/:

    pool/items-NNNNN.parquet   the pool cut into chunks of the request length (id, text, input_ids)
    pool/counts.json           counts, and each items shard's size and sha256
    pool/emb-NNNNN.npy         their embeddings, one file per items shard, written atomically
    pool/emb-NNNNN.json        that file's size and sha256 and its items shard's sha256
    pool/fingerprint           what the shards were made from; a mismatch rebuilds them
    neighbours.parquet         request_id, rank, neighbour_id, score (squared L2, smaller is nearer)
    retain_items.parquet       the pool items that are someone's neighbour (what training reads)
    stats.json                 score percentiles, leak-guard exclusions, requests short of k and why

Embedding is the long part, so it is resumable per shard: a rerun after a kill embeds
only the shards whose emb file is missing or no longer matches its record; an items
shard that no longer matches counts.json is cut again. With Ray (`pipeline.cluster`
policy) the missing shards are embedded on a Ray Data actor pool of
`resources.embed_actors`; elsewhere (torchrun boxes) the same embedder runs in this
process. Both write identical shards.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline import cluster, modeling, suites
from pipeline.atomic import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    check_records,
    file_digest,
    file_records,
    sha256_file,
)
from pipeline.config import Config, RequestsConfig
from pipeline.errors import UserError
from pipeline.ingest import read_rows
from pipeline.store import RunStore, fingerprint

log = logging.getLogger("icu.retrieve")
OUTPUTS = (
    "neighbours",
    "retain_items",
    "general_items",
    "retrieval_stats",
    "pool",
)  # the pool: checked, so damage is re-made

ITEM_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("shard", pa.int32()),
        ("pos", pa.int32()),
    ]
)
TEXT_SUFFIXES = (".txt", ".md", ".text")


# -- reading and chunking the pool -----------------------------------------------------
def read_pool(paths: list[str], text_column: str) -> list[Iterator[tuple[str, str]]]:
    """Per retain source, a lazy stream of (row key, text) for every usable row, in order.

    A source is a jsonl/json/csv/parquet file, a saved `datasets` folder, or a folder of
    text files (one document per file). Unusable rows (malformed, undecodable, empty)
    are counted in the stats by `chunk_pool`, never silently lost. Row keys start with the
    source's name (`source_of`).
    """
    return [_read_source(Path(path), name, text_column) for path, name in zip(paths, source_names(paths))]


def _read_source(p: Path, name: str, text_column: str) -> Iterator[tuple[str, str]]:
    if p.is_dir() and not (p / "state.json").exists() and not (p / "dataset_dict.json").exists():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise UserError(
                f"retain.paths: {p} holds no dataset and no {'/'.join(TEXT_SUFFIXES)} files; "
                "fix: point it at a data file, a saved dataset or a folder of text files"
            )
        for f in files:
            yield f"{name}/{f.relative_to(p)}", f.read_text(encoding="utf-8", errors="replace")
        return
    cfg = RequestsConfig(path=str(p), text_column=text_column, max_tokens=None)
    try:
        for row in read_rows(cfg):
            text = row.text if row.problem is None and isinstance(row.text, str) else None
            yield f"{name}:{row.row}", text
    except UserError as exc:  # the reader speaks of requests.*; here the file is a retain source
        raise UserError(str(exc).replace("requests.path", "retain.paths").replace("requests.", "retain.")) from None


def source_names(paths: list[str]) -> list[str]:
    """Short, unique, stable names for the sources (file stems, numbered on collision)."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}#{i}" for i, s in enumerate(stems)]


def source_of(item_id: str, names: list[str]) -> str:
    """The source a pool item came from: its id is "<source>:<row>:<chunk>" or "<source>/<file>:<chunk>"."""
    return max((n for n in names if item_id.startswith((f"{n}:", f"{n}/"))), key=len)


def chunk_pool(cfg: Config, tokenizer, out: Path, chunk_tokens: int, shard_rows: int) -> dict[str, Any]:
    """Write the pool as items shards of <= chunk_tokens tokens each; return counts (with each
    shard's size and sha256)."""
    counts = {"rows": 0, "unusable_rows": 0, "empty_rows": 0, "items": 0, "shards": 0}
    items = itertools.islice(_chunks(cfg, tokenizer, chunk_tokens, counts), cfg.retain.max_items)
    while shard := list(itertools.islice(items, shard_rows)):
        _write_items(out, counts, shard)
    counts["records"] = [file_records(items_path(out, s))["."] for s in range(counts["shards"])]
    if counts["items"] == 0:
        raise UserError(
            "retain.paths: the retain pool has no usable text; fix: add retain files with a "
            f"'{cfg.retain.text_column}' column (or set retain.text_column)"
        )
    return counts


def _chunks(cfg: Config, tokenizer, chunk_tokens: int, counts: dict) -> Iterator[dict]:
    """The sources' chunks taken in turn, one from each source while it has any, so that
    `retain.max_items` cuts every source alike instead of leaving the last ones out."""
    bar = tqdm(desc="retain pool", unit=" rows", disable=None)
    streams = [
        _source_chunks(rows, tokenizer, chunk_tokens, counts, bar)
        for rows in read_pool(cfg.retain.paths, cfg.retain.text_column)
    ]
    while streams:
        for stream in list(streams):
            item = next(stream, None)
            if item is None:
                streams.remove(stream)
            else:
                yield item
    bar.close()


def _source_chunks(rows: Iterator[tuple[str, str]], tokenizer, chunk_tokens: int, counts: dict, bar) -> Iterator[dict]:
    for key, text in rows:
        counts["rows"] += 1
        bar.update()
        if text is None:
            counts["unusable_rows"] += 1
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            counts["empty_rows"] += 1
        for c, start in enumerate(range(0, len(ids), chunk_tokens)):
            piece = ids[start : start + chunk_tokens]
            yield {"id": f"{key}:{c}", "text": tokenizer.decode(piece), "input_ids": piece}


def _write_items(out: Path, counts: dict, rows: list[dict]) -> None:
    shard = counts["shards"]
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "text": [r["text"] for r in rows],
            "input_ids": [r["input_ids"] for r in rows],
            "shard": [shard] * len(rows),
            "pos": list(range(len(rows))),
        },
        schema=ITEM_SCHEMA,
    )
    with atomic_path(items_path(out, shard)) as tmp:
        pq.write_table(table, tmp)
    counts["shards"] += 1
    counts["items"] += len(rows)


def items_path(pool: Path, shard: int) -> Path:
    return pool / f"items-{shard:05d}.parquet"


def emb_path(pool: Path, shard: int) -> Path:
    return pool / f"emb-{shard:05d}.npy"


# -- embedding -------------------------------------------------------------------------
def embedder_spec(cfg: Config) -> dict[str, Any]:
    """Everything an embedding actor needs to build its embedder (plain data: it is shipped to Ray)."""
    kind = cfg.retrieval.embedder
    spec = {
        "kind": kind,
        "batch_size": cfg.retrieval.batch_size,
        "device": "cuda" if cfg.resources.use_gpu else "cpu",
        "cpus": cfg.resources.cpus_per_worker,
    }
    if kind == "lm":
        spec.update(
            model_dir=str(cfg.model_dir), trust_remote_code=cfg.model.trust_remote_code, max_length=chunk_length(cfg)
        )
    return spec


def make_embedder(spec: dict[str, Any]):
    """A SentenceEmbedder (MiniLM or a folder) or an LMEmbedder over the target model."""
    from retrieval.embed import LMEmbedder, SentenceEmbedder

    if spec["kind"] == "lm":
        model_dir = Path(spec["model_dir"])
        tokenizer = modeling.load_tokenizer(model_dir, spec["trust_remote_code"])
        model = modeling.load_model(model_dir, trust_remote_code=spec["trust_remote_code"]).to(spec["device"])
        return LMEmbedder(model, tokenizer, max_length=spec["max_length"], batch_size=spec["batch_size"])
    return SentenceEmbedder(
        None if spec["kind"] == "minilm" else spec["kind"], device=spec["device"], batch_size=spec["batch_size"]
    )


class EmbedActor:
    """Ray Data `map_batches` callable: items shard paths in, (shard, pos, embedding) rows out."""

    def __init__(self, spec: dict[str, Any]):
        torch.set_num_threads(max(1, int(spec["cpus"])))  # Ray pins OMP threads to 1 otherwise
        self.embedder = make_embedder(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        table = pa.concat_tables([pq.read_table(p, columns=["text", "shard", "pos"]) for p in batch["path"]])
        return {
            "shard": table["shard"].to_numpy(),
            "pos": table["pos"].to_numpy(),
            "embedding": self.embedder.embed(table["text"].to_pylist()),
        }


def embed_shards(
    pool: Path, shards: list[int], spec: dict[str, Any], use_ray: bool, actors: int = 1, on_count=None
) -> None:
    """Embed the given items shards into emb files; `on_count(n)` is told how many have landed."""
    if not shards:
        return
    bar = cluster.Progress("retrieve: embedding", len(shards), "shards", on_count)

    def landed(shard: int) -> None:
        bar.update(1)

    if use_ray:
        _embed_with_ray(pool, shards, spec, actors, landed)
    else:
        embedder = make_embedder(spec)
        for shard in shards:
            texts = pq.read_table(items_path(pool, shard), columns=["text"])["text"].to_pylist()
            _save_embeddings(pool, shard, embedder.embed(texts))
            landed(shard)
    bar.close()


def _embed_with_ray(pool: Path, shards: list[int], spec: dict[str, Any], actors: int, landed) -> None:
    """Ray Data: embed the items shards on an actor pool; write each shard once all its rows are back."""
    sizes = {s: pq.ParquetFile(items_path(pool, s)).metadata.num_rows for s in shards}
    # A whole shard per call lands shards early (the unit of resume).
    batches = cluster.actor_pool_map(
        EmbedActor,
        spec,
        [{"path": str(items_path(pool, s))} for s in shards],
        actors,
        spec["cpus"],
        1 if spec["device"] == "cuda" else 0,
    )
    parts: dict[int, dict[int, np.ndarray]] = {s: {} for s in shards}
    for batch in batches:
        for shard, pos, vec in zip(batch["shard"], batch["pos"], batch["embedding"]):
            parts[int(shard)][int(pos)] = vec
            if len(parts[int(shard)]) == sizes[int(shard)]:
                rows = parts.pop(int(shard))
                _save_embeddings(pool, int(shard), np.stack([rows[i] for i in range(len(rows))]))
                landed(int(shard))
    if parts:
        raise RuntimeError(f"Ray Data returned incomplete embeddings for shards {sorted(parts)}")


def _save_embeddings(pool: Path, shard: int, vectors: np.ndarray) -> None:
    """The emb file, then its record (its hash and its items shard's): the record makes it count."""
    with atomic_path(emb_path(pool, shard)) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(vectors, dtype=np.float32))
    record = {"emb": file_records(emb_path(pool, shard))["."], "items_sha256": sha256_file(items_path(pool, shard))}
    atomic_write_json(_emb_record(pool, shard), record)


def _emb_record(pool: Path, shard: int) -> Path:
    return pool / f"emb-{shard:05d}.json"


def missing_shards(pool: Path, counts: dict[str, Any]) -> list[int]:
    """Items shards whose embeddings are absent, or differ from their record, or were made
    from other items (an emb file is trusted only as far as its sha256)."""
    missing = []
    for s in range(counts["shards"]):
        try:
            record = json.loads(_emb_record(pool, s).read_text())
        except (OSError, ValueError):
            missing.append(s)
            continue
        if (
            record["items_sha256"] != counts["records"][s][1]
            or check_records(emb_path(pool, s), {".": record["emb"]}) is not None
        ):
            missing.append(s)
    return missing


def damaged_items(pool: Path, counts: dict[str, Any]) -> list[int]:
    """Items shards that no longer match the size and sha256 recorded when they were cut."""
    return [s for s in range(counts["shards"]) if check_records(items_path(pool, s), {".": counts["records"][s]})]


# -- the stage -------------------------------------------------------------------------
class _TextColumn:
    """Random access to a string column kept as Arrow buffers (a 1M-item pool is not 1M str objects)."""

    def __init__(self, column: pa.ChunkedArray):
        self.column = column.combine_chunks()

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int) -> str:
        return self.column[int(i)].as_py()


def build_pool(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Chunk (unless an identical, intact pool is there) and embed what is missing; return counts."""
    pool, pool_key = store.artefact("pool"), fingerprint("pool", *pool_fingerprint_parts(cfg))
    stamp = pool / "fingerprint"
    same_inputs = stamp.exists() and stamp.read_text() == pool_key
    counts = _read_counts(pool) if same_inputs else None
    damaged = damaged_items(pool, counts) if counts is not None else []
    if damaged:
        log.info("retrieve: items shards %s differ from their records; cutting the pool again", damaged)
        counts = None
    if counts is None:
        if pool.exists() and not same_inputs:
            log.info("retrieve: retain pool inputs changed; rebuilding its shards")
            shutil.rmtree(pool)
        pool.mkdir(parents=True, exist_ok=True)
        (pool / "counts.json").unlink(missing_ok=True)  # emb files stay: their records name their items
        tokenizer = modeling.load_tokenizer(cfg.model_dir, cfg.model.trust_remote_code)
        counts = chunk_pool(cfg, tokenizer, pool, chunk_length(cfg), cfg.retrieval.shard_rows)
        atomic_write_json(pool / "counts.json", counts)
        atomic_write_text(stamp, pool_key)
    todo = missing_shards(pool, counts)
    log.info(
        "retrieve: pool of %d items in %d shards; %d already embedded, %d to embed",
        counts["items"],
        counts["shards"],
        counts["shards"] - len(todo),
        len(todo),
    )
    done = counts["shards"] - len(todo)
    embed_shards(
        pool,
        todo,
        embedder_spec(cfg),
        cluster.use_ray(cfg),
        cfg.resources.embed_actors,
        lambda n: store.progress("retrieve", done + n, counts["shards"], "embedding shards"),
    )
    return counts


def _read_counts(pool: Path) -> dict[str, Any] | None:
    try:
        return json.loads((pool / "counts.json").read_text())
    except (OSError, ValueError):
        return None


def chunk_length(cfg: Config) -> int:
    """Retain items are cut to the request length (the paper pairs same-length sequences)."""
    return cfg.retain.chunk_tokens or cfg.max_tokens


def load_pool(pool: Path, n_shards: int) -> tuple[np.ndarray, list[str], _TextColumn]:
    tables = [pq.read_table(items_path(pool, s), columns=["id", "text"]) for s in range(n_shards)]
    table = pa.concat_tables(tables)
    vectors = np.concatenate([np.load(emb_path(pool, s)) for s in range(n_shards)])
    return vectors, table["id"].to_pylist(), _TextColumn(table["text"])


def find_request_neighbours(cfg: Config, store: RunStore, counts: dict[str, Any]) -> dict[str, Any]:
    """Embed the requests, search the pool with the leak guard on, write the neighbour table."""
    from retrieval.index import IndexSpec
    from retrieval.neighbours import find_neighbours, general_rows

    pool = store.artefact("pool")
    requests = pd.read_parquet(store.artefact("accepted"), columns=["id", "text"])
    if requests.empty:
        raise UserError(
            "retrieve: no accepted requests to find neighbours for; fix: see "
            "requests/rejected.parquet for why every row was rejected"
        )
    vectors, pool_ids, pool_texts = load_pool(pool, counts["shards"])
    request_vecs = make_embedder(embedder_spec(cfg)).embed(requests["text"].tolist())
    r = cfg.retrieval
    k = min(r.k, len(pool_ids))
    spec = IndexSpec(kind="auto" if r.index == "auto" else r.index, exact_max=r.exact_max)
    table, stats = find_neighbours(
        request_vecs,
        requests["id"].tolist(),
        vectors,
        pool_ids,
        k=k,
        index_spec=spec,
        leak_threshold=r.leak_threshold,
        request_texts=requests["text"].tolist(),
        pool_texts=pool_texts,
        ngram_threshold=r.ngram_threshold,
        n_shards=r.index_shards,
        use_ray=cluster.use_ray(cfg),
    )
    with atomic_path(store.artefact("neighbours")) as tmp:
        table.to_parquet(tmp, index=False)
    names = source_names(cfg.retain.paths)
    general = [
        pool_ids[i]
        for i in general_rows(
            request_vecs,
            requests["id"].tolist(),
            requests["text"].tolist(),
            vectors,
            pool_ids,
            pool_texts,
            [source_of(str(pid), names) for pid in pool_ids],
            r.general_per_source,
            exclude=table[table["rank"] < r.pairs_per_request]["neighbour_id"].unique(),
            leak_threshold=r.leak_threshold,
            ngram_threshold=r.ngram_threshold,
            held_out=suites.held_out_texts(cfg, modeling.load_tokenizer(cfg.model_dir, cfg.model.trust_remote_code))
            if r.general_per_source
            else (),
        )
    ]
    for name, ids in (("retain_items", table["neighbour_id"].unique()), ("general_items", general)):
        wanted = pa.array(ids, type=pa.string())
        with atomic_path(store.artefact(name)) as tmp:
            pq.write_table(
                pa.concat_tables([_rows_with_ids(items_path(pool, s), wanted) for s in range(counts["shards"])]), tmp
            )
    stats = {
        **stats,
        "pool_counts": {k: v for k, v in counts.items() if k != "records"},
        "requests_without_neighbours": sorted(set(requests["id"]) - set(table["request_id"])),
        "general_items": len(general),
    }
    atomic_write_json(store.artefact("retrieval_stats"), stats)
    return {
        "requests": len(requests),
        "pool_items": len(pool_ids),
        "k": k,
        "index": stats["index"]["kind"],
        "excluded_by_leak_guard": stats["excluded_count"],
        "short_of_k": stats["short_count"],
        "median_score": stats["score_percentiles"].get("p50"),
    }


def _rows_with_ids(path: Path, ids: pa.Array) -> pa.Table:
    table = pq.read_table(path, columns=["id", "text", "input_ids"])
    return table.filter(pc.is_in(table["id"], value_set=ids))


def pool_fingerprint_parts(cfg: Config) -> list[Any]:
    """What the pool shards depend on: the retain sources, the chunking tokenizer (the model
    folder's weights signature, as ingest's key), the embedder."""
    return [
        cfg.part("retain"),
        chunk_length(cfg),
        modeling.weights_signature(cfg.model_dir),
        embedder_spec(cfg),
        cfg.retrieval.shard_rows,
        [file_digest(p) for p in cfg.retain.paths],
    ]


def key(cfg: Config, store: RunStore) -> str:
    """The pool's inputs, the retrieval settings, the requests, and (for the general rows, which
    keep out what the evaluation measures perplexity on) the evaluation's ppl settings."""
    e = cfg.evaluation
    held_out = (
        [cfg.part("evaluation")[0]["data_dir"], e.ppl_chunk, e.max_samples.get("ppl"), "ppl" in e.suites]
        if cfg.retrieval.general_per_source
        else None
    )
    return fingerprint("retrieve", pool_fingerprint_parts(cfg), cfg.part("retrieval"), held_out, store.key_of("ingest"))


def run(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Find each accepted request's retain neighbours (`neighbours`, `retain_items`, `retrieval_stats`)."""
    if not cfg.retain.paths:
        raise UserError(
            "retain.paths: empty, but ICU needs retain text to pair with every request; fix: "
            "list retain files (jsonl, csv, parquet, a saved dataset or a folder of .txt files)"
        )
    summary = find_request_neighbours(cfg, store, build_pool(cfg, store))
    log.info(
        "retrieve: %d requests, pool %d items, %s index; %d pool items excluded by the leak guard, "
        "%d requests short of k",
        summary["requests"],
        summary["pool_items"],
        summary["index"],
        summary["excluded_by_leak_guard"],
        summary["short_of_k"],
    )
    return summary
