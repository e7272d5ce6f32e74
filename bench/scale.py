"""Scale table: host memory and time of an unlearning step and of export, per model size (CPU).

    python bench/scale.py [--sizes 135m,500m,1.1b] [--full-up-to 500m] [--rows 4] [--tokens 128] [--steps 2]

Random-initialised Llama configs, built under ZeRO-3's `zero.Init` (no whole copy at any time),
no download. Per size, each measurement is its own process, so each peak is its own:
- step, full and LoRA (r 8 on every linear layer of the blocks): 2 ZeRO-3 ranks (torchrun,
  gloo, the unlearning workers' environment and ZeRO sizes), an icu_band step
  (`pipeline.losses`) on `rows` requests + `rows` neighbours + `rows` general rows of `tokens`
  random tokens, with the frozen reference the worker uses (full: a second ZeRO-3 engine;
  LoRA: the same engine with its adapters disabled): peak RSS per rank while stepping (sampled
  every 10 ms), RSS after building, parameter elements each rank holds, seconds per step.
  Full steps run up to `--full-up-to` (full 1.1B needs ~13 GB per rank: more than 2 ranks
  have on a 24 GB machine).
- export: a full checkpoint of that size (engine built, not stepped) written as a model folder,
  streamed (`unlearn.consolidate`: one shard at a time, `--shard` bytes) and as before this
  change (DeepSpeed's full fp32 state dict, then `save_pretrained`): peak RSS and its anonymous
  part (the memory-mapped checkpoint pages a shard read are file-backed: the kernel can drop
  them), the largest shard, seconds.
To compare the loss before and after chunking, run this file from a worktree of the older commit.
Writes bench/results/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.config import ResourcesConfig  # noqa: E402
from pipeline.ranks import worker_env, zero_sizes  # noqa: E402

SIZES = {  # Llama shapes: SmolLM2-135M, a ~500M, TinyLlama-1.1B
    "135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "500m": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}


class PeakRSS:
    """Peak resident and anonymous memory of this process (MB) inside the block, sampled every 10 ms."""

    def __enter__(self):
        self.rss = self.anon = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
            self.rss = max(self.rss, int(fields["VmRSS"].split()[0]) / 1024)
            self.anon = max(self.anon, int(fields["RssAnon"].split()[0]) / 1024)
            self._stop.wait(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _ds_config(rows: int, world: int, hidden: int, optimizer: bool) -> dict:
    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    zero = ds["zero_optimization"]
    zero.update({k: v for k, v in zero_sizes(hidden).items() if zero.get(k) == "auto"})
    ds.update(train_micro_batch_size_per_gpu=rows, train_batch_size=rows * world, gradient_clipping=1.0)
    if optimizer:
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}}
    return ds


def _llama(size: str):
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", max_position_embeddings=2048, **SIZES[size])


def step_worker(args) -> None:
    """One rank: build the engine (+ the frozen reference: a second ZeRO-3 engine, or with --lora the
    same engine with its adapters disabled) under zero.Init, time icu_band steps, save the engine."""
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline import adapter
    from pipeline.config import AdapterConfig
    from pipeline.losses import ICUBand, unlearning_loss

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = _llama(args.size)
    torch.manual_seed(0)
    engines = []
    for optimizer in (True, False)[: 1 if args.lora or not args.steps else 2]:
        ds = _ds_config(args.rows, world, config.hidden_size, optimizer)
        live = HfDeepSpeedConfig(ds)  # noqa: F841 (from_config builds under zero.Init while it lives)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if args.lora:
            model = adapter.wrap(model, AdapterConfig(type="lora"), seed=0)
        if not optimizer:
            model.requires_grad_(False)
        kwargs = dict(model_parameters=[p for p in model.parameters() if p.requires_grad]) if optimizer else {}
        engines.append(deepspeed.initialize(model=model, config=ds, **kwargs)[0])
    engine = engines[0]

    def reference(ids, mask):
        with torch.no_grad():
            if not args.lora:
                return engines[1](input_ids=ids, attention_mask=mask).logits
            with engine.module.disable_adapter():
                return engine.module(input_ids=ids, attention_mask=mask).logits

    after_build = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    g = torch.Generator().manual_seed(rank)
    n, T, V = args.rows, args.tokens, config.vocab_size
    settings = ICUBand(uw=1.0, lw=1.5, kl=3.0)
    times = []
    with PeakRSS() as peak:
        for _ in range(args.steps):
            ids = torch.randint(0, V, (3 * n, T), generator=g)
            mask = torch.ones_like(ids)
            start = time.perf_counter()
            ref_logits = reference(ids[n:], mask[n:])
            logits = engine(input_ids=ids, attention_mask=mask).logits
            loss, _ = unlearning_loss(
                "icu_band",
                settings,
                forget_logits=logits[:n],
                forget_ids=ids[:n],
                forget_mask=mask[:n],
                retain_logits=logits[n:],
                retain_ids=ids[n:],
                retain_mask=mask[n:],
                ref_retain_logits=ref_logits,
                forget_push=torch.ones(n, T - 1),
                forget_low=torch.full((n,), 12.0),
                forget_high=torch.full((n,), 20.0),
            )
            engine.backward(loss)
            engine.step()
            del logits, ref_logits, loss
            times.append(time.perf_counter() - start)
    params = list(engine.module.parameters())
    row = dict(
        rank=rank,
        peak_step_mb=round(peak.rss),
        after_build_mb=round(after_build),
        held=sum(p.ds_tensor.numel() for p in params),
        total=sum(p.ds_numel for p in params),
        trained=sum(p.ds_numel for p in params if p.requires_grad),
        step_s=round(min(times[1:] or times), 2) if times else None,
    )
    if args.save:
        engine.save_checkpoint(args.save, tag="final", save_latest=False)
        if rank == 0:
            config.save_pretrained(Path(args.save) / "base")
    rows: list = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        print("SCALE-STEP " + json.dumps(rows), flush=True)
    dist.barrier()


def export_worker(args) -> None:
    """One process: the saved checkpoint as a model folder (`<checkpoint>/out-<mode>`), streamed or as
    before (full state); its fixed overhead is the RSS once everything is imported, before export."""
    from transformers import AutoModelForCausalLM

    from pipeline import checkpoints, modeling, unlearn

    folder = Path(args.export)
    base, out = folder / "base", folder / f"out-{args.mode}"
    if not (base / "tokenizer.json").exists():  # consolidate copies the base folder's tokenizer
        modeling.byte_tokenizer().save_pretrained(base)
    fixed = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    with PeakRSS() as peak:
        start = time.perf_counter()
        if args.mode == "streamed":
            unlearn.consolidate(folder, "final", base, out, max_bytes=args.shard)
        else:
            with checkpoints.weights_only("bench"):
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="final")
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(_config_of(base))
            model.load_state_dict(state, strict=False, assign=True)
            model.save_pretrained(out, max_shard_size=args.shard)
        seconds = time.perf_counter() - start
    largest = max(p.stat().st_size for p in out.glob("*.safetensors"))
    print(
        "SCALE-EXPORT "
        + json.dumps(
            dict(
                mode=args.mode,
                peak_mb=round(peak.rss),
                anon_mb=round(peak.anon),
                fixed_mb=round(fixed),
                largest_shard_mb=round(largest / 2**20),
                seconds=round(seconds, 1),
            )
        )
    )


def same_weights(a: Path, b: Path) -> bool:
    """Every tensor of folder a equals folder b's (read a shard at a time)."""
    from pipeline import shards

    mapping_a, mapping_b = shards.weight_map(a), shards.weight_map(b)
    if mapping_a.keys() != mapping_b.keys():
        return False
    for file in dict.fromkeys(mapping_a.values()):
        names = [n for n, f in mapping_a.items() if f == file]
        mine, theirs = shards.load(a, names, mapping_a), shards.load(b, names, mapping_b)
        if not all(torch.equal(mine[n], theirs[n]) for n in names):
            return False
    return True


def _config_of(base: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base, local_files_only=True)


def _run(cmd: list[str], tag: str) -> list | dict:
    env = dict(os.environ, **worker_env(ResourcesConfig()), PYTHONPATH=str(REPO))  # 1 CPU a rank, no GPU
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((out for out in proc.stdout.splitlines() if out.startswith(tag)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len(tag) + 1 :])


def _step(size: str, args, *extra: str) -> list:
    return _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            __file__,
            "--step",
            size,
            "--rows",
            str(args.rows),
            "--tokens",
            str(args.tokens),
            *extra,
        ],
        "SCALE-STEP",
    )


def _mb(rows: list, key: str) -> str:
    return " / ".join(str(r[key]) for r in rows) + " MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m,500m,1.1b")
    parser.add_argument(
        "--full-up-to",
        default="500m",
        help="largest size whose full (not LoRA) step is run: "
        "full 1.1B needs ~13 GB per rank (fp32 weights, master copy, gradients, Adam, reference)",
    )
    parser.add_argument("--rows", type=int, default=4, help="requests per step (and as many neighbours, general rows)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--shard", type=int, default=500 * 10**6, help="export shard bytes")
    parser.add_argument("--export-only", action="store_true", help="skip the step measurements")
    parser.add_argument("--step", dest="size", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size:
        return step_worker(args)
    if args.export:
        return export_worker(args)
    sizes = args.sizes.split(",")
    full_sizes = sizes[: sizes.index(args.full_up_to) + 1] if args.full_up_to in sizes else sizes
    lines = [
        "| size | params (trained) | what trains | held / rank | RSS after build / rank | peak RSS in step / rank "
        "| s / step |",
        "|---" * 7 + "|",
    ]
    exports = [
        "| size | streamed: peak RSS (anonymous) | fixed (imports) | largest shard | full state (before): "
        "peak RSS (anonymous) | seconds streamed / full | same weights |",
        "|---" * 7 + "|",
    ]
    steps = ["--steps", str(args.steps)]
    for size in sizes:
        with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").is_dir() else None) as tmp:
            for lora in () if args.export_only else (False, True):
                if not lora and size not in full_sizes:
                    lines.append(f"| {size} | | full | not run: does not fit in this machine's memory | | | |")
                    continue
                ranks = _step(size, args, *steps, *(["--lora"] if lora else []))
                r0 = ranks[0]
                lines.append(
                    f"| {size} | {r0['total'] / 1e6:.0f}M ({r0['trained'] / 1e6:.1f}M) | "
                    f"{'LoRA r 8' if lora else 'full'} | {r0['held'] / 1e6:.0f}M | {_mb(ranks, 'after_build_mb')} | "
                    f"{_mb(ranks, 'peak_step_mb')} | {r0['step_s']} |"
                )
                print(lines[-1], flush=True)
            _step(size, args, "--steps", "0", "--save", tmp)  # a full checkpoint (built, not stepped) to export
            streamed, before = (
                _run(
                    [sys.executable, __file__, "--export", tmp, "--mode", mode, "--shard", str(args.shard)],
                    "SCALE-EXPORT",
                )
                for mode in ("streamed", "full")
            )
            same = same_weights(Path(tmp) / "out-streamed", Path(tmp) / "out-full")
        exports.append(
            f"| {size} | {streamed['peak_mb']} ({streamed['anon_mb']}) MB | {streamed['fixed_mb']} MB | "
            f"{streamed['largest_shard_mb']} MB | {before['peak_mb']} ({before['anon_mb']}) MB | "
            f"{streamed['seconds']} / {before['seconds']} | {'yes' if same else 'NO'} |"
        )
        print(exports[-1], flush=True)
    out = REPO / "bench" / "results" / ("scale-export.md" if args.export_only else "scale.md")
    setting = (
        f"2 ZeRO-3 ranks on CPU, {args.rows} + {args.rows} + {args.rows} rows of {args.tokens} tokens per step, "
        if not args.export_only
        else "export only (a built, unstepped 2-rank ZeRO-3 checkpoint), "
    )
    steps_table = [] if args.export_only else [*lines, ""]
    out.write_text("\n".join([f"{setting}export shards of {args.shard / 1e6:.0f} MB", "", *steps_table, *exports, ""]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
