"""Models: the default converts once under a lock and is a real LM; tiny models are local."""

import os
import subprocess
import sys

import pytest
import torch

from pipeline import modeling
from pipeline.errors import UserError

from conftest import REPO

PARAGRAPH = (
    "The history of the city goes back to Roman times, when a small settlement was founded on "
    "the banks of the river. Over the following centuries it grew into an important market "
    "town, and in the Middle Ages it became a centre of the wool trade. Today it is known for "
    "its cathedral, its university and its many museums, which attract visitors from all over "
    "the world."
)


@pytest.mark.slow
def test_default_converts_once_even_when_two_processes_race(tmp_path):
    env = dict(os.environ, ICU_CACHE=str(tmp_path / "cache"))
    code = "from pipeline import modeling; print(modeling.default_model_dir())"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    conversions = sum(err.count("converting the default model") for _, err in outs)
    assert conversions == 1, "exactly one process converts; the other waits on the lock and reuses"
    folder = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    third = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert "converting" not in third.stderr


@pytest.mark.slow
def test_default_model_is_a_real_language_model(default_model_dir):
    model = modeling.load_model(default_model_dir)
    tok = modeling.load_tokenizer(default_model_dir)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tok(PARAGRAPH, add_special_tokens=False, return_tensors="pt")["input_ids"]
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        ppl = torch.exp(model(ids, labels=ids).loss).item()
        ppl_shuffled = torch.exp(model(shuffled, labels=shuffled).loss).item()
    assert ppl < 100, ppl
    assert ppl_shuffled > 1000, ppl_shuffled
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert modeling.context_length(default_model_dir) == 8192


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gptneo"])
def test_tiny_models_are_local_and_deterministic(family, tmp_path):
    a = modeling.build_tiny_model(family, tmp_path / "a", seed=3)
    b = modeling.build_tiny_model(family, tmp_path / "b", seed=3)
    ma, mb = modeling.load_model(a), modeling.load_model(b)
    for (name, pa), (_, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(pa, pb), name
    tok = modeling.load_tokenizer(a)
    text = "Zoë's e-mail: x@y.z — 42\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < ma.config.vocab_size
    out = ma(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), ma.config.vocab_size)


def test_bad_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        modeling.resolve_model_dir(str(tmp_path))
    with pytest.raises(UserError, match="unknown test model"):
        modeling.resolve_model_dir("tiny-gpt5")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="cannot load"):
        modeling.load_model(tmp_path)


def test_weights_signature_follows_the_folder_a_link_points_at(tmp_path):
    a = modeling.build_tiny_model("tiny-llama", tmp_path / "a", seed=1)
    b = modeling.build_tiny_model("tiny-llama", tmp_path / "b", seed=2)
    link = tmp_path / "model"
    link.symlink_to(a, target_is_directory=True)
    first = modeling.weights_signature(link)
    assert first == modeling.weights_signature(link)
    link.unlink()
    link.symlink_to(b, target_is_directory=True)
    assert modeling.weights_signature(link) != first  # same model.name, other weights
