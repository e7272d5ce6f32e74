"""Model weights as safetensors shards, written and read a shard at a time.

A multi-billion-parameter model must never be whole in one process: the writer takes the
tensors' shapes, plans shards of at most `max_bytes`, writes each file's header from the plan
and then each tensor's bytes as it is handed over, so it holds one tensor, not a shard; the
reader opens a folder's files memory-mapped and yields the tensors it is asked for.
The layout is the one `from_pretrained` reads: `model.safetensors` when one shard holds
everything, else `model-0000k-of-0000n.safetensors` and `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(value: int | str) -> int | None:
    """Bytes from 500000000, "500MB" or "2GiB" (decimal units as Hugging Face writes them); None if unreadable."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
    if not match:
        return None
    size = int(float(match[1]) * _UNITS[(match[2] or "").upper()])
    return size if size > 0 else None


def plan(specs: dict[str, tuple[torch.Size, torch.dtype]], max_bytes: int) -> dict[str, list[str]]:
    """File name -> tensor names, in the given order; a new shard starts when the next tensor
    would pass max_bytes (a tensor larger than that gets a shard of its own)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, (shape, dtype) in specs.items():
        size = shape.numel() * dtype.itemsize
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    if len(groups) == 1:
        return {SINGLE: groups[0]}
    n = len(groups)
    return {f"model-{k + 1:05d}-of-{n:05d}.safetensors": names for k, names in enumerate(groups)}


def write(
    folder: Path,
    specs: dict[str, tuple[torch.Size, torch.dtype]],
    fetch: Callable[[list[str]], Iterable[tuple[str, torch.Tensor]]],
    max_bytes: int,
) -> dict[str, str]:
    """Write the shards `plan` makes, each from `fetch(names)` (its tensors one at a time, in any
    order), and the index when there is more than one; returns tensor name -> file."""
    layout = plan(specs, max_bytes)
    weight_map = {}
    for file, names in layout.items():
        _write_file(folder / file, {n: specs[n] for n in names}, fetch(names))
        weight_map.update(dict.fromkeys(names, file))
    if len(layout) > 1:
        total = sum(shape.numel() * dtype.itemsize for shape, dtype in specs.values())
        (folder / INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
        )
    return weight_map


def _write_file(
    path: Path, specs: dict[str, tuple[torch.Size, torch.dtype]], tensors: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """One safetensors file: an 8-byte little-endian header length, the JSON header (tensor ->
    dtype, shape, byte range; padded with spaces to 8 bytes), then the tensors' bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in specs.items():
        size = shape.numel() * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    done = set()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, tensor in tensors:
            if name not in specs or name in done:
                raise RuntimeError(f"{name}: not planned for {path.name}, or handed over twice")
            shape, dtype = specs[name]
            if tensor.shape != shape or tensor.dtype != dtype:
                raise RuntimeError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {tuple(shape)} {dtype}")
            f.seek(8 + len(blob) + header[name]["data_offsets"][0])
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            done.add(name)
    if len(done) != len(specs):
        raise RuntimeError(f"{path.name}: {len(specs) - len(done)} planned tensors were never handed over")


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> file of a model folder written as above (or by save_pretrained)."""
    from safetensors import safe_open

    if (folder / INDEX).is_file():
        return json.loads((folder / INDEX).read_text())["weight_map"]
    if not (folder / SINGLE).is_file():
        raise FileNotFoundError(f"{folder}: no {SINGLE} or {INDEX}")
    with safe_open(str(folder / SINGLE), framework="pt") as f:
        return dict.fromkeys(f.keys(), SINGLE)


def specs(folder: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of every tensor in the folder, read from the headers only."""
    out = {}
    for names, f in _open_files(folder, weight_map(folder)):
        for name in names:
            view = f.get_slice(name)
            out[name] = (torch.Size(view.get_shape()), _DTYPES[view.get_dtype()])
    return out


def load(folder: Path, names: list[str], mapping: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors, read from their files (each file memory-mapped while it is read)."""
    return dict(tensors(folder, names, mapping))


def tensors(
    folder: Path, names: list[str], mapping: dict[str, str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors one at a time, file by file."""
    mapping = mapping or weight_map(folder)
    for wanted, f in _open_files(folder, {n: mapping[n] for n in names}):
        for name in wanted:
            yield name, f.get_tensor(name)


def _open_files(folder: Path, mapping: dict[str, str]) -> Iterator[tuple[list[str], object]]:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, file in mapping.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(folder / file), framework="pt") as f:
            yield names, f


_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
