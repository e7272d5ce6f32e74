"""Config validation: every mistake is one line naming the key and the fix, exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import config_diff, load_config

from conftest import REPO, write_config


@pytest.fixture
def requests_file(tmp_path):
    path = tmp_path / "requests.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    return path


def base(requests_file, extra: str = "", model: str = "tiny-llama", requests: str = "") -> str:
    return (
        f"model:\n  name: {model}\nrequests:\n  path: {requests_file}\n{requests}"
        f"storage:\n  runs_dir: {requests_file.parent}/runs\n{extra}"
    )


CASES = {
    "unknown key": (
        "unlearning:\n  optim:\n    lrr: 0.1\n",
        ["unlearning.optim.lrr", "did you mean 'unlearning.optim.lr'"],
    ),
    "unknown section": ("unlerning:\n  lr: 0.1\n", ["unlerning", "did you mean 'unlearning'"]),
    "wrong type": ("unlearning:\n  stop: {max_epochs: many}\n", ["unlearning.stop.max_epochs", "expected int"]),
    "bool for int": ("unlearning:\n  optim: {batch_size: true}\n", ["unlearning.optim.batch_size", "expected int"]),
    "out of range": ("unlearning:\n  optim: {lr: -1}\n", ["unlearning.optim.lr", "> 0"]),
    "threshold range": ("unlearning:\n  check: {bleu_threshold: 2}\n", ["unlearning.check.bleu_threshold", "between"]),
    "bad choice": ("unlearning:\n  loss: {name: icuu}\n", ["unlearning.loss.name", "did you mean 'icu'"]),
    "missing path": ("retain:\n  paths: [/nonexistent/pool.csv]\n", ["retain.paths[0]", "not found"]),
    "missing model folder": ("", ["model.name", "not found"]),
    "cross-field": ("retrieval:\n  k: 2\n  pairs_per_request: 3\n", ["retrieval.pairs_per_request"]),
    "prefix too long": ("  max_tokens: 60\n", ["requests.max_tokens"]),
    "nan lr": ("unlearning:\n  optim: {lr: .nan}\n", ["unlearning.optim.lr", "finite number > 0", "nan"]),
    "inf kl": ("unlearning:\n  loss: {kl: .inf}\n", ["unlearning.loss.kl", "finite number >= 0"]),
    "nan grad_clip": ("unlearning:\n  optim: {grad_clip: .nan}\n", ["unlearning.optim.grad_clip", "finite"]),
    "inf cpus": ("resources:\n  cpus_per_worker: .inf\n", ["resources.cpus_per_worker", "finite"]),
    "nan threshold": ("unlearning:\n  check: {ma_threshold: .nan}\n", ["unlearning.check.ma_threshold", "between"]),
    "empty suites": ("evaluation:\n  suites: []\n", ["evaluation.suites: empty", "fix:"]),
    "renamed set_stop": (
        "unlearning:\n  set_stop: true\n",
        ["unlearning.set_stop: renamed", "unlearning.stop.rule: set"],
    ),
    "bad stop": ("unlearning:\n  stop: {rule: every}\n", ["unlearning.stop.rule", "each"]),
    "quantile range": (
        "unlearning:\n  stop: {stranger_quantile: 1.5}\n",
        ["unlearning.stop.stranger_quantile", "between"],
    ),
    "lr back-off range": ("unlearning:\n  optim: {lr_backoff: 0}\n", ["unlearning.optim.lr_backoff", "(0, 1]"]),
    "recover without a band": (
        "unlearning:\n  stop: {recover_within: 0.03}\n",
        ["unlearning.stop.recover_within", "icu_band"],
    ),
    "strangers missing": (
        "unlearning:\n  check: {strangers_path: /nonexistent/strangers.jsonl}\n",
        ["unlearning.check.strangers_path", "not found"],
    ),
    "mia without the hold": (
        "unlearning:\n  loss: {name: icu_band}\n  stop: {mia_within: 0.1}\n",
        ["unlearning.stop.mia_within", "recover_within"],
    ),
    "mia range": (
        "unlearning:\n  loss: {name: icu_band}\n  stop: {recover_within: 0.03, mia_within: 0.7}\n",
        ["unlearning.stop.mia_within", "between"],
    ),
    "recover range": (
        "unlearning:\n  loss: {name: icu_band}\n  stop: {recover_within: 2}\n",
        ["unlearning.stop.recover_within", "between"],
    ),
    "zero mmap threshold": ("resources:\n  malloc_mmap_threshold: 0\n", ["resources.malloc_mmap_threshold", "> 0"]),
    "negative margin": ("unlearning:\n  loss: {name: icu_band, margin: -1}\n", ["unlearning.loss.margin", ">= 0"]),
    "zero beta": ("unlearning:\n  loss: {name: npo, beta: 0}\n", ["unlearning.loss.beta", "> 0"]),
    "another method's setting": (
        "unlearning:\n  loss: {name: npo, margin: 1.0}\n",
        ["unlearning.loss.margin: not a setting of npo", "its settings: beta, retain_weight"],
    ),
    "negative general": ("retrieval:\n  general_per_source: -1\n", ["retrieval.general_per_source", ">= 0"]),
    "moved key": ("unlearning:\n  lr: 1.0e-4\n", ["unlearning.lr: moved to unlearning.optim.lr", "fix:"]),
    "moved method": ("unlearning:\n  method: icu_band\n", ["unlearning.method: moved to unlearning.loss.name"]),
    "moved stop": ("unlearning:\n  stop: each\n", ["unlearning.stop: moved to unlearning.stop.rule"]),
    "moved beta": ("unlearning:\n  npo_beta: 0.01\n", ["unlearning.npo_beta: moved to unlearning.loss.beta"]),
    "unknown recipe": (
        "unlearning:\n  recipe: icu_fast\n",
        ["unlearning.recipe: no recipe 'icu_fast'", "icu_band, icu_paper"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_errors_are_one_line(case, requests_file, tmp_path, capsys):
    extra, expected = CASES[case]
    if case == "missing model folder":
        text = base(requests_file, model="/nonexistent/model")
    elif case == "prefix too long":
        text = base(requests_file, requests=extra)
    else:
        text = base(requests_file, extra)
    rc = main(["ingest", str(write_config(tmp_path, text))])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in expected:
        assert needle in err


def test_missing_required_key(tmp_path, capsys):
    rc = main(["ingest", str(write_config(tmp_path, "model:\n  name: tiny-llama\n"))])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == (
        "icu: error: requests.path: missing; fix: set it to the erasure request file "
        "(jsonl, csv, parquet) or a saved dataset folder"
    )


def test_invalid_yaml_and_missing_file(tmp_path, capsys):
    assert main(["run", str(write_config(tmp_path, "model: [unclosed\n"))]) == 2
    assert "not valid YAML at line" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_console_script_prints_no_traceback(requests_file, tmp_path):
    cfg = write_config(tmp_path, base(requests_file, "unlearning:\n  optim: {lr: 0}\n"))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("icu: error: unlearning.optim.lr: must be a finite number > 0")
    )
    assert "Traceback" not in proc.stderr


def test_env_expansion_and_defaults(requests_file, tmp_path, monkeypatch):
    monkeypatch.setenv("REQ_DIR", str(requests_file.parent))
    text = base(requests_file).replace(str(requests_file), "${REQ_DIR}/requests.csv")
    text += "retain:\n  paths: ['${NOT_SET_ANYWHERE:-" + str(requests_file.parent) + "}/requests.csv']\n"
    cfg = load_config(write_config(tmp_path, text))
    assert cfg.requests.path == str(requests_file)
    assert cfg.retain.paths == [str(requests_file)]
    assert cfg.unlearning.optim.lr == 5e-5 and cfg.unlearning.ds_config.endswith("ds_configs/zero3_cpu.json")
    assert cfg.storage.name == "run"


def test_config_diff_names_changed_keys(requests_file, tmp_path):
    a = load_config(write_config(tmp_path, base(requests_file))).to_dict()
    b = load_config(write_config(tmp_path, base(requests_file, "unlearning:\n  optim: {lr: 1.0e-4}\n"))).to_dict()
    assert config_diff(a, a) == []
    assert config_diff(a, b) == ["unlearning.optim.lr (5e-05 -> 0.0001)"]


def test_the_paper_is_the_default_and_the_recipes_are_what_they_say(requests_file, tmp_path):
    """`loss: {name: icu}` with no other key is exactly the paper's recipe; icu_band is the recommended
    one, and a run's own keys override a recipe's (another method takes none of its loss settings)."""

    def unlearning(extra: str) -> dict:
        return load_config(write_config(tmp_path, base(requests_file, extra))).to_dict()["unlearning"]

    paper = unlearning("unlearning:\n  loss: {name: icu}\n")
    assert paper == unlearning("unlearning:\n  recipe: icu_paper\n") == unlearning("")
    assert paper["loss"] == {"name": "icu", "uw": 1.0, "lw": 0.5, "kl": 1.0, "general_lw": None}
    assert (
        paper["stop"]["rule"],
        paper["stop"]["stranger_quantile"],
        paper["optim"]["lr"],
        paper["check"]["every"],
    ) == ("set", None, 5e-5, None)
    band = unlearning("unlearning:\n  recipe: icu_band\n  optim: {lr: 3.0e-4}\n")
    assert band["loss"]["name"] == "icu_band" and band["optim"]["lr"] == 3e-4 and band["optim"]["batch_size"] == 4
    assert band["stop"]["recover_within"] == 0.03 and band["check"]["every"] == 2
    npo = unlearning(
        "unlearning:\n  recipe: icu_band\n  loss: {name: npo, beta: 0.01}\n  stop: {recover_within: null, "
        "mia_within: null}\n"
    )
    assert npo["loss"] == {"name": "npo", "beta": 0.01, "retain_weight": 1.0} and npo["optim"]["lr"] == 1e-4


def test_example_configs_validate(monkeypatch, tmp_path):
    """Every shipped config loads: the demo once its inputs are prepared, the paper configs
    once their weights are present (and not before, with the key named)."""
    monkeypatch.chdir(REPO)
    load_config(REPO / "ray_jobs" / "configs" / "icu_benchmark.yaml")
    monkeypatch.setenv("ICU_MODELS", str(tmp_path))
    for size in ("125m", "1.3b", "2.7b"):
        config = REPO / "ray_jobs" / "configs" / f"paper_gptneo_{size}.yaml"
        with pytest.raises(Exception, match="model.name: path not found"):
            load_config(config)
        (tmp_path / f"gpt-neo-{size.upper()}").mkdir()
        cfg = load_config(config)
        assert (cfg.requests.max_tokens, cfg.unlearning.optim.lr, cfg.unlearning.check.ma_threshold) == (
            200,
            5e-5,
            0.5994,
        )
        assert cfg.unlearning.loss.name == "icu" and cfg.unlearning.stop.rule == "set"
    demo = (REPO / "ray_jobs" / "configs" / "demo.yaml").read_text().replace("runs/customers", str(tmp_path))
    with pytest.raises(Exception, match="requests.path: path not found"):
        load_config(write_config(tmp_path, demo, "demo.yaml"))
    for name in ("erase.jsonl", "keep.jsonl", "unseen.jsonl", "strangers.jsonl", "model", "retrained"):
        (tmp_path / name).touch()
    demo_path = write_config(tmp_path, demo, "demo.yaml")
    assert load_config(demo_path).evaluation.keep_path == str(tmp_path / "keep.jsonl")
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from compare_methods import VARIANTS

    names = {"icu_band": "icu_band", "icu-paper": "icu", "rmu-alpha10": "rmu"}
    for variant, overrides in VARIANTS.items():  # each of the comparison's runs of the demo
        assert load_config(demo_path, overrides).unlearning.loss.name == names.get(variant, variant)
    assert load_config(demo_path, VARIANTS["rmu-alpha10"]).unlearning.loss.settings.alpha == 10.0


def test_job_in_rays_copy_of_the_project_refuses_relative_paths(tmp_path, monkeypatch, capsys):
    """Inside `ray job submit --working-dir .` the job runs in a temporary copy: a relative run
    directory there would vanish, a relative input points nowhere; both name --base-dir."""
    from ray_jobs.job import main as job_main

    package = tmp_path / "_ray_pkg_0123abcd"
    package.mkdir()
    requests_file = tmp_path / "requests.jsonl"
    requests_file.write_text('{"text": "hello"}\n')
    (package / "run.yaml").write_text(
        f"model: {{name: tiny-llama}}\nrequests: {{path: {requests_file}}}\nstorage: {{runs_dir: runs}}\n"
    )
    (package / "missing.yaml").write_text("model: {name: tiny-llama}\nrequests: {path: data/requests.jsonl}\n")
    (package / "ledger.yaml").write_text(
        f"model: {{name: tiny-llama}}\nrequests: {{path: {requests_file}}}\nstorage: {{runs_dir: {tmp_path}}}\n"
        "ledger: erasures\n"
    )
    monkeypatch.chdir(package)
    assert job_main("run", ["run.yaml"]) == 2
    assert "storage.runs_dir" in capsys.readouterr().err and not (package / "runs").exists()
    assert job_main("run", ["ledger.yaml"]) == 2
    assert "ledger.path" in capsys.readouterr().err and not (package / "erasures").exists()
    assert job_main("run", ["missing.yaml"]) == 2
    err = capsys.readouterr().err
    assert "requests.path: path not found" in err and "--base-dir $PWD" in err and err.count("\n") == 1


def test_job_base_dir_rebases_only_the_config(tmp_path, monkeypatch):
    """The config lives in Ray's copy of the project and becomes absolute; other arguments stay as given."""
    from ray_jobs.job import _rebase

    package, base = tmp_path / "_ray_pkg_0123abcd", tmp_path / "base"
    package.mkdir(), base.mkdir()
    (package / "run.yaml").write_text("model: {name: tiny-llama}\n")
    (package / "storage.name=other.yaml").write_text("{}\n")  # a file named like the --set value
    monkeypatch.chdir(package)
    rest = _rebase("run", ["--set", "storage.name=other.yaml", "run.yaml", "--restart-from", "unlearn"], str(base))
    assert rest == ["--set", "storage.name=other.yaml", str(package / "run.yaml"), "--restart-from", "unlearn"]
    assert Path.cwd() == base


@pytest.mark.parametrize(
    "content,needles",
    [
        ("{not json", ["unlearning.ds_config", "not valid JSON", "line 1"]),
        ("[1, 2]", ["must hold a JSON object"]),
        ('{"zero_optimization": {"stage": 2}}', ["zero_optimization.stage must be 3"]),
        (
            '{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}',
            ["train_micro_batch_size_per_gpu is 4 but unlearning.optim.batch_size is 8", "auto"],
        ),
        (
            '{"zero_optimization": {"stage": 3}, "gradient_clipping": 0.5}',
            ["gradient_clipping is 0.5 but unlearning.optim.grad_clip"],
        ),
        (
            '{"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}',
            ["optimizer.params.lr is 0.1 but unlearning.optim.lr"],
        ),
    ],
)
def test_deepspeed_config_is_checked_at_load(content, needles, requests_file, tmp_path, capsys):
    """An unusable DeepSpeed JSON is one line before any stage runs, not tracebacks minutes later in a worker."""
    ds = tmp_path / "ds.json"
    ds.write_text(content)
    rc = main(["run", str(write_config(tmp_path, base(requests_file, f"unlearning:\n  ds_config: {ds}\n")))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert all(n in err for n in needles), err
    assert not (tmp_path / "runs").exists()  # refused before the run directory was made


@pytest.mark.parametrize(
    "item,needles",
    [
        ("unlearning.optim.lr=[1", ["--set unlearning.optim.lr", "not valid YAML", "quote it"]),
        ("model.name.x=1", ["--set model.name.x", "model.name is a value, not a section"]),
        ("unlearning.optim.lr", ["expected KEY=VALUE"]),
    ],
)
def test_malformed_set_is_one_line(item, needles, requests_file, tmp_path, capsys):
    assert main(["run", str(write_config(tmp_path, base(requests_file))), "--set", item]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(n in err for n in needles), err


def test_the_workers_malloc_threshold_is_the_configs_and_off_when_null(requests_file, tmp_path):
    from pipeline.ranks import worker_env

    cfg = load_config(write_config(tmp_path, base(requests_file)))
    assert worker_env(cfg.resources)["MALLOC_MMAP_THRESHOLD_"] == "65536"
    cfg.resources.malloc_mmap_threshold = None
    assert "MALLOC_MMAP_THRESHOLD_" not in worker_env(cfg.resources)
