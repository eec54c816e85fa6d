"""Re-placement inside ``folding train``: the live statistics on the device, the solve in a
background thread, and the switch between two steps.

``LiveStatistics`` hooks Megatron's router (``RouterPatch``) and adds every training forward
pass's choices into tensors on the router's device: pairs per expert, co-activation (one
[E, T] x [T, E] product) and top-1 transitions from the previous MoE layer of the same
micro-batch on this rank (an ``index_add_``). Nothing is copied to the host and nothing waits
until ``reduce``, one all-reduce over every rank when a re-placement is due. Transitions across
pipeline stages are not seen; the training objective does not use them.

``Replacer`` runs the loop's side: every ``interval`` steps it reduces the window's statistics
and starts ``folding.placement.live.decide`` on rank 0 in a thread, on numpy copies, so training
goes on while it solves (telling it whether the dispatcher deduplicates per node, which decides
what a placement is predicted to send across nodes). The verdict is broadcast at the first step
boundary after the solve is ready (rank 0 says each boundary whether it is), or, with
``apply_after``, at exactly that many steps after the solve started (waiting for it if needed),
which makes a run repeatable. Every rank then moves its experts with
``RankTrainer.move_experts``. One solve is in flight at a time; a boundary that finds one still
running lets the window grow.
"""

from __future__ import annotations

import threading
from typing import List, Optional

import numpy as np
import torch

from folding.placement.live import Attempt, MoveCosts, RoutingStatistics, decide


class LiveStatistics:
    """Routing statistics of one rank's MoE layers, summed on the device."""

    def __init__(self, trainer):
        arch = trainer.arch
        self.ordinal = arch.moe_ordinals()
        self.num_experts, self.top_k = arch.num_experts, arch.moe_router_topk
        self.num_layers = len(self.ordinal)
        self.device = trainer.device
        self.steps = 0
        self.carried = RoutingStatistics.empty(self.num_experts, self.num_layers, self.top_k)
        """Statistics that came from a checkpoint, added once at the next reduction."""
        self._reset()
        self._install()

    def _reset(self) -> None:
        E, L = self.num_experts, self.num_layers
        self.counts = torch.zeros(L, E, dtype=torch.float64, device=self.device)
        self.pairs = torch.zeros(L, E, E, dtype=torch.float64, device=self.device)
        self.transitions = torch.zeros(max(L - 1, 0) * E * E, dtype=torch.float64,
                                       device=self.device)
        self._top1 = {}

    def _install(self) -> None:
        from folding.megatron.router_hooks import RouterPatch

        def make_topk(original, current_layer):
            def topk(*args, **kwargs):
                probs, routing_map = original(*args, **kwargs)
                if torch.is_grad_enabled():  # training forward passes only
                    self._add(self.ordinal[current_layer()], routing_map.detach(), probs.detach())
                return probs, routing_map
            return topk

        self._patch = RouterPatch("topk_routing_with_score_function", make_topk)

    def remove(self) -> None:
        self._patch.remove()

    def _add(self, layer: int, routing_map: torch.Tensor, probs: torch.Tensor) -> None:
        chosen = routing_map.to(torch.float32)
        self.counts[layer] += chosen.sum(dim=0).double()
        # Exact in fp32: each entry counts at most T tokens of one micro-batch.
        self.pairs[layer] += (chosen.t() @ chosen).double()
        top1 = torch.where(routing_map, probs.float(),
                           torch.full_like(probs, float("-inf"), dtype=torch.float32)).argmax(dim=1)
        previous = self._top1.get(layer - 1)
        if previous is not None and previous.shape == top1.shape:
            E = self.num_experts
            index = ((layer - 1) * E + previous) * E + top1
            self.transitions.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        self._top1[layer] = top1

    def step_done(self) -> None:
        self.steps += 1
        self._top1 = {}

    def reduce(self, reset: bool) -> RoutingStatistics:
        """The window's statistics summed over every rank (a collective)."""
        import torch.distributed as dist

        flat = torch.cat([self.counts.reshape(-1), self.pairs.reshape(-1), self.transitions])
        dist.all_reduce(flat)
        stats = self.carried.from_flat(flat.cpu().numpy(), self.steps).added(self.carried)
        for layer in range(stats.num_layers):
            np.fill_diagonal(stats.pairs[layer], 0.0)  # an expert is not its own pair
        if reset:
            self.steps = 0
            self.carried = RoutingStatistics.empty(self.num_experts, self.num_layers, self.top_k)
            self._reset()
        return stats


def transfer_plans(layers, old, new) -> list:
    """``live.transfer_plan`` of each folded MoE layer of this rank, from placement ``old`` to
    ``new``."""
    from folding.placement.live import transfer_plan

    out = []
    for layer in layers:
        ordinal = layer.moe_ordinal[layer.layer_number]
        out.append(transfer_plan(old.layers[ordinal], new.layers[ordinal], layer.slots_per_rank,
                                old.gpus_per_node))
    return out


def exchange_slots(plans, group, slots_per_rank: int, source, width: int, dtype, device) -> list:
    """Expert slots moved over one all-to-all of the EP ``group``, in both training loops.

    ``plans``: per layer, the (source slot, destination slot) pairs of a switch
    (``transfer_plans``); ``source(layer, local slot)``: the flattened state of a slot of
    this rank, in new memory (a slot may be a source and a destination of one switch, so
    nothing may alias what will be written); ``width``: the elements of one flattened slot.
    Returns ((layer, local slot), flattened state) for every slot of this rank that receives an
    expert: copies from its own slots first, then what arrived, for the caller to write."""
    import torch.distributed as dist

    me, size = dist.get_rank(group), dist.get_world_size(group)
    S = slots_per_rank
    sends: List[List[torch.Tensor]] = [[] for _ in range(size)]
    receives: List[List[tuple]] = [[] for _ in range(size)]
    local: list = []
    for index, plan in enumerate(plans):
        for src, dst in plan:
            if src // S == me:
                flat = source(index, src % S)
                if dst // S == me:
                    local.append(((index, dst % S), flat))
                else:
                    sends[dst // S].append(flat)
            elif dst // S == me:
                receives[src // S].append((index, dst % S))
    send = torch.cat([f for per_rank in sends for f in per_rank]) if any(sends) else \
        torch.empty(0, dtype=dtype, device=device)
    received = torch.empty(sum(len(r) for r in receives) * width, dtype=dtype, device=device)
    if size > 1:
        dist.all_to_all_single(received, send, [len(r) * width for r in receives],
                               [len(s) * width for s in sends], group=group)
    return local + list(zip([where for per_rank in receives for where in per_rank],
                            received.split(width) if received.numel() else []))


def move_costs(trainer) -> MoveCosts:
    """Bytes of one expert in full and of one dispatched row, from the model as built."""
    from folding.dispatcher.moe_layer import folded_moe_layers

    layer = folded_moe_layers(trainer.chunks)[0]
    expert = list(layer.experts.local_experts[0].parameters())
    # Each ETP rank holds a shard of the expert: a move copies every shard.
    elements = sum(p.numel() for p in expert) * trainer.spec.etp
    param_bytes = expert[0].element_size()
    main_bytes = 0 if expert[0].dtype == torch.float32 else 4
    hidden_bytes = 4 if trainer.training.precision == "fp32" else 2
    return MoveCosts(expert_bytes=elements * (param_bytes + main_bytes + 8),
                     row_bytes=trainer.arch.hidden_size * hidden_bytes,
                     copies=trainer.spec.edp)


def node_dedup(trainer) -> bool:
    """Whether the folded dispatcher deduplicates per node (on by default when the EP group
    spans several nodes): cross-node rows then follow the distinct nodes of a token."""
    from folding.dispatcher.moe_layer import folded_moe_layers

    layers = folded_moe_layers(trainer.chunks)
    return bool(layers and getattr(layers[0].token_dispatcher, "node_dedup", False))


class Replacer:
    """Periodic re-placement of one rank's trainer; ``after_step`` is a collective."""

    def __init__(self, trainer, interval: int, max_moved: float, apply_after: Optional[int] = None,
                 time_limit: Optional[float] = 10.0, always: bool = False):
        import torch.distributed as dist

        self.trainer = trainer
        self.interval, self.max_moved = interval, max_moved
        self.apply_after, self.time_limit, self.always = apply_after, time_limit, always
        self.rank = dist.get_rank()
        self.stats = LiveStatistics(trainer)
        self.costs = move_costs(trainer)
        self.node_dedup = node_dedup(trainer)
        self.attempts: List[Attempt] = []
        self._pending: Optional[int] = None  # step at which the solve in flight started
        self._thread: Optional[threading.Thread] = None
        self._result = None

    # ------------------------------------------------------------------ the loop's hook
    def after_step(self) -> None:
        step = self.trainer.steps_done
        self.stats.step_done()
        if self._pending is not None and self._due(step):
            self._apply(step)
        if self._pending is None and step % self.interval == 0:
            self._start(step)

    def _due(self, step: int) -> bool:
        import torch.distributed as dist

        if self.apply_after is not None:
            return step >= self._pending + self.apply_after
        flag = [self._thread is not None and not self._thread.is_alive()] if self.rank == 0 else [None]
        dist.broadcast_object_list(flag, src=0)
        return bool(flag[0])

    def _start(self, step: int) -> None:
        stats = self.stats.reduce(reset=True)
        self._pending = step
        if self.rank != 0:
            return
        current = self.trainer.placement
        self._result = None

        def work():
            try:
                self._result = decide(current, stats, step, self.interval, self.max_moved,
                                      self.costs, self.time_limit, self.always,
                                      node_dedup=self.node_dedup)
            except Exception as e:  # a failed solve skips this attempt, training goes on
                self._result = (None, Attempt(step, 0, 0, 0.0, 0.0, False,
                                              f"solve failed: {e}", 0.0))

        self._thread = threading.Thread(target=work, name="folding-replacement", daemon=True)
        self._thread.start()

    def _verdict(self):
        """Rank 0's result, on every rank (a collective)."""
        import torch.distributed as dist

        if self.rank == 0:
            self._thread.join()
            placement, attempt = self._result
            message = [(None if placement is None else placement.layers, attempt)]
        else:
            message = [None]
        dist.broadcast_object_list(message, src=0)
        self._thread, self._result, self._pending = None, None, None
        return message[0]

    def _apply(self, step: int) -> None:
        rows, attempt = self._verdict()
        if rows is not None:
            from folding.placement.placement import Placement

            old = self.trainer.placement
            self.trainer.move_experts(Placement(old.num_experts, old.num_layers, old.ep_size,
                                                old.slots_per_rank, old.gpus_per_node, rows))
            attempt.applied_at = step
        self.attempts.append(attempt)

    def finish(self) -> None:
        """At the end of the run: a solve still in flight is recorded as not applied."""
        if self._pending is not None:
            rows, attempt = self._verdict()
            if rows is not None:
                attempt.applied = False
                attempt.reason = "training ended before the switch"
            self.attempts.append(attempt)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_meta(self) -> dict:
        """The placement and the statistics of the window so far (a collective)."""
        return {"placement": self.trainer.placement.to_json(),
                "routing_statistics": self.stats.reduce(reset=False).to_json()}

    def resume(self, meta: dict) -> None:
        saved = meta.get("routing_statistics")
        if saved is not None:
            stats = RoutingStatistics.from_json(saved, "checkpoint routing statistics")
            if (stats.num_experts, stats.num_layers) == (self.stats.num_experts,
                                                         self.stats.num_layers):
                self.stats.carried = stats
