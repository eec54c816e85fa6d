"""Synthetic routing traces with controllable popularity skew, co-activation and affinity.

Each layer gives its experts "roles" 0..E-1 through a random permutation (the structure seed).
Role i has popularity (i+1)^-skew, and belongs to group i mod (E/group_size), so every group
mixes hot and cold roles. A token's top-1 role at layer 0 follows popularity; at each later
layer it follows the layer's chain (role i goes to role chain_l(i), a random permutation, so hot
and cold roles mix along chains) with probability ``affinity`` and is drawn afresh otherwise. Each of
its other k-1 experts comes, with probability ``coactivation``, from the top-1 role's group and
otherwise from the whole layer by popularity. ``drift`` reassigns the roles of that share of the
experts in every layer (with ``drift_seed``), which models routing that changes during training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from folding.errors import FoldingError
from folding.placement.trace import RoutingTrace


@dataclass(frozen=True)
class SynthSpec:
    """Parameters of a synthetic trace."""

    num_experts: int
    num_layers: int
    num_tokens: int
    top_k: int
    skew: float = 0.5
    """Zipf exponent of expert popularity (0: uniform)."""
    coactivation: float = 0.0
    """Probability that each non-top-1 expert comes from the top-1 expert's group."""
    group_size: int = 8
    """Experts per co-activation group; must divide num_experts."""
    affinity: float = 0.0
    """Probability that a token's top-1 role follows the chain from one layer to the next."""
    drift: float = 0.0
    """Share of experts per layer whose roles are reassigned."""
    seed: int = 0
    """Seed of the structure (roles, groups)."""
    token_seed: int = 1
    """Seed of the token draws."""
    drift_seed: int = 2
    """Seed of the drift."""

    def check(self) -> None:
        E, k, g = self.num_experts, self.top_k, self.group_size
        for name in ("num_experts", "num_layers", "num_tokens", "top_k", "group_size"):
            if getattr(self, name) < 1:
                raise FoldingError(f"{name}={getattr(self, name)} must be a positive integer")
        if k > E:
            raise FoldingError(f"top-k={k} is larger than num_experts={E}")
        if E % g:
            raise FoldingError(f"group size {g} does not divide num_experts={E}")
        for name in ("coactivation", "affinity", "drift"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FoldingError(f"{name}={getattr(self, name)} must lie in [0, 1]")
        if self.skew < 0:
            raise FoldingError(f"skew={self.skew} must be >= 0")


def structure(spec: SynthSpec):
    """(roles, chains): int64 [L, E] the expert that plays role i at layer l, drift applied, and
    int64 [L, E] the role that role i leads to at layer l+1."""
    rng = np.random.default_rng(spec.seed)
    roles = np.stack([rng.permutation(spec.num_experts) for _ in range(spec.num_layers)])
    chains = np.stack([rng.permutation(spec.num_experts) for _ in range(spec.num_layers)])
    moved = int(round(spec.drift * spec.num_experts))
    if moved >= 2:
        drift = np.random.default_rng(spec.drift_seed)
        for layer in range(spec.num_layers):
            chosen = drift.choice(spec.num_experts, moved, replace=False)
            # A cyclic shift of the chosen roles moves every chosen expert to another role.
            roles[layer, chosen] = roles[layer, np.roll(chosen, 1)]
    return roles, chains


def synthesize(spec: SynthSpec, progress: bool = False) -> RoutingTrace:
    """Draw a trace following ``spec`` (see the module docstring)."""
    from tqdm import tqdm

    spec.check()
    E, L, T, k, g = spec.num_experts, spec.num_layers, spec.num_tokens, spec.top_k, spec.group_size
    rng = np.random.default_rng(spec.token_seed)
    roles_to_experts, chains = structure(spec)
    popularity = (np.arange(E) + 1.0) ** -spec.skew
    popularity /= popularity.sum()
    cumulative = np.cumsum(popularity)
    log_popularity = np.log(popularity)
    num_groups = E // g
    # members[r] = the roles in role r's group, in role order.
    members = (np.arange(E) % num_groups)[:, None] + num_groups * np.arange(g)[None, :]

    def draw_roles(n):
        return np.minimum(np.searchsorted(cumulative, rng.random(n), side="right"), E - 1)

    topk = np.empty((L, T, k), dtype=np.int32)
    top1 = draw_roles(T)
    for layer in tqdm(range(L), desc="synthesising layers", disable=not progress, leave=False):
        if layer:
            redraw = rng.random(T) >= spec.affinity
            top1 = np.where(redraw, draw_roles(T), chains[layer - 1][top1])
        chosen = np.full((T, k), -1, dtype=np.int64)
        chosen[:, 0] = top1
        if k > 1:
            # Group members without replacement, weighted by popularity (Gumbel top-k).
            candidates = members[top1]
            keys = log_popularity[candidates] + rng.gumbel(size=candidates.shape)
            keys[candidates == top1[:, None]] = -np.inf
            ranked = np.take_along_axis(candidates, np.argsort(-keys, axis=1), axis=1)[:, :g - 1]
            from_group = np.minimum(rng.binomial(k - 1, spec.coactivation, size=T), g - 1)
            for column in range(1, k):
                use_group = from_group >= column
                if column - 1 < ranked.shape[1]:
                    chosen[use_group, column] = ranked[use_group, column - 1]
            for column in range(1, k):
                pending = np.flatnonzero(chosen[:, column] < 0)
                while pending.size:
                    candidate = draw_roles(pending.size)
                    clash = (chosen[pending] == candidate[:, None]).any(axis=1)
                    chosen[pending[~clash], column] = candidate[~clash]
                    pending = pending[clash]
        topk[layer] = roles_to_experts[layer][chosen]
    return RoutingTrace(topk, E)
