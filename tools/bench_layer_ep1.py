#!/usr/bin/env python3
"""Benchmark (not a test): one MoE layer at EP1, folded dispatcher against Megatron's alltoall.

With EP1 nothing is communicated, so all of a dispatcher's overhead shows: planning, host waits,
permutations, sums. One process, one device. The layer has hidden 1024, 64 SwiGLU experts of
ffn 512, top-8, 8192 tokens (``--tokens``), in bf16 on a GPU (fp32 on the CPU), routing forced
to the same top-8 for both. It prints the median forward + backward time of each dispatcher
(alternating, ``--repeats``), their ratio, and on a GPU the synchronisations each one makes, as
``torch.cuda.set_sync_debug_mode("warn")`` reports them. Last line: one JSON object.

    python tools/bench_layer_ep1.py [--device auto|cpu|cuda] [--tokens 8192] [--repeats 20]

tools/gpu_check.sh runs it on a GPU host (targets: time ratio <= 1.1, syncs equal).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def _setup(device: str):
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29731")
    if device == "cuda":
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1)
    else:
        from folding.megatron.cpu_runtime import enable

        dist.init_process_group("gloo", rank=0, world_size=1)
        enable()


def _layers(device: str, tokens: int):
    from folding.megatron.groups import initialize
    from folding.megatron.model import MoERouting
    from folding.recipe import load_recipe
    from folding.testing.dispatcher_harness import build_layer, copy_weights, forced_routing

    recipe = load_recipe("tiny-moe", world_size=1, tp=1, ep=1)
    model = dataclasses.replace(recipe.model, hidden_size=1024, num_attention_heads=8,
                                num_query_groups=8, num_experts=64, moe_router_topk=8,
                                moe_ffn_hidden_size=512)
    training = dataclasses.replace(recipe.training,
                                   precision="bf16" if device == "cuda" else "fp32")
    recipe = dataclasses.replace(recipe, model=model, training=training)
    initialize(recipe.folding)
    megatron = build_layer(recipe.model, recipe.training, recipe.folding, MoERouting())
    folded = build_layer(recipe.model, recipe.training, recipe.folding,
                         MoERouting(dispatcher="folded"))
    copy_weights(megatron, folded)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, 64, generator=g)
    ids = logits.topk(8, dim=1).indices
    for layer in (megatron, folded):
        forced_routing(layer, ids, logits, MoERouting())
        probs, routing_map = layer.route(None)
        moved = (probs.to(device), routing_map.to(device))
        layer.route = (lambda m: lambda hidden_states, padding_mask=None: m)(moved)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = torch.randn(tokens, 1, 1024, generator=g).to(device, dtype)
    return {"megatron": megatron.to(device), "folded": folded.to(device)}, hidden


def _step(layer, hidden, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    x = hidden.detach().requires_grad_(True)
    out, _ = layer(x)
    out.float().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _syncs(layer, hidden) -> int:
    """Synchronisations of one forward + backward, as CUDA's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            x = hidden.detach().requires_grad_(True)
            out, _ = layer(x)
            out.float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_layer_ep1.py: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    _setup(device)
    layers, hidden = _layers(device, args.tokens)
    for layer in layers.values():  # warm-up: kernels, allocator, one-time copies
        _step(layer, hidden, device)
    times = {name: [] for name in layers}
    for _ in range(args.repeats):
        for name, layer in layers.items():
            times[name].append(_step(layer, hidden, device))
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"device": device, "tokens": args.tokens, "experts": 64, "topk": 8,
              "megatron_s": medians["megatron"], "folded_s": medians["folded"],
              "time_ratio": medians["folded"] / medians["megatron"]}
    if device == "cuda":
        result["syncs"] = {name: _syncs(layer, hidden) for name, layer in layers.items()}
    print(f"one MoE layer, EP1, {args.tokens} tokens, 64 experts, top-8, on {device}: "
          f"Megatron alltoall {1e3 * medians['megatron']:.2f} ms, folded {1e3 * medians['folded']:.2f} ms, "
          f"ratio {result['time_ratio']:.2f} (target <= 1.1)")
    if "syncs" in result:
        print(f"synchronisations per forward + backward: Megatron {result['syncs']['megatron']}, "
              f"folded {result['syncs']['folded']} (target: equal)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
