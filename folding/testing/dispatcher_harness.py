"""One MoE layer, two dispatchers, identical inputs: the side-by-side harness.

Builds Megatron's MoE layer twice on an initialised folding, once with Megatron's alltoall
dispatcher and once with the folded dispatcher, with the same weights. Routing can be the
router's own, or forced from given top-k expert ids (to control skew, or to send every token to
one rank); forced routing goes through Megatron's token-dropping rule when a capacity factor is
set, as the router would. Used by the equivalence tests and by tools/bench_dispatch.py.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, List

import torch

from folding.megatron.model import (MoERouting, gpt_layer_spec, identity_placement,
                                    transformer_config)
from folding.mesh import FoldingSpec
from folding.recipe import ModelArch, TrainingSetup


def build_layer(arch: ModelArch, training: TrainingSetup, spec: FoldingSpec, routing: MoERouting,
                placement=None, seed: int = 0):
    """A Megatron MoE layer (layer 1) for this rank, with weights drawn from ``seed``."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    config = transformer_config(arch, training, spec, routing)
    layer_spec = gpt_layer_spec(arch, folded=routing.dispatcher == "folded")
    if routing.dispatcher == "folded":
        from folding.dispatcher.moe_layer import folded_layer_spec

        placement = placement or identity_placement(arch, spec)
        layer_spec = folded_layer_spec(layer_spec, placement, {1: 0}, spec.gpus_per_node,
                                       node_dedup=routing.node_dedup)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    mlp = layer_spec.submodules.mlp
    # megatron-core 0.16 describes the MoE layer with a ModuleSpec, 0.19 with a partial.
    layer = build_module(mlp, config=config) if isinstance(mlp, ModuleSpec) else mlp(config=config)
    layer.set_layer_number(1)
    return layer


def copy_weights(source, target) -> None:
    """Same parameters, same order (identity placement): copy every tensor."""
    with torch.no_grad():
        for (name, a), (_, b) in zip(source.named_parameters(), target.named_parameters()):
            b.copy_(a)


def forced_routing(layer, topk_ids: torch.Tensor, logits: torch.Tensor, routing: MoERouting):
    """Make ``layer`` route tokens to ``topk_ids`` [T, k] with softmax weights of ``logits``,
    applying Megatron's capacity rule when the routing drops tokens."""
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    experts = logits.shape[1]
    chosen = torch.gather(logits, 1, topk_ids)
    weights = torch.softmax(chosen, dim=1)
    probs = torch.zeros(logits.shape[0], experts).scatter(1, topk_ids, weights)
    routing_map = torch.zeros(logits.shape[0], experts, dtype=torch.bool).scatter(1, topk_ids, True)
    if routing.capacity_factor is not None:
        probs, routing_map = apply_router_token_dropping(
            probs, routing_map, topk_ids.shape[1], routing.capacity_factor,
            routing.drop_policy, routing.pad_to_capacity)
    layer.route = lambda hidden_states, padding_mask=None: (probs, routing_map)


@dataclass
class LayerRun:
    output: torch.Tensor
    input_grad: torch.Tensor
    expert_grads: list
    dispatch_combine_s: float


def run_layer(layer, hidden: torch.Tensor, grad_output: torch.Tensor) -> LayerRun:
    """Forward and backward of the layer; times dispatch + combine (the dispatcher's hooks)."""
    dispatcher = layer.token_dispatcher
    timed = {"s": 0.0}
    hooks = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "combine_preprocess",
             "token_combine", "combine_postprocess")
    originals = {h: getattr(dispatcher, h) for h in hooks}

    # On a GPU the hooks only queue work: wait for it on both sides of each, or the clock
    # measures launches.
    sync = torch.cuda.synchronize if hidden.is_cuda else (lambda: None)

    def timer(fn):
        def wrapped(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            timed["s"] += time.perf_counter() - start
            return out
        return wrapped

    for h in hooks:
        setattr(dispatcher, h, timer(originals[h]))
    try:
        x = hidden.clone().requires_grad_(True)
        out, _ = layer(x)
        out.backward(grad_output)
    finally:
        for h in hooks:
            setattr(dispatcher, h, originals[h])
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for p in layer.experts.parameters()]
    layer.zero_grad(set_to_none=True)
    return LayerRun(out.detach(), x.grad.detach(), grads, timed["s"])


@contextlib.contextmanager
def counting_peer_exchanges() -> Iterator[List[int]]:
    """The batches of point-to-point operations posted inside the block (a relay's hops), as a
    list of their sizes: one entry per synchronized exchange."""
    import torch.distributed as dist

    batches: List[int] = []
    original = dist.batch_isend_irecv

    def counted(ops):
        batches.append(len(ops))
        return original(ops)

    dist.batch_isend_irecv = counted
    try:
        yield batches
    finally:
        dist.batch_isend_irecv = original
