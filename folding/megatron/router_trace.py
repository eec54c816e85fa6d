"""Record routing traces from Megatron's router during training (``folding train --trace-out``).

The hook records, for every MoE layer and every token a rank routes, the router's top-k expert
choice before capacity dropping (so a trace shows what tokens asked for, also in runs that drop).
Ranks route disjoint token streams, one per (DP, TP, CP) position of the attention mesh; the
stages of a pipeline see the same stream for their own layers. ``write`` gathers every rank's
records, joins the layers of each stream across pipeline stages so that token t is the same
token in every layer, and writes the trace through ``folding.placement.recorder``.

Choices stay on the device the router ran on until ``write``: on a GPU a copy to the host in
every router call would wait for the GPU each time, in the middle of the forward pass.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch

StreamKey = Tuple[int, int, int]


class RouterTraceHook:
    """Installed on one rank's model; ``write`` is a collective."""

    def __init__(self, trainer, max_tokens: int):
        self.max_tokens = max_tokens
        self.spec = trainer.spec
        arch = trainer.arch
        self.ordinal = arch.moe_ordinals()
        self.num_experts = arch.num_experts
        self.topk = arch.moe_router_topk
        self.records: Dict[int, List[torch.Tensor]] = {}
        self.counts: Dict[int, int] = {}
        coords = trainer.spec.coordinates(trainer.rank)["attention"]
        self.stream: StreamKey = (coords["dp"], coords["tp"], coords["cp"])
        self._install()

    def _install(self) -> None:
        from folding.megatron.router_hooks import RouterPatch

        def make_topk(original, current_layer):
            def topk(*args, **kwargs):
                probs, routing_map = original(*args, **kwargs)
                if torch.is_grad_enabled():  # training forward passes only
                    self._record(current_layer(), routing_map, probs)
                return probs, routing_map
            return topk

        self._patch = RouterPatch("topk_routing_with_score_function", make_topk)

    def remove(self) -> None:
        self._patch.remove()

    def _record(self, layer_number: int, routing_map: torch.Tensor, probs: torch.Tensor) -> None:
        layer = self.ordinal[layer_number]
        room = self.max_tokens - self.counts.get(layer, 0)
        if room <= 0:
            return
        mask = routing_map[:room].detach()
        weights = probs[:room].detach().float()
        # The chosen experts of each token, highest weight first. Every token has top-k of them
        # before dropping; k comes from the model, as reading it off the mask would wait for
        # the device.
        key = torch.where(mask, -weights, torch.full_like(weights, float("inf")))
        ids = torch.argsort(key, dim=1, stable=True)[:, :self.topk].to(torch.int32)
        self.records.setdefault(layer, []).append(ids)
        self.counts[layer] = self.counts.get(layer, 0) + ids.shape[0]

    def write(self, path: str) -> int:
        """Gather from every rank and write the trace on rank 0; returns its token count."""
        import torch.distributed as dist

        from folding.placement.recorder import TraceRecorder

        local = {layer: torch.cat(chunks).cpu().numpy()
                 for layer, chunks in self.records.items()}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.stream, local))
        tokens = 0
        if dist.get_rank() == 0:
            streams: Dict[StreamKey, Dict[int, np.ndarray]] = {}
            for stream, layers in gathered:
                streams.setdefault(stream, {}).update(layers)
            recorder = TraceRecorder(self.num_experts, len(self.ordinal), self.max_tokens)
            for stream in sorted(streams):
                layers = streams[stream]
                usable = min(len(ids) for ids in layers.values())
                for layer in range(len(self.ordinal)):
                    recorder.record(layer, layers[layer][:usable])
            tokens = recorder.save(path).num_tokens
        dist.barrier()
        return tokens
