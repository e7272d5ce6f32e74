"""ICU training-step throughput and MFU of a ~1.1B Llama under DeepSpeed ZeRO-3 (synthetic data).

What it measures: the step the unlearning loop runs (`Worker.step` in pipeline/worker.py):
one forward of forget + neighbour rows concatenated through the trained ZeRO-3 engine, a
no-grad forward of the neighbour rows through a frozen ZeRO-3 reference engine (no
optimizer), the project's ICU loss (`pipeline.losses.unlearning_loss("icu", ...)`),
engine.backward and engine.step. The model is built FROM CONFIG (TinyLlama shape, random
init, nothing downloaded), sharded at construction (HfDeepSpeedConfig kept alive, so
`from_config` runs under deepspeed.zero.Init); the reference is built the same way from
the same seed, so it starts equal to the trained model (first-step KL ~ 0).
Tokens are seeded random ids, full rows (no padding), different per rank.

Printed on rank 0, lines starting with RESULT: parameters, world size, step time,
tokens/s (training tokens = all forget + neighbour rows' tokens of all ranks per step),
peak GPU memory, and MFU = (6*N*train_tokens + 2*N*reference_tokens) / step_time /
(world * peak) (4*N with --lora: only the adapters' weight gradients), N = all parameters (embeddings included,
attention score FLOPs not
counted), peak = --peak-tflops (989 = H200 dense bf16), plus a per-phase time split.

GPU (one node, all its GPUs):   bash bench/gpu_check.sh
  or python -m torch.distributed.run --standalone --nproc_per_node N bench/gpu_step.py [--steps 10]
CPU logic check (gloo, fp32, tiny model, torch AdamW):
  HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone \
      --nproc_per_node 2 bench/gpu_step.py --cpu --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed")  # 1 per ZeRO-3 call
sys.path.insert(0, str(ROOT))
from pipeline.losses import unlearning_loss  # noqa: E402
from scale import SIZES  # noqa: E402  (bench/ is this script's own folder)

SHAPES = {  # Llama-style; "tinyllama" is TinyLlama-1.1B's shape (1.10B parameters)
    "tinyllama": {k: v for k, v in SIZES["1.1b"].items() if k != "tie_word_embeddings"},
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}
#              pairs seq warmup steps breakdown   (per-rank pairs; a pair = forget row + neighbour row)
DEFAULTS = {"tinyllama": (8, 200, 3, 10, 3), "tiny": (2, 32, 1, 2, 1)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="gloo + DeepSpeed's CPU accelerator, fp32 (logic check)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model and a couple of steps")
    p.add_argument("--pairs", type=int, help="forget/neighbour pairs per rank per step (rows = 2 * pairs)")
    p.add_argument("--seq", type=int, help="tokens per row")
    p.add_argument("--warmup", type=int)
    p.add_argument("--steps", type=int, help="timed steps")
    p.add_argument("--breakdown", type=int, help="extra steps timed phase by phase (synchronised; 0 = none)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s of ONE device")
    p.add_argument(
        "--adam",
        choices=["torch", "fused"],
        default="torch",
        help="torch AdamW (nothing compiled) or DeepSpeed FusedAdam (JIT-compiled with nvcc)",
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "zero3.json"))
    p.add_argument("--json", help="also write the results here (rank 0)")
    p.add_argument(
        "--lora",
        action="store_true",
        help="LoRA r 8 on every linear layer (pipeline.adapter, peft): "
        "only adapters train; the reference is the same engine with its adapters disabled",
    )
    a = p.parse_args()
    a.shape = "tiny" if a.tiny else "tinyllama"
    for key, value in zip(("pairs", "seq", "warmup", "steps", "breakdown"), DEFAULTS[a.shape]):
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a


def ds_config(a: argparse.Namespace, hidden: int, world: int, optimizer: bool) -> dict:
    """ds_configs/zero3.json with its "auto" values filled as pipeline.ranks.deepspeed_config does."""
    ds = json.loads(Path(a.ds_config).read_text())
    zero = ds.setdefault("zero_optimization", {})
    for key, size in (
        ("reduce_bucket_size", hidden * hidden),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
        ("stage3_param_persistence_threshold", 10 * hidden),
        ("stage3_max_live_parameters", 10 * hidden * hidden),  # as pipeline.ranks.zero_sizes
        ("stage3_max_reuse_distance", 10 * hidden * hidden),
    ):
        if zero.get(key) == "auto":
            zero[key] = size
    ds.update(train_micro_batch_size_per_gpu=a.pairs, gradient_accumulation_steps=1, train_batch_size=a.pairs * world)
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = 1.0
    if a.cpu:
        ds["bf16"] = {"enabled": False}
    if optimizer:
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": a.lr, "weight_decay": 0.0, "torch_adam": a.cpu or a.adam == "torch"},
        }
    return ds


def build_model(a: argparse.Namespace, dtype: torch.dtype):
    """Random-init Llama from config; sharded at construction (a live HfDeepSpeedConfig is required)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(a.seed)  # same seed for both models: the reference starts equal to the trained one
    config = LlamaConfig(
        **SHAPES[a.shape], max_position_embeddings=max(2048, a.seq), tie_word_embeddings=False, use_cache=False
    )
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def icu_step(engine, ref, ids: torch.Tensor, mask: torch.Tensor, timer=None) -> dict[str, float]:
    """Worker.step for the ICU loss on full rows: rows [:n] forget, rows [n:] their neighbours."""
    mark = timer or (lambda name: None)
    n = ids.shape[0] // 2
    with torch.no_grad():
        if ref is None:  # LoRA: the engine itself with its adapters disabled
            with engine.module.disable_adapter():
                ref_logits = engine.module(input_ids=ids[n:], attention_mask=mask[n:]).logits
        else:
            ref_logits = ref(input_ids=ids[n:], attention_mask=mask[n:]).logits
    mark("reference_forward")
    logits = engine(input_ids=ids, attention_mask=mask).logits
    mark("forward")
    loss, parts = unlearning_loss(
        "icu",
        forget_logits=logits[:n],
        forget_ids=ids[:n],
        forget_mask=mask[:n],
        retain_logits=logits[n:],
        retain_ids=ids[n:],
        retain_mask=mask[n:],
        ref_retain_logits=ref_logits,
    )
    mark("loss")
    engine.backward(loss)
    mark("backward")
    engine.step()
    mark("optimizer_step")
    return parts


def main() -> None:
    a = parse_args()
    if a.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    elif not torch.cuda.is_available():
        sys.exit(
            f"gpu_step.py: CUDA is not available (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); run on a GPU machine, or pass --cpu [--tiny] for a logic check"
        )
    import deepspeed

    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if a.cpu else torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if a.cpu:  # the CPU shared-memory allreduce op is JIT-compiled (minutes on a busy box); gloo suffices here
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # (deepspeed.comm.torch is torch)
    deepspeed.init_distributed(dist_backend="gloo" if a.cpu else "nccl", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.float32 if a.cpu else torch.bfloat16
    hidden = SHAPES[a.shape]["hidden_size"]

    from transformers.integrations import HfDeepSpeedConfig

    t0 = time.perf_counter()
    train_ds = ds_config(a, hidden, world, optimizer=True)
    keep_alive = HfDeepSpeedConfig(train_ds)  # noqa: F841  from_config shards under it while it lives
    model = build_model(a, dtype)
    if a.lora:
        from pipeline import adapter
        from pipeline.config import AdapterConfig

        model = adapter.wrap(model, AdapterConfig(type="lora"), a.seed)
    trained = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trained, config=train_ds)
    ref = None
    if not a.lora:
        ref_model = build_model(a, dtype).requires_grad_(False)
        ref, *_ = deepspeed.initialize(model=ref_model, config=ds_config(a, hidden, world, optimizer=False))
        ref.eval()
    n_params = sum(p.ds_numel for p in engine.module.parameters())
    init_s = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(a.seed * 1_000_003 + rank)  # different rows per rank, reproducible
    total = a.warmup + a.steps + a.breakdown
    vocab = SHAPES[a.shape]["vocab_size"]
    batches = [torch.randint(0, vocab, (2 * a.pairs, a.seq), generator=gen).to(device) for _ in range(total)]
    mask = torch.ones(2 * a.pairs, a.seq, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    first = icu_step(engine, ref, batches[0], mask)
    for ids in batches[1 : a.warmup]:
        icu_step(engine, ref, ids, mask)
    sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for ids in batches[a.warmup : a.warmup + a.steps]:
        last = icu_step(engine, ref, ids, mask)
    sync(device)
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    step_s = elapsed.item() / a.steps

    phases: dict[str, float] = {}
    for ids in batches[a.warmup + a.steps :]:
        sync(device)
        clock = [time.perf_counter()]

        def timer(name: str) -> None:
            sync(device)
            now = time.perf_counter()
            phases[name] = phases.get(name, 0.0) + (now - clock[0]) / a.breakdown
            clock[0] = now

        icu_step(engine, ref, ids, mask, timer)

    if device.type == "cuda":
        peak = torch.tensor([torch.cuda.max_memory_allocated(device)], dtype=torch.float64, device=device)
    else:  # peak resident set size of the process (Linux reports KiB)
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)

    train_tokens = world * 2 * a.pairs * a.seq
    ref_tokens = world * a.pairs * a.seq
    # LoRA: no weight gradients of the frozen weights (4N per trained token, not 6N)
    flops = (4 if a.lora else 6) * n_params * train_tokens + 2 * n_params * ref_tokens
    mfu = flops / step_s / (world * a.peak_tflops * 1e12)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res = dict(
        model=a.shape,
        params=n_params,
        lora=a.lora,
        world=world,
        device=name,
        dtype=str(dtype).removeprefix("torch."),
        adam="torch" if a.cpu else a.adam,
        rows_per_rank=2 * a.pairs,
        seq=a.seq,
        warmup=a.warmup,
        steps=a.steps,
        init_s=round(init_s, 1),
        step_s=round(step_s, 4),
        train_tokens_per_step=train_tokens,
        ref_tokens_per_step=ref_tokens,
        tokens_per_s=round(train_tokens / step_s, 1),
        peak_mem_gib=round(peak.item() / 2**30, 2),
        flops_per_step=flops,
        achieved_tflops=round(flops / step_s / 1e12, 2),
        peak_tflops_per_device=a.peak_tflops,
        mfu=round(mfu, 4),
        first_loss=first,
        last_loss=last,
        phase_s={k: round(v, 4) for k, v in phases.items()},
    )
    if rank == 0:
        print(
            f"RESULT model={a.shape}{' LoRA' if a.lora else ''} params={n_params} ({n_params / 1e9:.3f}B) "
            f"world={world} device={res['device']} "
            f"dtype={res['dtype']} adam={res['adam']} rows/rank={2 * a.pairs}x{a.seq} tokens init={init_s:.1f}s"
        )
        print(
            f"RESULT step_s={step_s:.4f} (mean of {a.steps} after {a.warmup} warm-up) "
            f"tokens_per_s={train_tokens / step_s:,.0f} (train tokens/step={train_tokens}, "
            f"reference tokens/step={ref_tokens})"
        )
        print(
            f"RESULT peak_mem_gib={res['peak_mem_gib']} "
            f"({'max_memory_allocated' if device.type == 'cuda' else 'max RSS'}"
            f", max over ranks)"
        )
        print(
            f"RESULT mfu={mfu:.2%} achieved={flops / step_s / 1e12:.2f} TFLOP/s over peak {world}x{a.peak_tflops} "
            f"TFLOP/s; FLOPs/step = {4 if a.lora else 6}*N*train_tokens + 2*N*ref_tokens = {flops:.4g} "
            f"(N=all params, attention "
            f"scores not counted)"
        )
        print(
            "RESULT phases_s "
            + " ".join(f"{k}={v:.4f}" for k, v in phases.items())
            + f" (mean of {a.breakdown} synchronised steps)"
        )
        print(
            "RESULT loss first_step "
            + " ".join(f"{k}={v:.4g}" for k, v in first.items())
            + " | last_timed "
            + " ".join(f"{k}={v:.4g}" for k, v in last.items())
        )
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
