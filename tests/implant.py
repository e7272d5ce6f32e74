"""Implant-then-forget fixtures: a tiny model that has memorized known sequences.

A random tiny Llama is fine-tuned until it reproduces 16 sequences verbatim; 8 of them
become erasure requests and the other 8 are their retain neighbours.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import torch

from pipeline import modeling
from pipeline.metrics import pad_rows

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar "
         "papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
LENGTH = 64  # bytes = tokens with the byte tokenizer


def sequences(n: int = 16, seed: int = 7) -> list[str]:
    """n distinct pseudo-sentences of exactly LENGTH bytes."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        text = " ".join(rng.choice(WORDS) for _ in range(20))[:LENGTH]
        if text not in out:
            out.append(text)
    return out


def implant(out_dir: Path, texts: list[str], steps: int = 400, lr: float = 3e-3) -> float:
    """Fine-tune the tiny Llama on `texts` until memorized; save to out_dir; return its mean MA."""
    from pipeline.metrics import memorization_accuracy

    base = modeling.tiny_model_dir("tiny-llama")
    model = modeling.load_model(base).train()
    tok = modeling.load_tokenizer(base)
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids, mask = pad_rows(rows, tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return memorization_accuracy(model, ids, mask).mean().item()


def write_neighbours(run_dir: Path, request_ids: list[str], retain_texts: list[str], tokenizer) -> None:
    """Pair request i with retain text i, as the retrieval stage would write it."""
    folder = run_dir / "retrieval"
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"retain-{i}" for i in range(len(retain_texts))]
    pd.DataFrame({"request_id": request_ids, "rank": 0, "neighbour_id": ids, "score": 0.0}).to_parquet(
        folder / "neighbours.parquet")
    pd.DataFrame({"id": ids, "text": retain_texts,
                  "input_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in retain_texts]}
                 ).to_parquet(folder / "retain_items.parquet")
