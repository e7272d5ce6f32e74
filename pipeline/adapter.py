"""LoRA unlearning: adapters on the linear layers train, the model itself stays frozen.

Why: the frozen reference of the KL / NPO terms is then the same engine with its adapters
disabled, not a second copy of the model; the optimizer holds states for the adapters only;
and a checkpoint holds only them (the frozen weights are read back from the model folder).
Export merges them, W + (alpha / r) * B @ A per adapted weight, into a plain model folder, and
also writes them alone (`adapter/`, peft's format) for servers that load adapters.

Names: peft wraps the model as `base_model.model.<name>`; an adapted `<prefix>.weight` becomes
`<prefix>.base_layer.weight` beside `<prefix>.lora_A.default.weight` / `lora_B.default.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.config import AdapterConfig

WRAP = "base_model.model."
NAME = "default"


def enabled(adapter: AdapterConfig) -> bool:
    return adapter.type == "lora"


def lora_config(adapter: AdapterConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap(model: torch.nn.Module, adapter: AdapterConfig, seed: int):
    """The model with fresh adapters (B = 0, so it starts as the original), the same on every
    rank: the adapters' random A is drawn from `seed`, not from each rank's RNG."""
    from peft import get_peft_model

    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, lora_config(adapter))
    finally:
        torch.set_rng_state(state)


def missing_targets(module_names: list[str], adapter: AdapterConfig) -> list[str]:
    """Target names that match no module (peft matches a target against the last name parts)."""
    return [t for t in adapter.target_modules if not any(n == t or n.endswith("." + t) for n in module_names)]


def base_name(name: str) -> str | None:
    """The model's own name of an adapter weight `...<prefix>.lora_A.default.weight` -> `<prefix>.weight`."""
    for part in (".lora_A.", ".lora_B."):
        if part in name:
            return name.removeprefix(WRAP).split(part)[0] + ".weight"
    return None


def deltas(lora: dict[str, torch.Tensor], adapter: AdapterConfig) -> dict[str, torch.Tensor]:
    """Model weight name -> (alpha / r) * B @ A, in float32, from the adapter weights (peft names)."""
    out = {}
    for name, a in lora.items():
        if ".lora_A." in name:
            b = lora[name.replace(".lora_A.", ".lora_B.")]
            out[base_name(name)] = (b.float() @ a.float()) * (adapter.alpha / adapter.r)
    return out


def merged(named: dict[str, torch.Tensor], adapter: AdapterConfig) -> dict[str, torch.Tensor]:
    """The plain model's weights from the adapted model's (peft names): adapted weights merged."""
    delta = deltas({k: v for k, v in named.items() if base_name(k)}, adapter)
    out = {}
    for name, tensor in named.items():
        if base_name(name):
            continue
        plain = name.removeprefix(WRAP).replace(".base_layer.", ".")
        out[plain] = tensor + delta[plain].to(tensor.dtype) if plain in delta else tensor
    return out


def save(folder: Path, lora: dict[str, torch.Tensor], adapter: AdapterConfig, base_model: str) -> None:
    """The adapters alone, as peft writes them (adapter_model.safetensors, adapter_config.json)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k.replace(f".{NAME}.", "."): v.contiguous() for k, v in lora.items()},
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    config = lora_config(adapter).to_dict()
    config.update(base_model_name_or_path=base_model, target_modules=sorted(adapter.target_modules))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str, sort_keys=True) + "\n")
