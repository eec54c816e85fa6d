"""Replica counts and balanced packing: the load primitives every placement method shares.

A layer's *items* are the replicas of its experts: expert e with n_e replicas contributes n_e
items, each carrying load count_e / n_e (the uniform replica rule of ``placement.py``).
"""

from __future__ import annotations

import heapq
from typing import Tuple

import numpy as np

from folding.errors import FoldingError


def replica_counts(loads: np.ndarray, spare_slots: int) -> np.ndarray:
    """int64 [E]: replicas per expert when each spare slot goes to the expert with the largest
    load per replica (EPLB's rule); every expert keeps at least one replica."""
    loads = np.asarray(loads, dtype=np.float64)
    counts = np.ones(loads.shape[0], dtype=np.int64)
    if spare_slots <= 0:
        return counts
    # Max-heap on load per replica; ties go to the lower expert id so the result is reproducible.
    heap = [(-float(w), e) for e, w in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(spare_slots):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-float(loads[e]) / counts[e], e))
    return counts


def layer_items(counts: np.ndarray, replicas: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(expert, load) of every item of one layer: expert e repeated replicas[e] times, each
    carrying counts[e] / replicas[e]."""
    experts = np.repeat(np.arange(len(replicas)), replicas)
    return experts, np.asarray(counts, dtype=np.float64)[experts] / replicas[experts]


def item_loads(item_experts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float64: the load of each item (slot) given which expert it holds, replicas found from
    the items themselves; the sum over a rank's items is that rank's load."""
    replicas = np.bincount(item_experts, minlength=len(counts))
    return np.asarray(counts, dtype=np.float64)[item_experts] / np.maximum(replicas[item_experts], 1)


def balanced_packing(loads: np.ndarray, num_bins: int, items_per_bin: int) -> np.ndarray:
    """int64 [items]: bin of each item, heaviest item first into the lightest bin with room
    (greedy longest-processing-time packing with equal counts per bin)."""
    loads = np.asarray(loads, dtype=np.float64)
    if loads.shape[0] != num_bins * items_per_bin:
        raise FoldingError(f"{loads.shape[0]} items do not fill {num_bins} bins of {items_per_bin}")
    bins = np.empty(loads.shape[0], dtype=np.int64)
    bin_load = np.zeros(num_bins)
    room = np.full(num_bins, items_per_bin)
    for item in np.argsort(-loads, kind="stable"):
        open_bins = np.flatnonzero(room > 0)
        target = open_bins[np.argmin(bin_load[open_bins])]
        bins[item] = target
        bin_load[target] += loads[item]
        room[target] -= 1
    return bins
