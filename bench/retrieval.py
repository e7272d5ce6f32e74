"""Approximate vs exact neighbour search on a large pool: build time, throughput, recall@10.

Pool: SYNTHETIC clustered vectors, not text embeddings: `--clusters` gaussian clusters in
384 dimensions (MiniLM's width), unit-norm centres, gaussian noise of expected length
`--noise` times the centre's (default 1: within-cluster cosine ~0.5, close to the 0.5-0.7
cosine of real MiniLM neighbours on the ICU data; larger is harder), every vector
L2-normalised.
Queries are fresh draws from the same mixture (not pool members).

Exact throughput is measured with FAISS brute force on the first `--exact-queries`
queries and quoted per query (brute force cost is linear in the query count, so this
is the 10k-query rate without spending minutes on it); recall@10 is measured on those
same queries. Both sides run in this process, on the same cores, in the same run.

Embedding throughput: the same real texts (rows of the shared pile.csv, repeated past
its 1500 rows when --embed-items asks for more) embedded with
MiniLM by the bare model in this process, then by the stage's Ray Data path (items
shards -> `map_batches` on one actor given as many CPUs (threads) as the bare model uses); both timings include loading
the model, the Ray one also the pipeline start (Ray itself is started beforehand).

    python bench/retrieval.py [--n 1000000 --queries 10000 --kind ivf_flat] [--embed-items 1500]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval.index import IndexSpec, build_index, index_params, recall_at_k, search  # noqa: E402

DATA = Path(os.environ.get("ICU_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def mixture(n: int, centres: np.ndarray, noise: float, seed: int, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors from the gaussian mixture around `centres`, built in chunks to cap memory."""
    rng = np.random.default_rng(seed)
    k, d = centres.shape
    out = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        x = centres[rng.integers(0, k, b - a)]
        x += noise / np.sqrt(d) * rng.standard_normal((b - a, d), dtype=np.float32)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--exact-queries", type=int, default=1_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--kind", default="ivf_flat", choices=["ivf_flat", "ivf_pq", "hnsw"])
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--embed-items", type=int, default=1500, help="texts for the embedding comparison (0: skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    if args.embed_items:
        embedding_overhead(args.embed_items)
    search_speed(args)


def embedding_overhead(n_items: int, shard_rows: int = 256) -> None:
    """Ray Data embedding vs the bare model on the same texts: wall time ratio and max difference."""
    import tempfile

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from pipeline import retrieve
    from retrieval.embed import SentenceEmbedder

    rows = pd.read_csv(DATA / "icu_benchmark" / "pile.csv")["text"].astype(str).tolist()
    texts = (rows * (-(-n_items // len(rows))))[:n_items]  # the 1500 rows again when more are asked for
    start = time.perf_counter()
    bare = SentenceEmbedder(batch_size=64)
    load_s = time.perf_counter() - start
    vectors, forward_s = timed(bare.embed, texts)
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp)
        for s, a in enumerate(range(0, len(texts), shard_rows)):
            part = texts[a : a + shard_rows]
            pq.write_table(
                pa.table({"text": part, "shard": [s] * len(part), "pos": list(range(len(part)))}),
                retrieve.items_path(pool, s),
            )
        shards = list(range(-(-len(texts) // shard_rows)))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
        spec = {"kind": "minilm", "batch_size": 64, "device": "cpu", "cpus": torch.get_num_threads()}
        _, ray_s = timed(retrieve.embed_shards, pool, shards, spec, True, 1)
        ray_vectors = np.concatenate([np.load(retrieve.emb_path(pool, s)) for s in shards])
        ray.shutdown()
    bare_s = load_s + forward_s
    print(
        f"embedding {len(texts):,} pile texts with MiniLM: bare model {len(texts) / bare_s:,.1f} texts/s "
        f"(load {load_s:.1f}s + forward {forward_s:.1f}s), Ray Data 1 actor {len(texts) / ray_s:,.1f} texts/s "
        f"({ray_s:.1f}s); max |difference| {np.abs(ray_vectors - vectors).max():.1e}"
    )
    print(f"RESULT Ray Data embedding overhead = {ray_s / bare_s:.2f}x the bare model (target <= 1.2)")


def search_speed(args: argparse.Namespace) -> None:
    """Approximate vs exact search on the synthetic pool."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    pool, gen_s = timed(mixture, args.n, centres, args.noise, 1)
    queries = mixture(args.queries, centres, args.noise, 2)
    print(
        f"pool: {args.n:,} x {args.dim} synthetic clustered vectors ({args.clusters} gaussian clusters, "
        f"noise {args.noise}, L2-normalised), {args.queries:,} queries from the same mixture; "
        f"generated in {gen_s:.1f}s"
    )
    print(f"threads: faiss {faiss.omp_get_max_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")

    index, build_s = timed(build_index, pool, IndexSpec(kind=args.kind, target_recall=args.target_recall))
    params = ", ".join(f"{k}={v}" for k, v in index_params(index).items() if k not in ("kind", "size", "metric"))
    print(f"{args.kind} build: {build_s:.1f}s ({params}, calibrated for recall@10 >= {args.target_recall})")

    exact_q = queries[: args.exact_queries]
    (_, truth), exact_s = timed(faiss.knn, exact_q, pool, args.k)
    exact_qps = len(exact_q) / exact_s
    (_, found), approx_s = timed(search, index, queries, args.k, pool if args.kind == "ivf_pq" else None)
    approx_qps = len(queries) / approx_s
    recall = recall_at_k(found[: len(exact_q)], truth)
    print(
        f"exact flat search: {exact_qps:,.0f} queries/s (measured on {len(exact_q):,} queries in {exact_s:.1f}s; "
        f"10k queries would take ~{args.queries / exact_qps:.0f}s)"
    )
    rerank = " (PQ shortlist of 4k re-scored exactly)" if args.kind == "ivf_pq" else ""
    print(f"{args.kind} search{rerank}: {approx_qps:,.0f} queries/s ({len(queries):,} queries in {approx_s:.2f}s)")
    print(
        f"RESULT recall@{args.k} = {recall:.4f}, throughput = {approx_qps / exact_qps:.1f}x exact "
        f"(target: recall >= 0.95 at >= 20x)"
    )


if __name__ == "__main__":
    main()
