"""The retrieve stage: retain pool -> token chunks -> embeddings -> each request's neighbours.

Layout under runs/<name>/retrieval/:

    pool/items-NNNNN.parquet   the pool cut into chunks of the request length (id, text, input_ids)
    pool/emb-NNNNN.npy         their embeddings, one file per items shard, written atomically
    pool/fingerprint           what the shards were made from; a mismatch rebuilds them
    neighbours.parquet         request_id, rank, neighbour_id, score (squared L2, smaller is nearer)
    retain_items.parquet       the pool items that are someone's neighbour (what training reads)
    stats.json                 score percentiles, leak-guard exclusions, requests short of k and why

Embedding is the long part, so it is resumable per shard: a rerun after a kill embeds
only the shards whose emb file is missing. On a Ray cluster (resources.launcher: ray)
Ray Data reads the missing items shards and embeds them with `map_batches` on an actor
pool of `resources.embed_actors`; elsewhere (torchrun boxes) the same embedder runs in
this process. Both write identical shards.
"""

from __future__ import annotations

import itertools
import json
import logging
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

from pipeline import modeling
from pipeline.config import Config, RequestsConfig
from pipeline.errors import UserError
from pipeline.requests import read_rows
from pipeline.store import RunStore, atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger("icu.retrieve")

ITEM_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("input_ids", pa.list_(pa.int32())),
                         ("shard", pa.int32()), ("pos", pa.int32())])
TEXT_SUFFIXES = (".txt", ".md", ".text")


# -- reading and chunking the pool -----------------------------------------------------
def read_pool(paths: list[str], text_column: str) -> Iterator[tuple[str, str]]:
    """(source key, text) for every usable row of every retain source, in order.

    A source is a jsonl/json/csv/parquet file, a saved `datasets` folder, or a folder of
    text files (one document per file). Unusable rows (malformed, undecodable, empty)
    are counted in the stats by `chunk_pool`, never silently lost.
    """
    names = _source_names(paths)
    for path, name in zip(paths, names):
        p = Path(path)
        if p.is_dir() and not (p / "state.json").exists() and not (p / "dataset_dict.json").exists():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise UserError(f"retain.paths: {p} holds no dataset and no {'/'.join(TEXT_SUFFIXES)} files; "
                                "fix: point it at a data file, a saved dataset or a folder of text files")
            for f in files:
                yield f"{name}/{f.relative_to(p)}", f.read_text(encoding="utf-8", errors="replace")
            continue
        cfg = RequestsConfig(path=str(p), text_column=text_column, max_tokens=None)
        try:
            for row in read_rows(cfg):
                text = row.text if row.problem is None and isinstance(row.text, str) else None
                yield f"{name}:{row.row}", text
        except UserError as exc:  # the reader speaks of requests.*; here the file is a retain source
            raise UserError(str(exc).replace("requests.path", "retain.paths").replace("requests.", "retain.")) \
                from None


def _source_names(paths: list[str]) -> list[str]:
    """Short, unique, stable names for the sources (file stems, numbered on collision)."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}#{i}" for i, s in enumerate(stems)]


def chunk_pool(cfg: Config, tokenizer, out: Path, chunk_tokens: int, shard_rows: int) -> dict[str, Any]:
    """Write the pool as items shards of <= chunk_tokens tokens each; return counts."""
    counts = {"rows": 0, "unusable_rows": 0, "empty_rows": 0, "items": 0, "shards": 0}
    items = itertools.islice(_chunks(cfg, tokenizer, chunk_tokens, counts), cfg.retain.max_items)
    while shard := list(itertools.islice(items, shard_rows)):
        _write_items(out, counts, shard)
    if counts["items"] == 0:
        raise UserError("retain.paths: the retain pool has no usable text; fix: add retain files with a "
                        f"'{cfg.retain.text_column}' column (or set retain.text_column)")
    return counts


def _chunks(cfg: Config, tokenizer, chunk_tokens: int, counts: dict) -> Iterator[dict]:
    rows = tqdm(read_pool(cfg.retain.paths, cfg.retain.text_column), desc="retain pool", unit=" rows",
                disable=None)
    for key, text in rows:
        counts["rows"] += 1
        if text is None:
            counts["unusable_rows"] += 1
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            counts["empty_rows"] += 1
        for c, start in enumerate(range(0, len(ids), chunk_tokens)):
            piece = ids[start:start + chunk_tokens]
            yield {"id": f"{key}:{c}", "text": tokenizer.decode(piece), "input_ids": piece}


def _write_items(out: Path, counts: dict, rows: list[dict]) -> None:
    shard = counts["shards"]
    table = pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows],
                      "input_ids": [r["input_ids"] for r in rows], "shard": [shard] * len(rows),
                      "pos": list(range(len(rows)))}, schema=ITEM_SCHEMA)
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
    spec = {"kind": kind, "batch_size": cfg.retrieval.batch_size,
            "device": "cuda" if cfg.resources.use_gpu else "cpu", "cpus": cfg.resources.cpus_per_worker}
    if kind == "lm":
        spec.update(model=cfg.model.name, trust_remote_code=cfg.model.trust_remote_code,
                    max_length=cfg.retain.chunk_tokens or cfg.requests.max_tokens or 512)
    return spec


def make_embedder(spec: dict[str, Any]):
    """A SentenceEmbedder (MiniLM or a folder) or an LMEmbedder over the target model."""
    from retrieval.embed import LMEmbedder, SentenceEmbedder

    if spec["kind"] == "lm":
        model_dir = modeling.resolve_model_dir(spec["model"])
        tokenizer = modeling.load_tokenizer(model_dir, spec["trust_remote_code"])
        model = modeling.load_model(model_dir, trust_remote_code=spec["trust_remote_code"]).to(spec["device"])
        return LMEmbedder(model, tokenizer, max_length=spec["max_length"], batch_size=spec["batch_size"])
    return SentenceEmbedder(None if spec["kind"] == "minilm" else spec["kind"], device=spec["device"],
                            batch_size=spec["batch_size"])


class EmbedActor:
    """Ray Data `map_batches` callable: items shard paths in, (shard, pos, embedding) rows out."""

    def __init__(self, spec: dict[str, Any]):
        torch.set_num_threads(max(1, int(spec["cpus"])))  # Ray pins OMP threads to 1 otherwise
        self.embedder = make_embedder(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        table = pa.concat_tables([pq.read_table(p, columns=["text", "shard", "pos"]) for p in batch["path"]])
        return {"shard": table["shard"].to_numpy(), "pos": table["pos"].to_numpy(),
                "embedding": self.embedder.embed(table["text"].to_pylist())}


def embed_shards(pool: Path, shards: list[int], spec: dict[str, Any], use_ray: bool, actors: int = 1,
                 on_shard=None) -> None:
    """Embed the given items shards into emb files; `on_shard(i)` is called as each lands."""
    if not shards:
        return
    bar = tqdm(total=len(shards), desc="embedding", unit=" shards", disable=None)

    def landed(shard: int) -> None:
        bar.update(1)
        if on_shard:
            on_shard(shard)

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
    import ray

    from pipeline.launch import ensure_ray

    ensure_ray()
    sizes = {s: pq.ParquetFile(items_path(pool, s)).metadata.num_rows for s in shards}
    # One shard per block and per call: Ray's parquet reader would merge small files into
    # one block and starve the actor pool, and a whole shard per call lands shards early.
    ds = ray.data.from_items([{"path": str(items_path(pool, s))} for s in shards], override_num_blocks=len(shards))
    gpus = 1 if spec["device"] == "cuda" else 0
    ds = ds.map_batches(EmbedActor, fn_constructor_kwargs={"spec": spec}, batch_size=1,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=spec["cpus"], num_gpus=gpus)
    parts: dict[int, dict[int, np.ndarray]] = {s: {} for s in shards}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for shard, pos, vec in zip(batch["shard"], batch["pos"], batch["embedding"]):
            parts[int(shard)][int(pos)] = vec
            if len(parts[int(shard)]) == sizes[int(shard)]:
                rows = parts.pop(int(shard))
                _save_embeddings(pool, int(shard), np.stack([rows[i] for i in range(len(rows))]))
                landed(int(shard))
    if parts:
        raise RuntimeError(f"Ray Data returned incomplete embeddings for shards {sorted(parts)}")


def _save_embeddings(pool: Path, shard: int, vectors: np.ndarray) -> None:
    with atomic_path(emb_path(pool, shard)) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(vectors, dtype=np.float32))


def missing_shards(pool: Path, n_shards: int) -> list[int]:
    """Items shards whose embeddings are absent or do not have one row per item."""
    missing = []
    for s in range(n_shards):
        path = emb_path(pool, s)
        if not path.exists() or np.load(path, mmap_mode="r").shape[0] != \
                pq.ParquetFile(items_path(pool, s)).metadata.num_rows:
            missing.append(s)
    return missing


# -- the stage -------------------------------------------------------------------------
class _TextColumn:
    """Random access to a string column kept as Arrow buffers (a 1M-item pool is not 1M str objects)."""

    def __init__(self, column: pa.ChunkedArray):
        self.column = column.combine_chunks()

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int) -> str:
        return self.column[int(i)].as_py()


def build_pool(cfg: Config, store: RunStore, pool_key: str) -> dict[str, Any]:
    """Chunk (unless an identical pool is already there) and embed what is missing; return pool counts."""
    pool = store.stage_dir("retrieve") / "pool"
    stamp = pool / "fingerprint"
    if not (stamp.exists() and stamp.read_text() == pool_key and (pool / "counts.json").exists()):
        if pool.exists():
            log.info("retrieve: retain pool inputs changed or incomplete; rebuilding its shards")
            for f in pool.iterdir():
                f.unlink()
        pool.mkdir(parents=True, exist_ok=True)
        model_dir = modeling.resolve_model_dir(cfg.model.name)
        tokenizer = modeling.load_tokenizer(model_dir, cfg.model.trust_remote_code)
        counts = chunk_pool(cfg, tokenizer, pool, chunk_length(cfg, model_dir), cfg.retrieval.shard_rows)
        atomic_write_json(pool / "counts.json", counts)
        atomic_write_text(stamp, pool_key)
    counts = json.loads((pool / "counts.json").read_text())
    todo = missing_shards(pool, counts["shards"])
    done = counts["shards"] - len(todo)
    log.info("retrieve: pool of %d items in %d shards; %d already embedded, %d to embed", counts["items"],
             counts["shards"], done, len(todo))

    def landed(_shard: int) -> None:
        nonlocal done
        done += 1
        store.progress("retrieve", done, counts["shards"], "embedding shards")

    embed_shards(pool, todo, embedder_spec(cfg), cfg.resources.launcher == "ray", cfg.resources.embed_actors,
                 landed)
    return counts


def chunk_length(cfg: Config, model_dir: Path) -> int:
    """Retain items are cut to the request length (the paper pairs same-length sequences)."""
    return cfg.retain.chunk_tokens or cfg.requests.max_tokens or modeling.context_length(model_dir)


def load_pool(pool: Path, n_shards: int) -> tuple[np.ndarray, list[str], _TextColumn]:
    tables = [pq.read_table(items_path(pool, s), columns=["id", "text"]) for s in range(n_shards)]
    table = pa.concat_tables(tables)
    vectors = np.concatenate([np.load(emb_path(pool, s)) for s in range(n_shards)])
    return vectors, table["id"].to_pylist(), _TextColumn(table["text"])


def find_request_neighbours(cfg: Config, store: RunStore, counts: dict[str, Any]) -> dict[str, Any]:
    """Embed the requests, search the pool with the leak guard on, write the neighbour table."""
    from retrieval.index import IndexSpec
    from retrieval.neighbours import find_neighbours

    out = store.stage_dir("retrieve")
    requests = pd.read_parquet(store.path("requests", "accepted.parquet"), columns=["id", "text"])
    if requests.empty:
        raise UserError("retrieve: no accepted requests to find neighbours for; fix: see "
                        "requests/rejected.parquet for why every row was rejected")
    vectors, pool_ids, pool_texts = load_pool(out / "pool", counts["shards"])
    request_vecs = make_embedder(embedder_spec(cfg)).embed(requests["text"].tolist())
    r = cfg.retrieval
    k = min(r.k, len(pool_ids))
    spec = IndexSpec(kind="auto" if r.index == "auto" else r.index, exact_max=r.exact_max)
    table, stats = find_neighbours(request_vecs, requests["id"].tolist(), vectors, pool_ids, k=k, index_spec=spec,
                                   leak_threshold=r.leak_threshold, request_texts=requests["text"].tolist(),
                                   pool_texts=pool_texts, ngram_threshold=r.ngram_threshold,
                                   n_shards=r.index_shards)
    with atomic_path(out / "neighbours.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    wanted = pa.array(table["neighbour_id"].unique())
    used = pa.concat_tables([_rows_with_ids(items_path(out / "pool", s), wanted) for s in range(counts["shards"])])
    with atomic_path(out / "retain_items.parquet") as tmp:
        pq.write_table(used, tmp)
    stats = {**stats, "pool_counts": counts, "requests_without_neighbours":
             sorted(set(requests["id"]) - set(table["request_id"]))}
    atomic_write_json(out / "stats.json", stats)
    return {"requests": len(requests), "pool_items": len(pool_ids), "k": k, "index": stats["index"]["kind"],
            "excluded_by_leak_guard": stats["excluded_count"], "short_of_k": stats["short_count"],
            "median_score": stats["score_percentiles"].get("p50")}


def _rows_with_ids(path: Path, ids: pa.Array) -> pa.Table:
    table = pq.read_table(path, columns=["id", "text", "input_ids"])
    return table.filter(pc.is_in(table["id"], value_set=ids))


def pool_fingerprint_parts(cfg: Config) -> list[Any]:
    """What the pool shards depend on: the retain sources, the chunking tokenizer, the embedder."""
    from pipeline.store import file_digest

    return [cfg.retain, cfg.requests.max_tokens, cfg.model.name, embedder_spec(cfg), cfg.retrieval.shard_rows,
            [file_digest(p) for p in cfg.retain.paths]]
