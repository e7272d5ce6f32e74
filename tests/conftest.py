"""Shared test setup: offline hub, CPU DeepSpeed, and the location of the shared data."""

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# The operator's receipt key (pipeline/keys.py) of every run the tests make, Ray jobs included:
# never the machine's own ~/.config/icu/receipt.key.
_KEY_DIR = tempfile.mkdtemp(prefix="icu-test-key-")
atexit.register(shutil.rmtree, _KEY_DIR, ignore_errors=True)
_key_file = Path(_KEY_DIR) / "receipt.key"
_key_file.write_text(secrets.token_hex(32))
_key_file.chmod(0o600)
os.environ["ICU_RECEIPT_KEY_FILE"] = str(_key_file)
os.environ.pop("ICU_RECEIPT_KEY", None)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ICU_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only benchmark data folder (../shared/data from the project root)."""
    if not (SHARED_DATA / "icu_benchmark").is_dir():
        pytest.fail(
            f"shared data not found at {SHARED_DATA}; the tests need ../shared/data beside the "
            "project (or ICU_DATA pointing at it)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    from pipeline import modeling

    return modeling.tiny_model_dir("tiny-llama")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from pipeline import modeling

    return modeling.default_model_dir()


def write_config(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    """Write a YAML config into tmp_path; runs go to tmp_path/runs."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def implanted(tmp_path_factory, shared_data):
    """A tiny Llama that memorized 16 sequences: 8 become erasure requests, 8 the retain pool."""
    from implant import implant, windows, write_inputs

    root = tmp_path_factory.mktemp("implant")
    memorize, general = windows(shared_data)
    ma = implant(root / "model", memorize, general)
    assert ma > 0.9, f"the tiny model did not memorize its sequences (MA {ma:.3f})"
    requests, retain = write_inputs(root, memorize)
    return dict(root=root, memorize=memorize, requests=requests, retain=retain, data=shared_data)


def checkpoint_weights(folder: Path, tag: str) -> dict:
    """Every fp32 weight of a ZeRO-3 checkpoint tag, gathered (tests only: small models)."""
    from pipeline.checkpoints import fp32_partitions

    with fp32_partitions(folder, tag) as lazy:
        return {name: tensor.contiguous() for name, tensor in lazy.items()}
