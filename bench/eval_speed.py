"""Forgetting metrics cost: our MA + EL10 vs the reference procedure, same machine, one run.

    python bench/eval_speed.py [--requests 128] [--ref-requests 1] [--threads 2]

Requests: the first `--requests` rows of the exp0 forget set (column `text`), tokenized with
the default model's tokenizer (no special tokens) and cut to 200 tokens; rows shorter than
that are kept whole (their count is printed) unless `--full-length-only`.
Model: the default model (SmolLM2-135M-Instruct) in fp32, eval mode, on the CPU.

- ours: `pipeline.metrics.memorization_accuracy` (one teacher-forced forward) and
  `pipeline.metrics.extraction_likelihood` (ICU range, n=10: one prefill per batch of rows,
  only the prompts whose first greedy token misses are decoded, across rows, with a KV cache),
  called per row batch exactly as `pipeline.iur.memorization` calls them.
- reference: MA = for each t in 1..T-1, `model.generate(x_<t, max_new_tokens=1)` == x_t;
  EL10 = for each prompt t in round(0.75T)..T-10, `model.generate(x_<t, max_new_tokens=T-t)`
  one prompt at a time, scored with the n-gram hit rate of `pipeline.metrics`. Both use
  `pipeline.metrics._generation_config` (plain greedy, EOS never stops generation).

The reference costs hours for 128 requests on a small CPU, so it runs on the first
`--ref-requests` requests only; its time for all requests is extrapolated per request, and
ours is also timed on that subset alone for an apples-to-apples ratio. Times are wall clock
and process CPU time (all threads): on a shared machine the CPU-time ratio is the steadier.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import metrics  # noqa: E402
from pipeline.metrics import _generation_config, _ngram_hit_rate  # noqa: E402
from pipeline.modeling import load_model, load_tokenizer, resolve_model_dir  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared/data/icu_benchmark/forget_sets/exp0/lm_extraction_128_0.csv"


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def load_requests(path: Path, tok, count: int, seq_len: int, full_only: bool) -> tuple[list[list[int]], int]:
    """Token rows cut to `seq_len`, and how many of the rows read were shorter than that."""
    with open(path, newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    rows, short = [], 0
    for text in texts:
        if len(rows) == count:
            break
        ids = tok(text, add_special_tokens=False)["input_ids"][:seq_len]
        short += len(ids) < seq_len
        if len(ids) == seq_len or not full_only:
            rows.append(ids)
    return rows, short


# --- ours ------------------------------------------------------------------------------------


def ours(
    model, rows: list[list[int]], n: int, batch_size: int, gen_batch_size: int, pad_id: int
) -> tuple[list[float], list[float], Clock, Clock]:
    """(MA, EL) per row and the clocks of each, in row batches as pipeline.iur.memorization."""
    ma, el = [], []
    with Clock() as ma_clock:
        for start in range(0, len(rows), batch_size):
            ids, mask = metrics.pad_rows(rows[start : start + batch_size], pad_id)
            ma += metrics.memorization_accuracy(model, ids, mask).tolist()
    with Clock() as el_clock:
        for start in range(0, len(rows), batch_size):
            ids, mask = metrics.pad_rows(rows[start : start + batch_size], pad_id)
            el += metrics.extraction_likelihood(
                model, ids, mask, n=n, prompt_range="icu", batch_size=gen_batch_size, pad_token_id=pad_id
            ).tolist()
    return ma, el, ma_clock, el_clock


# --- reference -------------------------------------------------------------------------------


@torch.no_grad()
def generate_one(model, prompt: list[int], length: int) -> list[int]:
    """`length` greedy tokens after one unpadded prompt, by generate()."""
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=_generation_config(length, 1)
    )
    return out[0, len(prompt) :].tolist()


def icu_prompt_lengths(T: int, n: int) -> range:
    """t = round(0.75 T) (halves up) .. T-n: ICU's suffix-side prompts with >= n true tokens left."""
    return range(max(1, math.floor(0.75 * T + 0.5)), T - n + 1)


def reference(model, rows: list[list[int]], n: int):
    """MA and EL per row by the per-position / per-prompt generate() procedure, plus the
    per-position hits and per-prompt generations (for diagnosing differences) and clocks."""
    ma, el, hits, gens = [], [], [], []
    with Clock() as ma_clock:
        for x in rows:
            hit = [generate_one(model, x[:t], 1)[0] == x[t] for t in range(1, len(x))]
            hits.append(hit)
            ma.append(sum(hit) / len(hit))
    with Clock() as el_clock:
        for x in rows:
            ts = icu_prompt_lengths(len(x), n)
            gen = {t: generate_one(model, x[:t], len(x) - t) for t in ts}
            gens.append(gen)
            scores = [_ngram_hit_rate(gen[t], x[t:], n) for t in ts]
            el.append(sum(scores) / len(scores) if scores else 0.0)
    return ma, el, hits, gens, ma_clock, el_clock


# --- diagnostics when values differ ----------------------------------------------------------


@torch.no_grad()
def ma_position_diffs(model, rows: list[list[int]], ref_hits: list[list[bool]], pad_id: int) -> int:
    """Positions where the teacher-forced argmax hit differs from the generate() hit (one batch,
    as ours ran on the subset), with the top-2 logit gap of each printed."""
    ids, mask = metrics.pad_rows(rows, pad_id)
    logits, targets, valid = metrics._token_logits(model, ids, mask)
    hit = (logits.argmax(-1) == targets) & valid
    count = 0
    for i, row in enumerate(rows):
        for p in range(len(row) - 1):
            if bool(hit[i, p]) != ref_hits[i][p]:
                top = logits[i, p].topk(2).values
                print(
                    f"  MA row {i} t={p + 1}: ours hit={bool(hit[i, p])} ref hit={ref_hits[i][p]} "
                    f"top-2 logit gap {float(top[0] - top[1]):.3g}"
                )
                count += 1
    return count


def el_prompt_diffs(
    model, rows: list[list[int]], ref_gens: list[dict[int, list[int]]], n: int, gen_batch_size: int, pad_id: int
) -> int:
    """Prompts whose batched continuation (jobs as extraction_likelihood builds them for one row
    batch) differs from the one-prompt generate() continuation."""
    jobs = [(i, t) for i, row in enumerate(rows) for t in metrics.el_prompt_lengths(len(row), n, "icu")]
    got = metrics.greedy_continuations(
        model,
        [rows[i][:t] for i, t in jobs],
        [len(rows[i]) - t for i, t in jobs],
        batch_size=gen_batch_size,
        pad_token_id=pad_id,
    )
    count = 0
    for (i, t), g in zip(jobs, got):
        want = ref_gens[i][t]
        if g != want:
            first = next(k for k, (a, b) in enumerate(zip(g, want)) if a != b)
            print(f"  EL row {i} t={t}: continuations first differ at generated token {first}")
            count += 1
    return count


def max_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128, help="requests ours scores (timed)")
    parser.add_argument(
        "--ref-requests",
        type=int,
        default=1,
        help="first requests the reference also scores (~6 CPU-minutes each here)",
    )
    parser.add_argument("--seq-len", type=int, default=200)
    parser.add_argument("--n", type=int, default=10, help="EL n-gram size")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per MA/EL call (evaluation.batch_size)")
    parser.add_argument("--gen-batch-size", type=int, default=64, help="prompts per generate() call in EL")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full-length-only", action="store_true", help="skip rows shorter than --seq-len")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = resolve_model_dir("default")
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, "float32").eval()
    pad_id = tok.pad_token_id
    rows, short = load_requests(args.data, tok, args.requests, args.seq_len, args.full_length_only)
    k = min(args.ref_requests, len(rows))
    subset = rows[:k]
    lengths = [len(r) for r in rows]
    print(
        f"model {model_dir.name} ({model.dtype}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), "
        f"{torch.get_num_threads()} threads, CPU"
    )
    print(
        f"requests: {len(rows)} from {args.data.name}; {short} of the rows read have < {args.seq_len} tokens "
        f"({'skipped' if args.full_length_only else 'kept whole'}); lengths min {min(lengths)} "
        f"mean {sum(lengths) / len(lengths):.1f} max {max(lengths)}; reference subset: first {k} "
        f"(lengths {[len(r) for r in subset]})"
    )
    print(
        f"EL{args.n}, ICU prompt range (t = round(0.75T)..T-{args.n}); row batch {args.batch_size}, "
        f"generate batch {args.gen_batch_size}"
    )

    with torch.no_grad():  # warm-up: first-call allocations and lazy inits out of every clock
        model(torch.tensor([rows[0][:16]]))
        generate_one(model, rows[0][:16], 2)

    def run_ours(part: list[list[int]]):
        return ours(model, part, args.n, args.batch_size, args.gen_batch_size, pad_id)

    sub_ma, sub_el, sub_ma_c, sub_el_c = run_ours(subset)
    print(
        f"ours on the subset ({k}): MA {sub_ma_c.wall:.1f}s wall / {sub_ma_c.cpu:.1f}s CPU, "
        f"EL {sub_el_c.wall:.1f}s wall / {sub_el_c.cpu:.1f}s CPU",
        flush=True,
    )
    ref_ma, ref_el, ref_hits, ref_gens, ref_ma_c, ref_el_c = reference(model, subset, args.n)
    print(
        f"reference on the subset ({k}): MA {ref_ma_c.wall:.1f}s wall / {ref_ma_c.cpu:.1f}s CPU, "
        f"EL {ref_el_c.wall:.1f}s wall / {ref_el_c.cpu:.1f}s CPU",
        flush=True,
    )
    all_ma, all_el, all_ma_c, all_el_c = run_ours(rows)
    print(
        f"ours on all {len(rows)}: MA {all_ma_c.wall:.1f}s wall / {all_ma_c.cpu:.1f}s CPU, "
        f"EL {all_el_c.wall:.1f}s wall / {all_el_c.cpu:.1f}s CPU",
        flush=True,
    )

    # values
    d_ma_sub, d_el_sub = max_diff(sub_ma, ref_ma), max_diff(sub_el, ref_el)
    d_ma_all, d_el_all = max_diff(all_ma[:k], ref_ma), max_diff(all_el[:k], ref_el)
    print(f"subset values: ref MA {[round(v, 4) for v in ref_ma]} EL {[round(v, 4) for v in ref_el]}")
    print(
        f"RESULT max |ours - reference| on {k} requests: MA {d_ma_sub:.3g}, EL{args.n} {d_el_sub:.3g} "
        f"(ours run on the subset); MA {d_ma_all:.3g}, EL{args.n} {d_el_all:.3g} (ours run on all "
        f"{len(rows)}, other batching)"
    )
    if d_ma_sub or d_el_sub:
        print("differences, ours on the subset vs reference:")
        if k <= args.batch_size:
            n_ma = ma_position_diffs(model, subset, ref_hits, pad_id)
            n_el = el_prompt_diffs(model, subset, ref_gens, args.n, args.gen_batch_size, pad_id)
            total_ma = sum(len(h) for h in ref_hits)
            total_el = sum(len(g) for g in ref_gens)
            print(f"RESULT differing: {n_ma} of {total_ma} MA positions, {n_el} of {total_el} EL prompts")
        else:
            print("  (per-position diagnosis needs --ref-requests <= --batch-size)")

    # times
    ref_s = ref_ma_c.wall + ref_el_c.wall
    ref_cpu = ref_ma_c.cpu + ref_el_c.cpu
    sub_s, sub_cpu = sub_ma_c.wall + sub_el_c.wall, sub_ma_c.cpu + sub_el_c.cpu
    all_s, all_cpu = all_ma_c.wall + all_el_c.wall, all_ma_c.cpu + all_el_c.cpu
    target = 128
    print(
        f"RESULT reference: {ref_s / k:.1f}s wall ({ref_cpu / k:.1f}s CPU) per request "
        f"(MA {ref_ma_c.wall / k:.1f}s, EL {ref_el_c.wall / k:.1f}s); time for {target} requests "
        f"EXTRAPOLATED from {k} measured request(s): {ref_s / k * target:.0f}s wall "
        f"({ref_cpu / k * target:.0f}s CPU)"
    )
    ours_note = "measured" if len(rows) == target else f"EXTRAPOLATED from {len(rows)} measured requests"
    print(
        f"RESULT ours: {all_s / len(rows):.2f}s wall ({all_cpu / len(rows):.2f}s CPU) per request over "
        f"{len(rows)} requests (MA {all_ma_c.wall:.1f}s, EL {all_el_c.wall:.1f}s); time for {target} "
        f"requests {ours_note}: {all_s / len(rows) * target:.0f}s wall ({all_cpu / len(rows) * target:.0f}s CPU)"
    )
    print(
        f"RESULT ratio, reference extrapolated to {target} / ours {ours_note.split(' from')[0].lower()} "
        f"for {target}: {ref_s / k / (all_s / len(rows)):.1f}x wall, "
        f"{ref_cpu / k / (all_cpu / len(rows)):.1f}x CPU"
    )
    print(
        f"RESULT ratio per request on the same {k} request(s) (apples to apples): "
        f"{ref_s / sub_s:.1f}x wall, {ref_cpu / sub_cpu:.1f}x CPU; MA alone {ref_ma_c.wall / sub_ma_c.wall:.0f}x "
        f"wall ({ref_ma_c.cpu / sub_ma_c.cpu:.0f}x CPU), EL{args.n} alone {ref_el_c.wall / sub_el_c.wall:.1f}x "
        f"wall ({ref_el_c.cpu / sub_el_c.cpu:.1f}x CPU)"
    )
    print(
        "RESULT target >= 20x: "
        + ("met" if min(ref_s / sub_s, ref_cpu / sub_cpu) >= 20 else "NOT met")
        + " (apples-to-apples ratio)"
    )


if __name__ == "__main__":
    main()
