"""FAISS indexes for the retain pool: exact for small pools, approximate by size, sharded.

Scores follow FAISS: squared L2 distance for metric "l2" (smaller is better; the ICU
paper used exact L2 on normalised MiniLM vectors, which ranks like cosine) and inner
product for "ip" (larger is better). Every result is ordered by (score, id), so ties
go to the lower id and a sharded search returns exactly what one index would.

Parameter rules (when the spec leaves them unset), for N pool vectors:
- kind "auto": exact `flat` up to `exact_max` vectors (brute force is cheap there and
  exact, as in the paper); `ivf_flat` above that while the raw vectors stay under
  `flat_bytes_max`; `ivf_pq` beyond (PQ codes keep ~1/8 of the bytes). HNSW is never
  picked automatically: on CPU its build is slow and it stores the raw vectors plus a
  graph; choose it explicitly for latency-bound repeated queries.
- nlist = 4 * sqrt(N) (the FAISS guideline range is 4-16 sqrt(N)), at most N / 39 so every
  k-means centroid gets the 39 training points FAISS asks for.
- train_sample = 40 * nlist vectors drawn with a seeded RNG: k-means on the whole pool
  would dominate build time, and calibrating nprobe absorbs slightly coarser centroids.
- m (PQ sub-quantizers, 8 bits each) = d / 2, so each code byte covers two dimensions and
  codes take 1/8 of the float32 bytes. Alone this loses fine distances (recall@10 0.89
  on clustered synthetic 20k x 64), so PQ shortlists are re-scored exactly from the raw
  vectors (`search(..., vectors=)`, which may be a memmap; `find_neighbours` always
  does this), which brings recall@10 to 0.999 there. PQ k-means runs 10 iterations, not
  FAISS's 25: training is 3x faster and re-ranked recall does not change.
- nprobe (IVF) and ef_search (HNSW) are calibrated, not guessed: 1000 pool vectors are
  searched exactly and approximately (their own row left out); the search width is
  doubled until recall@10 reaches `target_recall` (its lower two-standard-error bound
  does, so sampling luck does not pick a width that misses on real queries), then
  bisected down to the smallest width that still does (if recall stops improving first,
  as PQ's quantisation error can cause, the narrowest best width is kept). The width is
  stored in the index, so it survives save/load. The calibration queries are pool members, a proxy for the
  requests; `bench/retrieval.py` measures recall on fresh queries.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger("icu.retrieval")

KINDS = ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw")
METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}
CALIBRATION_QUERIES = 1000
CALIBRATION_K = 10


@dataclass
class IndexSpec:
    """How to index a pool; unset (None) parameters are derived from the pool size."""

    kind: str = "auto"
    metric: str = "l2"
    nlist: int | None = None
    nprobe: int | None = None
    m: int | None = None
    hnsw_m: int = 32
    ef_search: int | None = None
    exact_max: int = 200_000
    flat_bytes_max: int = 16 * 2**30
    train_sample: int | None = None
    target_recall: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind {self.kind!r} is not one of {KINDS}")
        if self.metric not in METRICS:
            raise ValueError(f"index metric {self.metric!r} is not one of {tuple(METRICS)}")

    def resolve_kind(self, n: int, d: int) -> str:
        """The concrete index kind for n vectors of dimension d."""
        if self.kind != "auto":
            return self.kind
        if n <= self.exact_max:
            return "flat"
        return "ivf_flat" if n * d * 4 <= self.flat_bytes_max else "ivf_pq"


def as_matrix(vectors: np.ndarray) -> np.ndarray:
    """C-contiguous float32 2-D array, the only layout FAISS accepts without copying."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {vectors.shape}")
    return vectors


def build_index(vectors: np.ndarray, spec: IndexSpec | None = None) -> faiss.Index:
    """An index over `vectors` (row i gets id i), trained and calibrated as the spec says."""
    spec = spec or IndexSpec()
    vectors = as_matrix(vectors)
    n, d = vectors.shape
    kind = spec.resolve_kind(n, d)
    index = faiss.index_factory(d, _factory_string(kind, n, d, spec), METRICS[spec.metric])
    if kind == "ivf_pq":
        ivfpq = faiss.downcast_index(_ivf(index))
        ivfpq.do_polysemous_training = False  # the factory's default: minutes, for a search mode we never use
        ivfpq.pq.cp.niter = 10  # 3x faster than 25; re-ranked recall is the same (see module doc)
    if not index.is_trained:
        index.train(_training_sample(vectors, spec, _ivf(index).nlist))
    index.add(vectors)
    if kind != "flat":
        _calibrate(index, vectors, spec)
    return index


def _factory_string(kind: str, n: int, d: int, spec: IndexSpec) -> str:
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{spec.hnsw_m},Flat"
    nlist = spec.nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
    if kind == "ivf_flat":
        return f"IVF{nlist},Flat"
    m = spec.m or _pq_subquantizers(d)
    if d % m:
        raise ValueError(f"ivf_pq: m={m} must divide the dimension {d}")
    return f"IVF{nlist},PQ{m}x8"


def _pq_subquantizers(d: int) -> int:
    """The largest divisor of d that is at most d / 2 (two dimensions per code byte)."""
    return next(m for m in range(max(1, d // 2), 0, -1) if d % m == 0)


def _ivf(index: faiss.Index):
    return faiss.extract_index_ivf(index)


def _training_sample(vectors: np.ndarray, spec: IndexSpec, nlist: int) -> np.ndarray:
    size = min(len(vectors), spec.train_sample or 40 * nlist)
    if size == len(vectors):
        return vectors
    rows = np.sort(np.random.default_rng(spec.seed).choice(len(vectors), size, replace=False))
    return vectors[rows]


def _calibrate(index: faiss.Index, vectors: np.ndarray, spec: IndexSpec) -> None:
    """Set nprobe / efSearch: the spec's value, else the smallest width reaching target recall."""
    is_hnsw = isinstance(index, faiss.IndexHNSW)
    fixed = spec.ef_search if is_hnsw else spec.nprobe
    k = min(CALIBRATION_K, len(vectors) - 1)
    if fixed or k < 1:
        _set_width(index, fixed or (k if is_hnsw else 1))
        return
    rows = np.random.default_rng(spec.seed + 1).choice(
        len(vectors), min(CALIBRATION_QUERIES, len(vectors)), replace=False
    )
    _, exact = faiss.knn(vectors[rows], vectors, k + 1, metric=METRICS[spec.metric])
    truth = _drop_self(exact, rows, k)
    # PQ is always used with exact re-ranking, so calibrate the width for that use
    rerank = not is_hnsw and isinstance(faiss.downcast_index(_ivf(index)), faiss.IndexIVFPQ)
    recalls: dict[int, float] = {}

    def recall(width: int) -> float:
        if width not in recalls:
            _set_width(index, width)
            found = search(index, vectors[rows], k + 1, vectors=vectors if rerank else None)[1]
            recalls[width] = recall_at_k(_drop_self(found, rows, k), truth)
        return recalls[width]

    def lower_bound(width: int) -> float:
        """Recall minus two standard errors: the sample must show the target is met, not hint at it."""
        r = recall(width)
        return r - 2 * math.sqrt(r * (1 - r) / truth.size)

    width = _search_width(lower_bound, k if is_hnsw else 1, 4096 if is_hnsw else _ivf(index).nlist, spec.target_recall)
    _set_width(index, width)
    log.info(
        "calibrated %s=%d: recall@%d %.3f on %d pool vectors",
        "efSearch" if is_hnsw else "nprobe",
        width,
        k,
        recall(width),
        len(rows),
    )


def _search_width(recall, start: int, limit: int, target: float) -> int:
    """Double the width until recall reaches target, then bisect down to the smallest that does.

    Stops doubling when recall stops improving (PQ's quantisation error caps it) and
    keeps the narrowest width that gave the best recall.
    """
    lo, hi = start - 1, start  # lo misses the target (or is below the range), hi is the candidate
    while recall(hi) < target and hi < limit:
        wider = min(2 * hi, limit)
        if recall(wider) <= recall(hi):
            return hi
        lo, hi = hi, wider
    if recall(hi) < target:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if recall(mid) >= target else (mid, hi)
    return hi


def _set_width(index: faiss.Index, width: int) -> None:
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = width
    else:
        _ivf(index).nprobe = width


def _drop_self(ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Each query row's results without the query's own id, cut to k."""
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, (found, own) in enumerate(zip(ids, rows)):
        rest = found[found != own][:k]
        out[i, : len(rest)] = rest
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of all true ids (ignoring -1) that the approximate result of the same row contains."""
    hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth))
    total = int((truth >= 0).sum())
    return hits / total if total else 1.0


def index_params(index: faiss.Index) -> dict:
    """What was built, for logs and manifests: kind, size, metric and the search width."""
    params = {"size": int(index.ntotal), "metric": index_metric(index)}
    if isinstance(index, faiss.IndexFlat):
        return {"kind": "flat", **params}
    if isinstance(index, faiss.IndexHNSW):
        return {"kind": "hnsw", **params, "ef_search": int(index.hnsw.efSearch)}
    ivf = faiss.downcast_index(_ivf(index))
    kind = "ivf_pq" if isinstance(ivf, faiss.IndexIVFPQ) else "ivf_flat"
    return {"kind": kind, **params, "nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe)}


def index_metric(index: faiss.Index) -> str:
    return "ip" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"


def search(
    index: faiss.Index, queries: np.ndarray, k: int, vectors: np.ndarray | None = None, rerank_factor: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each [n_queries, k], best first, ties by lower id; missing slots are id -1.

    With `vectors` (the indexed rows, may be a memmap), the index proposes
    `rerank_factor * k` candidates and they are re-scored exactly: PQ's quantisation
    error then costs recall only when a true neighbour misses the shortlist.
    """
    queries = as_matrix(queries)
    metric = index_metric(index)
    scores, ids = index.search(queries, k if vectors is None else rerank_factor * k)
    if vectors is not None:
        scores = exact_scores(queries, vectors, ids, metric)
    return order_results(scores, ids, metric, k)


def exact_scores(
    queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, metric: str, max_floats: int = 2**24
) -> np.ndarray:
    """Exact score of every (query row, candidate id) pair, in query chunks of ~64 MB of candidates."""
    out = np.empty(ids.shape, dtype=np.float32)
    chunk = max(1, max_floats // max(1, ids.shape[1] * vectors.shape[1]))
    for a in range(0, len(ids), chunk):
        rows = ids[a : a + chunk]
        cand = np.asarray(vectors[np.where(rows >= 0, rows, 0).ravel()], dtype=np.float32)
        cand = cand.reshape(*rows.shape, -1)
        q = np.asarray(queries[a : a + chunk], dtype=np.float32)[:, None, :]
        out[a : a + chunk] = ((cand - q) ** 2).sum(-1) if metric == "l2" else (cand * q).sum(-1)
    return out


def order_results(scores: np.ndarray, ids: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (score, id) best first and keep k: the one rule all searches share.

    Missing results (id -1) sort last and come back as id -1 with the worst score
    (+inf for l2, -inf for ip).
    """
    worst = np.inf if metric == "l2" else -np.inf
    missing = ids < 0
    scores = np.where(missing, worst, scores).astype(np.float32)
    key = scores if metric == "l2" else -scores
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, ids), key), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1).astype(np.int64)


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write atomically (temp file + rename) so a killed job never leaves half an index."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)


def load_index(path: str | Path) -> faiss.Index:
    return faiss.read_index(str(path))


@dataclass
class ShardedIndex:
    """One index per contiguous slice of the pool; shard i's local id j is global id offsets[i] + j."""

    shards: list[faiss.Index]
    offsets: list[int]
    metric: str = "l2"
    use_ray: bool = False  # search the shards as Ray tasks (the caller's Ray policy)

    @classmethod
    def build(cls, vectors: np.ndarray, spec: IndexSpec, n_shards: int, use_ray: bool = False) -> "ShardedIndex":
        """Split the pool into n_shards near-equal slices and index each with the same spec."""
        vectors = as_matrix(vectors)
        bounds = np.linspace(0, len(vectors), n_shards + 1).astype(int)
        shards = [build_index(vectors[a:b], spec) for a, b in zip(bounds[:-1], bounds[1:])]
        return cls(shards, [int(a) for a in bounds[:-1]], spec.metric, use_ray)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return search_shards(self.shards, self.offsets, queries, k, self.metric, self.use_ray)


def search_shards(
    shards: list[faiss.Index],
    offsets: list[int],
    queries: np.ndarray,
    k: int,
    metric: str = "l2",
    use_ray: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over all shards: per-shard top-k, ids shifted to global, merged by `order_results`.

    With `use_ray` the shards are searched as Ray tasks (one per shard, the index shipped
    serialised), else one after another; the merge is the same either way.
    """
    queries = as_matrix(queries)
    parts = _search_with_ray(shards, queries, k) if use_ray else [search(s, queries, k) for s in shards]
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([np.where(p[1] >= 0, p[1] + off, -1) for p, off in zip(parts, offsets)], axis=1)
    return order_results(scores, ids, metric, k)


def _search_with_ray(shards: list[faiss.Index], queries: np.ndarray, k: int) -> list:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("search_shards(use_ray=True) needs Ray initialised (pipeline.cluster.ensure_ray)")

    @ray.remote
    def search_one(blob: np.ndarray, queries: np.ndarray, k: int):
        return search(faiss.deserialize_index(blob), queries, k)

    queries_ref = ray.put(queries)
    return ray.get([search_one.remote(faiss.serialize_index(s), queries_ref, k) for s in shards])
