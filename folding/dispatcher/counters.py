"""What the folded dispatcher moves, per layer and step.

Each dispatch records, for this rank: tokens and hidden-state bytes sent to itself, to other
ranks of its node and to other nodes; (token, expert) pairs dropped by capacity; and tokens the
rank received to compute. ``summary`` gives the totals since the last ``reset`` (the trainer
resets every step); ``combine_ranks`` combines ranks (max and mean pairs computed per rank).
"""

from __future__ import annotations

from typing import Dict, List

import torch

FIELDS = ("tokens_self", "tokens_node", "tokens_remote", "bytes_self", "bytes_node",
          "bytes_remote", "pairs_dropped", "pairs_routed", "received")


class TrafficCounters:
    """Running totals of one MoE layer on one rank since the last ``reset``.

    Totals, not one record per dispatch: under Megatron-LM's training loop nobody resets them,
    and a list would grow with every micro-batch of every step. A dispatch only adds tensors
    (rows per destination, kept pairs), on the data's device and without waiting for it;
    ``summary`` turns them into numbers.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._rows = self._bytes = self._kept = None
        self._destination = None
        self._pairs = self._received = self.dispatches = 0

    def record_rows(self, rows: torch.Tensor, hidden: torch.Tensor, own_rank: int,
                    rank_node: torch.Tensor) -> None:
        """``rows``: int64 [P] on the data's device, rows sent to each EP rank (each hop of a
        relayed dispatch is recorded)."""
        if self._rows is None:
            self._rows = torch.zeros_like(rows)
            self._bytes = torch.zeros_like(rows)
            # Each destination is this rank (0), another rank of its node (1) or another node (2).
            destination = torch.where(rank_node == rank_node[own_rank], 1, 2)
            destination[own_rank] = 0
            self._destination = destination.cpu()
        self._rows += rows
        self._bytes += rows * (hidden.shape[-1] * hidden.element_size())

    def record_pairs(self, routing_map: torch.Tensor, probs: torch.Tensor, topk: int) -> None:
        """One dispatch's routed pairs: kept by capacity (they carry a weight; padding adds
        weightless pairs) and offered."""
        if self._kept is None:
            self._kept = torch.zeros((), dtype=torch.long, device=routing_map.device)
        self._kept += (routing_map & (probs != 0)).sum()
        self._pairs += routing_map.shape[0] * topk
        self.dispatches += 1

    def record_received(self, pairs: int) -> None:
        self._received += pairs

    def summary(self) -> Dict[str, int]:
        out = dict.fromkeys(FIELDS, 0)
        if self._rows is not None:
            for totals, kind in ((self._rows, "tokens"), (self._bytes, "bytes")):
                by_class = torch.zeros(3, dtype=torch.long).index_add_(
                    0, self._destination, totals.long().cpu())
                for name, value in zip(("self", "node", "remote"), by_class.tolist()):
                    out[f"{kind}_{name}"] = value
            kept = int(self._kept) if self._kept is not None else 0
            out.update(pairs_routed=kept, pairs_dropped=self._pairs - kept)
        out["received"] = self._received
        return dict(out, dispatches=self.dispatches)


def combine_ranks(per_rank: List[Dict[str, int]]) -> Dict[str, float]:
    """Totals over the ranks of one layer, plus max and mean (token, expert) pairs computed per
    rank."""
    out: Dict[str, float] = {f: sum(r[f] for r in per_rank) for f in FIELDS}
    received = [r["received"] for r in per_rank]
    out["max_pairs_per_rank"] = max(received)
    out["mean_pairs_per_rank"] = sum(received) / len(received)
    return out
