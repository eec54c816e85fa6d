"""Token-dropping decisions of the checker: recorded in the reference, compared and replayed on
the folded ranks.

Dropping is a discontinuous function: with the "probs" policy an expert keeps the tokens with the
largest routing weights, and two weights a rounding error apart can swap places between a
single-process run and a folded one (their matmuls add in different orders). One such swap moves
a whole token, which would drown the rounding-level comparison of gradients in noise.

So the checker separates the two questions. The reference records, for every router call, which
(token, expert) pairs survive and how far each expert's capacity boundary is from a tie. On each
folded rank, Megatron's own decision for its tokens is computed as usual and compared with the
reference's decision for the same tokens: a difference is a failure unless the reference's
boundary was within rounding of a tie (a *near tie*, counted and reported). The folded run then
continues with the reference's decision, so the gradient comparison stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

# A capacity boundary closer than this (relative to the weights involved) is a near tie.
NEAR_TIE = 1e-5

Key = Tuple[int, int, int, int]  # (step, layer number, reference micro-batch, token group)


@dataclass
class DropRecord:
    """Held on the CPU: records are saved by the reference and loaded by every folded rank,
    each of which moves them to its own device when it compares."""

    keep: torch.Tensor
    """Bool [tokens, experts]: the (token, expert) pairs that survive capacity."""
    margin: torch.Tensor
    """Per expert, how far the capacity boundary is from a tie, relative to the weights."""


@dataclass
class DropCheck:
    """What the folded ranks found when comparing their decisions with the reference's."""

    compared: int = 0
    near_ties: int = 0
    mismatches: List[str] = field(default_factory=list)


def _capacity_margin(probs: torch.Tensor, capacity: int, policy: str) -> torch.Tensor:
    """Per expert: gap between the last kept and the first dropped weight, relative to them."""
    experts = probs.shape[1]
    if policy != "probs" or capacity >= probs.shape[0]:
        return torch.full((experts,), float("inf"), device=probs.device)
    top = probs.detach().float().topk(capacity + 1, dim=0).values
    kept, dropped = top[capacity - 1], top[capacity]
    gap = (kept - dropped).abs() / kept.abs().clamp_min(1e-30)
    # A boundary among weights of zero drops nothing that was routed: no decision at stake.
    return torch.where(kept > 0, gap, torch.full_like(gap, float("inf")))


def token_group_rows(rows: int, sequence_parallel: int, cp: int) -> List[torch.Tensor]:
    """The router-input rows (sequence-major, as Megatron flattens [s, b]) that each folded rank
    routes, in that rank's order; group ``tp + sequence_parallel * cp_rank``.

    CP rank r holds chunks r and 2 CP - 1 - r of 2 CP equal chunks of the sequence (Megatron's
    load-balanced split); sequence parallel then cuts a rank's tokens into contiguous shards.
    """
    everything = torch.arange(rows)
    if cp == 1:
        per_cp = [everything]
    else:
        chunks = everything.chunk(2 * cp)
        per_cp = [torch.cat([chunks[r], chunks[2 * cp - 1 - r]]) for r in range(cp)]
    return [shard for local in per_cp for shard in local.chunk(sequence_parallel)]


class DropDecisions:
    """Patches Megatron's router for the checker: ``record`` in the reference, ``replay`` on
    folded ranks. Token groups are the tokens one folded rank routes (``token_group_rows``)."""

    def __init__(self, mode: str, sequence_parallel: int = 1, cp: int = 1,
                 records: Optional[Dict[Key, DropRecord]] = None,
                 micro_batches: int = 1, dp_rank: int = 0, group: int = 0):
        assert mode in ("record", "replay")
        self.mode, self.sequence_parallel, self.cp = mode, sequence_parallel, cp
        self.records: Dict[Key, DropRecord] = records if records is not None else {}
        self.micro_batches, self.dp_rank, self.group = micro_batches, dp_rank, group
        self.check = DropCheck()
        self.step = 0
        self._calls: Dict[int, int] = {}

    def start_step(self, step: int) -> None:
        self.step = step
        self._calls.clear()

    def install(self) -> None:
        from folding.megatron.router_hooks import RouterPatch

        def make_drop(original, current_layer):
            def drop(probs, routing_map, router_topk, capacity_factor, drop_policy="probs",
                     pad_to_capacity=False):
                args = (router_topk, capacity_factor, drop_policy, pad_to_capacity)
                layer = current_layer()
                call = self._calls.get(layer, 0)
                self._calls[layer] = call + 1
                if self.mode == "record":
                    return self._record(original, probs, routing_map, args, layer, call)
                return self._replay(original, probs, routing_map, args, layer, call)
            return drop

        self._patch = RouterPatch("apply_router_token_dropping", make_drop)

    def uninstall(self) -> None:
        self._patch.remove()

    def _record(self, original, probs, routing_map, args, layer, micro_batch):
        from megatron.core.transformer.moe.moe_utils import get_capacity

        router_topk, capacity_factor, policy, _ = args
        out_probs, out_map = torch.empty_like(probs), torch.empty_like(routing_map)
        groups = token_group_rows(probs.shape[0], self.sequence_parallel, self.cp)
        for group, rows in enumerate(groups):
            rows = rows.to(probs.device)
            p, m = probs[rows], routing_map[rows]
            final_probs, final_map = original(p, m, *args)
            capacity = get_capacity(num_tokens=p.shape[0] * router_topk, num_experts=p.shape[1],
                                    capacity_factor=capacity_factor)
            self.records[(self.step, layer, micro_batch, group)] = DropRecord(
                final_map.detach().to("cpu", copy=True),
                _capacity_margin(p, capacity, policy).cpu())
            out_probs[rows], out_map[rows] = final_probs, final_map
        return out_probs, out_map

    def _replay(self, original, probs, routing_map, args, layer, micro_batch):
        _, own_map = original(probs, routing_map, *args)
        reference_mb = self.dp_rank * self.micro_batches + micro_batch
        key = (self.step, layer, reference_mb, self.group)
        record = self.records.get(key)
        if record is None:
            self.check.mismatches.append(f"step {self.step} layer {layer}: no reference decision "
                                         f"for micro-batch {reference_mb}, token group {self.group}")
            return original(probs, routing_map, *args)
        self.check.compared += 1
        # The mask, the margins and the rank's own decision on one device (the rank's).
        keep = record.keep.to(own_map.device)
        margin = record.margin.to(own_map.device)
        differs = (own_map != keep).any(dim=0)
        if differs.any():
            near = margin[differs] <= NEAR_TIE
            self.check.near_ties += int(near.sum())
            for expert in differs.nonzero().flatten()[~near].tolist():
                self.check.mismatches.append(
                    f"step {self.step} layer {layer} micro-batch {reference_mb} token group "
                    f"{self.group}: expert {expert} keeps other tokens than the reference")
        return probs * keep, keep
