"""The folded parallel mesh: degrees, validation, and rank groups in pure Python.

Attention layers use TP x CP x DP x PP and MoE layers use ETP x EP x EDP x PP on the same ranks
(PP is shared). ``FoldingSpec`` owns every degree, derives the ones left out (DP, EDP, ETP,
world size) where they are unique, checks the rules Megatron-Core and the model impose, and
computes every rank group Megatron builds for these degrees, rank for rank and in Megatron's
order, without torch.distributed. Creating the groups for real lives in
``folding.megatron.groups``.

Rank layout, as in Megatron: the order string lists the dimensions from fastest to slowest, so
with "tp-cp-ep-dp-pp" rank = tp + TP*(cp + CP*(dp + DP*pp)) in the attention mesh and
rank = etp + ETP*(ep + EP*(edp + EDP*pp)) in the MoE mesh (CP is 1 and EP stands where
attention has 1).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from folding.errors import FoldingError, InvalidFolding

DIMENSIONS = ("tp", "cp", "ep", "dp", "pp")
DEFAULT_ORDER = "tp-cp-ep-dp-pp"
CP_COMM_TYPES = ("p2p", "all_gather", "a2a")

# Group kinds and the Megatron order tokens that span them.
ATTENTION_GROUPS: Dict[str, Sequence[str]] = {
    "tp": ("tp",),
    "cp": ("cp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "tp_cp": ("tp", "cp"),
    "dp_cp": ("dp", "cp"),
}
MOE_GROUPS: Dict[str, Sequence[str]] = {
    "etp": ("tp",),
    "ep": ("ep",),
    "edp": ("dp",),
    "etp_ep": ("tp", "ep"),
}

# What each kind of group communicates, for the layout report.
COLLECTIVES = {
    ("attention", "tp"): "the TP all-gather/reduce-scatter",
    ("attention", "cp"): "the context-parallel attention exchange",
    ("attention", "dp"): "the gradient all-reduce",
    ("attention", "pp"): "the pipeline send/recv",
    ("attention", "tp_cp"): "the TP x CP collective",
    ("attention", "dp_cp"): "the dense gradient reduction",
    ("moe", "etp"): "the expert TP all-gather/reduce-scatter",
    ("moe", "ep"): "the all-to-all",
    ("moe", "edp"): "the expert gradient all-reduce",
    ("moe", "etp_ep"): "the token dispatch",
}


def parse_order(order: str) -> List[str]:
    """Split a Megatron order string; raises FoldingError on an unknown or repeated token."""
    tokens = [t for t in order.lower().split("-")]
    unknown = [t for t in tokens if t not in DIMENSIONS]
    if unknown or not order:
        raise FoldingError(
            f"order {order!r}: unknown dimension {unknown[0] if unknown else ''!r}; "
            f"use a '-'-separated permutation of {', '.join(DIMENSIONS)}"
        )
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise FoldingError(f"order {order!r}: dimension {repeated[0]!r} appears more than once")
    return tokens


def grid_groups(sizes: Dict[str, int], order: Sequence[str], span: Sequence[str]) -> List[List[int]]:
    """Rank groups that vary along the ``span`` dimensions of a Megatron rank grid.

    ``order`` lists dimensions fastest first; dimensions of size 1 may be absent from it.
    Groups are enumerated with the first non-spanned dimension fastest, and ranks inside a group
    with the first spanned dimension fastest, which is the order Megatron's RankGenerator uses.
    """
    full_order = list(order) + [d for d in DIMENSIONS if d not in order]
    shape = [sizes[d] for d in full_order]
    world = int(np.prod(shape))
    # grid[i_0, i_1, ...] = rank, with i_0 the fastest-varying dimension.
    grid = np.arange(world).reshape(shape[::-1]).transpose(*range(len(shape) - 1, -1, -1))
    spanned = [i for i, d in enumerate(full_order) if d in span]
    others = [i for i, d in enumerate(full_order) if d not in span]
    # Row-major flattening makes the last axis fastest: list the slowest dimensions first.
    moved = grid.transpose(others[::-1] + spanned[::-1])
    group_size = int(np.prod([shape[i] for i in spanned])) if spanned else 1
    return moved.reshape(-1, group_size).tolist()


@dataclass(frozen=True)
class FoldingSpec:
    """Parallel degrees of a folded layout, and the optional model facts they are checked against.

    Leave DP, EDP, ETP or world_size out to have them derived; the result is fully resolved and
    validated on construction (``InvalidFolding`` lists every violated rule).
    """

    world_size: Optional[int] = None
    """Total number of ranks; derived from the attention degrees when DP is given."""
    tp: int = 1
    """Tensor parallel size of attention (and dense MLP) layers."""
    cp: int = 1
    """Context parallel size of attention layers."""
    dp: Optional[int] = None
    """Data parallel size of attention layers; derived as world / (TP*CP*PP)."""
    pp: int = 1
    """Pipeline parallel size, shared by both meshes."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved schedule); None or 1 means no interleaving."""
    etp: Optional[int] = None
    """Tensor parallel size inside each expert; defaults to TP, as in Megatron."""
    ep: int = 1
    """Expert parallel size: the number of ranks the experts of one layer are spread over."""
    edp: Optional[int] = None
    """Expert data parallel size; derived as world / (ETP*EP*PP)."""
    order: str = DEFAULT_ORDER
    """Megatron rank order, fastest dimension first."""
    gpus_per_node: int = 8
    """Ranks per node: rank r lives on node r // gpus_per_node."""
    num_experts: Optional[int] = None
    """Experts per MoE layer, when a model is given."""
    num_layers: Optional[int] = None
    """Transformer layers, when a model is given."""
    num_attention_heads: Optional[int] = None
    """Attention heads, when a model is given."""
    num_query_groups: Optional[int] = None
    """Key/value heads (GQA groups), when a model is given."""
    sequence_parallel: Optional[bool] = None
    """Megatron's sequence parallelism; defaults to on when TP > 1."""
    cp_comm_type: str = "p2p"
    """How context-parallel attention exchanges keys and values (Megatron's ``cp_comm_type``):
    p2p (a ring of K/V blocks), all_gather (K/V gathered over CP) or a2a (Ulysses: heads
    scattered, sequence gathered)."""

    def __post_init__(self) -> None:
        violations = self._resolve()
        violations += self._check_rules()
        if violations:
            raise InvalidFolding(violations)

    # ----------------------------------------------------------------------------- derivation
    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    def _resolve(self) -> List[str]:
        """Fill in the derived degrees; return the violations that prevent it."""
        degrees = {"tp": self.tp, "cp": self.cp, "pp": self.pp, "ep": self.ep,
                   "dp": self.dp, "edp": self.edp, "etp": self.etp, "vpp": self.vpp,
                   "world_size": self.world_size, "gpus_per_node": self.gpus_per_node}
        bad = [f"{k.upper() if k not in ('world_size', 'gpus_per_node') else k}={v} must be a "
               f"positive integer" for k, v in degrees.items()
               if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1)]
        if bad:
            return bad
        if self.vpp == 1:
            self._set("vpp", None)
        if self.etp is None:
            self._set("etp", self.tp)
        if self.sequence_parallel is None:
            self._set("sequence_parallel", self.tp > 1)
        world = self.world_size
        if world is None:
            if self.dp is not None:
                world = self.tp * self.cp * self.dp * self.pp
            elif self.edp is not None:
                world = self.etp * self.ep * self.edp * self.pp
            else:
                return ["world_size is missing: give the world size or DP"]
            self._set("world_size", world)
        problems = []
        if self.dp is None:
            model = self.tp * self.cp * self.pp
            if world % model:
                problems.append(f"TP*CP*PP = world_size: world_size={world} is not divisible by "
                                f"TP={self.tp} x CP={self.cp} x PP={self.pp} = {model}")
            else:
                self._set("dp", world // model)
        if self.edp is None:
            expert = self.etp * self.ep * self.pp
            if world % expert:
                problems.append(f"ETP*EP*EDP*PP = world_size: world_size={world} is not divisible by "
                                f"ETP={self.etp} x EP={self.ep} x PP={self.pp} = {expert}")
            else:
                self._set("edp", world // expert)
        return problems

    def _check_rules(self) -> List[str]:
        """Every rule, one message per violated rule."""
        v: List[str] = []
        world = self.world_size
        if self.dp is not None and self.tp * self.cp * self.dp * self.pp != world:
            v.append(f"TP*CP*DP*PP = world_size: TP={self.tp} x CP={self.cp} x DP={self.dp} x "
                     f"PP={self.pp} = {self.tp * self.cp * self.dp * self.pp} != world_size={world}")
        if self.edp is not None and self.etp * self.ep * self.edp * self.pp != world:
            v.append(f"ETP*EP*EDP*PP = world_size: ETP={self.etp} x EP={self.ep} x EDP={self.edp} x "
                     f"PP={self.pp} = {self.etp * self.ep * self.edp * self.pp} != world_size={world}")
        if self.num_experts is not None:
            if self.ep > self.num_experts or self.num_experts % self.ep:
                v.append(f"EP={self.ep} does not divide num_experts={self.num_experts}")
        if self.num_attention_heads is not None and self.num_attention_heads % self.tp:
            v.append(f"TP={self.tp} does not divide num_attention_heads={self.num_attention_heads}")
        if self.num_query_groups is not None and self.num_query_groups % self.tp:
            v.append(f"TP={self.tp} does not divide num_query_groups={self.num_query_groups}")
        if self.sequence_parallel and self.tp == 1:
            v.append("sequence parallel needs TP>1 (TP=1)")
        if not self.sequence_parallel and self.tp > 1 and (self.ep > 1 or self.num_experts):
            v.append(f"sequence parallel is required with TP>1 in MoE layers (TP={self.tp}, "
                     f"EP={self.ep}): Megatron's MoELayer refuses to train without it")
        if self.vpp is not None and self.pp == 1:
            v.append(f"VPP={self.vpp} needs PP>1 (PP=1)")
        v += self._check_context_parallel()
        if self.num_layers is not None:
            stages = self.pp * (self.vpp or 1)
            if self.num_layers % stages:
                what = f"PP={self.pp} x VPP={self.vpp} = {stages}" if self.vpp else f"PP={self.pp}"
                v.append(f"num_layers={self.num_layers} is not divisible by {what}")
        # Comparing PP groups only means something once both meshes tile the world.
        v += self._check_order(compare_pp_groups=not v and None not in (self.dp, self.edp))
        return v

    def _check_context_parallel(self) -> List[str]:
        if self.cp_comm_type not in CP_COMM_TYPES:
            return [f"unknown cp comm type {self.cp_comm_type!r}; known: {', '.join(CP_COMM_TYPES)}"]
        if self.cp_comm_type != "a2a" or self.cp == 1:
            return []
        # Ulysses scatters each TP rank's heads and key/value groups over the CP ranks.
        v = []
        for what, count in (("num_attention_heads", self.num_attention_heads),
                            ("num_query_groups", self.num_query_groups)):
            if count is not None and count % self.tp == 0 and (count // self.tp) % self.cp:
                v.append(f"cp comm type a2a needs {what} per TP rank divisible by CP: "
                         f"{what}={count} / TP={self.tp} = {count // self.tp} is not divisible "
                         f"by CP={self.cp}")
        return v

    def _check_order(self, compare_pp_groups: bool) -> List[str]:
        try:
            tokens = parse_order(self.order)
        except FoldingError as e:
            return [str(e)]
        missing = [d for d in DIMENSIONS
                   if d not in tokens and max(self._attention_sizes()[d], self._moe_sizes()[d]) > 1]
        if missing:
            return [f"order {self.order!r} leaves out {missing[0]!r}, whose size is above 1"]
        if not compare_pp_groups:
            return []
        if tokens[-1] != "pp" and self.pp > 1 and self.dp != self.edp:
            return [f"order {self.order!r} does not end with pp, so Megatron needs DP == EDP "
                    f"(DP={self.dp}, EDP={self.edp})"]
        attention_pp, moe_pp = self._groups("attention", ("pp",)), self._groups("moe", ("pp",))
        if attention_pp != moe_pp:
            return [f"order {self.order!r}: PP groups of the attention and MoE meshes differ "
                    f"({attention_pp[0]} vs {moe_pp[0]}); put pp last"]
        return []

    # ----------------------------------------------------------------------------- rank groups
    def _attention_sizes(self) -> Dict[str, int]:
        return {"tp": self.tp, "cp": self.cp, "ep": 1, "dp": self.dp or 1, "pp": self.pp}

    def _moe_sizes(self) -> Dict[str, int]:
        return {"tp": self.etp, "cp": 1, "ep": self.ep, "dp": self.edp or 1, "pp": self.pp}

    def _groups(self, mesh: str, span: Sequence[str]) -> List[List[int]]:
        sizes = self._attention_sizes() if mesh == "attention" else self._moe_sizes()
        return grid_groups(sizes, parse_order(self.order), span)

    def rank_groups(self) -> Dict[str, Dict[str, List[List[int]]]]:
        """Every group Megatron builds for these degrees, keyed by mesh then kind."""
        return {
            "attention": {k: self._groups("attention", span) for k, span in ATTENTION_GROUPS.items()},
            "moe": {k: self._groups("moe", span) for k, span in MOE_GROUPS.items()},
        }

    def group_of(self, rank: int, mesh: str, kind: str) -> List[int]:
        """The group of ``kind`` in ``mesh`` ("attention" or "moe") that holds ``rank``."""
        span = (ATTENTION_GROUPS if mesh == "attention" else MOE_GROUPS)[kind]
        return next(g for g in self._groups(mesh, span) if rank in g)

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    @property
    def nodes(self) -> List[int]:
        return [self.node_of(r) for r in range(self.world_size)]

    @property
    def num_nodes(self) -> int:
        return math.ceil(self.world_size / self.gpus_per_node)

    def coordinates(self, rank: int) -> Dict[str, Dict[str, int]]:
        """Position of ``rank`` in each mesh: attention (tp, cp, dp, pp) and moe (etp, ep, edp, pp)."""
        tokens = parse_order(self.order)
        out = {}
        for mesh, sizes, names in (
            ("attention", self._attention_sizes(), {"tp": "tp", "cp": "cp", "dp": "dp", "pp": "pp"}),
            ("moe", self._moe_sizes(), {"tp": "etp", "ep": "ep", "dp": "edp", "pp": "pp"}),
        ):
            full = tokens + [d for d in DIMENSIONS if d not in tokens]
            index, coords = rank, {}
            for d in full:
                index, coords[d] = divmod(index, sizes[d])
            out[mesh] = {name: coords[d] for d, name in names.items()}
        return out

    # ----------------------------------------------------------------------------- summaries
    def degrees(self) -> Dict[str, object]:
        """The resolved degrees, as plain values (for JSON and recipes)."""
        keys = ("world_size", "tp", "cp", "dp", "pp", "vpp", "etp", "ep", "edp", "order",
                "gpus_per_node", "sequence_parallel", "cp_comm_type")
        return {k: getattr(self, k) for k in keys}

    def describe(self) -> str:
        """One line, e.g. 'TP2 CP1 DP4 PP1 | ETP1 EP4 EDP2'."""
        vpp = f" VPP{self.vpp}" if self.vpp else ""
        return (f"TP{self.tp} CP{self.cp} DP{self.dp} PP{self.pp}{vpp} | "
                f"ETP{self.etp} EP{self.ep} EDP{self.edp}")

    def is_folded(self) -> bool:
        """True when attention and MoE layers use different mappings of the same ranks."""
        groups = self.rank_groups()
        return groups["attention"]["tp"] != groups["moe"]["etp"] or self.ep > 1

    def with_degrees(self, **changes) -> "FoldingSpec":
        """A copy with some fields changed; derived fields are derived again."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.update(changes)
        return FoldingSpec(**fields)

    def layout_report(self) -> List["GroupSpan"]:
        """For each kind of group, how many nodes its widest group spans."""
        spans = []
        for mesh, kinds in self.rank_groups().items():
            for kind, groups in kinds.items():
                widest = max(len({self.node_of(r) for r in g}) for g in groups)
                spans.append(GroupSpan(mesh, kind, len(groups[0]), len(groups), widest,
                                       COLLECTIVES[(mesh, kind)]))
        return spans


@dataclass(frozen=True)
class GroupSpan:
    """How far the groups of one kind reach across nodes."""

    mesh: str
    kind: str
    size: int
    count: int
    max_nodes: int
    collective: str

    @property
    def message(self) -> str:
        label = self.kind.upper().replace("_", "x")
        if self.size == 1:
            return f"{label} groups have one rank: no communication"
        if self.max_nodes == 1:
            return f"{label} groups stay inside one node: {self.collective} stays on NVLink"
        return (f"{label} group spans {self.max_nodes} nodes: {self.collective} crosses the network")
