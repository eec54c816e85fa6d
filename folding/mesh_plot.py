"""Draw the attention and MoE meshes of a folding side by side, one colour per EP group."""

from __future__ import annotations

from folding.errors import FoldingError
from folding.mesh import FoldingSpec


def _mesh_cells(spec: FoldingSpec, mesh: str):
    """(rank, column, row) for every rank: columns are the data-parallel index, rows the
    model-parallel index (TP x CP, or ETP x EP), pipeline stages stacked side by side."""
    cells = []
    for rank in range(spec.world_size):
        c = spec.coordinates(rank)[mesh]
        if mesh == "attention":
            data, model, width = c["dp"], c["tp"] + spec.tp * c["cp"], spec.dp
        else:
            data, model, width = c["edp"], c["etp"] + spec.etp * c["ep"], spec.edp
        cells.append((rank, c["pp"] * (width + 1) + data, model))
    return cells


def draw_meshes(spec: FoldingSpec, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ep_groups = spec.rank_groups()["moe"]["ep"]
    ep_index = {r: i for i, g in enumerate(ep_groups) for r in g}
    cmap = plt.get_cmap("tab20" if len(ep_groups) > 10 else "tab10")
    panels = [("attention", f"Attention  TP{spec.tp} x CP{spec.cp} x DP{spec.dp} x PP{spec.pp}",
               "DP index (per PP stage)", "TP + TP*CP index"),
              ("moe", f"MoE  ETP{spec.etp} x EP{spec.ep} x EDP{spec.edp} x PP{spec.pp}",
               "EDP index (per PP stage)", "ETP + ETP*EP index")]
    if spec.world_size > 1024:
        raise FoldingError(f"--png draws at most 1024 ranks (world_size={spec.world_size})")
    layouts = {m: _mesh_cells(spec, m) for m, *_ in panels}
    extent = {m: (max(c for _, c, _ in cells) + 1, max(r for _, _, r in cells) + 1)
              for m, cells in layouts.items()}
    cols = max(c for c, _ in extent.values())
    rows = max(r for _, r in extent.values())
    scale = min(0.6, 14.0 / max(cols, 1))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 2 * cols * scale + 2), max(3, rows * scale + 1.5)))
    fontsize = max(4, min(10, 120 / max(cols, rows)))
    for ax, (mesh, title, xlabel, ylabel) in zip(axes, panels):
        for rank, col, row in layouts[mesh]:
            colour = cmap(ep_index[rank] % cmap.N)
            ax.add_patch(Rectangle((col, row), 0.95, 0.95, facecolor=colour, edgecolor="black",
                                   linewidth=0.4))
            ax.text(col + 0.475, row + 0.475, f"{rank}\nn{spec.node_of(rank)}", ha="center",
                    va="center", fontsize=fontsize)
        ax.set_xlim(0, extent[mesh][0])
        ax.set_ylim(extent[mesh][1], 0)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{spec.describe()}   colour = EP group, label = rank / node", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
