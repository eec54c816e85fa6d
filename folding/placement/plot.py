"""Draw a placement: per-rank load next to a reference, and the co-activation matrix with the
experts in placement order (ranks as blocks on the diagonal)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from folding.errors import FoldingError
from folding.placement.metrics import rank_loads
from folding.placement.placement import Placement
from folding.placement.trace import RoutingTrace

MAX_EXPERTS_DRAWN = 1024


def placement_order(placement: Placement, layer: int) -> np.ndarray:
    """The experts of ``layer`` in slot order, each at its first replica."""
    row = placement.layers[layer]
    _, first = np.unique(row, return_index=True)
    return row[np.sort(first)]


def ordered_coactivation(placement: Placement, trace: RoutingTrace) -> np.ndarray:
    """[E, E]: co-activation summed over layers, each layer's experts in placement order."""
    total = np.zeros((trace.num_experts, trace.num_experts))
    for layer in range(trace.num_layers):
        order = placement_order(placement, layer)
        total += trace.coactivation(layer)[np.ix_(order, order)]
    return total


def draw_placement(placement: Placement, trace: RoutingTrace, path: str, title: str = "placement",
                   reference: Optional[Placement] = None, reference_title: str = "contiguous") -> None:
    """Write a PNG with the per-rank load (mean over layers) and the ordered co-activation."""
    if trace.num_experts > MAX_EXPERTS_DRAWN:
        raise FoldingError(f"--png draws at most {MAX_EXPERTS_DRAWN} experts ({trace.num_experts} given)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = trace.expert_counts()
    loads = rank_loads(placement, counts).mean(axis=0)
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    ranks = np.arange(placement.ep_size)
    if reference is not None:
        left.bar(ranks, rank_loads(reference, counts).mean(axis=0), color="0.8", label=reference_title)
    left.bar(ranks, loads, width=0.5, color="tab:blue", label=title)
    left.axhline(loads.mean(), color="black", linewidth=0.8, linestyle="--", label="mean")
    left.set_xlabel("EP rank")
    left.set_ylabel("(token, expert) pairs per layer")
    left.set_title("Load per rank (mean over layers)")
    left.legend(loc="upper right")
    matrix = ordered_coactivation(placement, trace)
    right.imshow(np.log1p(matrix), cmap="viridis", interpolation="nearest")
    experts_per_rank = trace.num_experts / placement.ep_size
    for boundary in np.arange(1, placement.ep_size) * experts_per_rank - 0.5:
        width = 0.9 if round(boundary + 0.5) % (experts_per_rank * placement.gpus_per_node) == 0 else 0.3
        right.axhline(boundary, color="white", linewidth=width)
        right.axvline(boundary, color="white", linewidth=width)
    right.set_title("Co-activation, experts in placement order (log scale)")
    right.set_xlabel("expert (slot order)")
    right.set_ylabel("expert (slot order)")
    figure.suptitle(f"{title}: {placement.num_experts} experts x {placement.num_layers} layers on "
                    f"{placement.ep_size} ranks ({placement.gpus_per_node} per node)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
