"""Pure routing arithmetic of the folded dispatcher: which replica serves each (token, expert)
pair, what one rank sends to each other rank, and which pairs a rank computes from the rows it
receives. No communication, no autograd needed.

Everything here runs as tensor operations on the routing map's device and never makes the host
wait for it: the sizes that depend on the routing (rows sent, pairs received) are computed as
device counts, which the dispatcher copies to the host once per layer, and are then passed back
in as plain integers. Nothing allocates an integer tensor of [tokens x experts].

Notation: T local tokens, E logical experts, P ranks in the EP group, S slots per rank; slot s
lives on EP rank s // S and holds logical expert ``slot_expert[s]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch


class SlotMap:
    """One MoE layer's placement, as tensors, with what every dispatch needs precomputed.

    Built on the host when a placement is set (never in a step); ``on(device)`` gives the copy
    for the data's device, made once.
    """

    def __init__(self, slot_expert: torch.Tensor, slots_per_rank: int, rank_node: torch.Tensor):
        slot_expert = slot_expert.detach().to("cpu", torch.long)
        self.slot_expert = slot_expert
        """int64 [P*S]: the logical expert of every slot."""
        self.slots_per_rank = slots_per_rank
        self.rank_node = rank_node.detach().to("cpu", torch.long)
        """int64 [P]: the node of every EP rank."""
        self.num_ranks = slot_expert.numel() // slots_per_rank
        self.slot_rank = torch.arange(slot_expert.numel(), device="cpu") // slots_per_rank
        counts = torch.bincount(slot_expert)
        self.replicated: List[int] = torch.nonzero(counts > 1).flatten().tolist()
        """Logical experts with more than one slot, in expert order."""
        self.replica_slots: List[torch.Tensor] = [torch.nonzero(slot_expert == e).flatten()
                                                  for e in self.replicated]
        """The slots of each replicated expert, in slot order."""
        self.single_column = counts[slot_expert] == 1
        """bool [P*S]: the slot's expert has no other slot."""
        self.identity = bool(torch.equal(slot_expert, torch.arange(slot_expert.numel(), device="cpu")))
        """Slot s holds expert s (Megatron's contiguous layout): the routing map is the plan."""
        self._devices: Dict[torch.device, "SlotMap"] = {torch.device("cpu"): self}

    def on(self, device: torch.device) -> "SlotMap":
        device = torch.device(device)
        if device not in self._devices:
            copy = object.__new__(SlotMap)
            copy.__dict__.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                  for k, v in self.__dict__.items() if k != "_devices"})
            copy.replica_slots = [w.to(device) for w in self.replica_slots]
            copy._devices = self._devices
            self._devices[device] = copy
        return self._devices[device]


def _greedy_least_loaded(loads: torch.Tensor, count: int) -> torch.Tensor:
    """Indices into ``loads`` for ``count`` items given one at a time to the least-loaded
    candidate (ties: the lower index), exactly as the sequential greedy rule would.

    Candidate i receives its k-th item when its level is loads[i] + k; sorting the (level, i)
    keys of every item any candidate can receive gives the order of the greedy choices.
    """
    candidates = loads.numel()
    if count == 0:
        return torch.empty(0, dtype=torch.long, device=loads.device)
    steps = torch.arange(count, device=loads.device)
    levels = loads.view(-1, 1) + steps.view(1, -1)  # [m, count]
    keys = levels * candidates + torch.arange(candidates, device=loads.device).view(-1, 1)
    order = torch.argsort(keys.flatten())[:count]
    return order // count


def choose_slots(routing_map: torch.Tensor, slots: SlotMap, own_rank: int) -> torch.Tensor:
    """bool [T, P*S]: the slot that serves each routed (token, expert) pair, one per pair.

    Replica rule, deterministic: a replica on a rank the token is already being sent to (for
    its other experts), else one on the token's own rank, else one on its own node, else the
    replica least loaded in this batch so far. Experts with one replica are fixed first;
    replicated experts are resolved in expert order, tokens in token order. Without replicas this
    is one column gather; each replicated expert costs a few [T x replicas] operations.
    """
    slots = slots.on(routing_map.device)
    if slots.identity and routing_map.shape[1] == slots.slot_expert.numel():
        return routing_map
    routed = routing_map.index_select(1, slots.slot_expert)
    if not slots.replicated:
        return routed
    tokens, num_ranks, per_rank = routing_map.shape[0], slots.num_ranks, slots.slots_per_rank
    single = routed & slots.single_column
    sending = single.view(tokens, num_ranks, per_rank).any(dim=2)
    load = single.sum(dim=0)
    own_node = slots.rank_node[own_rank]
    for expert, where in zip(slots.replicated, slots.replica_slots):
        ranks = slots.slot_rank[where]
        count = where.numel()
        token_routed = routing_map[:, expert]
        pick = torch.full((tokens,), -1, dtype=torch.long, device=routing_map.device)
        preferences = (sending[:, ranks],                                    # already sent to
                       (ranks == own_rank).expand(tokens, -1),              # own rank
                       (slots.rank_node[ranks] == own_node).expand(tokens, -1))  # own node
        for allowed in preferences:
            # The first allowed replica in slot order.
            pick = torch.where((pick < 0) & allowed.any(dim=1), allowed.int().argmax(dim=1), pick)
        resolved = token_routed & (pick >= 0)
        # Loads of the resolved picks count before the least-loaded choice is made.
        base = load[where].index_add(0, pick.clamp(min=0), resolved.long())
        rest = token_routed & (pick < 0)
        nth = torch.cumsum(rest, 0) - 1
        greedy = _greedy_least_loaded(base, tokens)
        pick = torch.where(rest, greedy[nth.clamp(min=0)], pick)
        chosen = (torch.arange(count, device=pick.device) == pick.view(-1, 1)) & token_routed.view(-1, 1)
        routed[:, where] = chosen
        sending |= torch.zeros_like(sending).scatter_(
            1, ranks[pick.clamp(min=0)].view(-1, 1), token_routed.view(-1, 1))
        load.index_add_(0, where, chosen.sum(dim=0))
    return routed


@dataclass
class SendCounts:
    """What one rank will send, as device counts: the input of the one copy to the host."""

    sent: torch.Tensor
    """bool [T, P]: whether token t goes to rank p (once, whatever its experts there)."""
    counts: torch.Tensor
    """int64 [P, 1 + S]: rows for each destination rank, then routed pairs per local slot there."""


def count_sends(slot_routed: torch.Tensor, slots_per_rank: int, num_ranks: int) -> SendCounts:
    """Deduplicate: a token goes once to each distinct rank that hosts one of its chosen slots."""
    tokens = slot_routed.shape[0]
    by_rank = slot_routed.view(tokens, num_ranks, slots_per_rank)
    sent = by_rank.any(dim=2)
    counts = torch.cat([sent.sum(dim=0).view(-1, 1), by_rank.sum(dim=0)], dim=1)
    return SendCounts(sent=sent, counts=counts)


@dataclass
class SendPlan:
    """What one rank sends: one row per (token, destination rank), grouped by destination."""

    row_token: torch.Tensor
    """int64 [N]: the local token of each row."""
    row_mask: torch.Tensor
    """bool [N, S]: the destination's local slots each row is routed to."""
    row_columns: torch.Tensor
    """int64 [N, S]: the slot (column of the routing in slot space) of each row's local slot."""


def plan_rows(sends: SendCounts, slot_routed: torch.Tensor, rows: int) -> SendPlan:
    """The rows, given their number (the sum of the send counts, known on the host).

    Rows are the (destination, token) cells of the [P, T] send mask in row-major order, so they
    come grouped by destination; a static-size nonzero finds them without a host wait.
    """
    tokens, num_ranks = sends.sent.shape
    per_rank = slot_routed.shape[1] // num_ranks
    cells = torch.nonzero_static(sends.sent.t().reshape(-1), size=rows).view(-1)
    dest = cells // tokens
    row_token = cells - dest * tokens
    columns = dest.view(-1, 1) * per_rank + torch.arange(per_rank, device=cells.device)
    return SendPlan(row_token=row_token, row_mask=slot_routed[row_token.view(-1, 1), columns],
                    row_columns=columns)


def expand_received(row_mask: torch.Tensor, pairs: int):
    """Pairs to compute on this rank from received rows: (row, local slot) where routed, sorted
    by local slot then row; ``pairs`` (the routed pairs received, known on the host) sizes them."""
    rows = row_mask.shape[0]
    # The transposed mask's set cells come in (local slot, row) order already.
    cells = torch.nonzero_static(row_mask.t().reshape(-1), size=pairs).view(-1)
    local = cells // rows
    return cells - local * rows, local
