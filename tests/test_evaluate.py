"""Evaluation: suites built from the shared data, replicas that agree, plausible real-model numbers.

The metric functions themselves are checked against slow references in test_metrics.py;
here the suites and the stage plumbing around them are.
"""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest

from pipeline import evaluate, metrics, modeling, scoring, suites
from pipeline.suites import read_texts

from conftest import write_config

CAPS = {"forget": 6, "unseen": 6, "ppl": 3, "classification": 4, "dialogue": 3}


def _forget_rows(tok, shared_data, caps=CAPS, max_tokens=64) -> list[list[int]]:
    texts = read_texts(shared_data / "icu_benchmark" / "forget_sets" / "exp0" / "lm_extraction_128_0.csv")
    return [tok(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts[: caps["forget"]]]


def _requests(model_dir, shared_data, folder) -> str:
    """The parquet file of the forget rows' input_ids that a spec names (as a run's accepted requests)."""
    path = folder / "accepted.parquet"
    pd.DataFrame({"input_ids": _forget_rows(modeling.load_tokenizer(model_dir), shared_data)}).to_parquet(path)
    return str(path)


def _tasks(model_dir, shared_data, names, caps=CAPS, max_tokens=64):
    tok = modeling.load_tokenizer(model_dir)
    rows = _forget_rows(tok, shared_data, caps, max_tokens)
    return suites.build_tasks(
        names,
        shared_data,
        tok,
        forget_rows=rows,
        forget_ids=[f"r{i}" for i in range(len(rows))],
        max_tokens=max_tokens,
        min_tokens=32,
        ppl_chunk=128,
        caps=caps,
        unseen_path=shared_data / "icu_benchmark" / "pile.csv",
    ), tok


def test_suites_cover_every_task_with_capped_examples(tiny_llama_dir, shared_data):
    tasks, tok = _tasks(tiny_llama_dir, shared_data, ["forget", "unseen", "ppl", "classification", "dialogue"])
    names = {t.name: t for t in tasks}
    assert set(names) == {
        "forget",
        "pile_unseen",
        "pile",
        "wikitext",
        "lambada",
        "pubmed_qa",
        *suites.BIGBENCH_TASKS,
        *suites.DIALOGUE_TASKS,
    }
    for task in tasks:
        assert 0 < len(task.examples) <= CAPS[task.suite], task.name
        assert len({ex["id"] for ex in task.examples}) == len(task.examples), task.name
    assert all(len(ex["ids"]) == 128 for ex in names["pile"].examples)
    # a request travels to the scorers as its row in the accepted requests, never as its tokens
    assert [ex for ex in names["forget"].examples] == [{"id": f"r{i}", "row": i} for i in range(CAPS["forget"])]
    for name in ("pubmed_qa", *suites.BIGBENCH_TASKS):
        for ex in names[name].examples:
            assert 0 <= ex["label"] < len(ex["choices"]) >= 2
    dialogue = names["wizard_of_wikipedia"].examples[0]
    assert tok.decode(dialogue["context"]).rstrip().endswith(suites.SPEAKERS) and dialogue["reference"]


def test_keep_suite_scores_the_kept_texts_like_unseen_rows(tiny_llama_dir, shared_data, tmp_path):
    keep = tmp_path / "keep.jsonl"
    keep.write_text('{"text": "Alice Smith, born 1/2/1980"}\n{"text": "Bob Jones, born 3/4/1975"}\n')
    tok = modeling.load_tokenizer(tiny_llama_dir)
    tasks = suites.build_tasks(
        ["ppl"],
        shared_data,
        tok,
        forget_rows=None,
        forget_ids=None,
        max_tokens=16,
        min_tokens=8,
        ppl_chunk=128,
        caps={"ppl": 1},
        unseen_path=shared_data / "icu_benchmark" / "pile.csv",
        keep_path=str(keep),
    )
    task = next(t for t in tasks if t.name == "keep")
    assert task.kind == "memorization" and [tok.decode(ex["ids"]) for ex in task.examples] == [
        "Alice Smith, bor",
        "Bob Jones, born ",
    ]
    frame = scoring.score_model(
        scoring.model_spec(tiny_llama_dir, scoring.Options()), scoring.make_units([task]), actors=1, use_ray=False
    )
    model = modeling.load_model(tiny_llama_dir)
    ids, mask = metrics.pad_rows([ex["ids"] for ex in task.examples], tok.pad_token_id)
    assert evaluate.summarize(frame)["keep"]["ma"] == pytest.approx(
        metrics.memorization_accuracy(model, ids, mask).mean().item(), abs=1e-9
    )


def test_cut_reply_stops_at_the_next_speaker():
    assert scoring.cut_reply(" I like red too.\nPerson 1: why?") == "I like red too."
    assert scoring.cut_reply("no tag here ") == "no tag here"


def test_stage_perplexity_equals_the_metric_on_the_same_stream(tiny_llama_dir, shared_data):
    """PPL from per-chunk unit scores == exp of the mean NLL of 128-token chunks of the same stream."""
    tasks, tok = _tasks(tiny_llama_dir, shared_data, ["ppl"])
    spec = scoring.model_spec(tiny_llama_dir, scoring.Options())
    frame = scoring.score_model(spec, scoring.make_units(tasks, unit_size=2), actors=1, use_ray=False)
    summary = evaluate.summarize(frame)
    model = modeling.load_model(tiny_llama_dir)
    for task in tasks:
        stream = [t for ex in task.examples for t in ex["ids"]]
        chunks = [c for c in (stream[s : s + 128] for s in range(0, len(stream), 128)) if len(c) >= 2]
        want = math.exp(metrics.sequence_losses(model, chunks).mean())
        assert summary["ppl"][task.name] == pytest.approx(want, rel=1e-9)


def test_summary_counts_and_auc_from_per_sample_rows():
    rows = []
    for i, (ma, el, loss) in enumerate([(0.9, 0.5, -1.0), (0.1, 0.0, -3.0), (0.2, 0.01, -2.0)]):
        rows += [
            ("forget", "forget", f"r{i}", m, v)
            for m, v in (
                ("ma", ma),
                ("el", el),
                ("bertscore", 0.5),
                ("bleu", 0.1),
                ("mia_loss", loss),
                ("mia_zlib", loss),
                ("mia_min_k", loss),
            )
        ]
    for i, loss in enumerate([-2.5, -1.5]):
        rows += [
            ("unseen", "pile_unseen", f"p{i}", m, v)
            for m, v in (("ma", 0.3), ("el", 0.0), ("mia_loss", loss), ("mia_zlib", loss), ("mia_min_k", loss))
        ]
    frame = pd.DataFrame(rows, columns=scoring.COLUMNS)
    out = evaluate.summarize(frame, {"ma": 0.3, "el": 0.0})
    assert out["forget"]["below_thresholds"] == 1 and out["forget"]["requests"] == 3
    assert out["forget"]["ma"] == pytest.approx(0.4)
    # members -1, -3, -2 vs non-members -2.5, -1.5: pairs won 2 + 0 + 1 = 3 of 6
    assert out["mia_auc"]["loss"] == pytest.approx(0.5)
    # placements: members 1, 0, 0.5 (variance 1/4), non-members 2/3, 1/3 (1/18): sqrt(1/12 + 1/36)
    assert out["mia_auc_se"]["loss"] == pytest.approx((1 / 12 + 1 / 36) ** 0.5)


@pytest.mark.slow
def test_one_and_two_ray_actors_give_identical_per_sample_results(tiny_llama_dir, shared_data, tmp_path):
    import ray

    tasks, _ = _tasks(tiny_llama_dir, shared_data, ["forget", "unseen", "ppl", "classification", "dialogue"])
    units = scoring.make_units(tasks, unit_size=4)
    requests = _requests(tiny_llama_dir, shared_data, tmp_path)
    spec = scoring.model_spec(tiny_llama_dir, scoring.Options(prefix=16, suffix=16), requests=requests)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        one = scoring.score_model(spec, units, actors=1)
        two = scoring.score_model(spec, units, actors=2)
    finally:
        ray.shutdown()
    assert len(one) == len(two) > 0 and set(one["task"]) == {t.name for t in tasks}
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    # In this process torch uses every core (actors use their 1 CPU): sums reorder, floats may move ~1e-8.
    local = scoring.score_model(spec, units, actors=1, use_ray=False)
    pd.testing.assert_frame_equal(one, local, check_exact=False, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_default_model_utility_is_plausible_and_shuffled_text_is_not(default_model_dir, shared_data):
    """SmolLM2-135M: Pile/WikiText PPL in the range of small LMs, LAMBADA well above chance;
    the same tokens shuffled within each example score far worse."""
    caps = dict(CAPS, ppl=6, classification=64)
    tasks, _ = _tasks(default_model_dir, shared_data, ["ppl"], caps=caps)
    tasks = [t for t in tasks] + [
        t for t in _tasks(default_model_dir, shared_data, ["classification"], caps=caps)[0] if t.name == "lambada"
    ]
    shuffled = [
        suites.Task(t.suite, t.name, t.kind, [_shuffle(ex, seed=i) for i, ex in enumerate(t.examples)]) for t in tasks
    ]
    spec = scoring.model_spec(default_model_dir, scoring.Options())
    real = evaluate.summarize(scoring.score_model(spec, scoring.make_units(tasks), 1, use_ray=False))
    noise = evaluate.summarize(scoring.score_model(spec, scoring.make_units(shuffled), 1, use_ray=False))
    print(f"default model: {real}; shuffled: {noise}")
    # Measured: Pile 87.7 (not a Pile-trained model; the text mixes code, papers, e-mail), WikiText 27.9.
    assert 5 < real["ppl"]["pile"] < 150 and 5 < real["ppl"]["wikitext"] < 60
    assert real["classification"]["lambada"] > 15  # measured 23.4 %; small LMs get 20-40 %
    for name in ("pile", "wikitext"):
        assert noise["ppl"][name] > 10 * real["ppl"][name]
    assert noise["classification"]["lambada"] < real["classification"]["lambada"] / 2


def _shuffle(example: dict, seed: int) -> dict:
    rng = random.Random(seed)
    out = dict(example)
    key = "ids" if "ids" in example else "context"
    tokens = list(example[key])
    rng.shuffle(tokens)
    out[key] = tokens
    return out


def test_report_renders_table_task_tables_and_plots(tmp_path):
    from pipeline import report

    rows = []
    for label, shift in (("original", 0.0), ("unlearned", 0.5)):
        for i in range(4):
            rows += [
                (label, "forget", "forget", f"r{i}", m, v)
                for m, v in (("ma", 0.9 - shift + i / 100), ("el", 0.5 - shift / 2), ("bertscore", 0.6), ("bleu", 0.2))
            ]
    samples = pd.DataFrame(rows, columns=["model", *scoring.COLUMNS])
    summary = {
        "forget": {"el": 0.5, "ma": 0.9, "bertscore": 0.6, "bleu": 0.2, "below_thresholds": 0, "requests": 4},
        "ppl": {"pile": 20.0, "wikitext": 25.0},
        "classification": {"lambada": 30.0, "average": 30.0},
    }
    results = {
        "thresholds": {"ma": 0.4, "el": 0.01},
        "models": {"original": summary, "unlearned": summary},
        "unlearn": {"method": "icu", "epochs": 3, "stop_reason": "all_forgotten", "forgotten": 4, "requests": 4},
        "paired_change": {
            "classification": {"change": -5.4, "se": 3.1, "examples": 56, "tasks": 7},
            "dialogue": {"change": 3.0, "se": 1.2, "examples": 16, "tasks": 4},
        },
    }
    unlearn = tmp_path / "unlearn"
    unlearn.mkdir()
    pd.DataFrame(
        {"epoch": [0, 0, 1, 1], "request_id": ["a", "b", "a", "b"], "forgotten": [False, False, True, True]}
    ).to_parquet(unlearn / "history.parquet")
    pd.DataFrame({"epoch": [1], "mean_loss": [0.3], "mean_forget_nll": [2.0]}).to_parquet(unlearn / "epochs.parquet")
    path = report.write_report(tmp_path, results, samples, (unlearn / "history.parquet", unlearn / "epochs.parquet"))
    text = path.read_text()
    assert "| Model | EL10 % | MA % |" in text and "| unlearned | 50.0 | 90.0 |" in text and "| 3 |" in text
    assert "## Classification" in text and "MIA" not in text.split("\n")[2]  # no MIA column without MIA data
    # 56 examples at SE 3.1: a 2-point target needs SE 1, i.e. 56 * 3.1^2 = 539 examples
    assert (
        "-5.4 points (standard error 3.1; paired, the same 56 examples over 7 tasks). Within two standard "
        "errors of 0: at this size it is not told apart from no change; to tell 2 points apart it needs about "
        "539 examples"
    ) in text
    assert (
        "+3.0 points (standard error 1.2; paired, the same 16 examples over 4 tasks). More than two standard "
        "errors from 0: a change." in text
    )
    assert report._resolution("dialogue", {"change": 0.0, "se": 0.0, "examples": 16}).startswith("Within two")
    for png in ("forget_distributions.png", "forgotten_per_epoch.png", "loss_curves.png"):
        assert f"]({png})" in text and (tmp_path / png).stat().st_size > 5000


def test_null_max_tokens_cuts_threshold_and_evaluation_rows_alike(tmp_path, shared_data):
    """`requests.max_tokens: null` resolves once (to the model's context): the rows the
    stopping thresholds are measured on are the rows the report's unseen task scores."""
    from pipeline import driver

    requests = tmp_path / "r.jsonl"
    requests.write_text('{"text": "x"}\n')
    config = write_config(
        tmp_path,
        f"model: {{name: tiny-llama}}\nrequests: {{path: {requests}, max_tokens: null}}\n"
        f"evaluation: {{data_dir: {shared_data}, suites: [unseen], max_samples: {{unseen: 4}}}}\n"
        f"storage: {{runs_dir: {tmp_path}/runs}}\n",
    )
    cfg, store = driver.open_run(str(config))
    store.unlock()
    assert cfg.max_tokens == modeling.context_length(cfg.model_dir) > 200
    assert store.load_config().max_tokens == cfg.max_tokens  # what the workers read
    tok = modeling.load_tokenizer(cfg.model_dir)
    thresholds = suites.threshold_rows(cfg, tok)
    unseen = next(t for t in evaluate._tasks(cfg, tok, None) if t.name == "pile_unseen")
    assert [ex["ids"] for ex in unseen.examples] == thresholds
    assert max(map(len, thresholds)) > 200  # longer than the old fallback of 200 tokens


@pytest.mark.slow
def test_sharded_evaluation_gives_the_replica_values(implanted, tmp_path):
    """Every suite scored on 2 ZeRO-3 workers (the model sharded, the same units on each rank)
    equals one whole replica's scores, sample by sample; nothing of the units is left behind."""
    from implant import run_config

    from pipeline import driver, sharded_eval

    config = run_config(
        implanted,
        tmp_path,
        "sharded",
        {
            "resources.launcher": "torchrun",
            "evaluation.sharded": "always",
            "evaluation.max_samples": {"unseen": 4, "ppl": 1, "classification": 2, "dialogue": 2},
        },
    )
    cfg, store = driver.open_run(str(config))
    driver.run_pipeline(cfg, store, until="ingest")
    assert evaluate.sharded(cfg, cfg.model_dir)
    accepted = pd.read_parquet(store.artefact("accepted"), columns=["id", "input_ids"])
    units = scoring.make_units(evaluate._tasks(cfg, modeling.load_tokenizer(cfg.model_dir), accepted))
    assert {"forget", "unseen", "ppl", "classification", "dialogue"} <= {u["suite"] for u in units}
    spec = scoring.model_spec(cfg.model_dir, evaluate.options(cfg), requests=store.artefact("accepted"))
    replica = scoring.score_model(spec, units, 1, use_ray=False)
    shards = sharded_eval.score(cfg, store, spec, units, "original")
    assert len(shards) == len(replica) > 100
    pd.testing.assert_frame_equal(shards, replica, check_exact=False, atol=1e-4, rtol=0)
    assert not list(store.artefact("eval_partial").glob("*-sharded.*"))
