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

    python bench/retrieval.py [--n 1000000 --queries 10000 --kind ivf_flat]
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(message)s")

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    pool, gen_s = timed(mixture, args.n, centres, args.noise, 1)
    queries = mixture(args.queries, centres, args.noise, 2)
    print(f"pool: {args.n:,} x {args.dim} synthetic clustered vectors ({args.clusters} gaussian clusters, "
          f"noise {args.noise}, L2-normalised), {args.queries:,} queries from the same mixture; "
          f"generated in {gen_s:.1f}s")
    print(f"threads: faiss {faiss.omp_get_max_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")

    index, build_s = timed(build_index, pool, IndexSpec(kind=args.kind, target_recall=args.target_recall))
    params = ", ".join(f"{k}={v}" for k, v in index_params(index).items() if k not in ("kind", "size", "metric"))
    print(f"{args.kind} build: {build_s:.1f}s ({params}, calibrated for recall@10 >= {args.target_recall})")

    exact_q = queries[:args.exact_queries]
    (_, truth), exact_s = timed(faiss.knn, exact_q, pool, args.k)
    exact_qps = len(exact_q) / exact_s
    (_, found), approx_s = timed(search, index, queries, args.k, pool if args.kind == "ivf_pq" else None)
    approx_qps = len(queries) / approx_s
    recall = recall_at_k(found[:len(exact_q)], truth)
    print(f"exact flat search: {exact_qps:,.0f} queries/s (measured on {len(exact_q):,} queries in {exact_s:.1f}s; "
          f"10k queries would take ~{args.queries / exact_qps:.0f}s)")
    rerank = " (PQ shortlist of 4k re-scored exactly)" if args.kind == "ivf_pq" else ""
    print(f"{args.kind} search{rerank}: {approx_qps:,.0f} queries/s ({len(queries):,} queries in {approx_s:.2f}s)")
    print(f"RESULT recall@{args.k} = {recall:.4f}, throughput = {approx_qps / exact_qps:.1f}x exact "
          f"(target: recall >= 0.95 at >= 20x)")


if __name__ == "__main__":
    main()
