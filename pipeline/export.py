"""Turn the unlearning run's sharded ZeRO-3 checkpoint into a Hugging Face model folder.

`consolidate` gathers the fp32 master weights of every rank's shard (offline, one
process), loads them into the original architecture and saves safetensors + config +
tokenizer + generation config: the folder the evaluation loads and serving reads.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from pipeline import modeling
from pipeline.store import atomic_path

log = logging.getLogger("icu.export")


def consolidate(checkpoints: Path, tag: str, base_dir: Path, out_dir: Path, *, dtype: str = "float32",
                trust_remote_code: bool = False) -> Path:
    """Write the weights of checkpoint `tag` as a model folder like `base_dir` (atomically)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    config = AutoConfig.from_pretrained(base_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if _is_meta(model, k)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {tag} does not match {base_dir}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model = model.to(modeling.torch_dtype(dtype))
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        modeling.load_tokenizer(base_dir, trust_remote_code).save_pretrained(tmp)
        for extra in ("generation_config.json",):
            if (base_dir / extra).is_file() and not (tmp / extra).exists():
                shutil.copy(base_dir / extra, tmp / extra)
    log.info("export: consolidated checkpoint %s into %s", tag, out_dir)
    return out_dir


def _is_meta(model: torch.nn.Module, name: str) -> bool:
    return model.get_parameter(name).is_meta if name in dict(model.named_parameters()) else True
