"""Safetensors shards written and read a shard at a time (pipeline/shards.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pipeline import shards


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(10, 10, generator=g),
        "b": torch.randn(30, generator=g),
        "c": torch.randn(5, 20, generator=g),
        "d": torch.arange(7),
        "e": torch.randn(2, generator=g),
    }


def _specs(tensors):
    return {k: (t.shape, t.dtype) for k, t in tensors.items()}


def test_plan_packs_in_order_up_to_the_limit():
    layout = shards.plan(_specs(_tensors()), max_bytes=400)  # a: 400 B, b: 120, c: 400, d: 56, e: 8
    assert list(layout.values()) == [["a"], ["b"], ["c"], ["d", "e"]]
    assert list(layout) == [f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)]
    assert shards.plan(_specs(_tensors()), max_bytes=10**6) == {"model.safetensors": list("abcde")}


def test_write_then_read_back_one_shard_at_a_time(tmp_path):
    tensors = _tensors()
    asked = []

    def fetch(names):  # each shard's tensors one at a time, last first: the order does not matter
        asked.append(names)
        return ((n, tensors[n].clone()) for n in reversed(names))

    mapping = shards.write(tmp_path, _specs(tensors), fetch, max_bytes=500)
    assert asked == [["a"], ["b"], ["c", "d", "e"]]  # one shard's tensors per call
    index = json.loads((tmp_path / shards.INDEX).read_text())
    assert index["weight_map"] == mapping == shards.weight_map(tmp_path)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.itemsize for t in tensors.values())
    assert shards.specs(tmp_path) == _specs(tensors)
    got = shards.load(tmp_path, list(tensors))
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    with safe_open(str(tmp_path / mapping["c"]), framework="pt") as f:  # the library's own reader
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == ["c", "d", "e"]
        assert torch.equal(f.get_tensor("d"), tensors["d"])


def test_every_dtype_and_shape_round_trips_through_the_librarys_reader(tmp_path):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(1)
    tensors = {
        "bf16": torch.randn(3, 5, generator=g).bfloat16(),
        "f16": torch.randn(7, generator=g).half(),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "scalar": torch.tensor(2.5),
        "mask": torch.tensor([True, False, True]),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "empty": torch.zeros(0, 4),
    }
    shards.write(tmp_path, _specs(tensors), lambda names: ((n, tensors[n]) for n in names), max_bytes=10**6)
    got = load_file(str(tmp_path / shards.SINGLE))
    assert got.keys() == tensors.keys()
    assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in tensors.items())


def test_a_tensor_unlike_its_plan_or_missing_is_refused(tmp_path):
    tensors = _tensors()
    with pytest.raises(RuntimeError, match=r"a: got \(10, 10\) torch.float64, planned \(10, 10\) torch.float32"):
        shards.write(tmp_path, _specs(tensors), lambda names: ((n, tensors[n].double()) for n in names), 10**6)
    with pytest.raises(RuntimeError, match="1 planned tensors were never handed over"):
        shards.write(tmp_path, _specs(tensors), lambda names: ((n, tensors[n]) for n in names[1:]), 10**6)


@pytest.mark.parametrize(
    "text, size",
    [
        ("2GB", 2 * 10**9),
        ("500MB", 5 * 10**8),
        ("1GiB", 2**30),
        ("64kb", 64000),
        (1000, 1000),
        ("12", 12),
        ("0", None),
        ("two", None),
        (-5, None),
    ],
)
def test_parse_size(text, size):
    assert shards.parse_size(text) == size
