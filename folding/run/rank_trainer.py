"""One rank of a Megatron training run: model, DDP, optimizer, schedule, and the weight layout.

``RankTrainer`` builds Megatron's GPTModel chunks for this rank of a folding, loads their weights
from a full state dict through ``folding.layout.weights``, wraps them in Megatron's DDP, builds
Megatron's optimizer and learning-rate scheduler, and runs steps with Megatron's pipeline
schedules (``get_forward_backward_func``: no pipelining, 1F1B, or interleaved).
It can hand back this rank's parameters, reduced gradients and Adam state as shards, so a driver
can rebuild full tensors, compare them with a reference, or save them under any folding.
The model lives on the rank's device (``folding.run.device.rank_device``: its GPU under NCCL,
else the CPU); the shards it hands back are always CPU tensors, so that they pickle, travel
through gloo or NCCL object collectives and compare with CPU references alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from folding.errors import FoldingError
from folding.layout.parameters import full_parameters
from folding.layout.weights import ShardKey, named_parameters_of_chunks, shard, unshard
from folding.megatron.model import (MoERouting, build_model_chunks, build_optimizer,
                                    identity_placement, transformer_config, wrap_ddp)
from folding.mesh import FoldingSpec
from folding.recipe import ModelArch, TrainingSetup


def _draw_order(shapes: Dict[str, Tuple[int, ...]]) -> List[Tuple[str, Tuple[int, ...]]]:
    """The parameters in the order their initial values are drawn: registration order, except
    that each layer's query-key-value projection is drawn before its output projection. That
    was the first release's order; keeping it keeps a seed's starting point, and so every
    recorded loss, unchanged."""
    items = list(shapes.items())
    for i in range(len(items) - 1):
        if (items[i][0].endswith("self_attention.linear_proj.weight")
                and items[i + 1][0].endswith("self_attention.linear_qkv.weight")):
            items[i], items[i + 1] = items[i + 1], items[i]
    return items


def init_full_weights(arch: ModelArch, std: float, seed: int) -> Dict[str, torch.Tensor]:
    """Full-model weights drawn as Megatron initialises them: N(0, std) for weights, N(0,
    std / sqrt(2 L)) for the output projections of attention and MLPs, ones for norms.

    Drawing them once, in full, makes a run's starting point independent of its folding.
    """
    g = torch.Generator().manual_seed(seed)
    scaled = std / math.sqrt(2.0 * arch.num_layers)
    out = {}
    for name, shape in _draw_order(full_parameters(arch)):
        if name.endswith("layernorm.weight") or name.endswith("layer_norm_weight"):
            out[name] = torch.ones(shape)
        elif name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
            out[name] = torch.randn(shape, generator=g) * scaled
        else:
            out[name] = torch.randn(shape, generator=g) * std
    return out


def forward_step(data_iterator, model):
    """Megatron forward-step function: LM loss summed over tokens, with the token count."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output_tensor):
        losses = output_tensor.float().reshape(-1)
        total = losses.sum()
        count = torch.tensor(losses.numel(), dtype=torch.int, device=losses.device)
        return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}

    return output, loss_func


def _this_cp_rank_part(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This CP rank's chunks of a micro-batch, cut by Megatron's own batch split (0.19 added a
    required ``is_hybrid_cp`` argument)."""
    import inspect

    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    kwargs = {"cp_group": ps.get_context_parallel_group()}
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        kwargs["is_hybrid_cp"] = False
    return get_batch_on_this_cp_rank(dict(batch), **kwargs)


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy that shares no storage with ``tensor`` (one copy from a GPU)."""
    return tensor.detach().to("cpu", copy=True)


@dataclass
class StepResult:
    loss: float
    """Mean LM loss (nats per token) over the global batch."""
    grad_norm: Optional[float]
    """Global gradient norm before clipping, as Megatron's optimizer reports it."""
    grads: Optional[Dict[ShardKey, torch.Tensor]] = None
    """This rank's reduced gradients, when asked for."""


class RankTrainer:
    """Everything one rank needs to train a folded model with Megatron's own components."""

    def __init__(self, arch: ModelArch, training: TrainingSetup, spec: FoldingSpec,
                 routing: Optional[MoERouting] = None,
                 full_weights: Optional[Dict[str, torch.Tensor]] = None, placement=None):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from folding.megatron.groups import initialize
        from folding.run.device import rank_device

        self.arch, self.training, self.spec = arch, training, spec
        self.device = rank_device()
        self.routing = routing or MoERouting.from_training(training)
        self.rank = dist.get_rank()
        if not ps.model_parallel_is_initialized():
            initialize(spec)
        model_parallel_cuda_manual_seed(training.seed)
        self.config = transformer_config(arch, training, spec, self.routing)
        if self.routing.dispatcher == "folded" and placement is None:
            placement = identity_placement(arch, spec)
        self.placement = placement
        self.chunks = build_model_chunks(arch, training, spec, self.routing, self.config, placement)
        if full_weights is None:
            full_weights = init_full_weights(arch, training.init_method_std, training.seed)
        self.load_params(shard(full_weights, arch, spec, self.rank, placement))
        self.ddp = wrap_ddp(self.chunks, training.use_distributed_optimizer)
        self.optimizer = build_optimizer(self.ddp, training)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if training.lr_warmup_iters else training.lr,
            max_lr=training.lr, min_lr=training.min_lr,
            lr_warmup_steps=training.lr_warmup_iters,
            lr_decay_steps=max(training.train_iters, training.lr_warmup_iters + 1),
            lr_decay_style=training.lr_decay_style, start_wd=training.weight_decay,
            end_wd=training.weight_decay, wd_incr_steps=max(training.train_iters, 1),
            wd_incr_style="constant")
        self.config.finalize_model_grads_func = self._finalize_grads
        self._megatron_finalize = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.config.no_sync_func = ([d.no_sync for d in self.ddp] if len(self.ddp) > 1
                                    else self.ddp[0].no_sync)
        self.params = named_parameters_of_chunks(self.chunks)
        self.steps_done = 0
        self.traffic_steps: List[List[dict]] = []

    def _finalize_grads(self, *args, **kwargs):
        """Megatron's gradient reductions, then the sum over the replicas of each expert."""
        result = self._megatron_finalize(*args, **kwargs)
        if self.placement is not None:
            from folding.dispatcher.moe_layer import sum_replica_gradients

            sum_replica_gradients(self.chunks)
        return result

    # --------------------------------------------------------------------------- state
    def load_params(self, local: Dict[ShardKey, torch.Tensor]) -> None:
        params = named_parameters_of_chunks(self.chunks)
        missing = sorted(set(params) - set(local))
        if missing:
            raise FoldingError(f"rank {self.rank}: no weights for {missing[0][1]} (chunk {missing[0][0]})")
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(local[key])

    def param_shard(self) -> Dict[ShardKey, torch.Tensor]:
        return {k: _host_copy(p) for k, p in self.params.items()}

    def grad_shard(self) -> Dict[ShardKey, torch.Tensor]:
        """Reduced gradients (Megatron's main_grad) of this rank's parameters."""
        return {k: _host_copy(p.main_grad.float()) for k, p in self.params.items()}

    def _adam_states(self):
        """(shard key, Adam state dict) for every parameter this rank optimises."""
        key_of = {id(p): k for k, p in self.params.items()}
        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for opt in optimizers:
            if type(opt).__name__ != "FP32Optimizer":
                raise FoldingError(f"optimizer state moves only for fp32 training, not "
                                   f"{type(opt).__name__}")
            inner = opt.optimizer
            for group in inner.param_groups:
                for p in group["params"]:
                    yield key_of[id(p)], inner.state[p]

    def optimizer_shard(self) -> Dict[str, Dict[ShardKey, torch.Tensor]]:
        """Adam's moments of this rank's parameters, as shards."""
        out: Dict[str, Dict[ShardKey, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
        for key, state in self._adam_states():
            for field in out:
                if field in state:
                    out[field][key] = _host_copy(state[field])
        return out

    def adam_step(self) -> int:
        """Optimizer steps taken (0 before the first)."""
        steps = {int(state["step"]) for _, state in self._adam_states() if "step" in state}
        return steps.pop() if steps else 0

    def load_optimizer_shard(self, local: Dict[str, Dict[ShardKey, torch.Tensor]],
                             adam_step: int) -> None:
        if adam_step == 0:
            return  # nothing was stepped yet: a fresh optimizer is the saved state
        for key, state in self._adam_states():
            param = self.params[key]
            for field, values in local.items():
                state[field] = values[key].to(device=param.device, dtype=param.dtype,
                                              copy=True)
            # Adam keeps its step count as a float tensor; restore it in the same form.
            state["step"] = torch.tensor(float(adam_step))

    def _dispatchers(self):
        from folding.dispatcher.moe_layer import folded_moe_layers

        return [(layer.layer_number, layer.token_dispatcher)
                for layer in folded_moe_layers(self.chunks)]

    def traffic_report(self) -> Optional[List[dict]]:
        """What the folded dispatchers moved, per step and MoE layer, over all ranks (a
        collective: every rank calls it). None with Megatron's dispatchers."""
        import torch.distributed as dist

        from folding.dispatcher.counters import combine_ranks

        if self.routing.dispatcher != "folded":
            return None
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.traffic_steps)
        report = []
        for step in range(len(self.traffic_steps)):
            layers = sorted({layer for rank in gathered for layer in rank[step]})
            report.append({layer: combine_ranks([rank[step][layer] for rank in gathered
                                                 if layer in rank[step]])
                           for layer in layers})
        return report

    def full_state(self) -> Dict:
        """The full model and Adam moments, rebuilt from every rank (a collective)."""
        import torch.distributed as dist

        local = {"params": self.param_shard(), "optimizer": self.optimizer_shard()}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        model = unshard([g["params"] for g in gathered], self.arch, self.spec,
                        placement=self.placement)
        optimizer = {field: unshard([g["optimizer"][field] for g in gathered], self.arch,
                                    self.spec, placement=self.placement)
                     for field in ("exp_avg", "exp_avg_sq")}
        optimizer["step"] = self.adam_step()
        return {"model": model, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "step": self.steps_done}

    def restore(self, state: Dict) -> None:
        """Load Adam moments, step counts and scheduler of a full state into this trainer."""
        local = {field: shard(state["optimizer"][field], self.arch, self.spec, self.rank,
                              self.placement)
                 for field in ("exp_avg", "exp_avg_sq")}
        self.load_optimizer_shard(local, adam_step=state["optimizer"]["step"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_done = int(state["step"])

    def with_placement(self, placement) -> "RankTrainer":
        """The same model and optimizer state with experts moved to another placement (a
        collective). Returns a new trainer; this one is closed."""
        state = self.full_state()
        other = RankTrainer(self.arch, self.training, self.spec, self.routing,
                            full_weights=state["model"], placement=placement)
        other.restore(state)
        other.traffic_steps = self.traffic_steps
        self.close()
        return other

    def move_experts(self, placement) -> int:
        """Switch to ``placement`` in place, between steps (a collective over each EP group):
        every slot whose expert changes receives that expert's parameters and Adam moments from
        a slot holding it now, over one all-to-all of the EP group (a copy when the source is on
        the same rank); the layers then dispatch by the new placement. Unlike
        ``with_placement`` nothing else is rebuilt or gathered. Returns the slots this rank
        received."""
        from folding.dispatcher.moe_layer import folded_moe_layers
        from folding.run.replacement import exchange_slots, transfer_plans

        layers = folded_moe_layers(self.chunks)
        if not layers:
            self.placement = placement
            return 0
        state = {id(self.params[key]): s for key, s in self._adam_states()}
        stepped = self.adam_step() > 0

        def pieces(layer, slot: int) -> List[torch.Tensor]:
            out = []
            for p in layer.experts.local_experts[slot].parameters():
                out.append(p.data)
                if stepped:
                    out += [state[id(p)]["exp_avg"], state[id(p)]["exp_avg_sq"]]
            return out

        # torch.cat copies: every source is read out before anything is written.
        arrivals = exchange_slots(
            transfer_plans(layers, self.placement, placement), layers[0].ep_group,
            layers[0].slots_per_rank,
            lambda index, slot: torch.cat([t.reshape(-1) for t in pieces(layers[index], slot)]),
            sum(t.numel() for t in pieces(layers[0], 0)),
            next(layers[0].experts.local_experts[0].parameters()).dtype, self.device)
        with torch.no_grad():
            for (index, slot), flat in arrivals:
                targets = pieces(layers[index], slot)
                for target, value in zip(targets, flat.split([t.numel() for t in targets])):
                    target.copy_(value.view_as(target))
        for layer in layers:
            layer.set_placement(placement)
        self.placement = placement
        return len(arrivals)

    def close(self) -> None:
        """Let go of the model, Megatron's DDP and optimizer, and the process groups they hold.

        Once a backward pass has run, autograd's gradient accumulators (C++ objects the garbage
        collector cannot see into) keep each DDP wrapper alive through the gradient hooks it
        registered on them, and DDP holds the model, its buffers and every process group. A
        process that builds trainers in turn (the checker, the memory measurements) would keep
        them all, and their gloo threads, whose idle polling slowed every later case. Emptying
        the wrappers breaks the chain. Megatron's rotary embedding memoises ``forward`` with a
        class-level ``lru_cache`` whose keys hold the module, and with it the context-parallel
        group it keeps; the model's memoised methods are cleared for that reason. The trainer
        cannot be used afterwards.
        """
        for chunk in self.chunks or []:
            for module in chunk.modules():
                for attribute in vars(type(module)).values():
                    if hasattr(attribute, "cache_clear"):
                        attribute.cache_clear()
        for wrapper in self.ddp or []:
            vars(wrapper).clear()
        if self.config is not None:
            self.config.finalize_model_grads_func = None
            self.config.no_sync_func = None
            self.config.grad_scale_func = None
        self.ddp = self.chunks = self.optimizer = self.scheduler = self.config = None
        self.params = {}

    # --------------------------------------------------------------------------- steps
    def step(self, micro_batches: List[Dict[str, torch.Tensor]], keep_grads: bool = False) -> StepResult:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for d in self.ddp:
            d.zero_grad_buffer()
        self.optimizer.zero_grad()
        dispatchers = self._dispatchers() if self.routing.dispatcher == "folded" else []
        for _, dispatcher in dispatchers:
            dispatcher.counters.reset()
        # Megatron's schedules take the whole sequence's length and divide it by CP themselves.
        seq_length = micro_batches[0]["tokens"].shape[1]
        if self.spec.cp > 1:
            micro_batches = [_this_cp_rank_part(b) for b in micro_batches]
        iterators = ([iter(micro_batches) for _ in self.ddp] if len(self.ddp) > 1
                     else iter(micro_batches))
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators,
            model=self.ddp if len(self.ddp) > 1 else self.ddp[0],
            num_microbatches=len(micro_batches), seq_length=seq_length,
            micro_batch_size=micro_batches[0]["tokens"].shape[0], forward_only=False)
        grads = self.grad_shard() if keep_grads else None
        if dispatchers:
            self.traffic_steps.append({layer: d.counters.summary() for layer, d in dispatchers})
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.steps_done += 1
        return StepResult(self._global_loss(losses), grad_norm, grads)

    def _global_loss(self, losses) -> float:
        """Mean LM loss over the global batch, identical on every rank."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        # On the rank's device: NCCL reduces GPU tensors only.
        local = torch.zeros(2, dtype=torch.float64, device=self.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
            for item in losses:
                total, count = item["lm loss"].double()
                local[0] += total / count
                local[1] += 1
        # Each micro-batch's mean is counted once per TP x CP rank of the last stage.
        dist.all_reduce(local)
        return float(local[0] / local[1])
