"""The retrieve stage end to end: pool chunking, sharded resumable embedding, Ray Data, leak guard, errors.

Requests are exp0 texts cut to 180 characters; the tiny byte-level model does the chunking
(200 tokens = 200 bytes), MiniLM does the embedding, so each run takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import driver, retrieve
from pipeline.cli import main
from pipeline.errors import UserError

from conftest import REPO, write_config

CONFIG = """
model: {{name: tiny-llama}}
requests: {{path: {requests}, id_column: id, prefix_tokens: 50, suffix_tokens: 50, max_tokens: 200}}
retain: {{paths: [{retain}], max_items: {max_items}}}
retrieval: {{shard_rows: {shard_rows}, k: 5}}
resources: {{launcher: torchrun, embed_actors: 2}}
evaluation: {{data_dir: {data}}}
storage: {{runs_dir: {runs}, name: {name}}}
"""


def _near_copy(text: str) -> str:
    words = text.split(" ")
    words[len(words) // 3] = "banana"
    return " ".join(words)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data):
    """Requests (20 exp0 texts, 180 chars) and a retain pool of pile text plus 5 planted near-copies."""
    root = tmp_path_factory.mktemp("retrieve")
    exp0 = pd.read_csv(shared_data / "icu_benchmark/forget_sets/exp0/lm_extraction_128_0.csv").head(20)
    requests = pd.DataFrame({"id": [f"r{i}" for i in range(20)], "text": exp0["text"].str.slice(0, 180)})
    requests.to_json(root / "requests.jsonl", orient="records", lines=True)
    pile = pd.read_csv(shared_data / "icu_benchmark/pile.csv").head(120)
    planted = [_near_copy(t) for t in requests["text"][:5]]
    pool = pd.DataFrame({"text": planted + pile["text"].tolist() + [requests["text"][7]]})  # + one exact copy
    pool.to_json(root / "retain.jsonl", orient="records", lines=True)
    return root


def _config(inputs: Path, tmp: Path, name: str, max_items: int = 100_000, shard_rows: int = 64) -> Path:
    text = CONFIG.format(
        requests=inputs / "requests.jsonl",
        retain=inputs / "retain.jsonl",
        max_items=max_items,
        shard_rows=shard_rows,
        data=REPO.parent / "shared" / "data",
        runs=tmp / "runs",
        name=name,
    )
    return write_config(tmp, text, f"{name}.yaml")


def _run(config: Path) -> Path:
    cfg, store = driver.open_run(str(config))
    driver.run_pipeline(cfg, store, until="retrieve")
    return store.root / "retrieval"


def test_stage_output_and_leak_guard(inputs, tmp_path):
    out = _run(_config(inputs, tmp_path, "guard"))
    table = pd.read_parquet(out / "neighbours.parquet")
    stats = json.loads((out / "stats.json").read_text())
    planted = {f"retain:{i}:0" for i in range(5)} | {"retain:125:0"}  # chunk 0 of each copy holds it all
    assert not planted & set(table.neighbour_id)
    assert planted <= set(stats["excluded"]) and stats["excluded_count"] >= 6
    assert (table.groupby("request_id").size() == 5).all() and table.request_id.nunique() == 20
    assert (table.groupby("request_id")["score"].apply(lambda s: s.is_monotonic_increasing)).all()
    items = pd.read_parquet(out / "retain_items.parquet")
    assert set(items.id) == set(table.neighbour_id)
    assert all(0 < len(ids) <= 200 for ids in items.input_ids)  # chunked to the request length
    counts = stats["pool_counts"]
    assert counts["rows"] == 126 and counts["unusable_rows"] == 0 and counts["shards"] == -(-counts["items"] // 64)


def test_every_source_in_the_pool_and_in_the_general_rows(inputs, tmp_path, shared_data):
    """retain.max_items takes the sources in turn (the second file is not crowded out by the first),
    and general_per_source is a quota per retain file, whatever its rows and chunks are called."""
    rows = pd.read_csv(shared_data / "icu_benchmark/forget_sets/exp1/lm_extraction_128_1.csv")["text"].tolist()
    for name, part in (("first", rows[:60]), ("second", rows[60:120])):  # text no evaluation suite reads
        pd.DataFrame({"text": part}).to_json(tmp_path / f"{name}.jsonl", orient="records", lines=True)
    text = (
        CONFIG.format(
            requests=inputs / "requests.jsonl",
            retain=tmp_path / "first.jsonl",
            max_items=40,
            shard_rows=64,
            data=REPO.parent / "shared" / "data",
            runs=tmp_path / "runs",
            name="mixed",
        )
        .replace(f"[{tmp_path / 'first.jsonl'}]", f"[{tmp_path / 'first.jsonl'}, {tmp_path / 'second.jsonl'}]")
        .replace("k: 5}", "k: 5, general_per_source: 3}")
    )
    out = _run(write_config(tmp_path, text, "mixed.yaml"))
    pool = pd.concat(pd.read_parquet(f) for f in sorted((out / "pool").glob("items-*.parquet")))
    assert len(pool) == 40 and pool["id"].str.startswith("first:").sum() == 20
    general = pd.read_parquet(out / "general_items.parquet")["id"]
    assert sorted(general.str.split(":").str[0].value_counts().tolist()) == [3, 3]
    assert retrieve.source_of("first:12:3", ["first", "first:12"]) == "first:12"  # the longest name that fits
    assert retrieve.source_of("docs/a/b.txt:0", ["docs", "docs#1"]) == "docs"


def test_ray_data_embeddings_equal_in_process(inputs, tmp_path):
    ray = pytest.importorskip("ray")
    out = _run(_config(inputs, tmp_path, "local", max_items=160, shard_rows=32))  # in-process embedding
    pool = out / "pool"
    counts = json.loads((pool / "counts.json").read_text())
    ray_pool = tmp_path / "ray_pool"
    ray_pool.mkdir()
    for s in range(counts["shards"]):
        shutil.copy(retrieve.items_path(pool, s), ray_pool)
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        spec = {"kind": "minilm", "batch_size": 16, "device": "cpu", "cpus": 1}
        retrieve.embed_shards(ray_pool, list(range(counts["shards"])), spec, use_ray=True, actors=2)
    finally:
        ray.shutdown()
    for s in range(counts["shards"]):
        np.testing.assert_allclose(
            np.load(retrieve.emb_path(ray_pool, s)), np.load(retrieve.emb_path(pool, s)), atol=1e-5
        )


def test_kill_during_embedding_then_resume(inputs, tmp_path):
    config = _config(inputs, tmp_path, "killed", max_items=480, shard_rows=24)
    pool = tmp_path / "runs" / "killed" / "retrieval" / "pool"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "retrieve", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while len(list(pool.glob("emb-*.json"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # an emb file counts once its record (emb-N.json) is written
    done_before = {
        p.with_suffix(".npy").name: p.with_suffix(".npy").stat().st_mtime_ns for p in pool.glob("emb-*.json")
    }
    total = json.loads((pool / "counts.json").read_text())["shards"]
    assert 3 <= len(done_before) < total, f"kill landed after {len(done_before)} of {total} shards"
    assert not (pool.parent / "neighbours.parquet").exists()

    resumed = _run(config)
    after = {p.name: p.stat().st_mtime_ns for p in pool.glob("emb-*.npy")}
    assert len(after) == total and all(after[name] == t for name, t in done_before.items())

    fresh = _run(_config(inputs, tmp_path, "uninterrupted", max_items=480, shard_rows=24))
    pd.testing.assert_frame_equal(
        pd.read_parquet(resumed / "neighbours.parquet"), pd.read_parquet(fresh / "neighbours.parquet")
    )


def _outputs(run: Path) -> dict[str, bytes]:
    return {
        name: (run / name).read_bytes()
        for name in ("requests/accepted.parquet", "retrieval/neighbours.parquet", "retrieval/retain_items.parquet")
    }


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data), 97):  # float bytes after the .npy header
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_damaged_outputs_are_detected_and_rebuilt(inputs, tmp_path, caplog):
    """Each damage a user can do by editing a run directory is noticed, the affected stage
    reruns (saying why in one line), and the outputs equal an untouched run's."""
    reference = _outputs(_run(_config(inputs, tmp_path, "untouched", shard_rows=32)).parent)
    config = _config(inputs, tmp_path, "damaged", shard_rows=32)
    run = _run(config).parent
    pool = run / "retrieval" / "pool"
    damages = [
        ("accepted", lambda: _truncate(run / "requests/accepted.parquet"), "ingest: output requests/accepted"),
        ("pool shard", lambda: _truncate(retrieve.items_path(pool, 1)), "items shards [1] differ"),
        (
            "neighbours",
            lambda: _truncate(run / "retrieval/neighbours.parquet"),
            "retrieve: output retrieval/neighbours",
        ),
        ("manifest", lambda: _truncate(run / "manifest.json"), "manifest.json is unreadable"),
        ("embedding bytes", lambda: _flip(retrieve.emb_path(pool, 2)), "1 to embed"),
    ]
    for what, damage, said in damages:
        damage()
        caplog.clear()
        with caplog.at_level("INFO"):
            _run(config)
        assert said in caplog.text, f"{what}: {caplog.text}"
        assert _outputs(run) == reference, f"after damaging the {what}, the outputs differ from an untouched run's"


def test_repointing_the_model_folder_rebuilds_the_pool(inputs, tmp_path, tiny_llama_dir, caplog):
    """The pool is tokenized by the model's tokenizer: other weights behind the same path
    (a re-linked folder) must cut it again, as ingest's key already does."""
    for name in ("a", "b"):
        shutil.copytree(tiny_llama_dir, tmp_path / name)
    link = tmp_path / "model"
    link.symlink_to(tmp_path / "a")
    config = _config(inputs, tmp_path, "relinked")
    config.write_text(config.read_text().replace("name: tiny-llama", f"name: {link}"))
    pool = _run(config) / "pool"
    first = (pool / "fingerprint").read_text()
    link.unlink()
    link.symlink_to(tmp_path / "b")
    with caplog.at_level("INFO"):
        _run(config)
    assert (pool / "fingerprint").read_text() != first
    assert "retain pool inputs changed; rebuilding its shards" in caplog.text


def test_bad_retain_input_is_one_clear_error(inputs, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"other": "x"}\n')
    config = _config(inputs, tmp_path, "bad")
    config.write_text(config.read_text().replace(str(inputs / "retain.jsonl"), str(empty)))
    assert main(["retrieve", str(config)]) == 2
    assert "retain.text_column" in capsys.readouterr().err

    no_pool = tmp_path / "nopool.yaml"
    no_pool.write_text(config.read_text().replace(f"paths: [{empty}]", "paths: []").replace("name: bad", "name: np"))
    with pytest.raises(UserError, match="retain.paths: empty"):
        _run(no_pool)
