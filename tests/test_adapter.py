"""LoRA unlearning (pipeline/adapter.py): merging and saving against peft's own, one ZeRO-3 step
on 2 ranks against a single-process peft step, and a whole run to the per-request rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline import adapter, driver, modeling, unlearn
from pipeline.config import AdapterConfig, load_config
from pipeline.errors import UserError
from pipeline.losses import unlearning_loss

from conftest import REPO
from implant import run_config

LORA = AdapterConfig(type="lora", r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])


def _adapted(seed: int = 0):
    """The tiny Llama with adapters whose B is random too (fresh ones start at B = 0: nothing to merge)."""
    model = adapter.wrap(modeling.load_model(modeling.tiny_model_dir("tiny-llama")), LORA, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_merged_weights_equal_peft_merge():
    model = _adapted()
    ours = adapter.merged({n: p.detach() for n, p in model.named_parameters()}, LORA)
    theirs = dict(model.merge_and_unload().named_parameters())
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6


def test_saved_adapters_load_with_peft(tmp_path):
    from peft import PeftModel

    model = _adapted().eval()
    lora = {n: p.detach() for n, p in model.named_parameters() if adapter.base_name(n)}
    base_dir = modeling.tiny_model_dir("tiny-llama")
    adapter.save(tmp_path / "adapter", lora, LORA, base_model=str(base_dir))
    loaded = PeftModel.from_pretrained(modeling.load_model(base_dir), tmp_path / "adapter").eval()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_same_seed_gives_every_rank_the_same_adapters():
    names = lambda m: {n: p.detach() for n, p in m.named_parameters() if ".lora_A." in n}
    a, b = names(_adapted(seed=3)), names(_adapted(seed=3))
    assert a and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_adapter_configs_get_one_line(tmp_path, implanted):
    config = run_config(implanted, tmp_path, "bad", {"unlearning.adapter": {"type": "lora", "target_modules": []}})
    with pytest.raises(UserError, match="unlearning.adapter.target_modules: empty; fix"):
        load_config(config)
    config = run_config(implanted, tmp_path, "bad", {"unlearning.adapter": {"type": "lorra"}})
    with pytest.raises(UserError, match="unlearning.adapter.type"):
        load_config(config)
    config = run_config(implanted, tmp_path, "bad", {"unlearning.adapter": {"type": "lora", "target_modules": ["qkv"]}})
    cfg, _ = driver.open_run(str(config))
    with pytest.raises(UserError, match=r"target_modules: qkv match no linear layer .* fix: choose from .*q_proj"):
        unlearn.check_adapter(cfg)  # what the unlearn stage runs before any worker starts


@pytest.mark.slow
def test_a_zero3_lora_step_on_two_ranks_equals_a_single_process_peft_step(implanted, tmp_path):
    """At a second step (after the first moved the adapters): loss on each rank, and the adapters'
    gradient (averaged over ranks, as data parallelism does), equal those of a plain peft model
    with the same adapter weights on the same rows (1e-5); the frozen reference is the engine
    with its adapters disabled, and only one model was ever loaded."""
    config = run_config(
        implanted,
        tmp_path,
        "step",
        {
            "unlearning.adapter": {
                "type": "lora",
                "r": 4,
                "alpha": 8.0,
                "target_modules": ["q_proj", "v_proj", "down_proj"],
            },
            "unlearning.loss.lw": 0.5,
            "unlearning.loss.kl": 1.0,
            "retrieval.pairs_per_request": 2,
            "resources.launcher": "torchrun",
        },
    )
    cfg, store = driver.open_run(str(config))
    driver.run_pipeline(cfg, store, until="retrieve")
    out = tmp_path / "step.pt"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "tests" / "lora_step.py"),
            str(store.root),
            str(out),
        ],
        env=env,
        check=True,
    )
    got = torch.load(out, weights_only=True)
    assert got["ref_is_engine"] and got["models_loaded"] == 1

    model = adapter.wrap(modeling.load_model(cfg.model_dir), cfg.unlearning.adapter, cfg.unlearning.optim.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(got["before"][name])
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in got["before"].items())  # adapted != frozen
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mean_grad = {n: torch.zeros_like(p) for n, p in trained.items()}
    for seen in got["ranks"]:
        n = len(seen["forget_ids"])
        ids = torch.cat([seen["forget_ids"], seen["retain_ids"]])
        attend = torch.cat([seen["forget_mask"], seen["retain_mask"]]).clone()
        attend[:, 0] = 1
        with torch.no_grad(), model.disable_adapter():
            ref = model(input_ids=ids[n:], attention_mask=attend[n:]).logits
        logits = model(input_ids=ids, attention_mask=attend).logits
        loss, _ = unlearning_loss(
            "icu",
            cfg.unlearning.loss.settings,
            forget_logits=logits[:n],
            forget_ids=ids[:n],
            forget_mask=seen["forget_mask"],
            retain_logits=logits[n:],
            retain_ids=ids[n:],
            retain_mask=seen["retain_mask"],
            ref_retain_logits=ref,
        )
        assert abs(loss.item() - seen["loss"]) <= 1e-5
        for name, g in zip(trained, torch.autograd.grad(loss, list(trained.values()))):
            mean_grad[name] += g / len(got["ranks"])
    assert got["grads"].keys() == mean_grad.keys()
    worst = max((got["grads"][k] - mean_grad[k]).abs().max().item() for k in mean_grad)
    assert worst <= 1e-5, worst


@pytest.mark.slow
def test_lora_run_forgets_every_request_and_exports_the_merged_model(implanted, tmp_path):
    from peft import PeftModel

    from conftest import checkpoint_weights
    from pipeline import export

    config = run_config(
        implanted,
        tmp_path,
        "lora",
        {
            "unlearning.adapter": {"type": "lora", "r": 8, "alpha": 16.0},
            "unlearning.optim.lr": 3.0e-3,
            "retrieval.pairs_per_request": 2,
            "resources.launcher": "torchrun",
            "resources.max_failures": 0,
        },
    )
    cfg, store = driver.open_run(str(config))
    driver.run_pipeline(cfg, store, until="unlearn")
    result = json.loads(store.artefact("unlearn_result").read_text())
    assert result["forgotten"] == 8, result
    part = result["partition"]
    assert part["models_loaded"] == 1 and 0 < part["trained"] < part["total"] / 4  # r 8 of hidden 64
    saved = checkpoint_weights(store.artefact("checkpoints"), "final")
    assert saved and all(adapter.base_name(k) for k in saved if "lora" in k)
    assert sum(t.numel() for t in saved.values()) == part["trained"]  # adapters only: no frozen weights

    folder = store.artefact("unlearned_model")
    merged = modeling.load_model(folder).state_dict()
    peft = PeftModel.from_pretrained(modeling.load_model(cfg.model_dir), folder / "adapter").merge_and_unload()
    assert max((merged[k] - v).abs().max().item() for k, v in peft.state_dict().items()) <= 1e-6
    export.verify(folder, torch.load(store.artefact("probe"), weights_only=True))  # the engine's logits, 1e-5
