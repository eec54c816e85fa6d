"""What the folded dispatcher moves, per layer and step.

Each dispatch records, for this rank: tokens and hidden-state bytes sent to itself, to other
ranks of its node and to other nodes; (token, expert) pairs dropped by capacity; and tokens the
rank received to compute. ``summary`` totals the steps; ``gather_summaries`` combines ranks
(max and mean received tokens per rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch

FIELDS = ("tokens_self", "tokens_node", "tokens_remote", "bytes_self", "bytes_node",
          "bytes_remote", "pairs_dropped", "pairs_routed", "received")


@dataclass
class TrafficCounters:
    """Counters of one MoE layer on one rank; one dict per dispatch (micro-batch)."""

    records: List[Dict[str, int]] = field(default_factory=list)

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
        record = {f"tokens_{k}": v for k, v in tokens.items()}
        record.update({f"bytes_{k}": v * row_bytes for k, v in tokens.items()})
        record.update(pairs_dropped=routing_map.shape[0] * topk - kept, pairs_routed=kept,
                      received=0)
        self.records.append(record)

    def record_received(self, pairs: int) -> None:
        if self.records:
            self.records[-1]["received"] = pairs

    def reset(self) -> None:
        self.records.clear()

    def summary(self) -> Dict[str, int]:
        return {f: sum(r[f] for r in self.records) for f in FIELDS} | {"dispatches": len(self.records)}


def combine_ranks(per_rank: List[Dict[str, int]]) -> Dict[str, float]:
    """Totals over the ranks of one layer, plus max and mean (token, expert) pairs computed per
    rank."""
    out: Dict[str, float] = {f: sum(r[f] for r in per_rank) for f in FIELDS}
    received = [r["received"] for r in per_rank]
    out["max_pairs_per_rank"] = max(received)
    out["mean_pairs_per_rank"] = sum(received) / len(received)
    return out
