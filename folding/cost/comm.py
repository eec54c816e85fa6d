"""Alpha-beta communication times and how far each group of a folding reaches across nodes.

A collective over a group costs a latency per step (alpha) plus its bytes over the bandwidth
of the slowest link it uses (beta). Inside a node that is NVLink. A group that spans nodes sends
its inter-node traffic through the network adapters of its own ranks (one per GPU, rail
optimised), so its bandwidth is the adapter rate times the group's ranks per node, capped by
NVLink: a data-parallel group with one rank per node gets one adapter, a group that fills whole
nodes gets all of them.

``group_spans`` gives each group kind's size and the most nodes one of its groups touches; it
uses ``folding.mesh.grid_groups``, Megatron's rank layout, and agrees with
``FoldingSpec.layout_report`` (tested) at a fraction of its cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from folding.cost.hardware import HardwareProfile
from folding.mesh import ATTENTION_GROUPS, MOE_GROUPS, FoldingSpec, grid_groups, parse_order

SPAN_KINDS = (("attention", "tp"), ("attention", "cp"), ("attention", "dp_cp"), ("attention", "pp"),
              ("moe", "etp"), ("moe", "ep"), ("moe", "edp"))


@dataclass(frozen=True)
class Span:
    """One kind of group: its size and the most nodes any of its groups touches."""

    size: int
    nodes: int

    @property
    def ranks_per_node(self) -> int:
        return -(-self.size // self.nodes)


@lru_cache(maxsize=65536)
def _max_nodes(sizes: Tuple[Tuple[str, int], ...], order: Tuple[str, ...], span: Tuple[str, ...],
               gpus_per_node: int) -> int:
    groups = np.asarray(grid_groups(dict(sizes), order, span)) // gpus_per_node
    groups.sort(axis=1)
    return int((np.diff(groups, axis=1) != 0).sum(axis=1).max()) + 1


def group_spans(spec: FoldingSpec) -> Dict[Tuple[str, str], Span]:
    """Size and node reach of the groups the cost model communicates over."""
    order = tuple(parse_order(spec.order))
    attention = tuple(sorted(spec._attention_sizes().items()))
    moe = tuple(sorted(spec._moe_sizes().items()))
    out = {}
    for mesh, kind in SPAN_KINDS:
        sizes, tokens = (attention, ATTENTION_GROUPS[kind]) if mesh == "attention" else (moe, MOE_GROUPS[kind])
        size = int(np.prod([dict(sizes)[t] for t in tokens]))
        nodes = 1 if size == 1 else _max_nodes(sizes, order, tuple(tokens), spec.gpus_per_node)
        out[(mesh, kind)] = Span(size, nodes)
    return out


def bandwidth(span: Span, hw: HardwareProfile) -> float:
    """Bus bandwidth in bytes/s available to one rank of a group."""
    nvlink = hw.nvlink_gbps * hw.nvlink_efficiency * 1e9
    if span.nodes <= 1:
        return nvlink
    return min(nvlink, hw.network_gbps * hw.network_efficiency * 1e9 * span.ranks_per_node)


def latency(span: Span, hw: HardwareProfile) -> float:
    return (hw.nvlink_latency_us if span.nodes <= 1 else hw.network_latency_us) * 1e-6


def all_gather_time(total_bytes: float, span: Span, hw: HardwareProfile) -> float:
    """Ring all-gather (or reduce-scatter) whose gathered result holds ``total_bytes``."""
    n = span.size
    if n <= 1:
        return 0.0
    return (n - 1) * latency(span, hw) + (n - 1) / n * total_bytes / bandwidth(span, hw)


reduce_scatter_time = all_gather_time


def all_reduce_time(total_bytes: float, span: Span, hw: HardwareProfile) -> float:
    return 2 * all_gather_time(total_bytes, span, hw)


def all_to_all_time(bytes_per_rank: float, span: Span, hw: HardwareProfile,
                    nvlink_efficiency: Optional[float] = None,
                    network_efficiency: Optional[float] = None) -> float:
    """All-to-all in which each rank sends ``bytes_per_rank`` spread evenly over the group: the
    share for ranks on the same node goes over NVLink, the rest through the rank's adapter.
    The efficiencies (fractions of the link rates) default to the profile's."""
    n = span.size
    if n <= 1:
        return 0.0
    local = min(span.ranks_per_node, n)
    nvlink, network = _link_rates(hw, nvlink_efficiency, network_efficiency)
    intra = bytes_per_rank * (local - 1) / n / nvlink
    inter = bytes_per_rank * (n - local) / n / network if span.nodes > 1 else 0.0
    return latency(span, hw) * (n - 1) + max(intra, inter)


def exchange_time(sent: np.ndarray, rank_node: np.ndarray, hw: HardwareProfile,
                  nvlink_efficiency: Optional[float] = None,
                  network_efficiency: Optional[float] = None,
                  point_to_point: bool = False) -> float:
    """All-to-all in which rank i sends ``sent[i, j]`` bytes to rank j (any spread: a dispatcher's
    measured sends), ranks on the nodes ``rank_node`` says. Each rank sends and receives over
    NVLink inside its node and through its adapter across nodes, both at once; the exchange
    lasts as long as its busiest link of any rank, plus a latency per peer: every other rank of
    the group for a collective (on an even spread this is ``all_to_all_time``), or, with
    ``point_to_point``, only the peers a rank sends to or receives from, at NVLink latency when
    they are all on its node."""
    sent = np.asarray(sent, dtype=np.float64)
    n = sent.shape[0]
    if n <= 1:
        return 0.0
    node = np.asarray(rank_node)
    same_node = node[:, None] == node[None, :]
    np.fill_diagonal(same_node, False)  # a rank's rows to itself stay in its memory
    across = node[:, None] != node[None, :]
    nvlink, network = _link_rates(hw, nvlink_efficiency, network_efficiency)
    intra, inter = sent * same_node, sent * across
    busiest = max(intra.sum(axis=1).max(), intra.sum(axis=0).max()) / nvlink
    if across.any():
        busiest = max(busiest, inter.sum(axis=1).max() / network, inter.sum(axis=0).max() / network)
    if not point_to_point:
        return latency(Span(n, len(np.unique(node))), hw) * (n - 1) + busiest
    talks = (sent > 0) | (sent.T > 0)
    np.fill_diagonal(talks, False)
    peers = talks.sum(axis=1)
    remote = (talks & across).any(axis=1)
    per_peer = np.where(remote, hw.network_latency_us, hw.nvlink_latency_us) * 1e-6
    return float((peers * per_peer).max()) + busiest


def dispatch_combine_time(rows_per_hop: Sequence[Sequence[Sequence[float]]], rank_node,
                          row_bytes: float, hw: HardwareProfile,
                          point_to_point: bool = False) -> float:
    """A token dispatcher's dispatch and combine over an EP group: ``rows_per_hop[i][h][j]``
    rows of ``row_bytes`` that rank i sends to rank j in its h-th all-to-all of the dispatch
    (one hop for direct sends, two when relayed through one rank per node); combine sends every
    hop back, in reverse. The count exchange before the rows, a collective, costs its latency;
    ``point_to_point``: the hops exchange with the peers that have rows only (``exchange_time``)."""
    n = len(rows_per_hop)
    nodes = np.asarray(rank_node)
    total = latency(Span(n, len(np.unique(nodes))), hw) * (n - 1)
    for hop in range(len(rows_per_hop[0])):
        sent = np.array([rank[hop] for rank in rows_per_hop], dtype=np.float64) * row_bytes
        total += (exchange_time(sent, nodes, hw, point_to_point=point_to_point)
                  + exchange_time(sent.T, nodes, hw, point_to_point=point_to_point))
    return total


def _link_rates(hw: HardwareProfile, nvlink_efficiency: Optional[float],
                network_efficiency: Optional[float]) -> Tuple[float, float]:
    """Bytes/s one rank reaches over NVLink and over its adapter in an all-to-all."""
    return (hw.nvlink_gbps * (nvlink_efficiency or hw.nvlink_efficiency) * 1e9,
            hw.network_gbps * (network_efficiency or hw.network_efficiency) * 1e9)


def p2p_time(nbytes: float, crosses_nodes: bool, hw: HardwareProfile) -> float:
    """One send/receive between neighbouring pipeline stages."""
    if crosses_nodes:
        return hw.network_latency_us * 1e-6 + nbytes / (hw.network_gbps * hw.network_efficiency * 1e9)
    return hw.nvlink_latency_us * 1e-6 + nbytes / (hw.nvlink_gbps * hw.nvlink_efficiency * 1e9)
