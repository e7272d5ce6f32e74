"""Retrieval: exactness against numpy, the leak guard, approximate recall, shards, save/load, LM pooling.

The real-data tests embed the ICU benchmark (exp0 forget set as requests; the first 500 pile
texts + wikitext + the other four forget sets as the pool, ~1.5k texts) once per session with MiniLM,
each text cut to its first TRUNCATE characters so the module stays near one minute on
two CPU cores.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from retrieval.embed import LMEmbedder, SentenceEmbedder
from retrieval.index import (
    IndexSpec,
    ShardedIndex,
    build_index,
    index_params,
    load_index,
    recall_at_k,
    save_index,
    search,
    search_shards,
)
from retrieval.neighbours import ShingleTable, find_neighbours, general_rows

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "icu_benchmark"
TRUNCATE = 200


def _read(rel: str, source: str, limit: int | None = None) -> pd.DataFrame:
    path = DATA / rel
    if not path.is_file():
        pytest.fail(
            f"ICU benchmark data missing: looked for {path} (the project expects the shared data "
            "folder at <repo root>/../shared/data)"
        )
    texts = pd.read_csv(path, nrows=limit)["text"].astype(str).str.slice(0, TRUNCATE)
    return pd.DataFrame({"id": [f"{source}:{i}" for i in range(len(texts))], "text": texts})


@pytest.fixture(scope="session")
def icu():
    """Requests and pool (ids, texts) and their MiniLM embeddings, plus the embedder itself."""
    requests = _read("forget_sets/exp0/lm_extraction_128_0.csv", "exp0")
    pool = pd.concat(
        [_read("pile.csv", "pile", limit=500), _read("wikitext.csv", "wikitext")]
        + [_read(f"forget_sets/exp{i}/lm_extraction_128_{i}.csv", f"exp{i}") for i in range(1, 5)],
        ignore_index=True,
    )
    embedder = SentenceEmbedder()
    return dict(
        requests=requests,
        pool=pool,
        embedder=embedder,
        R=embedder.embed(requests.text.tolist()),
        P=embedder.embed(pool.text.tolist()),
    )


def reference_knn(queries: np.ndarray, pool: np.ndarray, k: int, allowed: np.ndarray | None = None):
    """Brute force in float64: squared L2, ties broken by the lower id."""
    d2 = ((queries[:, None, :].astype(np.float64) - pool[None, :, :].astype(np.float64)) ** 2).sum(-1)
    if allowed is not None:
        d2[:, ~allowed] = np.inf
    ids = np.broadcast_to(np.arange(len(pool)), d2.shape)
    order = np.lexsort((ids, d2), axis=1)[:, :k]
    return np.take_along_axis(d2, order, 1), order


def test_exact_search_matches_numpy(icu):
    assert icu["R"].shape == (128, 384) and icu["P"].shape == (1512, 384)
    index = build_index(icu["P"], IndexSpec(kind="auto"))
    assert index_params(index)["kind"] == "flat"  # 2.5k vectors: auto must be exact
    scores, ids = search(index, icu["R"], 10)
    ref_scores, ref_ids = reference_knn(icu["R"], icu["P"], 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def _near_copy(text: str, rng: random.Random) -> str:
    """The text with two words (far apart) replaced: a 'few words changed' copy."""
    words = text.split(" ")
    for i in (len(words) // 4, 3 * len(words) // 4):
        words[i] = rng.choice(["banana", "quartz", "meadow", "violet"])
    return " ".join(words)


def test_leak_guard_excludes_near_copies_and_matches_reference(icu):
    requests, pool = icu["requests"], icu["pool"]
    unique = requests[~requests.text.isin(set(pool.text))]  # a few requests already have exact copies there
    wordy = unique.text.str.split().str.len().sort_values(ascending=False).index[:5]
    rng = random.Random(0)
    planted = pd.DataFrame(
        {"id": [f"planted:{i}" for i in wordy], "text": [_near_copy(requests.text[i], rng) for i in wordy]}
    )
    pool = pd.concat([pool, planted], ignore_index=True)
    P = np.concatenate([icu["P"], icu["embedder"].embed(planted.text.tolist())])
    planted_rows = np.arange(len(icu["P"]), len(P))

    # Without a guard each planted copy would be among its own request's 3 nearest.
    _, raw = search(build_index(P, IndexSpec(kind="flat")), icu["R"][wordy], 3)
    assert all(row in found for row, found in zip(planted_rows, raw))

    table, stats = find_neighbours(
        icu["R"],
        requests.id.tolist(),
        P,
        pool.id.tolist(),
        k=10,
        index_spec=IndexSpec(kind="flat"),
        request_texts=requests.text.tolist(),
        pool_texts=pool.text.tolist(),
    )
    assert not set(table.neighbour_id) & set(planted.id)
    assert set(planted.id) <= set(stats["excluded"]) and stats["excluded_count"] >= 5
    copies = set(pool.id[pool.text.isin(set(requests.text))])
    assert copies and copies <= set(stats["excluded"])  # exact copies (shared across forget sets) too
    assert stats["short_count"] == 0 and (table.groupby("request_id").size() == 10).all()

    # Same ids and scores as brute force over the pool minus what the guard excluded.
    allowed = ~pool.id.isin(set(stats["excluded"])).to_numpy()
    ref_scores, ref_ids = reference_knn(icu["R"], P, 10, allowed)
    assert table.request_id.tolist() == np.repeat(requests.id, 10).tolist()  # request order, then rank
    np.testing.assert_array_equal(table.neighbour_id.to_numpy().reshape(128, 10), pool.id.to_numpy()[ref_ids])
    np.testing.assert_allclose(table.score.to_numpy().reshape(128, 10), ref_scores, atol=1e-5)


def test_general_rows_fill_a_quota_per_source_past_the_leak_guard():
    """Up to the quota from every source, never a neighbour, never a near-copy of a request, and the
    same rows for the same seed; a source with too few usable items gives what it has."""
    rng = np.random.default_rng(0)
    requests = ["alice smith born 1970 lives at 12 high street and her phone is 555 0101"]
    request_vecs = rng.normal(size=(1, 8)).astype(np.float32)
    pool_ids = [f"a:{i}:0" for i in range(10)] + [f"b:{i // 2}:{i % 2}" for i in range(4)]  # <source>:<row>:<chunk>
    sources = [p.split(":")[0] for p in pool_ids]
    texts = [f"general text number {i} about weather and rivers and hills" for i in range(14)]
    texts[11] = requests[0]  # b:0:1 is an exact copy of the request
    vecs = rng.normal(size=(14, 8)).astype(np.float32)
    vecs[12] = request_vecs[0]  # b:1:0 embeds exactly like it
    chosen = general_rows(
        request_vecs, ["r0"], requests, vecs, pool_ids, texts, sources, per_source=3, exclude=["a:0:0", "b:0:0"]
    )
    picked = [pool_ids[i] for i in chosen]
    assert len([p for p in picked if p.startswith("a:")]) == 3
    assert [p for p in picked if p.startswith("b:")] == ["b:1:1"]  # b:0:0 a neighbour, b:0:1 and b:1:0 leak
    assert "a:0:0" not in picked and len(set(picked)) == len(picked)
    assert chosen == general_rows(
        request_vecs, ["r0"], requests, vecs, pool_ids, texts, sources, per_source=3, exclude=["a:0:0", "b:0:0"]
    )
    assert general_rows(request_vecs, ["r0"], requests, vecs, pool_ids, texts, sources, per_source=0, exclude=[]) == []
    evaluated = [texts[4] + " and more words after it"]  # a:4 lies inside a text the evaluation measures
    held = general_rows(
        request_vecs, ["r0"], requests, vecs, pool_ids, texts, sources, per_source=10, exclude=[], held_out=evaluated
    )
    assert 4 not in held and len(held) == 9 + 2  # the other 9 a items; b:0:0 (no neighbour now) and b:1:1


def test_short_requests_get_a_reason():
    rng = np.random.default_rng(0)
    requests = rng.standard_normal((2, 8)).astype(np.float32)
    pool = np.concatenate([requests[:1], rng.standard_normal((3, 8)).astype(np.float32)])
    table, stats = find_neighbours(requests, ["a", "b"], pool, ["copy", "p1", "p2", "p3"], k=5)
    assert "copy" not in set(table.neighbour_id) and stats["excluded"].keys() == {"copy"}
    assert stats["short"].keys() == {"a", "b"} and "pool has 4 items" in stats["short"]["a"]


def test_shingle_overlap_is_relative_to_the_shorter_text():
    request = "one two three four five six seven eight nine ten eleven twelve"
    table = ShingleTable([request, "completely different words that share nothing at all with it"], 8)
    overlap, owner = table.best_overlap("prefix words then " + request + " and a long tail of other words")
    assert owner == 0 and overlap == 1.0
    assert table.best_overlap("nothing in common here at all, not one eight word run") == (0.0, -1)


def clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    return centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic():
    """20k x 64 clustered vectors, 300 perturbed pool points as queries, exact top-10."""
    pool = clustered(20_000, 64, 100, seed=0)
    rng = np.random.default_rng(1)
    queries = pool[rng.choice(len(pool), 300, replace=False)] + 0.05 * rng.standard_normal((300, 64)).astype(np.float32)
    exact = search(build_index(pool, IndexSpec(kind="flat")), queries, 10)
    return pool, queries, exact


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw", "ivf_pq"])
def test_approximate_recall(synthetic, kind):
    pool, queries, (_, truth) = synthetic
    index = build_index(pool, IndexSpec(kind=kind))
    # PQ codes alone lose fine distances; the library re-ranks PQ shortlists exactly.
    _, ids = search(index, queries, 10, vectors=pool if kind == "ivf_pq" else None)
    assert recall_at_k(ids, truth) >= 0.9


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_sharded_search_equals_unsharded(synthetic, metric):
    pool, queries, _ = synthetic
    spec = IndexSpec(kind="flat", metric=metric)
    scores, ids = search(build_index(pool, spec), queries, 10)
    sharded = ShardedIndex.build(pool, spec, n_shards=3)
    assert sharded.offsets == [0, 6666, 13333]
    got_scores, got_ids = sharded.search(queries, 10)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_scores, scores, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw"])
def test_save_load_round_trip(synthetic, tmp_path, kind):
    pool, queries, _ = synthetic
    index = build_index(pool[:5000], IndexSpec(kind=kind, nprobe=3, ef_search=24))
    save_index(index, tmp_path / "pool.faiss")
    loaded = load_index(tmp_path / "pool.faiss")
    assert index_params(loaded) == index_params(index)  # the calibrated / chosen width is kept
    assert index_params(loaded).get("nprobe", 3) == 3 and index_params(loaded).get("ef_search", 24) == 24
    for a, b in zip(search(index, queries, 10), search(loaded, queries, 10)):
        np.testing.assert_array_equal(a, b)


def test_lm_embedder_ignores_padding():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.modeling import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
        )
    )
    embedder = LMEmbedder(model, tok, max_length=128)
    texts = ["short", "a considerably longer text that forces padding onto the short one"]
    batch = embedder.embed(texts)
    alone = np.concatenate([embedder.embed([t]) for t in texts])
    assert batch.shape == (2, 32)
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(batch[0], batch[1])
    np.testing.assert_array_equal(embedder({"text": np.array(texts)})["embedding"], batch)  # Ray Data form


@pytest.mark.slow
def test_ray_shard_search_merges_like_sequential(synthetic):
    import ray

    pool, queries, _ = synthetic
    sharded = ShardedIndex.build(pool[:6000], IndexSpec(kind="flat"), n_shards=3, use_ray=True)
    expected = search_shards(sharded.shards, sharded.offsets, queries, 10)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        got = sharded.search(queries, 10)
    finally:
        ray.shutdown()
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
