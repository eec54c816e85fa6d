"""Collect routing decisions during training and write them as a routing trace.

``TraceRecorder`` receives, for each MoE layer and each forward pass, the top-k expert ids of
the tokens that went through the router ([T, k], numpy or torch), or Megatron's boolean routing
map ([T, E]) with its probabilities. Tokens of one forward pass reach every layer in the same
order, so the i-th recorded token of every layer is the same token; the trace keeps the tokens
that all layers recorded. Recording stops at ``max_tokens`` (``folding train --trace-tokens``).
This module has no Megatron dependency: a router hook only calls ``record`` or
``record_routing_map``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

import numpy as np

from folding.errors import FoldingError
from folding.placement.trace import RoutingTrace


def to_numpy(array) -> np.ndarray:
    """A numpy view of a numpy array or a (possibly GPU) torch tensor."""
    if hasattr(array, "detach"):
        array = array.detach()
        if getattr(array, "dtype", None) is not None and str(array.dtype) == "torch.bfloat16":
            array = array.float()
        array = array.cpu().numpy()
    return np.asarray(array)


class TraceRecorder:
    """Accumulates per-layer top-k ids; ``trace()`` or ``save(path)`` produce the trace."""

    def __init__(self, num_experts: int, num_layers: int, max_tokens: Optional[int] = None):
        if num_experts < 1 or num_layers < 1:
            raise FoldingError("a trace recorder needs at least one expert and one layer")
        if max_tokens is not None and max_tokens < 1:
            raise FoldingError(f"--trace-tokens must be positive, not {max_tokens}")
        self.num_experts = num_experts
        self.num_layers = num_layers
        self.max_tokens = max_tokens
        self._topk: List[List[np.ndarray]] = [[] for _ in range(num_layers)]
        self._probs: List[List[np.ndarray]] = [[] for _ in range(num_layers)]
        self._recorded = np.zeros(num_layers, dtype=np.int64)
        self._top_k: Optional[int] = None
        self._with_probs: Optional[bool] = None

    @property
    def tokens_recorded(self) -> int:
        """Tokens that every layer has recorded: the length of the trace so far."""
        return int(self._recorded.min())

    @property
    def full(self) -> bool:
        """True once every layer holds ``max_tokens`` tokens; later calls are ignored."""
        return self.max_tokens is not None and self.tokens_recorded >= self.max_tokens

    def record(self, layer: int, topk_ids, probs=None) -> None:
        """Append the [T, k] expert ids (and optional [T, k] weights) of one layer's tokens."""
        if not 0 <= layer < self.num_layers:
            raise FoldingError(f"layer {layer} is outside [0, {self.num_layers})")
        ids = to_numpy(topk_ids)
        if ids.ndim != 2:
            raise FoldingError(f"layer {layer}: top-k ids have shape {ids.shape}, expected [tokens, k]")
        if self._top_k is None:
            self._top_k = ids.shape[1]
        if ids.shape[1] != self._top_k:
            raise FoldingError(f"layer {layer}: top-k width {ids.shape[1]} differs from the "
                               f"{self._top_k} recorded before")
        with_probs = probs is not None
        if self._with_probs is None:
            self._with_probs = with_probs
        if with_probs != self._with_probs:
            raise FoldingError(f"layer {layer}: probabilities must be recorded for every call or none")
        room = ids.shape[0] if self.max_tokens is None else max(self.max_tokens - int(self._recorded[layer]), 0)
        take = min(room, ids.shape[0])
        if take == 0:
            return
        if ((ids[:take] < 0) | (ids[:take] >= self.num_experts)).any():
            raise FoldingError(f"layer {layer}: expert ids outside [0, {self.num_experts})")
        self._topk[layer].append(ids[:take].astype(np.int32, copy=True))
        if with_probs:
            weights = to_numpy(probs)
            if weights.shape != ids.shape:
                raise FoldingError(f"layer {layer}: probs have shape {weights.shape}, ids {ids.shape}")
            self._probs[layer].append(weights[:take].astype(np.float32, copy=True))
        self._recorded[layer] += take

    def record_routing_map(self, layer: int, routing_map, probs=None) -> None:
        """Record Megatron's router output: a boolean [T, E] map with k experts per token and,
        optionally, the [T, E] probabilities; ids are stored highest probability first."""
        mask = to_numpy(routing_map).astype(bool)
        if mask.ndim != 2 or mask.shape[1] != self.num_experts:
            raise FoldingError(f"layer {layer}: routing map has shape {mask.shape}, expected "
                               f"[tokens, {self.num_experts}]")
        per_token = mask.sum(axis=1)
        if per_token.size and (per_token != per_token[0]).any():
            raise FoldingError(f"layer {layer}: tokens route to different numbers of experts "
                               f"({int(per_token.min())} to {int(per_token.max())}); dropped tokens "
                               f"cannot be recorded")
        k = int(per_token[0]) if per_token.size else 0
        weights = None if probs is None else to_numpy(probs).astype(np.float32)
        # Chosen experts first, ordered by weight (or by id without weights).
        key = np.where(mask, -weights if weights is not None else 0.0, np.inf)
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        self.record(layer, order, None if weights is None else np.take_along_axis(weights, order, axis=1))

    def trace(self) -> RoutingTrace:
        """The tokens recorded by every layer, as a validated trace."""
        empty = np.flatnonzero(self._recorded == 0)
        if empty.size:
            raise FoldingError(f"layer {int(empty[0])} recorded no tokens")
        tokens = self.tokens_recorded
        topk = np.stack([np.concatenate(chunks)[:tokens] for chunks in self._topk])
        probs = (np.stack([np.concatenate(chunks)[:tokens] for chunks in self._probs])
                 if self._with_probs else None)
        return RoutingTrace(topk, self.num_experts, probs)

    def save(self, path: Union[str, Path]) -> RoutingTrace:
        """Write the trace to ``path`` (.npz) and return it."""
        trace = self.trace()
        trace.save(path)
        return trace
