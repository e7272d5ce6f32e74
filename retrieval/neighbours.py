"""The k nearest retain-pool neighbours of every forget request, with a leak guard.

ICU trains each request's neighbour with plain NLL plus KL to the original model, so a
neighbour that is a near-copy of ANY request would re-teach exactly what is being
erased. A pool item is excluded from every request's neighbours when, against any
request, it is:

- an exact copy (same text after whitespace normalisation; without texts, cosine 1);
- embedding-close: cosine >= `leak_threshold` (default 0.90) on L2-normalised vectors;
- n-gram-close: overlap of hashed, lower-cased word 8-gram shingles >= `ngram_threshold`
  (default 0.30), measured as |shared| / |shingles of the SHORTER text|, so a pool item
  that contains a request, or is contained in one, scores high either way.

Why these thresholds (measured with all-MiniLM-L6-v2 on the ICU benchmark: the 128 exp0
requests against pile + wikitext + the other four forget sets, 2512 texts, each cut to
1000 characters; near-copies made by replacing a fraction of a request's words, over
the 109 requests with >= 40 words):
- cosine 0.90: a request's 10th-best pool item has cosine < 0.81 for 99% of requests,
  so the test never costs a request its neighbour list; the 37 pool items it removes
  are shared boilerplate (a Techdirt footer, Intel-HEX dumps, licence headers,
  generated HTML) that sits next to the request's own copy of it. Cosine
  is a weak copy detector, though: it flags 79% of copies with 2% of words changed and
  25% with 5% (median cosine 0.95 and 0.84), so it mainly catches copies whose words
  changed form (re-formatting, hex, casing) where shingles break.
- 8-gram overlap 0.30: changing a fraction f of the words keeps about (1-f)^8 of the
  shingles; 0.30 flags 100% of copies at 5% changed words, 88% at 10%, 37% at 15%,
  5% at 20% (0.50 would flag only 14% at 10%). It removes 67 pool items (2.7%), all
  sharing long verbatim runs with a request (licence headers, boilerplate): exactly
  the text the retain term must not re-teach.
In all 107 of 2512 pool items (4.3%) are excluded; the candidate-only check below finds
106 of them (the other was never proposed as anyone's neighbour).
Texts too short to have one 8-gram (a few long tokens, e.g. hex dumps) rely on the
embedding and exact-copy tests.

How it scales: the pool index proposes each request's top-K' (K' > k, over-fetching);
every pool item proposed for ANY request is checked against EVERY request (exact cosine
via brute-force kNN over the requests, which are few compared with the pool; shingles
via a sorted hash table of the requests' shingles), so the guard costs work only for
items that could be returned. Candidates are re-scored exactly from the pool vectors.
A request left with fewer than k neighbours is searched again with K' x 4 until the
whole pool has been seen; if it still falls short, `stats["short"]` says why.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

import faiss
import numpy as np
import pandas as pd

from retrieval.embed import l2_normalise
from retrieval.index import IndexSpec, ShardedIndex, as_matrix, build_index, exact_scores, index_params, order_results

LEAK_THRESHOLD = 0.90
NGRAM_N = 8
NGRAM_THRESHOLD = 0.30
_PRIME = np.uint64(1099511628211)  # FNV-64 prime: mixes word hashes into one shingle hash


def find_neighbours(
    request_vecs: np.ndarray,
    request_ids: Sequence,
    pool_vecs: np.ndarray,
    pool_ids: Sequence,
    k: int = 10,
    index_spec: IndexSpec | None = None,
    leak_threshold: float = LEAK_THRESHOLD,
    request_texts: Sequence[str] | None = None,
    pool_texts: Sequence[str] | None = None,
    ngram_n: int = NGRAM_N,
    ngram_threshold: float = NGRAM_THRESHOLD,
    n_shards: int = 1,
    use_ray: bool = False,
) -> tuple[pd.DataFrame, dict]:
    """Neighbour table [request_id, rank (0 = nearest), neighbour_id, score] and stats.

    Scores are exact squared L2 (metric "l2", smaller is nearer) or inner product ("ip").
    Texts are optional; without them only the embedding and cosine-1 tests run.
    `n_shards` > 1 splits the pool into that many indexes searched in parallel (pools
    too large for one index), as Ray tasks with `use_ray`; the merged result is the same.
    """
    request_vecs, pool_vecs = as_matrix(request_vecs), as_matrix(pool_vecs)
    _check_inputs(request_vecs, request_ids, pool_vecs, pool_ids, request_texts, pool_texts, k)
    spec = index_spec or IndexSpec()
    index = ShardedIndex.build(pool_vecs, spec, n_shards, use_ray) if n_shards > 1 else build_index(pool_vecs, spec)
    guard = LeakGuard(request_vecs, request_ids, leak_threshold, request_texts, ngram_n, ngram_threshold)
    verdicts: dict[int, str | None] = {}
    kept: dict[int, list[tuple[int, float]]] = {}
    fetched: dict[int, int] = {}
    todo, fetch = np.arange(len(request_vecs)), min(len(pool_vecs), 2 * k + 16)
    while len(todo):
        rows = index.search(request_vecs[todo], fetch)[1]
        new = np.setdiff1d(rows[rows >= 0], np.fromiter(verdicts, dtype=np.int64, count=len(verdicts)))
        new_texts = None if pool_texts is None else [pool_texts[i] for i in new]
        verdicts.update(guard.check(new, pool_vecs[new], new_texts))
        unsafe = np.fromiter((r for r, why in verdicts.items() if why is not None), dtype=np.int64)
        rows = np.where((rows >= 0) & ~np.isin(rows, unsafe), rows, -1)
        scores, rows = order_results(
            exact_scores(request_vecs[todo], pool_vecs, rows, spec.metric), rows, spec.metric, fetch
        )
        for q, s, r in zip(todo, scores, rows):
            kept[int(q)] = [(int(i), float(v)) for i, v in zip(r, s) if i >= 0][:k]
            fetched[int(q)] = fetch
        todo = np.array([q for q in todo if len(kept[int(q)]) < k and fetch < len(pool_vecs)], dtype=np.int64)
        fetch = min(len(pool_vecs), 4 * fetch)
    table = _table(kept, request_ids, pool_ids)
    stats = _stats(table, kept, fetched, verdicts, request_ids, pool_ids, len(pool_vecs), k)
    params = index_params(index.shards[0]) if n_shards > 1 else index_params(index)
    return table, {**stats, "index": {**params, "size": len(pool_vecs), "shards": n_shards}}


def general_rows(
    request_vecs: np.ndarray,
    request_ids: Sequence,
    request_texts: Sequence[str],
    pool_vecs: np.ndarray,
    pool_ids: Sequence,
    pool_texts: Sequence[str],
    pool_sources: Sequence[str],
    per_source: int,
    exclude: Sequence,
    seed: int = 0,
    leak_threshold: float = LEAK_THRESHOLD,
    ngram_n: int = NGRAM_N,
    ngram_threshold: float = NGRAM_THRESHOLD,
    held_out: Sequence[str] = (),
) -> list[int]:
    """Pool rows kept as general retain text: up to `per_source` per source, drawn at random (seeded)
    from the items that are not in `exclude` (the neighbours trained on), pass the leak guard, and
    share no more than `ngram_threshold` of their word n-grams with any `held_out` text (what the
    evaluation measures: training on it would flatter the utility numbers).

    `pool_sources` names each pool row's source (its retain file); the quota per source keeps one
    large corpus from filling the set.
    """
    if per_source <= 0:
        return []
    guard = LeakGuard(as_matrix(request_vecs), request_ids, leak_threshold, request_texts, ngram_n, ngram_threshold)
    pool_vecs = as_matrix(pool_vecs)
    evaluated = ShingleTable(list(held_out), ngram_n) if held_out else None
    excluded = set(exclude)
    by_source: dict[str, list[int]] = {}
    for row, (pid, source) in enumerate(zip(pool_ids, pool_sources, strict=True)):
        if pid not in excluded:
            by_source.setdefault(source, []).append(row)
    chosen: list[int] = []
    rng = np.random.default_rng(seed)
    for source in sorted(by_source):
        rows, taken = rng.permutation(by_source[source]), []
        for start in range(0, len(rows), 4 * per_source):  # candidates a few at a time
            batch = rows[start : start + 4 * per_source]
            verdicts = guard.check(batch, pool_vecs[batch], [pool_texts[i] for i in batch])
            taken += [
                int(r)
                for r in batch
                if verdicts[int(r)] is None
                and not (evaluated and evaluated.best_overlap(pool_texts[r])[0] >= ngram_threshold)
            ][: per_source - len(taken)]
            if len(taken) >= per_source:
                break
        chosen += taken
    return chosen


def _check_inputs(request_vecs, request_ids, pool_vecs, pool_ids, request_texts, pool_texts, k) -> None:
    if len(request_ids) != len(request_vecs) or len(pool_ids) != len(pool_vecs):
        raise ValueError("each vector needs exactly one id")
    if request_vecs.shape[1] != pool_vecs.shape[1]:
        raise ValueError(
            f"request and pool vectors differ in dimension: {request_vecs.shape[1]} vs {pool_vecs.shape[1]}"
        )
    if (request_texts is None) != (pool_texts is None):
        raise ValueError("give texts for both requests and pool, or for neither")
    if request_texts is not None and (len(request_texts) != len(request_ids) or len(pool_texts) != len(pool_ids)):
        raise ValueError("each text needs exactly one vector")
    if k < 1 or not len(pool_vecs):
        raise ValueError("k must be >= 1 and the pool must not be empty")


def _table(kept: dict[int, list[tuple[int, float]]], request_ids: Sequence, pool_ids: Sequence) -> pd.DataFrame:
    rows = [
        (request_ids[q], rank, pool_ids[i], s) for q, pairs in sorted(kept.items()) for rank, (i, s) in enumerate(pairs)
    ]
    return pd.DataFrame(rows, columns=["request_id", "rank", "neighbour_id", "score"]).astype(
        {"rank": "int64", "score": "float32"}
    )


def _stats(table: pd.DataFrame, kept, fetched, verdicts, request_ids, pool_ids, n_pool: int, k: int) -> dict:
    excluded = {pool_ids[i]: why for i, why in sorted(verdicts.items()) if why is not None}
    short = {
        request_ids[q]: _short_reason(len(pairs), k, fetched[q], n_pool, len(excluded))
        for q, pairs in kept.items()
        if len(pairs) < k
    }
    pct = [0, 5, 25, 50, 75, 95, 100]
    scores = table["score"].to_numpy()
    return {
        "k": k,
        "requests": len(kept),
        "pool": n_pool,
        "candidates_checked": len(verdicts),
        "excluded_count": len(excluded),
        "excluded": excluded,
        "score_percentiles": {f"p{p}": float(v) for p, v in zip(pct, np.percentile(scores, pct))}
        if len(scores)
        else {},
        "short_count": len(short),
        "short": short,
    }


def _short_reason(got: int, k: int, fetched: int, n_pool: int, n_excluded: int) -> str:
    if n_pool - n_excluded < k:
        return f"{got} of {k}: the pool has {n_pool} items and {n_excluded} are near-copies of requests"
    return (
        f"{got} of {k}: the index returned too few usable items for {fetched} asked (pool {n_pool}, "
        f"{n_excluded} near-copies excluded); an approximate index may need a larger nprobe / ef_search"
    )


class LeakGuard:
    """Decides, for pool items, whether they are near-copies of any request (see module doc)."""

    def __init__(
        self,
        request_vecs: np.ndarray,
        request_ids: Sequence,
        leak_threshold: float,
        request_texts: Sequence[str] | None,
        ngram_n: int,
        ngram_threshold: float,
    ):
        self.requests = l2_normalise(request_vecs)
        self.request_ids = request_ids
        self.threshold = leak_threshold
        self.ngram_threshold = ngram_threshold
        self.ngram_n = ngram_n
        self.exact = {} if request_texts is None else {_text_key(t): i for i, t in enumerate(request_texts)}
        self.shingles = None if request_texts is None else ShingleTable(request_texts, ngram_n)

    def check(self, rows: np.ndarray, vecs: np.ndarray, texts: Sequence[str] | None) -> dict[int, str | None]:
        """{pool row: None if safe, else why it is excluded (names the request by id, never by text)}."""
        if not len(rows):
            return {}
        cos, nearest = faiss.knn(l2_normalise(vecs), self.requests, 1, metric=faiss.METRIC_INNER_PRODUCT)
        out = {}
        for j, row in enumerate(rows):
            out[int(row)] = self._verdict(float(cos[j, 0]), int(nearest[j, 0]), None if texts is None else texts[j])
        return out

    def _verdict(self, cos: float, nearest: int, text: str | None) -> str | None:
        if text is not None and (q := self.exact.get(_text_key(text))) is not None:
            return f"exact copy of request {self.request_ids[q]}"
        if cos >= min(self.threshold, 1.0 - 1e-6):
            return f"cosine {cos:.3f} >= {self.threshold} with request {self.request_ids[nearest]}"
        if text is not None:
            overlap, q = self.shingles.best_overlap(text)
            if overlap >= self.ngram_threshold:
                return (
                    f"{self.ngram_n}-gram overlap {overlap:.2f} >= {self.ngram_threshold} with request "
                    f"{self.request_ids[q]}"
                )
        return None


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8", "replace"), digest_size=16).digest()


def shingles(text: str, n: int = NGRAM_N) -> np.ndarray:
    """Sorted unique 64-bit hashes of the lower-cased whitespace-word n-grams of `text`."""
    words = text.lower().split()
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    h = np.array([zlib.crc32(w.encode("utf-8", "replace")) for w in words], dtype=np.uint64)
    acc = np.zeros(len(words) - n + 1, dtype=np.uint64)
    for j in range(n):
        acc = acc * _PRIME + h[j : len(h) - n + 1 + j]
    return np.unique(acc)


class ShingleTable:
    """All requests' shingles in one sorted array, so a pool text is matched by binary search."""

    def __init__(self, texts: Sequence[str], n: int):
        sets = [shingles(t, n) for t in texts]
        self.n = n
        self.sizes = np.array([len(s) for s in sets], dtype=np.int64)
        hashes = np.concatenate(sets) if sets else np.zeros(0, dtype=np.uint64)
        owners = np.repeat(np.arange(len(sets)), self.sizes)
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.owners = hashes[order], owners[order]

    def best_overlap(self, text: str) -> tuple[float, int]:
        """(largest overlap with any request, that request's index); (0.0, -1) when nothing is shared."""
        own = shingles(text, self.n)
        lo = np.searchsorted(self.hashes, own, "left")
        hi = np.searchsorted(self.hashes, own, "right")
        hit = hi > lo
        if not hit.any():
            return 0.0, -1
        owners = np.concatenate([self.owners[a:b] for a, b in zip(lo[hit], hi[hit])])
        reqs, shared = np.unique(owners, return_counts=True)
        overlap = shared / np.minimum(self.sizes[reqs], len(own))
        best = int(np.argmax(overlap))
        return float(overlap[best]), int(reqs[best])
