"""The folded token dispatcher: deduplicated, placement-aware all-to-all on Megatron's interface.

Megatron's alltoall dispatcher sends one copy of a token per selected expert and assumes expert
e lives on EP rank e // (E/EP). This one sends a token once to each distinct rank that hosts one
of its experts, with a row of routing weights for that rank's local slots; the receiver expands
the row into one input per local expert, runs the experts, sums the token's outputs and sends
one row back. Expert e may live in any slot, or several (replicas), as a ``Placement`` says.

Communication: all-to-all over the EP group (hidden states with the weights and the routed-pair
mask appended when they share a dtype, else the weights in their own message, so 16-bit hidden
states never round fp32 weights), then, with ETP > 1, an all-gather of the received rows over
the expert-TP group and a reduce-scatter of the outputs: the same collectives as Megatron's alltoall
dispatcher, through Megatron's own autograd-aware mappings, so it runs on NCCL and on gloo
(with the CPU runtime) unchanged. Token dropping happens in Megatron's router before dispatch,
so capacity, drop policies and padding behave exactly as with Megatron's dispatchers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from folding.dispatcher.counters import TrafficCounters
from folding.dispatcher.send_plan import SlotMap, choose_replicas, expand_received, plan_sends
from folding.errors import FoldingError

try:
    from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher
except ImportError:  # pragma: no cover - megatron-core is a dependency
    MoETokenDispatcher = object


class FoldedTokenDispatcher(MoETokenDispatcher):
    """Deduplicated dispatch following an expert placement (``SlotMap`` per layer)."""

    def __init__(self, config, pg_collection, slots_per_rank: int, gpus_per_node: int,
                 counters: Optional[TrafficCounters] = None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.slots_per_rank = slots_per_rank
        self.ep_rank = dist.get_rank(self.ep_group)
        self.ep_global_ranks = dist.get_process_group_ranks(self.ep_group)
        self.rank_node = torch.tensor([r // gpus_per_node for r in self.ep_global_ranks])
        self.slot_map: Optional[SlotMap] = None
        self.counters = counters or TrafficCounters()
        self.hidden_shape = None

    def set_slot_experts(self, slot_expert: torch.Tensor) -> None:
        """The logical expert of every slot of this layer (``P*S`` entries)."""
        expected = self.ep_size * self.slots_per_rank
        if slot_expert.numel() != expected:
            raise FoldingError(f"placement has {slot_expert.numel()} slots, EP={self.ep_size} x "
                             f"{self.slots_per_rank} slots per rank = {expected} expected")
        self.slot_map = SlotMap(slot_expert.long().cpu(), self.slots_per_rank, self.rank_node)

    # ------------------------------------------------------------------------------ dispatch
    def dispatch_preprocess(self, tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self.hidden_shape = tokens.shape
        hidden = tokens.reshape(-1, tokens.shape[-1])
        device = hidden.device
        chosen = choose_replicas(routing_map.cpu(), self.slot_map, self.ep_rank)
        plan = plan_sends(chosen, self.slots_per_rank, self.ep_size)
        self.plan = plan
        self.row_token = plan.row_token.to(device)
        rows = plan.row_token.numel()
        # Routing weights of each row for the destination's local slots; the mask marks routed
        # pairs (a padded pair may carry weight 0 and must still be computed).
        row_probs = torch.zeros(rows, self.slots_per_rank, dtype=probs.dtype, device=device)
        row_probs = row_probs.index_put(
            (plan.pair_row.to(device), plan.pair_local_slot.to(device)),
            probs[plan.pair_token.to(device), plan.pair_expert.to(device)])
        row_mask = torch.zeros(rows, self.slots_per_rank, dtype=torch.bool, device=device)
        row_mask[plan.pair_row.to(device), plan.pair_local_slot.to(device)] = True
        self.row_mask = row_mask
        self.counters.record_dispatch(plan, routing_map, probs, hidden, self.ep_rank,
                                      self.rank_node, self.config.moe_router_topk)
        return hidden[self.row_token], row_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        from megatron.core.tensor_parallel import all_to_all

        # Counts travel on the data's device: NCCL moves only GPU tensors.
        send = self.plan.send_counts.to(hidden_states.device)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.ep_group)
        self.input_splits, self.output_splits = send.tolist(), recv.tolist()
        # Weights and the routed-pair mask travel together, in the weights' dtype (0/1 is exact);
        # in the hidden states' message too when the dtypes agree (fp32), one collective fewer.
        payload = torch.cat([probs, self.row_mask.to(probs.dtype)], dim=1)
        together = payload.dtype == hidden_states.dtype
        hidden_width = hidden_states.shape[-1]
        messages = ([torch.cat([hidden_states, payload], dim=1)] if together
                    else [hidden_states, payload])
        messages = [all_to_all(self.ep_group, m, self.output_splits, self.input_splits)
                    for m in messages]
        if self.tp_size > 1:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            device = messages[0].device
            counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.tp_size)]
            dist.all_gather(counts, torch.tensor([messages[0].shape[0]], device=device),
                            group=self.tp_group)
            self.tp_splits = [int(c) for c in counts]
            messages = [gather_from_sequence_parallel_region(
                m, group=self.tp_group, output_split_sizes=self.tp_splits) for m in messages]
        if together:
            received, received_payload = messages[0].split([hidden_width, 2 * self.slots_per_rank], dim=1)
        else:
            received, received_payload = messages
        received_probs, received_mask = received_payload.split(self.slots_per_rank, dim=1)
        received_mask = received_mask.detach() != 0
        self.received_mask = received_mask
        return received, received_probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        rows, local, tokens_per_slot = expand_received(self.received_mask.cpu())
        self.pair_rows = rows.to(hidden_states.device)
        self.received_rows = hidden_states.shape[0]
        local = local.to(hidden_states.device)
        self.counters.record_received(int(rows.numel()))
        return hidden_states[self.pair_rows], tokens_per_slot, probs[self.pair_rows, local]

    # ------------------------------------------------------------------------------ combine
    def combine_preprocess(self, hidden_states: torch.Tensor):
        """Sum each received row's expert outputs (already weighted by the experts)."""
        out = torch.zeros(self.received_rows, hidden_states.shape[-1], dtype=hidden_states.dtype,
                          device=hidden_states.device)
        out = out.index_add(0, self.pair_rows, hidden_states)
        if self.tp_size > 1:
            from megatron.core.tensor_parallel import reduce_scatter_to_sequence_parallel_region

            out = reduce_scatter_to_sequence_parallel_region(
                out, group=self.tp_group, input_split_sizes=self.tp_splits)
        return out

    def token_combine(self, hidden_states: torch.Tensor, *args, **kwargs):
        from megatron.core.tensor_parallel import all_to_all

        return all_to_all(self.ep_group, hidden_states, self.input_splits, self.output_splits)

    def combine_postprocess(self, hidden_states: torch.Tensor):
        tokens = self.hidden_shape.numel() // self.hidden_shape[-1]
        out = torch.zeros(tokens, hidden_states.shape[-1], dtype=hidden_states.dtype,
                          device=hidden_states.device)
        out = out.index_add(0, self.row_token, hidden_states)
        return out.view(self.hidden_shape)
