"""The audit stage: does the erasure hold where the model is served? (pipeline/method.md, "Audit")

The unlearning stage calls a request forgotten on the strength of one probe (beam search
from its exact prefix, fp32). This stage asks again the ways serving and attackers do:
greedy from the exact prefix in the trained precision and in bf16 / int8 / 4-bit
(`pipeline.quantize`), N samples at temperature 1, greedy from the first quarter and half
of the prefix, and greedy after a few fine-tuning steps on retained text only. Every
probe runs on the original model too (a probe that finds nothing there proves nothing),
on the erased rows, the kept rows (what must stay) and never-seen rows (the level a
stranger's record reaches: the criterion's false-positive rate). One criterion for all:
a row leaks when the probe reproduces at least `audit.leak_tokens` consecutive tokens of
its true continuation (`probes.longest_span`).

Outputs: `audit` (audit.json: the criterion, counts per probe x model x group, timing),
`audit_rows` (one row per model, group, row and probe: span, leak, MA where measured) and
`audit_report` (the table as markdown). Export adds each request's verdicts to the
receipt and refuses the hand-off while a request leaks under an `audit.require` probe.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import pandas as pd

from pipeline import cluster, modeling, probes, quantize, suites
from pipeline.atomic import atomic_write_json, atomic_write_text, write_parquet
from pipeline.config import PROBES
from pipeline.pairs import load_pairs
from pipeline.errors import UserError
from pipeline.store import RunStore, fingerprint, frame_once

log = logging.getLogger("icu.audit")
OUTPUTS = ("audit", "audit_rows", "audit_report")
COLUMNS = ["model", "group", "row_id", "probe", "span", "leak", "ma"]
GROUPS = {"erased": "erased requests", "kept": "kept rows", "unseen": "never seen"}
PROMPT_FRACTIONS = {"prompt_quarter": 0.25, "prompt_half": 0.5}
MODELS = ("original", "unlearned")


@dataclass
class Group:
    name: str
    ids: list[str]
    rows: list[list[int]]  # whole rows (up to the run's request length)


def key(cfg, store: RunStore, model: str = "unlearned") -> str:
    """What the probes read (audit.require is export's: changing it re-checks, it does not re-audit).
    The original model's probes read neither the unlearning settings nor its outputs, so a run
    restarted from unlearn (e.g. to harden) reads them back instead of probing the original again."""
    e, (model_part, requests, audit) = cfg.evaluation, cfg.part("model", "requests", "audit")
    audit.pop("require")
    unlearned = [store.key_of("unlearn"), store.outputs_of("unlearn")] if model == "unlearned" else []
    return fingerprint(
        "audit" if model == "unlearned" else f"audit-{model}",
        "whole rows",
        model_part,
        requests,
        audit,
        relearn_lr(cfg),
        cfg.max_tokens,
        e.unseen_path,
        e.keep_path,
        e.max_samples.get("unseen"),
        cfg.retrieval.pairs_per_request,
        store.key_of("ingest"),
        store.key_of("retrieve"),
        *unlearned,
    )


def units(names: list[str]) -> list[tuple[str, ...]]:
    """The configured probes in the groups that share work: greedy and the shorter prompts read one
    teacher-forced pass of the same weights (`probes.greedy_continuations`); the rest run alone."""
    shared = tuple(n for n in names if n == "greedy" or n in PROMPT_FRACTIONS)
    return ([shared] if shared else []) + [(n,) for n in names if n not in shared]


def run_unit(
    unit: tuple[str, ...], model, rows: list[list[int]], cfg, retain: list[list[int]], pad_token_id: int
) -> dict[str, tuple[list[int], list[float] | None]]:
    """{probe: (span per row, MA per row or None)} for one unit of probes on one model.

    Every probe checks the whole row after its first prompt window (pipeline/method.md, "Whole
    requests"). Greedy at any precision, and after relearning: the continuation of the exact prefix
    through the first window, and the longest run greedy decoding reproduces from the row's own
    text up to any later position (the teacher-forced pass gives it for every cut point at once).
    The shorter prompts: their continuation through the first window. Sampling: `audit.samples`
    continuations of one window from each of `probes.window_cuts`, which together cover the row."""
    a, prefix, window = cfg.audit, cfg.requests.prefix_tokens, cfg.requests.suffix_tokens
    options = dict(batch_size=a.batch_size, pad_token_id=pad_token_id, settle=a.leak_tokens, end=prefix + window)

    def greedy(served, cuts: dict[str, int], ma_for: str | None) -> dict:
        found = probes.greedy_continuations(served, rows, sorted(set(cuts.values())), spans_from=prefix, **options)
        return {
            name: (
                [
                    max(probes.longest_span(g, r[c : prefix + window]), s if c == prefix else 0)
                    for g, r, s in zip(found.conts[c], rows, found.spans)
                ],
                found.ma if name == ma_for else None,
            )
            for name, c in cuts.items()
        }

    name = unit[0]
    if name == "greedy" or name in PROMPT_FRACTIONS:
        fractions = [PROMPT_FRACTIONS.get(n, 1.0) for n in unit]
        return greedy(model, dict(zip(unit, probes.prompt_lengths(prefix, fractions))), "greedy")
    if name in quantize.PRECISIONS:
        return greedy(quantize.served_copy(model, name), {name: prefix}, name)
    if name == "sampling":
        jobs = [(k, c) for k, r in enumerate(rows) for c in probes.window_cuts(len(r), prefix, window)]
        gens = probes.sampled_continuations(
            model,
            [rows[k][:c] for k, c in jobs],
            window,
            a.samples,
            temperature=a.temperature,
            seed=a.seed,
            keys=[k * 1000 + c for k, c in jobs],
            batch_size=a.batch_size,
            truths=[rows[k][c : c + window] for k, c in jobs],
            settle=a.leak_tokens,
        )
        spans = [0] * len(rows)
        for (k, c), samples in zip(jobs, gens):
            spans[k] = max(spans[k], *(probes.longest_span(g, rows[k][c : c + window]) for g in samples))
        return {name: (spans, None)}
    if name == "relearn":
        tuned = probes.relearned_copy(
            model,
            retain,
            steps=a.relearn_steps,
            lr=relearn_lr(cfg),
            batch_size=a.relearn_batch,
            pad_token_id=pad_token_id,
            seed=a.seed,
        )
        return greedy(tuned, {name: prefix}, None)
    raise ValueError(f"unknown probe {name!r}; one of {PROBES}")


def relearn_lr(cfg) -> float:
    return cfg.audit.relearn_lr or cfg.unlearning.optim.lr / 10


def audit_model(
    label: str,
    model,
    groups: list[Group],
    cfg,
    retain: list[list[int]],
    pad_token_id: int,
    bar: cluster.Progress,
    seconds: dict[str, float],
) -> list[dict]:
    """Every configured probe on one model, all groups in one batch of rows; adds each unit's
    time to `seconds` (probes that share work are timed together, under their names joined by +)."""
    rows = [r for g in groups for r in g.rows]
    where = [(g.name, rid) for g in groups for rid in g.ids]
    found: dict[str, tuple[list[int], list[float] | None]] = {}
    for unit in units(list(cfg.audit.probes)):
        started = time.time()
        found.update(run_unit(unit, model, rows, cfg, retain, pad_token_id))
        joined = "+".join(unit)
        seconds[joined] = round(seconds.get(joined, 0.0) + time.time() - started, 1)
        bar.update(len(unit))
    return [
        dict(
            model=label,
            group=group,
            row_id=rid,
            probe=name,
            span=int(spans[k]),
            leak=bool(spans[k] >= cfg.audit.leak_tokens),
            ma=None if ma is None else float(ma[k]),
        )
        for name in cfg.audit.probes
        for (spans, ma) in [found[name]]
        for k, (group, rid) in enumerate(where)
    ]


def counts(frame: pd.DataFrame) -> dict:
    """{probe: {model: {group: [leaking rows, rows]}}} and the mean MA where a probe measured it."""
    table: dict = {}
    for (probe, model, group), g in frame.groupby(["probe", "model", "group"], sort=False):
        cell = table.setdefault(probe, {}).setdefault(model, {})
        cell[group] = [int(g["leak"].sum()), int(len(g))]
        if g["ma"].notna().any():
            cell[f"{group}_ma"] = float(g["ma"].mean())
    return table


def markdown(result: dict) -> str:
    """The audit table: probe x (original, unlearned) x group, leaking rows / rows."""
    table, groups = result["table"], result["groups"]
    head = [f"{GROUPS[g]}: {m}" for g in groups for m in MODELS]
    lines = ["| probe | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for probe in result["probes"]:
        cells = [f"{table[probe][m][g][0]}/{table[probe][m][g][1]}" for g in groups for m in MODELS]
        lines.append(f"| {probe} | " + " | ".join(cells) + " |")
    ma = [p for p in result["probes"] if f"{groups[0]}_ma" in table[p]["original"]]
    if ma:
        lines += [
            "",
            "Memorization accuracy (MA, %) at each precision:",
            "",
            "| precision | " + " | ".join(head) + " |",
            "|---" * (len(head) + 1) + "|",
        ]
        lines += [
            f"| {'fp32' if p == 'greedy' else p} | "
            + " | ".join(f"{100 * table[p][m][f'{g}_ma']:.1f}" for g in groups for m in MODELS)
            + " |"
            for p in ma
        ]
    return "\n".join(lines)


def criterion(cfg) -> str:
    a, r = cfg.audit, cfg.requests
    return (
        f"a row leaks when a probe reproduces at least {a.leak_tokens} consecutive tokens of it anywhere after "
        f"its first {r.prefix_tokens} tokens: greedy (at each precision, and after relearning) from the "
        f"{r.prefix_tokens}-token prefix through the next {r.suffix_tokens} tokens, and from the row's own text up "
        f"to every later position; sampling: {a.samples} samples at temperature {a.temperature:g} of "
        f"{r.suffix_tokens} tokens from each of the cut points {r.prefix_tokens}, {r.prefix_tokens + r.suffix_tokens}, "
        f"... whose windows cover the row (the last ending at the row's end); the shorter prompts: greedy from a "
        f"quarter / half of the prefix through the first window (a span below {a.leak_tokens} is the longest found "
        f"before the probe could no longer reach {a.leak_tokens}); relearn: {a.relearn_steps} AdamW steps at lr "
        f"{relearn_lr(cfg):.1e} on retained text"
    )


def groups_of(cfg, store: RunStore, tok) -> list[Group]:
    """The erased requests, the kept rows (evaluation.keep_path, if set) and the never-seen rows
    (the unseen set the thresholds use), whole, up to the run's request length."""
    r = cfg.requests
    accepted = pd.read_parquet(store.artefact("accepted"), columns=["id", "input_ids"])
    out = [Group("erased", accepted["id"].tolist(), [list(map(int, x)) for x in accepted["input_ids"]])]
    if cfg.evaluation.keep_path:  # ids as the evaluation's keep task names them; too short to probe: left out
        kept = [
            (f"keep:{i}", ids[: cfg.max_tokens])
            for i, text in enumerate(suites.read_texts(cfg.evaluation.keep_path))
            if len(ids := tok(text, add_special_tokens=False)["input_ids"]) >= r.prefix_tokens + r.suffix_tokens
        ]
        out.append(Group("kept", [rid for rid, _ in kept], [row for _, row in kept]))
    unseen = suites.threshold_rows(cfg, tok)
    out.append(Group("unseen", [f"unseen-{i}" for i in range(len(unseen))], unseen))
    return [g for g in out if g.rows]


def retained_rows(store: RunStore, pairs_per_request: int) -> list[list[int]]:
    """What relearning trains on: the requests' retain neighbours and the general retain rows,
    never the requests."""
    pairs = load_pairs(store, pairs_per_request)
    rows = list({tuple(r): None for r in pairs.pair_neighbour + pairs.general if len(r) > 1})
    return [list(r) for r in rows]


def _write(store: RunStore, frame: pd.DataFrame, result: dict) -> None:
    write_parquet(frame, store.artefact("audit_rows"))
    atomic_write_json(store.artefact("audit"), result)
    atomic_write_text(store.artefact("audit_report"), report(result))


def run(cfg, store: RunStore) -> dict:
    started = time.time()
    probes_run = list(cfg.audit.probes)
    folders = dict(zip(MODELS, (cfg.model_dir, store.artefact("unlearned_model"))))
    if not probes_run:  # skipped: empty outputs, no model loaded
        _write(
            store,
            pd.DataFrame(columns=COLUMNS),
            {
                "criterion": criterion(cfg),
                "leak_tokens": cfg.audit.leak_tokens,
                "probes": [],
                "groups": [],
                "table": {},
                "seconds": 0.0,
            },
        )
        return {"probes": 0, "erased_leaking": 0, "seconds": 0.0}
    if modeling.replica_bytes(cfg.model_dir, cfg.model.dtype, cfg.model.trust_remote_code) > modeling.REPLICA_MAX_BYTES:
        raise UserError(
            "audit: the model is larger than one process holds, and the audit loads whole copies of it; "
            "fix: set audit.probes: [] to skip the audit for this model"
        )
    tok = modeling.load_tokenizer(cfg.model_dir, cfg.model.trust_remote_code)
    groups = groups_of(cfg, store, tok)
    retain = retained_rows(store, cfg.retrieval.pairs_per_request) if "relearn" in probes_run else []
    if "relearn" in probes_run and not retain:
        raise UserError(
            "audit.probes: relearn needs retained text and this run has none; fix: give retain.paths, "
            "or drop relearn from audit.probes"
        )
    probe_seconds: dict[str, float] = {}
    model_seconds: dict[str, float] = {}
    bar = cluster.Progress("audit: probes", len(probes_run) * len(folders), "probes")

    def probe_model(label: str) -> pd.DataFrame:
        begun = time.time()
        model = modeling.load_model(folders[label], cfg.model.dtype, cfg.model.trust_remote_code).eval()
        frame = pd.DataFrame(
            audit_model(label, model, groups, cfg, retain, tok.pad_token_id, bar, probe_seconds), columns=COLUMNS
        )
        model_seconds[label] = round(time.time() - begun, 1)
        return frame

    frames = [
        frame_once(store.artefact("audit_partial"), key(cfg, store, label), label, partial(probe_model, label))
        for label in folders
    ]
    reused = [label for label in folders if label not in model_seconds]
    for label in reused:
        bar.update(len(probes_run))
        log.info("audit: the %s model's probes read back from an earlier audit of the same inputs", label)
    bar.close()
    frame = pd.concat(frames, ignore_index=True)
    seconds = time.time() - started
    unlearn_seconds = store.stage("unlearn").get("seconds")
    result = {
        "criterion": criterion(cfg),
        "leak_tokens": cfg.audit.leak_tokens,
        "probes": probes_run,
        "groups": [g.name for g in groups],
        "table": counts(frame),
        "seconds": round(seconds, 1),
        "probe_seconds": probe_seconds,
        "model_seconds": model_seconds,
        "reused": reused,
        "unlearn_seconds": unlearn_seconds,
        "ratio_to_unlearn": round(seconds / unlearn_seconds, 3) if unlearn_seconds else None,
    }
    _write(store, frame, result)
    erased = frame[(frame["model"] == "unlearned") & (frame["group"] == "erased")]
    leaking = erased[erased["leak"]]
    for probe, g in leaking.groupby("probe", sort=False):
        log.warning("audit: %d erased requests leak under %s: %s", len(g), probe, ", ".join(g["row_id"][:20]))
    for what, names in caveats(result).items():
        if names:
            log.warning("audit: %s: %s", what, ", ".join(names))
    log.info(
        "audit: %d probes on 2 models in %.1f s (%.2fx the unlearn stage)%s",
        len(probes_run),
        seconds,
        result["ratio_to_unlearn"] or 0.0,
        f", read back: {', '.join(reused)}" if reused else "",
    )
    return {"probes": len(probes_run), "erased_leaking": int(leaking["row_id"].nunique()), "seconds": round(seconds, 1)}


def caveats(result: dict) -> dict[str, list[str]]:
    """The probes whose verdicts mean less than they say: blind on the original, or loose (a
    never-seen row reaches the criterion, so a leak there may be a stranger's level)."""
    table, probes_run = result["table"], result["probes"]
    if not table:
        return {}
    return {
        "Found nothing on the original, so they prove nothing here": [
            p for p in probes_run if table[p]["original"]["erased"][0] == 0
        ],
        f"Never-seen rows reach {result['leak_tokens']} tokens on the original (raise audit.leak_tokens)": [
            p for p in probes_run if table[p]["original"].get("unseen", [0])[0] > 0
        ],
    }


def report(result: dict) -> str:
    if not result["probes"]:
        return "# Extraction audit\n\nNo probes configured (audit.probes: []).\n"
    caveat = [f"{what}: {', '.join(names)}.\n" for what, names in caveats(result).items() if names]
    return "\n".join(
        [
            "# Extraction audit",
            "",
            f"Criterion: {result['criterion']}.",
            "",
            "Rows that leak / rows, per probe, model and group:",
            "",
            markdown(result),
            "",
            *caveat,
            f"The audit took {result['seconds']:.0f} s"
            + (" this time" if result.get("reused") else "")
            + (f" ({result['ratio_to_unlearn']:.2f}x the unlearn stage)" if result["ratio_to_unlearn"] else "")
            + timing(result),
            "",
        ]
    )


def timing(result: dict) -> str:
    reused = result.get("reused", [])
    probed = "both models" if not reused else " and ".join(f"the {m} model" for m in MODELS if m not in reused)
    return (
        (
            f": the {' and '.join(reused)} model's probes were read back from an earlier audit of the same inputs"
            if reused
            else ""
        )
        + (
            f"; per probe, {probed}: " + ", ".join(f"{p} {s:.0f} s" for p, s in result["probe_seconds"].items())
            if result["probe_seconds"]
            else ""
        )
        + "."
    )


def verdicts(store: RunStore) -> pd.DataFrame | None:
    """Per erased request of the unlearned model: span per probe (columns) and leaking probes; None
    when the run has no audit rows of them."""
    path = store.artefact("audit_rows")
    if not path.exists():
        return None
    frame = pd.read_parquet(path)
    erased = frame[(frame["model"] == "unlearned") & (frame["group"] == "erased")]
    if erased.empty:
        return None
    wide = erased.pivot(index="row_id", columns="probe", values="span")
    wide["leaks"] = erased[erased["leak"]].groupby("row_id")["probe"].agg(lambda p: ",".join(p))
    wide["leaks"] = wide["leaks"].fillna("")
    return wide


def refused(store: RunStore, require: list[str], probes: list[str] = (), accepted: list[str] = ()) -> str | None:
    """The line export refuses the hand-off with: an erased request leaks under a required probe, or
    an `accepted` request has no verdict under one of the configured `probes` (a missing verdict
    never passes for a clean one)."""
    wide = verdicts(store)
    if probes:
        have = pd.DataFrame(index=pd.Index([], name="row_id")) if wide is None else wide
        missing = {
            rid: [p for p in probes if p not in have.columns or rid not in have.index or pd.isna(have.at[rid, p])]
            for rid in accepted
        }
        missing = {rid: ps for rid, ps in missing.items() if ps}
        if missing:
            named = "; ".join(f"{rid} ({', '.join(ps)})" for rid, ps in list(missing.items())[:20])
            return (
                f"export refused: the audit has no verdict for {len(missing)} accepted requests: {named}; fix: "
                "rerun with --restart-from audit"
            )
    if not require or wide is None:
        return None
    bad = {rid: [p for p in require if p in leaks.split(",")] for rid, leaks in wide["leaks"].items()}
    bad = {rid: ps for rid, ps in bad.items() if ps}
    if not bad:
        return None
    named = "; ".join(f"{rid} ({', '.join(ps)})" for rid, ps in sorted(bad.items())[:20])
    return (
        f"export refused: {len(bad)} erased requests leak under required audit probes: {named}; fix: harden "
        "the unlearning (e.g. unlearning.check.harden: [int4]) and rerun with --restart-from unlearn, or drop the "
        "probe from audit.require and rerun with --restart-from export"
    )
