"""What the evaluation scores: each suite as a list of tasks of tokenized examples.

A task has a `kind` that names how its examples are scored (see `pipeline.evaluate`):
- "requests": erasure requests; generation similarity (as IUR), MA, EL_n, membership scores.
- "memorization": unseen text; MA, EL_n (the forgetting thresholds), membership scores.
- "ppl": non-overlapping chunks of the concatenated documents; mean token NLL per chunk.
- "choice": a context and candidate continuations; correct when the label has the
  lowest summed NLL (PubMedQA and the BIG-bench sets).
- "lambada": a context and its last word; correct when greedy decoding reproduces it.
- "dialogue": the turns before a conversation's last reply; unigram F1 of a 32-token
  greedy reply, cut at the next speaker tag, against that reply.
The readers of the shared benchmark data (`evaluation.data_dir`) live here too.
Examples are built here once, in a fixed order, so every replica scores the same tokens.
The `mia` suite has no examples of its own: it compares the forget and unseen rows'
membership scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import UserError

BIGBENCH_TASKS = ("cause_and_effect", "physical_intuition", "winowhy", "social_iqa", "truthful_qa_mc")
DIALOGUE_TASKS = ("wizard_of_wikipedia", "wizard_of_internet", "empathetic_dialogues", "blended_skill_talk")
SPEAKERS = ("Person 1:", "Person 2:")
DIALOGUE_TURNS = 4  # turns of context before the reply
CONTEXT_TOKENS = 384  # contexts are cut from the left to this many tokens
UNSEEN_CAP = 64  # unseen rows when evaluation.max_samples.unseen is not set


def read_texts(path: str | Path, column: str = "text", limit: int | None = None) -> list[str]:
    """Non-empty texts of one column of a csv/jsonl/parquet file, in file order."""
    path = Path(path)
    readers = {
        ".csv": pd.read_csv,
        ".parquet": pd.read_parquet,
        ".jsonl": lambda p: pd.read_json(p, lines=True),
        ".json": pd.read_json,
    }
    if path.suffix not in readers:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use csv, jsonl, json or parquet")
    if not path.is_file():
        raise UserError(f"{path}: not found; fix: set evaluation.data_dir to the shared data folder")
    frame = readers[path.suffix](path)
    if column not in frame.columns:  # the names are not shown: a file without a header row would show its first row
        raise UserError(
            f"{path}: no column {column!r} among its {len(frame.columns)} columns; fix: name the text "
            "column 'text' (with a header row)"
        )
    texts = [t for t in frame[column].tolist() if isinstance(t, str) and t.strip()]
    return texts[:limit] if limit else texts


def unseen_rows(path: str | Path, tokenizer, max_tokens: int, min_tokens: int, limit: int | None) -> list[list[int]]:
    """Token rows of text the model never saw (`evaluation.unseen_path`, held-out Pile text by
    default): the forgetting thresholds' yardstick.

    Rows are cut to `max_tokens` (the request length) and rows shorter than `min_tokens`
    (prefix + suffix) are skipped, so they look like requests.
    """
    rows = []
    for text in read_texts(path):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) >= min_tokens:
            rows.append(ids)
        if limit and len(rows) >= limit:
            break
    return rows


def threshold_rows(cfg, tokenizer, path: str | None = None) -> list[list[int]]:
    """The unseen rows the forgetting thresholds are measured on (by the unlearning workers)
    and the evaluation's unseen task shows: one definition, cut to the run's request length.
    `path`: other never-seen text cut the same way (`unlearning.check.strangers_path`)."""
    e, r = cfg.evaluation, cfg.requests
    return unseen_rows(
        path or e.unseen_path,
        tokenizer,
        cfg.max_tokens,
        r.prefix_tokens + r.suffix_tokens,
        e.max_samples.get("unseen", UNSEEN_CAP),
    )


PPL_SETS = ("pile", "wikitext")  # icu_benchmark/<name>.csv


def held_out_texts(cfg, tokenizer) -> list[str]:
    """What the evaluation measures perplexity on, when its suites include ppl."""
    e = cfg.evaluation
    if "ppl" not in e.suites:
        return []
    return [
        doc
        for name in PPL_SETS
        for doc in ppl_documents(
            Path(e.data_dir) / "icu_benchmark" / f"{name}.csv", tokenizer, e.ppl_chunk, e.max_samples.get("ppl")
        )
    ]


@dataclass
class Task:
    suite: str
    name: str
    kind: str
    examples: list[dict[str, Any]] = field(default_factory=list)


def build_tasks(
    suites: list[str],
    data_dir: str | Path,
    tokenizer,
    *,
    forget_rows: list[list[int]] | None,
    forget_ids: list[str] | None,
    max_tokens: int,
    min_tokens: int,
    ppl_chunk: int,
    caps: dict[str, int],
    unseen_path: str | Path,
    keep_path: str | None = None,
) -> list[Task]:
    """The tasks of the chosen suites; `caps[suite]` limits examples per task.

    `unseen_path`: text the model never saw (`evaluation.unseen_path`: the thresholds' set).
    `keep_path`: text that should stay memorized, scored like the unseen set (its own task,
    "keep"), so collateral damage to neighbours of the requests shows.
    """
    data = Path(data_dir)
    wanted = set(suites) | ({"forget", "unseen"} if "mia" in suites else set())
    tasks: list[Task] = []
    if "forget" in wanted:
        if not forget_rows:
            raise UserError(
                "evaluation.suites: 'forget' and 'mia' need erasure requests; fix: run them in a "
                "pipeline run, or leave them out when evaluating a model on its own"
            )
        # a request's tokens never travel with the units (Ray's object store spills to disk): its
        # row in the accepted requests does, and each scorer reads the rows from the run directory
        rows = forget_rows[: caps.get("forget")]
        tasks.append(
            Task(
                "forget", "forget", "requests", [{"id": rid, "row": i} for i, rid in enumerate(forget_ids[: len(rows)])]
            )
        )
    if "unseen" in wanted:
        rows = unseen_rows(unseen_path, tokenizer, max_tokens, min_tokens, caps.get("unseen", UNSEEN_CAP))
        tasks.append(
            Task("unseen", "pile_unseen", "memorization", [{"id": f"pile:{i}", "ids": r} for i, r in enumerate(rows)])
        )
    if keep_path:
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in read_texts(keep_path)]
        tasks.append(Task("keep", "keep", "memorization", [{"id": f"keep:{i}", "ids": r} for i, r in enumerate(rows)]))
    if "ppl" in wanted:
        tasks += [
            _ppl_task(name, data / "icu_benchmark" / f"{name}.csv", tokenizer, ppl_chunk, caps.get("ppl"))
            for name in PPL_SETS
        ]
    if "classification" in wanted:
        cap = caps.get("classification")
        tasks.append(_lambada(data / "icu_benchmark" / "lambada.csv", tokenizer, cap))
        tasks.append(_pubmed_qa(data / "icu_benchmark" / "pubmed_qa.csv", tokenizer, cap))
        tasks += [_bigbench(data / "bigbench_mc" / f"{name}.json", tokenizer, cap) for name in BIGBENCH_TASKS]
    if "dialogue" in wanted:
        tasks += [
            _dialogue(data / "icu_benchmark" / f"{name}.json", tokenizer, caps.get("dialogue"))
            for name in DIALOGUE_TASKS
        ]
    return tasks


def _need(path: Path) -> Path:
    if not path.is_file():
        raise UserError(
            f"{path}: not found; fix: set evaluation.data_dir to the shared data folder "
            "(it holds icu_benchmark/ and bigbench_mc/)"
        )
    return path


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _context(tokenizer, text: str) -> list[int]:
    return _encode(tokenizer, text)[-CONTEXT_TOKENS:]


def ppl_documents(path: Path, tokenizer, chunk: int, cap: int | None) -> list[str]:
    """The documents of `path` the perplexity task reads (enough for `cap` chunks; all if no cap):
    text that must never be trained on (retrieval keeps it out of the general retain rows)."""
    docs, tokens = [], 0
    for text in read_texts(path):
        docs.append(text)
        tokens += len(_encode(tokenizer, text)) + 1
        if cap and tokens >= cap * chunk:
            break
    return docs


def _ppl_task(name: str, path: Path, tokenizer, chunk: int, cap: int | None) -> Task:
    """Chunks of `chunk` tokens of the documents joined with EOS (cap = number of chunks)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in ppl_documents(path, tokenizer, chunk, cap):
        stream += _encode(tokenizer, text) + eos
    chunks = [stream[s : s + chunk] for s in range(0, len(stream), chunk)]
    chunks = [c for c in chunks if len(c) >= 2][:cap]
    return Task("ppl", name, "ppl", [{"id": f"{name}:{i}", "ids": c} for i, c in enumerate(chunks)])


def _lambada(path: Path, tokenizer, cap: int | None) -> Task:
    examples = []
    for i, text in enumerate(read_texts(path, limit=cap)):
        context, _, word = text.strip().rpartition(" ")
        if context and word:
            examples.append(
                {
                    "id": f"lambada:{i}",
                    "context": _context(tokenizer, context),
                    "target": _encode(tokenizer, " " + word),
                }
            )
    return Task("classification", "lambada", "lambada", examples)


def _pubmed_qa(path: Path, tokenizer, cap: int | None) -> Task:
    frame = pd.read_csv(_need(path), nrows=cap)
    options = ("yes", "no", "maybe")
    examples = [
        {
            "id": f"pubmed_qa:{row.pubid}",
            "context": _context(tokenizer, f"Abstract: {row.abstract}\nQuestion: {row.question}\nAnswer:"),
            "choices": [_encode(tokenizer, " " + o) for o in options],
            "label": options.index(row.final_decision),
        }
        for row in frame.itertuples()
        if row.final_decision in options
    ]
    return Task("classification", "pubmed_qa", "choice", examples)


def _bigbench(path: Path, tokenizer, cap: int | None) -> Task:
    """BIG-bench's zero-shot multiple-choice prompt: task prefix, input prefix, input
    (with the choices listed when the task asks for it), output prefix; then each choice."""
    spec = json.loads(_need(path).read_text(encoding="utf-8"))
    in_prefix = spec.get("example_input_prefix", "\nQ: ")
    out_prefix = spec.get("example_output_prefix", "\nA: ")
    examples = []
    for i, ex in enumerate(spec["examples"][:cap]):
        choices = list(ex["target_scores"])
        text = ex["input"]
        if spec.get("append_choices_to_input", True):
            text += "".join(f"\n  choice: {c}" for c in choices)
        prompt = spec.get("task_prefix", "") + in_prefix + text + out_prefix.rstrip(" ")
        sep = " " if out_prefix.endswith(" ") else ""
        examples.append(
            {
                "id": f"{path.stem}:{i}",
                "context": _context(tokenizer, prompt),
                "choices": [_encode(tokenizer, sep + c) for c in choices],
                "label": max(range(len(choices)), key=lambda k: ex["target_scores"][choices[k]]),
            }
        )
    return Task("classification", path.stem, "choice", examples)


def _dialogue(path: Path, tokenizer, cap: int | None) -> Task:
    """Each conversation's last turn is the reply to predict from the turns before it."""
    turns = json.loads(_need(path).read_text(encoding="utf-8"))["text"]
    examples = []
    for key in sorted(turns, key=int):
        convo = [t.strip() for t in turns[key] if isinstance(t, str) and t.strip()]
        if len(convo) < 2:
            continue
        history = convo[:-1][-DIALOGUE_TURNS:]
        first = (len(convo) - 1 - len(history)) % 2
        lines = [f"{SPEAKERS[(first + j) % 2]} {t}" for j, t in enumerate(history)]
        reply_speaker = SPEAKERS[(first + len(history)) % 2]
        examples.append(
            {
                "id": f"{path.stem}:{key}",
                "reference": convo[-1],
                "context": _context(tokenizer, "\n".join(lines) + f"\n{reply_speaker}"),
            }
        )
        if cap and len(examples) >= cap:
            break
    return Task("dialogue", path.stem, "dialogue", examples)
