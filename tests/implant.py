"""Implant-then-forget fixtures: a tiny model that knows some English and has memorized 16 sequences.

The tiny byte-level Llama is trained on a mixture: 64-byte windows of wikitext (general
English, so that its MA on unseen Pile text, the forgetting threshold, is that of a
model with language knowledge, not of a random one) and 16 other wikitext windows
repeated until reproduced verbatim. 8 of those become erasure requests, the other 8 the
retain pool. Nothing here comes from pile.csv, the unseen set the thresholds use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
import yaml

from pipeline import modeling
from pipeline.config import set_dotted
from pipeline.metrics import memorization_accuracy, pad_rows

LENGTH = 64  # bytes = tokens with the byte tokenizer
LEAK = 12  # the audit's leak span for this model: never-seen wikitext windows reach 9-10 bytes


def windows(data_dir: Path, n_memorize: int = 16, n_general: int = 2048) -> tuple[list[str], list[str]]:
    """(sequences to memorize, general text windows): disjoint 64-byte ASCII windows of wikitext."""
    texts = pd.read_csv(data_dir / "icu_benchmark" / "wikitext.csv")["text"].dropna().astype(str)
    out = []
    for text in texts:
        text = " ".join(text.split())
        out += [
            text[i : i + LENGTH] for i in range(0, len(text) - LENGTH + 1, LENGTH) if text[i : i + LENGTH].isascii()
        ]
    return out[:n_memorize], out[n_memorize : n_memorize + n_general]


def implant(out_dir: Path, memorize: list[str], general: list[str], steps: int = 600, lr: float = 3e-3) -> float:
    """Train the tiny Llama on general + memorized windows; save to out_dir; return the memorized MA."""
    base = modeling.tiny_model_dir("tiny-llama")
    model = modeling.load_model(base).train()
    tok = modeling.load_tokenizer(base)
    enc = lambda texts: pad_rows([tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.pad_token_id)
    mem_ids, mem_mask = enc(memorize)
    gen_ids, _ = enc(general)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(0, len(gen_ids), (48,), generator=gen)
        ids = torch.cat([mem_ids, gen_ids[pick]])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return memorization_accuracy(model, mem_ids, mem_mask).mean().item()


def write_inputs(root: Path, memorize: list[str]) -> tuple[Path, Path]:
    """requests.jsonl (the first 8 memorized windows) and retain.jsonl (the other 8).

    Odd requests are cut to 48 bytes: the two ranks then hold rows of different lengths,
    so their IUR checks need different numbers of generate() calls, which ZeRO-3 must sync.
    """
    requests, retain = root / "requests.jsonl", root / "retain.jsonl"
    requests.write_text(
        "".join(
            json.dumps({"id": f"req{i}", "text": t[:48] if i % 2 else t}) + "\n" for i, t in enumerate(memorize[:8])
        )
    )
    retain.write_text("".join(json.dumps({"text": t}) + "\n" for t in memorize[8:]))
    return requests, retain


def run_config(implanted: dict, tmp: Path, name: str, overrides: dict | None = None) -> Path:
    """A run config forgetting the implanted requests (retain pool: the other 8), written to tmp/<name>.yaml.

    `overrides` maps dotted keys to values, as `icu --set` does.
    """
    data = {
        "model": {"name": str(implanted["root"] / "model")},
        "requests": {
            "path": str(implanted["requests"]),
            "id_column": "id",
            "prefix_tokens": 20,
            "suffix_tokens": 20,
            "max_tokens": 64,
        },
        "retain": {"paths": [str(implanted["retain"])]},
        "retrieval": {"k": 8, "pairs_per_request": 8},
        # every request must be forgotten (stop: each); one-sided, since the unseen rows here (Pile
        # text) are not the same kind of text as the implanted requests, so their NLL is no band
        "unlearning": {
            "optim": {"lr": 2.0e-4, "batch_size": 4},
            "stop": {"rule": "each", "max_epochs": 30, "stranger_quantile": None},
        },
        "evaluation": {
            "data_dir": str(implanted["data"]),
            "batch_size": 8,
            "max_samples": {"unseen": 32, "ppl": 2, "classification": 4, "dialogue": 2},
        },
        "audit": {"leak_tokens": LEAK},
        "resources": {"num_workers": 2, "max_failures": 2},
        "storage": {"runs_dir": str(tmp / "runs"), "name": name},
    }
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def request_rows(implanted: dict, tok) -> list[list[int]]:
    """The erasure requests' token rows, as write_inputs cut them."""
    texts = [json.loads(line)["text"] for line in implanted["requests"].read_text().splitlines()]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def inside_4bit_buckets(model, rows: list[list[int]], lr: float = 5e-2, max_ma: float = 0.25, max_steps: int = 600):
    """Gradient ascent on `rows` that never moves a weight out of its Q4_0 bucket: only the weights
    4-bit rounds train, and any element (or block) whose rounded value would change is put back.
    The result forgets `rows` in fp32 (MA of every row below `max_ma`) while its 4-bit copy is the
    original's, bit for bit: the failure mode of a utility-preserving unlearning update that is
    smaller than a 4-bit bucket (Zhang et al. 2025), made exact."""
    from pipeline import quantize

    names = set(quantize.rounded_linears(model))
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in names)
    rounded = {n: quantize.q4_0(params[n].detach()) for n in names}
    opt = torch.optim.SGD([params[n] for n in names], lr=lr)
    ids, mask = pad_rows(rows, 0)
    for _ in range(max_steps):
        before = {n: params[n].detach().clone() for n in names}
        model.train()
        loss = -model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            for n in names:
                w = params[n]
                w.copy_(torch.where(quantize.q4_0(w) == rounded[n], w, before[n]))
                moved = (quantize.q4_0(w) != rounded[n]).reshape(w.shape[0], -1, quantize.BLOCK)
                w.copy_(torch.where(moved.any(-1, keepdim=True).expand_as(moved).reshape(w.shape), before[n], w))
        if memorization_accuracy(model, ids, mask).max() < max_ma:
            break
    model.requires_grad_(True)
    return model
