"""Host memory during unlearning does not grow with vocabulary x tokens.

The reference ICU code caches the original model's full-vocabulary softmax for every
neighbour token on the host (requests x tokens x vocab x 4 bytes: 5 GB at 128 x 200 x 50k).
Our loop runs the frozen ZeRO-3 reference per batch instead, so unlearning 512 requests
instead of 64 must raise the workers' peak RSS by far less than that cache would take.

The byte-level tiny Llama has a 257-token vocabulary and a 1024-token context, which
caps such a cache at 448 x 1024 x 257 x 4 B = 0.47 GB: too close to run-to-run noise
(~100 MB) to tell anything. So the test gives the same tiny body a 20k vocabulary (the byte
tokenizer still uses ids < 257; the logits, and a cache of them, are full width): 448 extra
requests x 32 tokens x 20480 x 4 B = 1.1 GiB. The bound is half of that, so even a
half-precision cache would fail the test.
"""

from __future__ import annotations

import json
import random
import string
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline import driver, modeling

from conftest import write_config

pytestmark = pytest.mark.slow

VOCAB = 20480
TOKENS = 32  # per request and per neighbour (bytes = tokens)
SMALL, LARGE = 64, 512

CONFIG = """
model: {{name: {model}}}
requests: {{path: {requests}, id_column: id, prefix_tokens: 8, suffix_tokens: 8, max_tokens: {tokens}}}
unlearning: {{max_epochs: 1, batch_size: 32, ma_threshold: 0.0, el_threshold: 0.0,
             bertscore_threshold: 0.0, bleu_threshold: 0.0}}
evaluation: {{data_dir: {data}, batch_size: 64}}
resources: {{num_workers: 2, launcher: torchrun, max_failures: 0}}
storage: {{runs_dir: {runs}, name: {name}}}
"""


@pytest.fixture(scope="module")
def wide_vocab_llama(tmp_path_factory) -> Path:
    """The tiny-llama body with a VOCAB-sized embedding and head, saved with the byte tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("wide-llama")
    tok = modeling.byte_tokenizer()
    spec = dict(modeling.TINY_CONFIGS["tiny-llama"])
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=VOCAB, bos_token_id=tok.eos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **spec)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _texts(n: int, seed: int) -> list[str]:
    """n distinct random lowercase 'sentences' of exactly TOKENS bytes."""
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_lowercase + " ") for _ in range(TOKENS)) for _ in range(n)]


def _unlearn(tmp: Path, model: Path, data: Path, n: int) -> tuple[dict, pd.DataFrame]:
    """Ingest n requests, give each a one-row neighbour table, unlearn one epoch under torchrun."""
    requests = tmp / f"requests{n}.jsonl"
    requests.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n"
                                for i, t in enumerate(_texts(LARGE, seed=0)[:n])))
    text = CONFIG.format(model=model, requests=requests, tokens=TOKENS, data=data, runs=tmp / "runs", name=f"n{n}")
    cfg, store = driver.open_run(str(write_config(tmp, text, f"n{n}.yaml")))
    driver.run_ingest(cfg, store)
    # Retrieval's output contract (what load_pairs reads), written directly: no Ray, no embedder.
    tok = modeling.load_tokenizer(model)
    out = store.stage_dir("retrieve")
    ids = pd.read_parquet(store.path("requests", "accepted.parquet"), columns=["id"])["id"].tolist()
    assert len(ids) == n
    pd.DataFrame({"id": [f"n{i}" for i in range(n)],
                  "input_ids": [tok(t, add_special_tokens=False)["input_ids"] for t in _texts(n, seed=1)]}
                 ).to_parquet(out / "retain_items.parquet")
    pd.DataFrame({"request_id": ids, "neighbour_id": [f"n{i}" for i in range(n)], "rank": 0}
                 ).to_parquet(out / "neighbours.parquet")
    result = driver.run_unlearn(cfg, store)
    return result, pd.read_parquet(store.path("unlearn", "epochs.parquet"))


def test_peak_rss_does_not_grow_like_a_full_vocabulary_cache(wide_vocab_llama, shared_data, tmp_path):
    peaks, seconds = {}, {}
    for n in (SMALL, LARGE):
        started = time.time()
        result, epochs = _unlearn(tmp_path, wide_vocab_llama, shared_data, n)
        seconds[n] = time.time() - started
        # One epoch trained on (nearly) every pair. The thresholds make forgetting all but impossible:
        # only a generation whose BERTScore-F1 comes out below 0 counts as dissimilar.
        assert result["epochs"] == 1 and epochs["active_pairs"].iloc[0] >= 0.95 * n
        peaks[n] = result["partition"]["peak_rss_mb"]
    growth_mb = max(large - small for small, large in zip(peaks[SMALL], peaks[LARGE]))
    cache_mb = (LARGE - SMALL) * TOKENS * VOCAB * 4 / 2**20
    print(f"\npeak RSS per rank: {SMALL} requests {peaks[SMALL]} MB ({seconds[SMALL]:.0f} s), "
          f"{LARGE} requests {peaks[LARGE]} MB ({seconds[LARGE]:.0f} s); growth {growth_mb:.0f} MB vs "
          f"a full-vocabulary cache of the {LARGE - SMALL} extra requests {cache_mb:.0f} MB")
    assert cache_mb >= 1024, "the hypothetical cache must be large enough for this test to be able to fail"
    assert growth_mb < cache_mb / 2, f"peak RSS grew {growth_mb:.0f} MB for {LARGE - SMALL} more requests"
