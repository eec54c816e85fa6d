"""What the folded dispatcher moves, per layer and step.

Each dispatch records, for this rank: tokens and hidden-state bytes sent to itself, to other
ranks of its node and to other nodes; (token, expert) pairs dropped by capacity; and tokens the
rank received to compute. ``summary`` gives the totals since the last ``reset`` (the trainer
resets every step); ``combine_ranks`` combines ranks (max and mean pairs computed per rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch

FIELDS = ("tokens_self", "tokens_node", "tokens_remote", "bytes_self", "bytes_node",
          "bytes_remote", "pairs_dropped", "pairs_routed", "received")


@dataclass
class TrafficCounters:
    """Running totals of one MoE layer on one rank since the last ``reset``.

    Totals, not one record per dispatch: under Megatron-LM's training loop nobody resets them,
    and a list would grow with every micro-batch of every step.
    """

    totals: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(FIELDS, 0))
    dispatches: int = 0

    def record_dispatch(self, plan, routing_map: torch.Tensor, probs: torch.Tensor,
                        hidden: torch.Tensor, own_rank: int, rank_node: torch.Tensor,
                        topk: int) -> None:
        dest_counts = plan.send_counts
        same = torch.zeros_like(dest_counts, dtype=torch.bool)
        same[own_rank] = True
        node = (rank_node == rank_node[own_rank]) & ~same
        row_bytes = hidden.shape[-1] * hidden.element_size()
        tokens = {"self": int(dest_counts[same].sum()), "node": int(dest_counts[node].sum()),
                  "remote": int(dest_counts[~same & ~node].sum())}
        # Pairs that survived capacity carry a weight; padding adds weightless pairs.
        kept = int((routing_map & (probs != 0)).sum())
        for where, count in tokens.items():
            self.totals[f"tokens_{where}"] += count
            self.totals[f"bytes_{where}"] += count * row_bytes
        self.totals["pairs_dropped"] += routing_map.shape[0] * topk - kept
        self.totals["pairs_routed"] += kept
        self.dispatches += 1

    def record_received(self, pairs: int) -> None:
        self.totals["received"] += pairs

    def reset(self) -> None:
        self.totals = dict.fromkeys(FIELDS, 0)
        self.dispatches = 0

    def summary(self) -> Dict[str, int]:
        return dict(self.totals, dispatches=self.dispatches)


def combine_ranks(per_rank: List[Dict[str, int]]) -> Dict[str, float]:
    """Totals over the ranks of one layer, plus max and mean (token, expert) pairs computed per
    rank."""
    out: Dict[str, float] = {f: sum(r[f] for r in per_rank) for f in FIELDS}
    received = [r["received"] for r in per_rank]
    out["max_pairs_per_rank"] = max(received)
    out["mean_pairs_per_rank"] = sum(received) / len(received)
    return out
