"""Routing traces: the .npz file format, its validation, and the statistics placements need.

A trace is an .npz file with ``topk`` int32 [L, T, k] (the expert ids token t picked at MoE
layer l; the same token index across layers, column 0 the top-1 expert), optional ``probs``
float32 [L, T, k] (the router's weights for those experts) and ``num_experts`` (a scalar).
``load_trace`` refuses malformed files with one line naming the problem.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from folding.errors import FoldingError


@dataclass(eq=False)
class RoutingTrace:
    """Expert ids chosen by every token at every MoE layer."""

    topk: np.ndarray
    """int32 [L, T, k]: expert ids of token t at MoE layer l, top-1 first."""
    num_experts: int
    """Experts per MoE layer (E)."""
    probs: Optional[np.ndarray] = None
    """float32 [L, T, k] or None: router weights of the chosen experts."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_layers(self) -> int:
        return self.topk.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.topk.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk.shape[2]

    # ------------------------------------------------------------------------------ checks
    def validate(self, source: str = "trace") -> "RoutingTrace":
        """Check shapes, ranges and distinctness; raises FoldingError naming the problem."""
        E = self.num_experts
        if isinstance(E, bool) or not isinstance(E, (int, np.integer)) or E < 1:
            raise FoldingError(f"{source}: num_experts must be a positive integer, not {E!r}")
        self.num_experts = int(E)
        topk = np.asarray(self.topk)
        if topk.ndim != 3:
            raise FoldingError(f"{source}: topk has shape {topk.shape} but must be [layers, tokens, k]")
        if not np.issubdtype(topk.dtype, np.integer):
            raise FoldingError(f"{source}: topk must hold integer expert ids, not {topk.dtype}")
        L, T, k = topk.shape
        if L == 0 or T == 0 or k == 0:
            raise FoldingError(f"{source}: topk has shape {topk.shape}: no layers, tokens or experts")
        if k > E:
            raise FoldingError(f"{source}: top-k={k} is larger than num_experts={E}")
        bad = (topk < 0) | (topk >= E)
        if bad.any():
            l, t, j = map(int, np.argwhere(bad)[0])
            raise FoldingError(f"{source}: layer {l}, token {t} picks expert {int(topk[l, t, j])}, "
                               f"outside [0, {E})")
        if k > 1:
            ordered = np.sort(topk, axis=2)
            repeated = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2)
            if repeated.any():
                l, t = map(int, np.argwhere(repeated)[0])
                raise FoldingError(f"{source}: layer {l}, token {t} repeats an expert in its top-k "
                                   f"{topk[l, t].tolist()}")
        self.topk = topk.astype(np.int32, copy=False)
        if self.probs is not None:
            probs = np.asarray(self.probs)
            if probs.shape != topk.shape:
                raise FoldingError(f"{source}: probs has shape {probs.shape} but topk has {topk.shape}")
            if not np.issubdtype(probs.dtype, np.floating) or not np.isfinite(probs).all():
                raise FoldingError(f"{source}: probs must be finite floating-point weights")
            self.probs = probs.astype(np.float32, copy=False)
        return self

    # ------------------------------------------------------------------------------ file I/O
    def save(self, path: Union[str, Path]) -> None:
        arrays = {"topk": self.topk.astype(np.int32), "num_experts": np.int64(self.num_experts)}
        if self.probs is not None:
            arrays["probs"] = self.probs.astype(np.float32)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    # ------------------------------------------------------------------------------ slices
    def tokens(self, selection) -> "RoutingTrace":
        """The trace restricted to some tokens (a slice or an index array), every layer kept."""
        probs = None if self.probs is None else self.probs[:, selection]
        return RoutingTrace(self.topk[:, selection], self.num_experts, probs)

    def split(self, fraction: float = 0.5) -> Tuple["RoutingTrace", "RoutingTrace"]:
        """First ``fraction`` of the tokens and the rest: fit on one, score on the other."""
        cut = int(round(self.num_tokens * fraction))
        if not 0 < cut < self.num_tokens:
            raise FoldingError(f"cannot split {self.num_tokens} tokens at fraction {fraction}")
        return self.tokens(slice(0, cut)), self.tokens(slice(cut, None))

    # ------------------------------------------------------------------------------ statistics
    def expert_counts(self) -> np.ndarray:
        """int64 [L, E]: (token, expert) pairs per expert, per layer."""
        E, L = self.num_experts, self.num_layers
        flat = (self.topk.astype(np.int64) + E * np.arange(L)[:, None, None]).ravel()
        return np.bincount(flat, minlength=L * E).reshape(L, E)

    def coactivation(self, layer: int) -> np.ndarray:
        """float64 [E, E]: tokens that picked both experts i and j at ``layer`` (zero diagonal)."""
        E, k = self.num_experts, self.top_k
        ids = self.topk[layer].astype(np.int64)
        if k < 2:
            return np.zeros((E, E))
        first, second = np.triu_indices(k, 1)
        pairs = (ids[:, first] * E + ids[:, second]).ravel()
        counts = np.bincount(pairs, minlength=E * E).reshape(E, E).astype(np.float64)
        return counts + counts.T

    def top1_transitions(self) -> np.ndarray:
        """float64 [L-1, E, E]: tokens whose top-1 expert is i at layer l and j at layer l+1."""
        E, L = self.num_experts, self.num_layers
        if L < 2:
            return np.zeros((0, E, E))
        top1 = self.topk[:, :, 0].astype(np.int64)
        index = (np.arange(L - 1)[:, None] * E + top1[:-1]) * E + top1[1:]
        return np.bincount(index.ravel(), minlength=(L - 1) * E * E).reshape(L - 1, E, E).astype(np.float64)


def load_trace(path: Union[str, Path]) -> RoutingTrace:
    """Read and validate a routing trace (.npz)."""
    path = Path(path)
    if not path.is_file():
        raise FoldingError(f"trace {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):
            raise FoldingError(f"{path} is a single array, not an .npz trace with 'topk' and 'num_experts'")
        with data:
            arrays = {name: data[name] for name in data.files}
    except FoldingError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise FoldingError(f"{path} is not a readable .npz trace: {e}") from None
    for key in ("topk", "num_experts"):
        if key not in arrays:
            raise FoldingError(f"{path}: missing key {key!r} (has {', '.join(sorted(arrays)) or 'nothing'})")
    num_experts = arrays["num_experts"]
    if num_experts.shape != () or not np.issubdtype(num_experts.dtype, np.integer):
        raise FoldingError(f"{path}: num_experts must be an integer scalar, not {num_experts.dtype} "
                           f"of shape {num_experts.shape}")
    trace = RoutingTrace.__new__(RoutingTrace)
    trace.topk, trace.num_experts, trace.probs = arrays["topk"], int(num_experts), arrays.get("probs")
    return trace.validate(source=str(path))
