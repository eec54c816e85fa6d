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
from typing import List

import torch


class _OnDevices:
    """Host tensors built once, with a copy on each device the data uses: ``on(device)``
    makes it the first time (a copy from host memory can wait for the device) and reuses it."""

    def on(self, device: torch.device):
        device = torch.device(device)
        copies = self.__dict__.setdefault("_devices", {torch.device("cpu"): self})
        if device not in copies:
            copy = object.__new__(type(self))
            copy.__dict__.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                  for k, v in self.__dict__.items() if k != "_devices"})
            copy._devices = copies
            copies[device] = copy
        return copies[device]


class SlotMap(_OnDevices):
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
        replicas = max((int(counts[e]) for e in self.replicated), default=0)
        self.replica_experts = torch.tensor(self.replicated, dtype=torch.long, device="cpu")
        self.replica_slots = torch.zeros(len(self.replicated), replicas, dtype=torch.long,
                                         device="cpu")
        """int64 [n, R]: the slots of each replicated expert in slot order, padded with slot 0."""
        self.replica_valid = torch.zeros(len(self.replicated), replicas, dtype=torch.bool,
                                         device="cpu")
        """bool [n, R]: which entries of ``replica_slots`` are slots, not padding."""
        for i, e in enumerate(self.replicated):
            where = torch.nonzero(slot_expert == e).flatten()
            self.replica_slots[i, :where.numel()] = where
            self.replica_valid[i, :where.numel()] = True
        self.single_column = counts[slot_expert] == 1
        """bool [P*S]: the slot's expert has no other slot."""
        self.identity = bool(torch.equal(slot_expert, torch.arange(slot_expert.numel(), device="cpu")))
        """Slot s holds expert s (Megatron's contiguous layout): the routing map is the plan."""


def choose_slots(routing_map: torch.Tensor, slots: SlotMap, own_rank: int) -> torch.Tensor:
    """bool [T, P*S]: the slot that serves each routed (token, expert) pair, one per pair.

    Replica rule, deterministic: a replica on a rank the token is already sent to for an expert
    with one slot, else one on the token's own rank, else one on its own node, else the replica
    least loaded in this batch (after the pairs the first three rules placed), tokens taken in
    order. Without replicas this is one column gather (none for the contiguous layout); the
    replicated experts are resolved all together, with [T x replicated experts x replicas]
    operations.
    """
    slots = slots.on(routing_map.device)
    if slots.identity and routing_map.shape[1] == slots.slot_expert.numel():
        return routing_map
    routed = routing_map.index_select(1, slots.slot_expert)
    if not slots.replicated:
        return routed
    device = routing_map.device
    tokens, num_ranks, per_rank = routing_map.shape[0], slots.num_ranks, slots.slots_per_rank
    experts, replicas = slots.replica_slots.shape
    valid = slots.replica_valid
    ranks = slots.slot_rank[slots.replica_slots]                                   # [n, R]
    sending = (routed & slots.single_column).view(tokens, num_ranks, per_rank).any(dim=2)
    token_routed = routing_map.index_select(1, slots.replica_experts)              # [T, n]
    # Each replica's rule tier: 3 the token is already sent to its rank (an expert with one slot
    # there), 2 its rank is the token's own, 1 its node is the token's own, 0 none. The pick is
    # the highest tier's first replica in slot order: the largest key below.
    own_tier = torch.where(ranks == own_rank, 2,
                           (slots.rank_node[ranks] == slots.rank_node[own_rank]).long())
    sent_to = sending[:, ranks.view(-1)].view(tokens, experts, replicas)
    order = replicas - torch.arange(replicas, device=device)
    key = torch.where(sent_to, 3, own_tier) * (replicas + 1) + order
    best, first = torch.where(valid, key, 0).max(dim=2)
    pick = torch.where(best > replicas, first, -1)
    resolved = token_routed & (pick >= 0)
    cell = torch.arange(experts, device=device) * replicas + pick.clamp(min=0)
    base = torch.zeros(experts * replicas, dtype=torch.long, device=device).index_add_(
        0, cell.view(-1), resolved.view(-1).long()).view(experts, replicas)
    # Padding never wins: its level starts above any real replica's last.
    base = torch.where(valid, base, 2 * tokens + 1)
    rest = token_routed & (pick < 0)
    nth = (torch.cumsum(rest, dim=0) - 1).clamp(min=0)
    greedy = _greedy_least_loaded_each(base, tokens)                              # [n, T]
    pick = torch.where(rest, greedy.gather(1, nth.t()).t(), pick)
    chosen = (torch.arange(replicas, device=device) == pick.unsqueeze(2)) & token_routed.unsqueeze(2)
    routed[:, slots.replica_slots[valid]] = chosen[:, valid]
    return routed


def _greedy_least_loaded_each(loads: torch.Tensor, count: int) -> torch.Tensor:
    """For every row of ``loads`` [n, m]: the candidates of ``count`` items given one at a time
    to the least-loaded candidate (ties: the lower index), exactly as the sequential greedy rule
    would: [n, count].

    Candidate i receives an item at each level loads[i] + s. That item is the greedy rule's
    k-th, where k counts the items every candidate j receives below that level, plus one for
    each j < i that also receives one at it; scattering i to position k gives the sequence with
    no sort. A loop over the m candidates (replicas of an expert: a handful), never over items.
    """
    rows, candidates = loads.shape
    levels = loads.unsqueeze(2) + torch.arange(count, device=loads.device)  # [n, m, count]
    position = torch.zeros_like(levels)
    earlier = torch.arange(candidates, device=loads.device).view(1, -1, 1)
    for j in range(candidates):
        level_j = loads[:, j].view(rows, 1, 1)
        position += (levels - level_j).clamp(min=0)
        position += (level_j <= levels) & (j < earlier)
    # Items past the first ``count`` land in one spare cell, dropped.
    out = torch.zeros(rows, count + 1, dtype=torch.long, device=loads.device)
    out.scatter_(1, position.clamp(max=count).view(rows, -1),
                 earlier.expand(rows, -1, count).reshape(rows, -1))
    return out[:, :count]


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
    """What one rank sends: one row per (token, destination), grouped by destination. A row
    carries the routing of one block of W consecutive slots (its destination rank's, or with
    node-level deduplication its destination node's)."""

    row_token: torch.Tensor
    """int64 [N]: the local token of each row."""
    row_mask: torch.Tensor
    """bool [N, W]: the slots of the row's block it is routed to."""
    row_block: torch.Tensor
    """int64 [N]: the row's (token, block) as token * blocks + block: its row in the
    [T * blocks, W] view of anything in slot space (``row_values``)."""


def row_values(by_slot: torch.Tensor, plan: SendPlan) -> torch.Tensor:
    """[N, W]: each row's values of its block of slots, from ``by_slot`` [T, P*S] (one
    contiguous block per row: a single index_select, with autograd)."""
    return by_slot.reshape(-1, plan.row_mask.shape[1]).index_select(0, plan.row_block)


def plan_rows(sends: SendCounts, slot_routed: torch.Tensor, rows: int) -> SendPlan:
    """The rows, given their number (the sum of the send counts, known on the host).

    Rows are the (destination, token) cells of the [P, T] send mask in row-major order, so they
    come grouped by destination; a static-size nonzero finds them without a host wait.
    """
    num_ranks = sends.sent.shape[1]
    per_rank = slot_routed.shape[1] // num_ranks
    dest, row_token = _rows_by_destination(sends.sent, rows)
    block = row_token * num_ranks + dest
    return SendPlan(row_token=row_token,
                    row_mask=slot_routed.reshape(-1, per_rank).index_select(0, block),
                    row_block=block)


def _rows_by_destination(sent: torch.Tensor, rows: int):
    """(destination, token) of each set cell of the [T, P] send mask, grouped by destination in
    token order; a static-size nonzero (``rows``: the count, known on the host), no host wait."""
    tokens = sent.shape[0]
    cells = torch.nonzero_static(sent.t().reshape(-1), size=rows).view(-1)
    dest = cells // tokens
    return dest, cells - dest * tokens


def expand_received(row_mask: torch.Tensor, pairs: int):
    """Pairs to compute on this rank from received rows: (row, local slot) where routed, sorted
    by local slot then row; ``pairs`` (the routed pairs received, known on the host) sizes them."""
    rows = row_mask.shape[0]
    # The transposed mask's set cells come in (local slot, row) order already.
    cells = torch.nonzero_static(row_mask.t().reshape(-1), size=pairs).view(-1)
    local = cells // rows
    return cells - local * rows, local


class NodeLayout(_OnDevices):
    """Where the EP ranks sit, for node-level deduplication: a token goes once to each remote
    node that hosts one of its experts, to one rank there (its gateway), which forwards it to
    the ranks of its node that need it; inside its own node it goes directly to each rank that
    needs it (over NVLink, in the same exchange as the rows to other nodes).

    Requires the EP ranks of every node to be contiguous in EP order and equally many (the
    layouts Megatron builds); ``reason`` says why node-level deduplication is off otherwise.
    """

    def __init__(self, rank_node: torch.Tensor, own_rank: int):
        nodes = rank_node.tolist()
        blocks = []
        for rank, node in enumerate(nodes):
            if not blocks or blocks[-1][0] != node:
                blocks.append((node, []))
            blocks[-1][1].append(rank)
        sizes = {len(members) for _, members in blocks}
        self.reason = None
        if len({node for node, _ in blocks}) != len(blocks):
            self.reason = "the EP ranks of a node are not contiguous in the EP group"
        elif len(sizes) != 1:
            self.reason = f"nodes hold different numbers of EP ranks ({sorted(sizes)})"
        elif len(blocks) == 1:
            self.reason = "all EP ranks are on one node"
        self.num_nodes = len(blocks)
        self.ranks_per_node = len(blocks[0][1])
        self.own_node = own_rank // self.ranks_per_node if self.reason is None else 0
        self.position = own_rank % self.ranks_per_node
        """This rank's index inside its node: its gateway on every other node has the same."""
        self.gateways = torch.arange(self.num_nodes, device="cpu") * self.ranks_per_node + self.position
        """int64 [N]: the rank of each remote node this rank sends its rows for that node to."""
        first = self.own_node * self.ranks_per_node
        source = torch.arange(len(nodes), device="cpu")
        self.source_gateway = torch.where(source // self.ranks_per_node == self.own_node,
                                          own_rank, first + source % self.ranks_per_node)
        """int64 [P]: the rank of this rank's node that forwards each rank's rows to this one:
        for a rank of another node, its gateway here; for a rank of this node, which sends
        directly, this rank itself."""
        self.arrival_order = torch.argsort(self.source_gateway * len(nodes) + source)
        """int64 [P]: the sources in the order their rows arrive in the second hop: by the rank
        that forwards them, then by source."""

    @property
    def active(self) -> bool:
        return self.reason is None


def relay_sends(sent: torch.Tensor, layout: NodeLayout) -> torch.Tensor:
    """bool [T, P]: the first hop of a relayed dispatch, from the deduplicated sends ``sent``
    [T, P]: token t goes once to the gateway of each remote node where it has a destination,
    and directly to each of its destinations in its own node."""
    tokens, ranks = sent.shape
    by_node = sent.view(tokens, layout.num_nodes, layout.ranks_per_node)
    hop = torch.zeros_like(by_node)
    hop[:, :, layout.position] = by_node.any(dim=2)
    hop[:, layout.own_node] = by_node[:, layout.own_node]
    return hop.view(tokens, ranks)


def relay_counts(rank_counts: torch.Tensor, hop_rows: torch.Tensor,
                 layout: NodeLayout) -> torch.Tensor:
    """int64 [P, 1 + (1+S) + L(1+S)]: the one count message of a relayed dispatch. To every rank:
    the rows it receives from this rank in the first hop (``hop_rows``, from ``relay_sends``),
    the rows and per-slot pairs that will reach it from this rank (through whichever rank), and
    those it will forward to each rank of its node in the second hop: a gateway the rows of
    every rank of its node, a rank of this rank's own node its own rows (to itself)."""
    ranks, width = rank_counts.shape
    per_node = layout.ranks_per_node
    forward = torch.zeros(ranks, per_node, width, dtype=rank_counts.dtype,
                          device=rank_counts.device)
    forward[layout.gateways] = rank_counts.view(layout.num_nodes, per_node, width)
    first = layout.own_node * per_node
    members = torch.arange(per_node, device=rank_counts.device)
    forward[first:first + per_node] = 0  # this rank is its own node's gateway: not here
    forward[first + members, members] = rank_counts[first:first + per_node]
    return torch.cat([hop_rows.view(-1, 1).to(rank_counts.dtype), rank_counts,
                      forward.view(ranks, -1)], dim=1)


def plan_relay_rows(hop: torch.Tensor, slot_routed: torch.Tensor, layout: NodeLayout,
                    rows: int) -> SendPlan:
    """The first hop's rows (``hop`` from ``relay_sends``; ``rows`` its sum, known on the host),
    grouped by destination, each with the routing of all the slots of its destination's node;
    a row sent directly inside this rank's node keeps only its destination's slots."""
    span = slot_routed.shape[1] // layout.num_nodes
    per_rank = span // layout.ranks_per_node
    dest, row_token = _rows_by_destination(hop, rows)
    node = dest // layout.ranks_per_node
    block = row_token * layout.num_nodes + node
    member = torch.arange(span, device=dest.device) // per_rank
    own_slots = member == (dest % layout.ranks_per_node).view(-1, 1)
    keep = own_slots | (node != layout.own_node).view(-1, 1)
    return SendPlan(row_token=row_token,
                    row_mask=slot_routed.reshape(-1, span).index_select(0, block) & keep,
                    row_block=block)


def order_by_source(rows_by_source: torch.Tensor, arrival_order: torch.Tensor,
                    rows: int) -> torch.Tensor:
    """int64 [rows]: the permutation that puts a relayed dispatch's received rows in (ETP peer,
    source) order, each source's rows keeping their (token) order. ``rows_by_source`` [ETP, P]:
    rows from each source as each ETP peer received them, which arrive by forwarding rank, then
    source (``NodeLayout.arrival_order``); ``rows``: their total, known on the host."""
    peers, ranks = rows_by_source.shape
    device = rows_by_source.device
    sizes = rows_by_source[:, arrival_order].reshape(-1)
    labels = (torch.arange(peers, device=device).view(-1, 1) * ranks + arrival_order).reshape(-1)
    key = torch.repeat_interleave(labels, sizes, output_size=rows)
    return torch.sort(key, stable=True).indices


def plan_forward(node_mask: torch.Tensor, ranks_per_node: int, rows: int):
    """At a gateway: the rows to forward inside its node, grouped by destination, as (received
    row, destination's index in the node), from the [M, L*S] routed mask of the received rows."""
    received = node_mask.shape[0]
    sent = node_mask.view(received, ranks_per_node, node_mask.shape[1] // ranks_per_node).any(dim=2)
    cells = torch.nonzero_static(sent.t().reshape(-1), size=rows).view(-1)
    member = cells // received
    return cells - member * received, member
