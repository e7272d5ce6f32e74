"""The training pairs: each request with its retain neighbours, and the general retain rows.

What the unlearning loop trains on and the audit's relearning probe reads (only retained text).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pandas as pd

from pipeline.store import RunStore


@dataclass
class Pairs:
    """Request rows and their retain neighbours, paired by index (neighbour [] = none found)."""

    request_ids: list[str]
    requests: list[list[int]]
    pair_request: list[int]
    pair_neighbour: list[list[int]]
    general: list[list[int]] = field(default_factory=list)  # general retain rows (not paired)

    @functools.cached_property
    def neighbours(self) -> list[list[int]]:
        """Each distinct neighbour row once, in pair order."""
        return [list(row) for row in dict.fromkeys(tuple(row) for row in self.pair_neighbour if row)]


def load_pairs(store: RunStore, pairs_per_request: int) -> Pairs:
    """Requests from ingest; neighbours (top `pairs_per_request`) and general retain rows from
    retrieval, if it ran."""
    accepted = pd.read_parquet(store.artefact("accepted"), columns=["id", "input_ids"])
    ids = accepted["id"].tolist()
    rows = [list(map(int, r)) for r in accepted["input_ids"]]
    table = store.artefact("neighbours")
    neighbours: dict[str, list[list[int]]] = {}
    if table.exists():
        pairs = pd.read_parquet(table)
        items = pd.read_parquet(store.artefact("retain_items"), columns=["id", "input_ids"])
        by_id = dict(zip(items["id"], items["input_ids"]))
        for rid, nid in (
            pairs[pairs["rank"] < pairs_per_request]
            .sort_values(["request_id", "rank"])[["request_id", "neighbour_id"]]
            .itertuples(index=False)
        ):
            neighbours.setdefault(rid, []).append(list(map(int, by_id[nid])))
    pair_request, pair_neighbour = [], []
    for i, rid in enumerate(ids):
        for row in neighbours.get(rid) or [[]]:
            pair_request.append(i)
            pair_neighbour.append(row)
    general_table = store.artefact("general_items")
    general = (
        [list(map(int, r)) for r in pd.read_parquet(general_table, columns=["input_ids"])["input_ids"]]
        if general_table.exists()
        else []
    )
    return Pairs(ids, rows, pair_request, pair_neighbour, general)
