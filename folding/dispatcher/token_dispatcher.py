"""The folded token dispatcher: deduplicated, placement-aware all-to-all on Megatron's interface.

Megatron's alltoall dispatcher sends one copy of a token per selected expert and assumes expert
e lives on EP rank e // (E/EP). This one sends a token once to each distinct rank that hosts one
of its experts, with a row of routing weights for that rank's local slots; the receiver expands
the row into one input per local expert, runs the experts, sums the token's outputs and sends
one row back. Expert e may live in any slot, or several (replicas), as a ``Placement`` says.

Communication: all-to-all over the EP group (hidden states with the weights appended when they
share a dtype, else the weights in their own message, so 16-bit hidden states never round fp32
weights; a weight of ``UNROUTED`` marks a slot the row is not routed to), then, with ETP > 1, an
all-gather of the received rows over the expert-TP group and a reduce-scatter of the outputs:
the same collectives as Megatron's alltoall dispatcher, through Megatron's own autograd-aware
mappings, so it runs on NCCL and on gloo (with the CPU runtime) unchanged. With node-level
deduplication the two hops of the relay (to one rank of each remote node and to the ranks of
this node; inside the node) each have few peers, so they run point to point with those peers
only (``peer_exchange``), a 16-bit hop's rows and fp32 weights in one exchange. Token dropping
happens in Megatron's router before dispatch, so capacity, drop policies and padding behave
exactly as with Megatron's dispatchers.

Host waits: the plan is made on the data's device (``send_plan``), and the sizes the host must
know (rows per destination, rows and pairs received, the ETP peers' rows) travel as one small
count tensor in the same exchange, copied to the host without blocking on a side stream and
awaited once per layer, at ``host_wait_point``: in ``token_dispatch`` (the default, so whatever
the layer queues in between, such as shared experts, overlaps the copy) or already in
``dispatch_preprocess``. The backward pass never waits. Sums of expert outputs accumulate in
fp32 (at least the precision of Megatron's unpermute) and the ETP reduce-scatter runs in the
probabilities' dtype, as Megatron's does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from folding.dispatcher.counters import TrafficCounters
from folding.dispatcher.peer_exchange import peer_all_to_all
from folding.dispatcher.send_plan import (NodeLayout, SlotMap, choose_slots, count_sends,
                                          expand_received, plan_forward, plan_relay_rows,
                                          order_by_source, plan_rows, relay_counts,
                                          relay_sends, row_values)
from folding.errors import FoldingError

try:
    from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher
except ImportError:  # pragma: no cover - megatron-core is a dependency
    MoETokenDispatcher = object

HOST_WAIT_POINTS = ("dispatch_preprocess", "token_dispatch")
UNROUTED = float("-inf")
"""A row's weight for a slot it is not routed to, in the exchanged weights: never a router's
probability, so a routed pair of weight 0 (padding) stays distinguishable."""


def refuse_unsupported(config) -> None:
    """FoldingError naming the Megatron setting the folded dispatcher cannot honour."""
    impl = getattr(config, "cuda_graph_impl", "none") or "none"
    if impl != "none":
        scopes = [getattr(s, "name", str(s)) for s in (getattr(config, "cuda_graph_scope", None) or [])]
        captured = [s for s in scopes if s == "moe_preprocess" or (s == "moe_router" and impl == "local")]
        if not scopes or captured:
            what = (f"--cuda-graph-scope {' '.join(captured)}" if captured
                    else "--cuda-graph-impl without --cuda-graph-scope (the whole layer)")
            raise FoldingError(f"{what} captures the folded dispatcher's planning in a CUDA graph, "
                               f"whose row counts depend on the routing; leave the MoE preprocessing "
                               f"out of the graph scope (for example --cuda-graph-scope attn)")
    if getattr(config, "moe_permute_fusion", False):
        raise FoldingError("--moe-permute-fusion fuses Megatron's permutation, which the folded "
                           "dispatcher does not use (it plans deduplicated rows itself); drop the flag")
    if getattr(config, "moe_router_padding_for_quantization", False):
        raise FoldingError("--moe-router-padding-for-quantization is not supported by the folded "
                           "dispatcher (padded counts would not survive replica choice); drop the flag")


class FoldedTokenDispatcher(MoETokenDispatcher):
    """Deduplicated dispatch following an expert placement (``SlotMap`` per layer)."""

    _copy_stream = None  # shared by every layer, as Megatron shares its device-to-host stream

    def __init__(self, config, pg_collection, slots_per_rank: int, gpus_per_node: int,
                 counters: Optional[TrafficCounters] = None,
                 host_wait_point: str = "token_dispatch", node_dedup: Optional[bool] = None):
        super().__init__(config=config, pg_collection=pg_collection)
        refuse_unsupported(config)
        if host_wait_point not in HOST_WAIT_POINTS:
            raise FoldingError(f"host_wait_point {host_wait_point!r} is not one of {HOST_WAIT_POINTS}")
        self.host_wait_point = host_wait_point
        self.slots_per_rank = slots_per_rank
        self.ep_rank = dist.get_rank(self.ep_group)
        self.tp_rank_in_group = dist.get_rank(self.tp_group) if self.tp_size > 1 else 0
        self.ep_global_ranks = dist.get_process_group_ranks(self.ep_group)
        # Host tensors, explicitly: a model built on the meta device must still know its placement.
        self.rank_node = torch.tensor([r // gpus_per_node for r in self.ep_global_ranks],
                                      device="cpu")
        self.slot_map: Optional[SlotMap] = None
        self.counters = counters or TrafficCounters()
        self.hidden_shape = None
        self._host_counts = self._copied = None
        self.nodes = NodeLayout(self.rank_node, self.ep_rank)
        if node_dedup and not self.nodes.active and self.nodes.num_nodes > 1:
            raise FoldingError(f"node-level deduplication cannot run: {self.nodes.reason}")
        self.node_dedup = self.nodes.active if node_dedup is None else (node_dedup and self.nodes.active)
        """Send a token once per remote node, through one rank there (on by default when the
        EP group spans several nodes)."""

    def set_slot_experts(self, slot_expert: torch.Tensor) -> None:
        """The logical expert of every slot of this layer (``P*S`` entries)."""
        expected = self.ep_size * self.slots_per_rank
        if slot_expert.numel() != expected:
            raise FoldingError(f"placement has {slot_expert.numel()} slots, EP={self.ep_size} x "
                             f"{self.slots_per_rank} slots per rank = {expected} expected")
        self.slot_map = SlotMap(slot_expert, self.slots_per_rank, self.rank_node)

    # ------------------------------------------------------------------------------ dispatch
    def dispatch_preprocess(self, tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """Plan on the device, exchange the counts and start their copy to the host."""
        self.hidden_shape = tokens.shape
        hidden = tokens.reshape(-1, tokens.shape[-1])
        self.probs_dtype = probs.dtype
        self.slot_routed = choose_slots(routing_map, self.slot_map, self.ep_rank)
        self.sends = count_sends(self.slot_routed, self.slots_per_rank, self.ep_size)
        counts = self.sends.counts
        if self.node_dedup:
            host = self._node_counts(counts, hidden)
        else:
            received = counts
            if self.ep_size > 1:
                # Counts travel on the data's device: NCCL moves only GPU tensors.
                received = self._all_to_all_counts(counts)
            host = [counts[:, 0], self._gather_tp(received)]
            self.counters.record_rows(counts[:, 0], hidden, self.ep_rank, self.rank_node)
        self._start_copy(torch.cat([h.reshape(-1) for h in host]))
        self.counters.record_pairs(routing_map, probs, self.config.moe_router_topk)
        if self.host_wait_point == "dispatch_preprocess":
            self._finish_copy()
        return hidden, probs

    def _all_to_all_counts(self, counts: torch.Tensor) -> torch.Tensor:
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.ep_group)
        return received

    def _gather_tp(self, received: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return received.unsqueeze(0)
        peers = [torch.empty_like(received) for _ in range(self.tp_size)]
        dist.all_gather(peers, received, group=self.tp_group)
        return torch.stack(peers)

    def _node_counts(self, rank_counts: torch.Tensor, hidden: torch.Tensor):
        """Counts of both hops in one exchange: first-hop rows to each remote node's gateway and
        to each rank of this node; what each rank will forward to each rank of its node; what
        each rank will receive, by the rank that forwards it."""
        device = rank_counts.device
        # The layout's tensors on the data's device, for this dispatch's relay plans.
        self._nodes_here = nodes = self.nodes.on(device)
        width = 1 + self.slots_per_rank
        self.hop_sent = relay_sends(self.sends.sent, nodes)
        message = relay_counts(rank_counts, self.hop_sent.sum(dim=0), nodes)
        arrived = self._all_to_all_counts(message)
        first_hop, first_hop_in = message[:, 0], arrived[:, 0]
        relayed = arrived[:, 1 + width:].reshape(self.ep_size, nodes.ranks_per_node, width).sum(dim=0)
        to_members = torch.zeros(self.ep_size, dtype=relayed.dtype, device=device)
        first = nodes.own_node * nodes.ranks_per_node
        to_members[first:first + nodes.ranks_per_node] = relayed[:, 0]
        received = torch.zeros(self.ep_size, width, dtype=relayed.dtype, device=device).index_add_(
            0, nodes.source_gateway, arrived[:, 1:1 + width])
        for rows in (first_hop, to_members):  # both hops cross links
            self.counters.record_rows(rows, hidden, self.ep_rank, self.rank_node)
        # The rows reaching this rank from each source, to put them back in source order.
        gathered = self._gather_tp(torch.cat([received, arrived[:, 1:2]], dim=1))
        self._rows_by_source = gathered[:, :, width]
        return [first_hop, first_hop_in, to_members, gathered]

    def _start_copy(self, counts: torch.Tensor) -> None:
        if counts.is_cuda:
            cls = FoldedTokenDispatcher
            if cls._copy_stream is None:
                cls._copy_stream = torch.cuda.Stream()
            cls._copy_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(cls._copy_stream):
                self._host_counts = counts.to("cpu", non_blocking=True)
                counts.record_stream(cls._copy_stream)
            self._copied = cls._copy_stream.record_event()
        else:
            self._host_counts, self._copied = counts, None

    def _finish_copy(self) -> None:
        """The layer's one host wait; then every routing-dependent size is a host integer."""
        if self._host_counts is None:
            return
        if self._copied is not None:
            self._copied.synchronize()
        host, self._host_counts = self._host_counts, None
        ranks, width = self.ep_size, 1 + self.slots_per_rank
        if self.node_dedup:
            first_hop, first_hop_in, to_members = host[:3 * ranks].view(3, ranks).tolist()
            host = host[3 * ranks:].view(-1, ranks, width + 1)[:, :, :width]
            self.relay_input_splits, self.relay_output_splits = first_hop, first_hop_in
            self.input_splits = to_members
            self.relayed_rows = sum(first_hop_in)
            self.plan = plan_relay_rows(self.hop_sent, self.slot_routed, self._nodes_here,
                                        sum(self.relay_input_splits))
        else:
            self.input_splits = host[:ranks].tolist()
            host = host[ranks:]
            self.plan = plan_rows(self.sends, self.slot_routed, sum(self.input_splits))
        received = host.reshape(-1, ranks, width)
        self.output_splits = received[self.tp_rank_in_group, :, 0].tolist()
        self.tp_splits = received[:, :, 0].sum(dim=1).tolist()
        self.received_rows = sum(self.tp_splits)
        self.tokens_per_slot = received[:, :, 1:].sum(dim=(0, 1))
        self.received_pairs = int(self.tokens_per_slot.sum())
        if self.node_dedup:
            self.source_order = order_by_source(self._rows_by_source,
                                                self._nodes_here.arrival_order,
                                                self.received_rows)

    @staticmethod
    def _pack(rows: torch.Tensor, probs: torch.Tensor) -> list:
        """Rows and their weights as the messages of one exchange: one message when the dtypes
        agree (fp32), one collective fewer; else two, so 16-bit hidden states never round fp32
        weights. ``probs`` marks the slots a row is not routed to with ``UNROUTED`` (a routed
        pair may carry weight 0, as a padded one does, and must still be computed), so the
        weights alone say which pairs to compute."""
        return [torch.cat([rows, probs], dim=1)] if probs.dtype == rows.dtype else [rows, probs]

    @staticmethod
    def _unpack(messages: list, hidden_width: int):
        """(rows, weights) of ``_pack``'s messages."""
        if len(messages) == 2:
            return messages
        return messages[0].split([hidden_width, messages[0].shape[1] - hidden_width], dim=1)

    def _exchange(self, messages: list, output_splits, input_splits, gather_tp: bool) -> list:
        """Each message through one all-to-all (relaying, all of them in one point-to-point
        exchange) and, ``gather_tp``, the ETP all-gather."""
        messages = self._all_to_all(messages, output_splits, input_splits)
        if gather_tp and self.tp_size > 1:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            messages = [gather_from_sequence_parallel_region(
                m, group=self.tp_group, output_split_sizes=self.tp_splits) for m in messages]
        return messages

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        self._finish_copy()
        plan, slots = self.plan, self.slot_map.on(probs.device)
        # Routing weights of each row for the destination's slots (a node's, with node-level
        # deduplication), UNROUTED where the row is not routed.
        by_slot = probs if slots.identity else probs.index_select(1, slots.slot_expert)
        row_probs = torch.where(plan.row_mask, row_values(by_slot, plan),
                                torch.full((), UNROUTED, dtype=probs.dtype, device=probs.device))
        hidden_width = hidden_states.shape[-1]
        messages = self._pack(hidden_states.index_select(0, plan.row_token), row_probs)
        if self.node_dedup:
            messages = self._exchange(messages, self.relay_output_splits,
                                      self.relay_input_splits, gather_tp=False)
            node_probs = self._unpack(messages, hidden_width)[1].detach()
            # Forwarded inside the node as received, with the weights of all its slots: one row
            # for each rank of it that hosts an expert of the row (a local copy for this rank's;
            # a row sent directly from this node names only this rank). Each rank reads its own
            # slots' columns.
            self.relay_source, _ = plan_forward(node_probs != UNROUTED,
                                                self.nodes.ranks_per_node, sum(self.input_splits))
            messages = [m.index_select(0, self.relay_source) for m in messages]
        messages = self._exchange(messages, self.output_splits, self.input_splits, gather_tp=True)
        received, received_probs = self._unpack(messages, hidden_width)
        if self.node_dedup:
            first = self.nodes.position * self.slots_per_rank
            received_probs = received_probs[:, first:first + self.slots_per_rank]
        self.received_mask = received_probs.detach() != UNROUTED
        return received, received_probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        if self.node_dedup:
            # Relayed rows arrive by forwarding rank, which depends on where an expert lives;
            # each expert takes them in source order, as without the relay, so that its batch
            # (and the order its weight gradient sums over) does not depend on the placement.
            order = self.source_order
            rows, local = expand_received(self.received_mask.index_select(0, order),
                                          self.received_pairs)
            rows = order[rows]
        else:
            rows, local = expand_received(self.received_mask, self.received_pairs)
        self.pair_rows = rows
        self.counters.record_received(self.received_pairs)
        return hidden_states.index_select(0, rows), self.tokens_per_slot, probs[rows, local]

    # ------------------------------------------------------------------------------ combine
    def combine_preprocess(self, hidden_states: torch.Tensor):
        """Sum each received row's expert outputs (already weighted by the experts)."""
        out = _sum_rows(hidden_states, self.pair_rows, self.received_rows)
        if self.tp_size > 1:
            from megatron.core.tensor_parallel import reduce_scatter_to_sequence_parallel_region

            out = reduce_scatter_to_sequence_parallel_region(
                out.to(self.probs_dtype), group=self.tp_group, input_split_sizes=self.tp_splits)
        return out.to(hidden_states.dtype)

    def token_combine(self, hidden_states: torch.Tensor, *args, **kwargs):
        [out] = self._all_to_all([hidden_states], self.input_splits, self.output_splits)
        if self.node_dedup:
            # Each first-hop row's sum over the ranks it was forwarded to, sent home once.
            out = _sum_rows(out, self.relay_source, self.relayed_rows).to(hidden_states.dtype)
            [out] = self._all_to_all([out], self.relay_input_splits, self.relay_output_splits)
        return out

    def _all_to_all(self, tensors: list, output_splits, input_splits) -> list:
        """Rows of each tensor over the EP group, with autograd: Megatron's all-to-all, one per
        tensor, or, relaying, one point-to-point exchange for all of them with the peers that
        have rows (each hop of a relay has few: ``peer_exchange``)."""
        if self.node_dedup:
            return peer_all_to_all(tensors, output_splits, input_splits, self.ep_global_ranks,
                                   self.ep_rank)
        from megatron.core.tensor_parallel import all_to_all

        return [all_to_all(self.ep_group, t, output_splits, input_splits) for t in tensors]

    def combine_postprocess(self, hidden_states: torch.Tensor):
        tokens = self.hidden_shape.numel() // self.hidden_shape[-1]
        out = _sum_rows(hidden_states, self.plan.row_token, tokens)
        return out.to(hidden_states.dtype).view(self.hidden_shape)


def _sum_rows(values: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` sums of ``values`` by ``index``, accumulated in at least fp32."""
    dtype = torch.promote_types(values.dtype, torch.float32)
    out = torch.zeros(rows, values.shape[-1], dtype=dtype, device=values.device)
    return out.index_add_(0, index, values.to(dtype))
